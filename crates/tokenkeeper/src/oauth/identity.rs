//! Which provider account a grant belongs to, read the way the profile's
//! [`IdentityCheck`] says: the provider's user endpoint, or the `sub` of the ID token.
//!
//! The manager compares it with the account an installation was authorized with, so that a
//! re-authorization approved with another account (a hijacked or mixed-up flow) cannot bind an
//! existing installation to that account. Failures are plain descriptions for
//! `AuthorizationError::Identity`: never a token, never the reply body.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::time::Duration;

use reqwest::header::ACCEPT;
use tokenkeeper_core::{IdToken, Timestamp};

use crate::oauth::client::{CodeGrant, OAuthClient};
use crate::oauth::profile::IdentityCheck;

/// Longest account id kept (provider ids are far shorter; anything longer is not an id).
const MAX_ACCOUNT_LEN: usize = 256;

impl OAuthClient {
    /// The provider account of a just-exchanged grant, or `None` when the profile's check is
    /// disabled.
    pub(crate) async fn account_of(&self, grant: &CodeGrant) -> Result<Option<String>, String> {
        match &self.consumer().profile().identity {
            IdentityCheck::Disabled | IdentityCheck::Unset => Ok(None),
            IdentityCheck::IdTokenSubject => {
                let token = grant.id_token.as_ref().ok_or(
                    "the provider sent no ID token (request the openid scope, or choose another IdentityCheck)",
                )?;
                let profile = self.consumer().profile();
                let expected = Expected {
                    client_id: self.consumer().client_id(),
                    issuer: profile.issuer.as_deref(),
                    now: self.clock().now(),
                    leeway: profile.timing.skew,
                };
                id_token_subject(token, &expected).map(Some)
            }
            IdentityCheck::Endpoint { url, pointer } => {
                let consumer = self.consumer();
                let response = self
                    .http()
                    .get(url.clone())
                    .bearer_auth(grant.tokens.access_token.secret())
                    .header(ACCEPT, "application/json")
                    .timeout(consumer.http_timeout())
                    .send()
                    .await
                    .map_err(|e| format!("the identity endpoint failed: {}", e.without_url()))?;
                let status = response.status();
                if matches!(status.as_u16(), 401 | 403) {
                    return Err(format!(
                        "the identity endpoint {url} refused the new access token (HTTP {status}): does the consumer request the scope it needs (ProviderProfile::required_scopes)?"
                    ));
                }
                if !status.is_success() {
                    return Err(format!("the identity endpoint answered HTTP {status}"));
                }
                let limit = consumer.max_response_bytes();
                if response.content_length().is_some_and(|l| l > limit as u64) {
                    return Err(format!(
                        "the identity endpoint's reply exceeds {limit} bytes"
                    ));
                }
                // Read chunk by chunk under the cap, as the token client does (review N4): a
                // reply without a length cannot make this process buffer more than the cap.
                let mut response = response;
                let mut body = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| format!("the identity endpoint failed: {}", e.without_url()))?
                {
                    if body.len() + chunk.len() > limit {
                        return Err(format!(
                            "the identity endpoint's reply exceeds {limit} bytes"
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                let json: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|_| "the identity endpoint's reply is not JSON".to_owned())?;
                account_at(&json, pointer).map(Some)
            }
        }
    }
}

/// What one authenticated call with an access token says of its grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The provider accepted the token.
    Accepted,
    /// The provider refused it (HTTP 401 or 403): the grant is revoked, or the token is.
    Refused(u16),
    /// No answer that says either (no identity endpoint in the profile, a timeout, another
    /// status).
    Unknown,
}

impl OAuthClient {
    /// Asks the profile's identity endpoint whether `access` still works: one harmless
    /// authenticated `GET`, its body not read. `Unknown` without such an endpoint.
    pub(crate) async fn probe(&self, access: &tokenkeeper_core::AccessToken) -> Probe {
        let IdentityCheck::Endpoint { url, .. } = &self.consumer().profile().identity else {
            return Probe::Unknown;
        };
        let sent = self
            .http()
            .get(url.clone())
            .bearer_auth(access.secret())
            .header(ACCEPT, "application/json")
            .timeout(self.consumer().http_timeout())
            .send()
            .await;
        match sent.map(|r| r.status().as_u16()) {
            Ok(status @ (401 | 403)) => Probe::Refused(status),
            Ok(status) if (200..300).contains(&status) => Probe::Accepted,
            _ => Probe::Unknown,
        }
    }
}

/// The account id at `pointer`: a non-empty string or an integer.
fn account_at(json: &serde_json::Value, pointer: &str) -> Result<String, String> {
    let id = match json.pointer(pointer) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => {
            return Err(format!(
                "the identity reply has no account id at {pointer:?}"
            ));
        }
    };
    if id.is_empty() || id.len() > MAX_ACCOUNT_LEN || id.chars().any(char::is_control) {
        return Err(format!(
            "the identity reply's account id at {pointer:?} is empty, too long or has control characters"
        ));
    }
    Ok(id)
}

