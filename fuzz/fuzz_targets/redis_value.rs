//! Fuzzes the Redis backend's stored-value decoder (header line + record): any bytes decode
//! to a record that keeps every invariant, or give a typed error naming the installation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper_core::{InstallationId, StoreError};

fuzz_target!(|data: &[u8]| {
    let id = InstallationId::new("fuzz").expect("valid id");
    match tokenkeeper_redis::__fuzz_decode(&id, data) {
        Ok(record) => {
            assert_eq!(record.check_invariants(), Ok(()));
            let again = tokenkeeper_redis::__fuzz_decode(&id, &tokenkeeper_redis::__fuzz_encode(&record))
                .expect("re-encoding decodes");
            assert_eq!(again, record);
        }
        Err(StoreError::Corrupt { id: got, .. }) => assert_eq!(got, id),
        Err(other) => panic!("a stored value gave an error that is not Corrupt: {other}"),
    }
});
