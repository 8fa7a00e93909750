//! Fuzzes `Retry-After` parsing (seconds or an HTTP date, from any provider or proxy): never
//! a panic, never a wait beyond the 24-hour cap.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let text = String::from_utf8_lossy(data);
    for at in [now, UNIX_EPOCH, SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX.into())] {
        if let Some(wait) = tokenkeeper::oauth::parse_retry_after(&text, at) {
            assert!(wait <= Duration::from_secs(24 * 3600), "{wait:?}");
        }
    }
});
