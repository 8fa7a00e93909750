//! Checks for files that hold tokens outside a network store: the SQLite database and its
//! `-wal`/`-shm` files, and the unsaved-tokens directory. Both must belong to the user the
//! process writes as, be closed to other users, and sit where no other user can swap them
//! (review N10). The user is learned from a file the process creates (no `unsafe`
//! `geteuid`): that is also the right answer where the file system maps users (NFS
//! squashing, user namespaces).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The user id files created in `dir` by this process belong to: read from a probe file
/// created there (owner-only) and removed at once.
///
/// # Errors
///
/// The directory cannot be written, or the probe read back.
#[cfg(unix)]
pub fn creator_uid(dir: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    // The name is hard to guess (a name another user created first in a shared directory
    // would only make `create_new` fail: then another name is tried).
    let mut last = None;
    for _ in 0..8 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let probe = dir.join(format!(
            ".tokenkeeper-probe-{}-{}-{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
        {
            Ok(file) => {
                let uid = file.metadata().map(|m| m.uid());
                drop(file);
                let _ = std::fs::remove_file(&probe);
                return uid;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no probe name was free")))
}

/// Why `dir` lets other users replace what it holds, if it does: it belongs to another user
/// than `me` or root (its owner can rename anything in it), or group or others may write it
/// and it is not sticky (in a sticky directory, such as `/tmp`, only a file's owner may rename
/// or remove it).
///
/// # Errors
///
/// The directory's metadata cannot be read.
#[cfg(unix)]
pub fn replaceable_by_others(dir: &Path, me: u32) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir)?;
    if meta.uid() != me && meta.uid() != 0 {
        return Ok(Some(format!(
            "it belongs to uid {}, who can rename or replace the files in it; use a directory of this user (uid {me}) or root",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode();
    let sticky = mode & 0o1000 != 0;
    Ok((mode & 0o022 != 0 && !sticky).then(|| {
        format!(
            "its mode {:o} lets other users rename or replace the files in it; use a directory only this user may write (chmod go-w), or a sticky one",
            mode & 0o7777
        )
    }))
}

/// Why the file at `path` is not this user's alone, if it is not: a symbolic link (it could
/// point anywhere), owned by another user than `me`, or open to its group or others (with
/// the mode, when `mode_too`). `Ok(None)` also when there is no such file.
///
/// # Errors
///
/// The file's metadata cannot be read for another reason than its absence.
#[cfg(unix)]
pub fn not_private(path: &Path, me: u32, mode_too: bool) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Ok(Some(
            "it is a symbolic link; point the store at the real file".into(),
        ));
    }
    if meta.uid() != me {
        return Ok(Some(format!(
            "it belongs to uid {}, not to the user this process writes as (uid {me}), so that user could read every token; chown it or use a new path",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    Ok((mode_too && mode & 0o077 != 0).then(|| {
        format!("its mode is {mode:o}, so its group or others may read the tokens; chmod 600 it")
    }))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tk-private-files-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_creator_is_who_owns_what_we_create() {
        use std::os::unix::fs::MetadataExt;
        let d = dir("creator");
        let me = creator_uid(&d).unwrap();
        let f = d.join("f");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), me);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "the probe is gone"
        );
    }

    #[test]
    fn shared_directories_unless_sticky() {
        let d = dir("shared");
        let me = creator_uid(&d).unwrap();
        let set = |mode| std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode));
        set(0o755).unwrap();
        assert!(replaceable_by_others(&d, me).unwrap().is_none());
        set(0o775).unwrap();
        assert!(replaceable_by_others(&d, me).unwrap().is_some());
        set(0o777).unwrap();
        assert!(
            replaceable_by_others(&d, me)
                .unwrap()
                .unwrap()
                .contains("777")
        );
        set(0o1777).unwrap();
        assert!(replaceable_by_others(&d, me).unwrap().is_none());
        set(0o755).unwrap();
        if me != 0 {
            // Another user's directory (here: as seen by a process of another uid).
            assert!(
                replaceable_by_others(&d, me + 1)
                    .unwrap()
                    .unwrap()
                    .contains("belongs to uid")
            );
        } else {
            // Root's directories are trusted (root can do anything anyway); another
            // user's are not.
            std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
            assert!(
                replaceable_by_others(&d, 0)
                    .unwrap()
                    .unwrap()
                    .contains("65534")
            );
        }
    }

    #[test]
    fn links_strangers_and_open_modes() {
        let d = dir("files");
        let me = creator_uid(&d).unwrap();
        let f = d.join("db");
        assert!(not_private(&f, me, true).unwrap().is_none(), "absent");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(not_private(&f, me, true).unwrap().is_none());
        assert!(
            not_private(&f, me.wrapping_add(1), true)
                .unwrap()
                .unwrap()
                .contains("belongs to uid")
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(not_private(&f, me, true).unwrap().unwrap().contains("644"));
        assert!(not_private(&f, me, false).unwrap().is_none());
        let link = d.join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(
            not_private(&link, me, false)
                .unwrap()
                .unwrap()
                .contains("symbolic link")
        );
    }
}
