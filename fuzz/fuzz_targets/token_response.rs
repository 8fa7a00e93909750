//! Fuzzes token endpoint reply parsing: any status and body must give a token set or a typed
//! error, never a panic, and a parsed reply never loses the previous refresh token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper::{oauth::Operation, oauth::RawResponse, core::Timestamp, oauth::parse_token_response, profiles};

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data.split_first() {
        Some((s, rest)) => (200 + u16::from(*s) * 2, rest),
        None => (200, data),
    };
    let profile = profiles::bitbucket();
    let t0 = Timestamp::from_unix_secs(1_700_000_000);
    let previous = tokenkeeper::core::TokenSet::bearer(
        tokenkeeper::AccessToken::new("a0"),
        Some(tokenkeeper::core::RefreshToken::new("r0")),
        t0,
        t0,
    );
    let raw = RawResponse { status, retry_after: None, body: body.to_vec() };
    if let Ok(t) = parse_token_response(&profile, Operation::Refresh, &raw, t0, Some(&previous)) {
        assert!(t.refresh_token.is_some());
        assert!(t.expires_at >= t0);
    }
});