/// What an ID token must say to be believed: who it was issued to, by whom, and until when.
struct Expected<'a> {
    client_id: &'a str,
    /// The profile's issuer, when it names one (`ProviderProfile::issuer`).
    issuer: Option<&'a str>,
    now: Timestamp,
    /// Allowed clock difference for `exp` (the profile's skew).
    leeway: Duration,
}

/// The `sub` claim of an ID token (a JWT: `header.payload.signature`), once its claims show it
/// was issued to this client by this issuer and has not expired (OpenID Connect Core 1.0
/// §3.1.3.7, items 2, 3 and 9). The signature is not checked: the token came straight from
/// the token endpoint over TLS, which §3.1.3.7 item 6 allows in place of it. `sub` is unique
/// per issuer only, so the issuer is checked whenever the profile names one.
///
/// - `iss` must equal the profile's issuer exactly (when it names one).
/// - `aud` (a string or an array of strings) must contain the client id; an `azp`, when
///   present, must be the client id (a token minted for another application of the same
///   project, which lists every application in `aud`, is refused).
/// - `exp` must be a number of seconds not past by more than the leeway.
fn id_token_subject(token: &IdToken, expected: &Expected<'_>) -> Result<String, String> {
    let payload = token
        .secret()
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .ok_or("the ID token is not a JWT")?;
    let json: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| "the ID token's payload is not JSON")?;
    if let Some(issuer) = expected.issuer
        && json.get("iss").and_then(|v| v.as_str()) != Some(issuer)
    {
        return Err(format!(
            "the ID token was not issued by {issuer} (its iss claim differs or is missing)"
        ));
    }
    check_audience(&json, expected.client_id)?;
    let exp = json
        .get("exp")
        .and_then(serde_json::Value::as_f64)
        .filter(|e| e.is_finite() && *e >= 0.0)
        .ok_or("the ID token has no numeric exp claim")?;
    let deadline = Timestamp::from_unix_secs(0)
        .saturating_add(Duration::from_secs_f64(exp.min(1e12)))
        .saturating_add(expected.leeway);
    if expected.now >= deadline {
        return Err(format!(
            "the ID token expired at {deadline} (exp plus the clock-skew leeway)"
        ));
    }
    account_at(&json, "/sub")
}

