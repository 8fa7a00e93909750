//! The proptest version of the `token_response` fuzz target (which runs under cargo-fuzz):
//! any status and body, and mutations of real replies, give a token set or a typed error,
//! never a panic, and never lose the previous refresh token.

use proptest::prelude::*;
use tokenkeeper::{
    AccessToken, core::RefreshToken, core::Timestamp, core::TokenSet, oauth::Operation,
    oauth::RawResponse, oauth::parse_token_response, profiles,
};

const REAL: &[u8] = br#"{"access_token":"acc","scopes":"repository account","expires_in":7200,"token_type":"bearer","state":"refresh_token","refresh_token":"ref"}"#;

fn check(status: u16, body: Vec<u8>) {
    let t0 = Timestamp::from_unix_secs(1_700_000_000);
    let previous = TokenSet::bearer(
        AccessToken::new("a0"),
        Some(RefreshToken::new("r0")),
        t0,
        t0,
    );
    let raw = RawResponse {
        status,
        retry_after: None,
        body,
    };
    for profile in [
        profiles::bitbucket(),
        profiles::github_app(),
        profiles::atlassian_3lo(),
    ] {
        match parse_token_response(&profile, Operation::Refresh, &raw, t0, Some(&previous)) {
            Ok(t) => {
                assert!(t.refresh_token.is_some());
                assert!(t.expires_at >= t0);
            }
            Err(e) => assert!(!e.to_string().contains("r0")),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn arbitrary_replies_never_panic(status in 100u16..600, body in prop::collection::vec(any::<u8>(), 0..256)) {
        check(status, body);
    }

    #[test]
    fn mutated_real_replies_never_panic(
        status in prop::sample::select(vec![200u16, 400, 401, 403, 429, 500]),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6),
    ) {
        let mut body = REAL.to_vec();
        for (at, byte, insert) in edits {
            let i = at.index(body.len());
            if insert { body.insert(i, byte) } else { body[i] = byte }
        }
        check(status, body);
    }
}
