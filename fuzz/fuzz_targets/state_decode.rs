//! Fuzzes the authorization `state` parser, the one parser fed straight from the internet (the
//! callback's query): arbitrary text, and arbitrary bodies signed with a fixed key so the
//! parser past the MAC check is reached. Whatever decodes must re-encode to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tokenkeeper::__fuzz::state(data);
});
