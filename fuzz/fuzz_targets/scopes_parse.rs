//! Fuzzes `Scopes::parse` (a provider's `scope` field): no empty scope, sorted and unique, and
//! the wire form it prints parses back to the same scopes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper_core::Scopes;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let scopes = Scopes::parse(&text);
    let names: Vec<&str> = scopes.iter().collect();
    assert!(names.iter().all(|s| !s.is_empty() && !s.contains([' ', ','])));
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    assert_eq!(Scopes::parse(&scopes.to_string()), scopes, "the wire form round-trips");
    assert!(names.iter().all(|s| scopes.contains(s)));
});