/// `aud` contains `client_id`; a present `azp` is `client_id`.
fn check_audience(json: &serde_json::Value, client_id: &str) -> Result<(), String> {
    let audiences: Vec<&str> = match json.get("aud") {
        Some(serde_json::Value::String(one)) => vec![one.as_str()],
        Some(serde_json::Value::Array(many)) => many.iter().filter_map(|v| v.as_str()).collect(),
        _ => return Err("the ID token has no aud claim".to_owned()),
    };
    if !audiences.contains(&client_id) {
        return Err("the ID token was not issued to this client (its aud claim does not contain the client id)".to_owned());
    }
    // Core 1.0 §3.1.3.7 item 5: a present azp names the party the token was issued to.
    let azp = json.get("azp").and_then(|v| v.as_str());
    if azp.is_some_and(|a| a != client_id) {
        return Err("the ID token was issued to another client of the same audience (its azp claim is not the client id)".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn account_ids_are_read_as_strings_or_integers_and_nothing_else() {
        let reply = json!({"uuid": "{a-b}", "id": 42, "f": 1.5, "e": "", "n": null});
        assert_eq!(account_at(&reply, "/uuid"), Ok("{a-b}".into()));
        assert_eq!(account_at(&reply, "/id"), Ok("42".into()));
        for bad in ["/f", "/e", "/n", "/missing"] {
            assert!(account_at(&reply, bad).is_err(), "{bad}");
        }
        assert!(account_at(&json!({"id": "a\nb"}), "/id").is_err());
        assert!(account_at(&json!({"id": "x".repeat(300)}), "/id").is_err());
    }

    const NOW: i64 = 1_800_000_000;

    fn expected(issuer: Option<&'static str>) -> Expected<'static> {
        Expected {
            client_id: "x",
            issuer,
            now: Timestamp::from_unix_secs(NOW),
            leeway: Duration::from_secs(60),
        }
    }

    fn token(claims: serde_json::Value) -> IdToken {
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        IdToken::new(format!("eyJhbGciOiJub25lIn0.{payload}."))
    }

    #[test]
    fn the_subject_comes_from_the_payload_of_an_id_token() {
        let good = json!({"sub": "user-7", "aud": "x", "exp": NOW + 10, "iss": "https://op"});
        assert_eq!(
            id_token_subject(&token(good.clone()), &expected(None)),
            Ok("user-7".into())
        );
        assert_eq!(
            id_token_subject(&token(good), &expected(Some("https://op"))),
            Ok("user-7".into())
        );
        for bad in ["", "a.b.c", "a", "a.e30."] {
            assert!(
                id_token_subject(&IdToken::new(bad), &expected(None)).is_err(),
                "{bad}"
            );
        }
    }

    /// Review N4: OpenID Connect Core 1.0 §3.1.3.7 items 2, 3 and 9.
    #[test]
    fn an_id_token_for_another_client_issuer_or_time_is_refused() {
        let refused = [
            (
                json!({"sub": "u", "aud": "y", "exp": NOW + 10}),
                None,
                "aud",
            ),
            (json!({"sub": "u", "exp": NOW + 10}), None, "aud"),
            (json!({"sub": "u", "aud": 7, "exp": NOW + 10}), None, "aud"),
            (
                json!({"sub": "u", "aud": ["y", "z"], "exp": NOW + 10}),
                None,
                "aud",
            ),
            (
                json!({"sub": "u", "aud": ["x", "y"], "azp": "y", "exp": NOW + 10}),
                None,
                "azp",
            ),
            (
                json!({"sub": "u", "aud": "x", "azp": "y", "exp": NOW + 10}),
                None,
                "azp",
            ),
            (json!({"sub": "u", "aud": "x"}), None, "exp"),
            (json!({"sub": "u", "aud": "x", "exp": "soon"}), None, "exp"),
            (
                json!({"sub": "u", "aud": "x", "exp": NOW - 61}),
                None,
                "expired",
            ),
            (
                json!({"sub": "u", "aud": "x", "exp": NOW + 10, "iss": "https://evil"}),
                Some("https://op"),
                "https://op",
            ),
            (
                json!({"sub": "u", "aud": "x", "exp": NOW + 10}),
                Some("https://op"),
                "iss",
            ),
        ];
        for (claims, issuer, says) in refused {
            let err = id_token_subject(&token(claims.clone()), &expected(issuer))
                .expect_err(&claims.to_string());
            assert!(err.contains(says), "{claims}: {err}");
        }
        let accepted = [
            json!({"sub": "u", "aud": ["y", "x"], "exp": NOW + 10}),
            json!({"sub": "u", "aud": ["y", "x"], "azp": "x", "exp": NOW + 10}),
            json!({"sub": "u", "aud": "x", "azp": "x", "exp": NOW - 59}),
            json!({"sub": "u", "aud": "x", "exp": 1.8e9 + 10.5}),
        ];
        for claims in accepted {
            assert!(
                id_token_subject(&token(claims.clone()), &expected(None)).is_ok(),
                "{claims}"
            );
        }
    }
}
