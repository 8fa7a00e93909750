//! Which provider account a grant belongs to, read the way the profile's
//! [`IdentityCheck`] says: the provider's user endpoint, or the `sub` of the ID token.
//!
//! The manager compares it with the account an installation was authorized with, so that a
//! re-authorization approved with another account (a hijacked or mixed-up flow) cannot bind an
//! existing installation to that account. Failures are plain descriptions for
//! `AuthorizationError::Identity`: never a token, never the reply body.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::header::ACCEPT;
use tokenkeeper_core::IdToken;

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
                id_token_subject(token).map(Some)
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
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| format!("the identity endpoint failed: {}", e.without_url()))?;
                if body.len() > limit {
                    return Err(format!(
                        "the identity endpoint's reply exceeds {limit} bytes"
                    ));
                }
                let json: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|_| "the identity endpoint's reply is not JSON".to_owned())?;
                account_at(&json, pointer).map(Some)
            }
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

/// The `sub` claim of an ID token (a JWT: `header.payload.signature`).
fn id_token_subject(token: &IdToken) -> Result<String, String> {
    let payload = token
        .secret()
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .ok_or("the ID token is not a JWT")?;
    let json: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| "the ID token's payload is not JSON")?;
    account_at(&json, "/sub")
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

    #[test]
    fn the_subject_comes_from_the_payload_of_an_id_token() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"user-7","aud":"x"}"#);
        let token = IdToken::new(format!("eyJhbGciOiJub25lIn0.{payload}."));
        assert_eq!(id_token_subject(&token), Ok("user-7".into()));
        for bad in ["", "a.b.c", "a", "a.e30."] {
            assert!(id_token_subject(&IdToken::new(bad)).is_err(), "{bad}");
        }
    }
}
