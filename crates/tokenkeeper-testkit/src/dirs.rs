//! Fresh directories for tests that need real files (SQLite databases, keys, logs).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

static N: AtomicU32 = AtomicU32::new(0);

/// A process-unique suffix: pid, a counter, and the time in nanoseconds.
pub fn unique_suffix() -> String {
    format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

/// A fresh, empty directory for one test, under the system temp dir.
pub fn fresh_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tokenkeeper-test-{tag}-{}", unique_suffix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the temp dir is writable");
    dir
}

/// A fresh database path inside a fresh directory.
pub fn fresh_db(tag: &str) -> PathBuf {
    fresh_dir(tag).join("tokens.db")
}
