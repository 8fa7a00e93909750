//! Fuzzes opening sealed values: any stored text must open or give a typed error, never a
//! panic; and any plaintext sealed for one installation and role opens to itself there only.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper_core::InstallationId;
use tokenkeeper_core::sealed::{Keyring, SealError};

fuzz_target!(|data: &[u8]| {
    let keyring = Keyring::new("k1", &std::array::from_fn::<u8, 32, _>(|i| (i as u8).wrapping_mul(37) ^ 0x5a))
        .and_then(|k| k.with_previous("k0", &std::array::from_fn::<u8, 32, _>(|i| (i as u8).wrapping_mul(53) ^ 0x3c)))
        .expect("valid keys");
    let id = InstallationId::new("fuzz").expect("valid id");
    let text = String::from_utf8_lossy(data);
    match keyring.open(&id, "access", &text) {
        Ok(_) | Err(SealError::Plaintext { .. }) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let sealed = keyring.seal(&id, "access", &text).expect("sealing works");
    assert_eq!(keyring.open(&id, "access", &sealed).as_deref(), Ok(&*text));
    assert!(keyring.open(&id, "refresh", &sealed).is_err(), "the role is bound");
    let other = InstallationId::new("other").expect("valid id");
    assert!(keyring.open(&other, "access", &sealed).is_err(), "the installation is bound");
});
