//! The proptest version of the `record_decode` fuzz target (which runs under cargo-fuzz):
//! arbitrary bytes and mutations of valid encodings never panic the decoder, and whatever
//! decodes keeps every invariant.

use std::time::Duration;

use proptest::prelude::*;
use tokenkeeper_core::*;

fn valid() -> Vec<u8> {
    let t0 = Timestamp::from_unix_secs(1_767_225_600);
    let id = InstallationId::new("fuzz").unwrap();
    let tokens = TokenSet::bearer(
        AccessToken::new("a"),
        Some(RefreshToken::new("r")),
        t0,
        t0.saturating_add(Duration::from_secs(7200)),
    );
    let r = Record::new(id, "c", tokens, t0, t0);
    let leased = r
        .apply(
            Event::LeaseAcquired {
                holder: LeaseHolder::new("h"),
                until: t0,
            },
            t0,
        )
        .unwrap();
    leased.encode()
}

fn check(bytes: &[u8]) {
    let id = InstallationId::new("fuzz").unwrap();
    if let Ok(record) = Record::decode(&id, bytes) {
        assert_eq!(record.check_invariants(), Ok(()));
        assert_eq!(Record::decode(&id, &record.encode()).unwrap(), record);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn mutated_records_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8),
    ) {
        let mut bytes = valid();
        for (at, byte, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, byte),
            }
        }
        check(&bytes);
    }
}
