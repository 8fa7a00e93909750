//! Fuzzes stored-record decoding: any bytes must decode to a record that keeps every
//! invariant, or give a typed error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper_core::{InstallationId, Record};

fuzz_target!(|data: &[u8]| {
    let id = InstallationId::new("fuzz").expect("valid id");
    if let Ok(record) = Record::decode(&id, data) {
        assert_eq!(record.id(), &id);
        assert_eq!(record.check_invariants(), Ok(()));
        let again = Record::decode(&id, &record.encode()).expect("re-encoding decodes");
        assert_eq!(again, record);
    }
});
