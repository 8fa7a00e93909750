//! Parsing token endpoint replies, leniently where a live token is at stake and strictly where
//! nothing usable came back.
//!
//! Accepted variations: `scope` or `scopes` (space or comma separated, or a JSON array),
//! `bearer` in any case, `expires_in` as a number or a numeric string. A reply without
//! `refresh_token` or scopes keeps the previous ones (RFC 6749 §6). A 200 whose body carries
//! `error` is an error. `expires_in` counts from when the request was *sent*. An absent or
//! unparseable `expires_in` takes the profile's default lifetime; a negative one means
//! "already expired" and a huge one is capped at ten years, so a reply that rotated the refresh
//! token is never thrown away over its expiry field.

use std::time::Duration;

use serde_json::{Map, Value};
use tokenkeeper_core::{
    AccessToken, FailureClass, IdToken, RefreshToken, Scopes, Timestamp, TokenSet,
};

use crate::oauth::error::{OAuthError, Operation, ProviderWords};
use crate::oauth::profile::ProviderProfile;

/// The longest access token lifetime believed.
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Whether an access token can travel in an `Authorization: Bearer` header: visible ASCII
/// only (RFC 6750's `b64token` and then some; no space, no control character, no CR/LF that
/// would split the header).
fn sendable(access: &str) -> bool {
    access.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// A reply from the token endpoint, before interpretation. `Debug` shows the body's length,
/// never the body (it holds tokens).
#[derive(Clone)]
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, already converted to a duration.
    pub retry_after: Option<Duration>,
    /// The body (already size-capped).
    pub body: Vec<u8>,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("retry_after", &self.retry_after)
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn provider_error(
    profile: &ProviderProfile,
    operation: Operation,
    raw: &RawResponse,
    map: &Map<String, Value>,
) -> Option<OAuthError> {
    let code = str_field(map, "error")?;
    let description = str_field(map, "error_description");
    let class = if raw.status >= 500 || raw.status == 429 || raw.status == 408 {
        FailureClass::Transient
    } else {
        profile.errors.classify(raw.status, code, description)
    };
    // Control characters (ANSI escapes, CR/LF) would forge log lines and `explain` output;
    // invisible format characters (bidi overrides, zero-width) would disguise them.
    let clean = |s: &str, max| truncate(&s.replace(hidden_or_control, ""), max);
    let words = ProviderWords {
        error: Some(clean(code, 200)),
        description: description.map(|d| clean(d, 500)),
        error_uri: str_field(map, "error_uri").map(|u| clean(u, 500)),
    };
    Some(OAuthError::provider(
        operation,
        class,
        raw.status,
        words,
        raw.retry_after,
        None,
    ))
}

/// A control character, or an invisible format character that reorders or hides text
/// (Unicode `Cf`: bidi embeddings, overrides and isolates, zero-width spaces and joiners, the
/// word joiner, the byte order mark, the soft hyphen, the Arabic letter mark).
fn hidden_or_control(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn invalid(operation: Operation, raw: &RawResponse, why: &str) -> OAuthError {
    OAuthError::invalid_response(
        operation,
        FailureClass::Transient,
        Some(raw.status),
        raw.retry_after,
        why,
    )
}

fn expires_in(map: &Map<String, Value>) -> Option<Duration> {
    seconds(map, "expires_in")
}

/// A non-negative number of seconds (a number or a numeric string), capped at
/// `MAX_LIFETIME`; `None` when absent or unparseable.
fn seconds(map: &Map<String, Value>, field: &str) -> Option<Duration> {
    let secs: f64 = match map.get(field)? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    if !secs.is_finite() {
        return None;
    }
    Some(if secs <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64()))
    })
}

fn scopes(map: &Map<String, Value>) -> Option<Scopes> {
    match map.get("scope").or_else(|| map.get("scopes"))? {
        Value::String(s) => Some(Scopes::parse(s)),
        Value::Array(items) => Some(Scopes::new(items.iter().filter_map(Value::as_str))),
        _ => None,
    }
}

/// Interprets a token endpoint reply. `previous` (for refreshes) supplies the refresh token and
/// scopes a reply leaves out.
pub fn parse_token_response(
    profile: &ProviderProfile,
    operation: Operation,
    raw: &RawResponse,
    sent_at: Timestamp,
    previous: Option<&TokenSet>,
) -> Result<TokenSet, OAuthError> {
    let map = json_object(operation, raw)?;
    // A 2xx reply carrying a refresh token is a rotation that happened at the provider: the
    // new refresh token exists nowhere else, so no anomaly in the rest of the reply (an extra
    // `error`, an odd `token_type`, no usable access token) may throw it away.
    let rotated = (200..300).contains(&raw.status) && str_field(&map, "refresh_token").is_some();
    if let Some(e) = provider_error(profile, operation, raw, &map) {
        if !rotated {
            return Err(e);
        }
        // The class only: the provider's words are logged once its echoed secrets are scrubbed.
        tracing::warn!(class = %e.class(), "the provider's success reply carries an `error` next to a new refresh token; the tokens are kept");
    }
    if !(200..300).contains(&raw.status) {
        return Err(invalid(
            operation,
            raw,
            "an error reply without an `error` field",
        ));
    }
    let access = access_token(operation, raw, &map, rotated)?;
    let token_type = token_type(operation, raw, &map, rotated)?;
    let refresh = str_field(&map, "refresh_token").map(RefreshToken::new);
    // A token without `expires_in` and without any refresh token (none in the reply, none
    // held before) is permanent where the profile says so (GitHub OAuth apps).
    let permanent = profile.unstated_expiry_is_permanent
        && refresh.is_none()
        && previous.is_none_or(|p| p.refresh_token.is_none());
    let expires_at = match expires_in(&map) {
        _ if access.is_empty() => sent_at,
        // Believed as said, however short (zero or less: expired at birth). The minimum
        // interval between refreshes, not a longer belief, keeps such tokens from turning
        // every call into a refresh.
        Some(lifetime) => sent_at.saturating_add(lifetime),
        None if permanent => Timestamp::MAX,
        None => sent_at.saturating_add(profile.default_access_lifetime),
    };
    // Zero or less is no word on the refresh token's life (some servers send 0 for "none").
    let refresh_expires_at = refresh
        .as_ref()
        .and(seconds(&map, "refresh_token_expires_in"))
        .filter(|d| !d.is_zero())
        .map(|d| sent_at.saturating_add(d));
    let scopes = scopes(&map)
        .filter(|s| !s.is_empty())
        .or_else(|| previous.map(|p| p.scopes.clone()))
        .unwrap_or_default();
    let tokens = TokenSet {
        access_token: AccessToken::new(access),
        refresh_token: refresh,
        token_type: token_type.to_owned(),
        expires_at,
        scopes,
        obtained_at: sent_at,
        refresh_expires_at,
    };
    Ok(match previous {
        Some(p) => tokens.merged_onto(p),
        None => tokens,
    })
}

/// The reply's JSON object. A success that is not one is an invalid reply; an error page
/// that is not one (HTML from a proxy, plain text) is classed by its status alone.
fn json_object(operation: Operation, raw: &RawResponse) -> Result<Map<String, Value>, OAuthError> {
    let parsed: Result<Map<String, Value>, _> = serde_json::from_slice(&raw.body);
    match parsed {
        Ok(map) => Ok(map),
        Err(_) if (200..300).contains(&raw.status) => {
            Err(invalid(operation, raw, "the reply is not a JSON object"))
        }
        Err(_) => {
            let class = match raw.status {
                401 => FailureClass::ConsumerCredentialsInvalid,
                _ => FailureClass::Transient,
            };
            Err(OAuthError::provider(
                operation,
                class,
                raw.status,
                ProviderWords::default(),
                raw.retry_after,
                Some("the error reply is not JSON"),
            ))
        }
    }
}

/// The access token a bearer header can carry. A reply that rotated the refresh token keeps
/// it even without a usable access token (which then counts as expired: empty).
fn access_token<'m>(
    operation: Operation,
    raw: &RawResponse,
    map: &'m Map<String, Value>,
    rotated: bool,
) -> Result<&'m str, OAuthError> {
    match str_field(map, "access_token") {
        Some(access) if access.is_empty() || sendable(access) => Ok(access),
        Some(_) if rotated => {
            tracing::warn!(
                "the provider's reply rotated the refresh token but its access token holds characters no header can carry; the refresh token is kept and the access token counts as expired"
            );
            Ok("")
        }
        Some(_) => Err(invalid(
            operation,
            raw,
            "the access token holds characters a bearer header cannot carry (space, control characters or non-ASCII)",
        )),
        None if rotated => {
            tracing::warn!(
                "the provider's reply rotated the refresh token but carries no access token; the refresh token is kept and the access token counts as expired"
            );
            Ok("")
        }
        None => Err(invalid(operation, raw, "the reply has no access_token")),
    }
}

/// The token type, bearer unless said otherwise; another type is refused unless the reply
/// rotated the refresh token (then the tokens are kept).
fn token_type<'m>(
    operation: Operation,
    raw: &RawResponse,
    map: &'m Map<String, Value>,
    rotated: bool,
) -> Result<&'m str, OAuthError> {
    let token_type = str_field(map, "token_type").unwrap_or("bearer");
    if token_type.eq_ignore_ascii_case("bearer") {
        return Ok(token_type);
    }
    if !rotated {
        return Err(OAuthError::invalid_response(
            operation,
            FailureClass::Configuration,
            Some(raw.status),
            raw.retry_after,
            "the token type is not bearer",
        ));
    }
    tracing::warn!(
        token_type,
        "the provider's reply rotated the refresh token with a non-bearer token type; the tokens are kept"
    );
    Ok(token_type)
}

/// The OpenID Connect `id_token` of a successful code exchange reply, if it carries one.
pub(crate) fn id_token(raw: &RawResponse) -> Option<IdToken> {
    let map: Map<String, Value> = serde_json::from_slice(&raw.body).ok()?;
    str_field(&map, "id_token").map(IdToken::new)
}

/// Parses `Retry-After`: delay seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(24 * 3600)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(24 * 3600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles;

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status,
            retry_after: None,
            body: body.as_bytes().to_vec(),
        }
    }

    fn t0() -> Timestamp {
        Timestamp::from_unix_secs(1_000_000)
    }

    fn parse(status: u16, body: &str, previous: Option<&TokenSet>) -> Result<TokenSet, OAuthError> {
        parse_token_response(
            &profiles::bitbucket(),
            Operation::Refresh,
            &raw(status, body),
            t0(),
            previous,
        )
    }

    #[test]
    fn github_expiries_permanent_tokens_and_refresh_token_lifetimes() {
        let github = |body: &str, previous: Option<&TokenSet>| {
            parse_token_response(
                &profiles::github_app(),
                Operation::Refresh,
                &raw(200, body),
                t0(),
                previous,
            )
            .unwrap()
        };
        // No expiry and no refresh token: a permanent token (GitHub OAuth apps).
        let t = github(r#"{"access_token":"a","token_type":"bearer"}"#, None);
        assert!(!t.expires());
        assert_eq!(t.expires_at, Timestamp::MAX);
        // Elsewhere the profile's default lifetime applies.
        let t = parse(200, r#"{"access_token":"a"}"#, None).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(7200));
        // A refresh token with its own lifetime, as a number or a string.
        for v in ["15897600", "\"15897600\""] {
            let t = github(
                &format!(
                    r#"{{"access_token":"a","expires_in":28800,"refresh_token":"r","refresh_token_expires_in":{v}}}"#
                ),
                None,
            );
            assert!(t.expires());
            assert_eq!(
                t.refresh_expires_at,
                Some(t0().saturating_add(Duration::from_secs(15_897_600)))
            );
        }
        // Zero is no word on it.
        let t = github(
            r#"{"access_token":"a","expires_in":28800,"refresh_token":"r","refresh_token_expires_in":0}"#,
            None,
        );
        assert_eq!(t.refresh_expires_at, None);
        // A refresh reply without a refresh token keeps the previous one and its lifetime,
        // and is no permanent token.
        let previous = github(
            r#"{"access_token":"a","expires_in":28800,"refresh_token":"r","refresh_token_expires_in":100}"#,
            None,
        );
        let t = github(r#"{"access_token":"b"}"#, Some(&previous));
        assert!(t.expires());
        assert_eq!(t.refresh_token.as_ref().map(|r| r.secret()), Some("r"));
        assert_eq!(t.refresh_expires_at, previous.refresh_expires_at);
    }

    #[test]
    fn bitbucket_legacy_and_new_shapes() {
        let t = parse(200, r#"{"access_token":"a","scopes":"repository account","expires_in":7200,"token_type":"bearer","state":"authorization_code","refresh_token":"r"}"#, None).unwrap();
        assert_eq!(t.expires_at, t0().saturating_add(Duration::from_secs(7200)));
        assert_eq!(t.scopes.to_string(), "account repository");
        assert_eq!(t.refresh_token.unwrap().secret(), "r");
        let t = parse(
            200,
            r#"{"access_token":"a","scope":"account","expires_in":"3600","token_type":"Bearer"}"#,
            None,
        )
        .unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(3600));
        assert_eq!(t.scopes.to_string(), "account");
    }

    #[test]
    fn omitted_fields_keep_previous_or_take_defaults() {
        let prev = parse(
            200,
            r#"{"access_token":"a0","scope":"x y","refresh_token":"r0","expires_in":10}"#,
            None,
        )
        .unwrap();
        let t = parse(200, r#"{"access_token":"a1"}"#, Some(&prev)).unwrap();
        assert_eq!(t.refresh_token.as_ref().unwrap().secret(), "r0");
        assert_eq!(t.scopes.to_string(), "x y");
        assert_eq!(t.lifetime(), Duration::from_secs(7200), "profile default");
        assert_eq!(t.token_type, "bearer");
        // Short lifetimes are believed as said; zero or less is expired at birth.
        for (short, lifetime) in [("-5", 0), ("0", 0), ("1", 1), ("5", 5), ("59", 59)] {
            let body = format!(r#"{{"access_token":"a","expires_in":{short}}}"#);
            let t = parse(200, &body, None).unwrap();
            assert_eq!(
                t.lifetime(),
                Duration::from_secs(lifetime),
                "expires_in {short}"
            );
        }
        // An access token no header can carry is refused, unless the reply rotated the
        // refresh token (kept; the access token counts as expired).
        for bad in [r"a\r\nX-Injected: 1", "a b", r"a\u0000", "tökén"] {
            let body = format!(r#"{{"access_token":"{bad}","expires_in":3600}}"#);
            let e = parse(200, &body, None).unwrap_err();
            assert_eq!(e.class(), FailureClass::Transient, "{bad}");
            let body =
                format!(r#"{{"access_token":"{bad}","expires_in":3600,"refresh_token":"r9"}}"#);
            let t = parse(200, &body, None).unwrap();
            assert!(t.access_token.secret().is_empty(), "{bad}");
            assert_eq!(t.refresh_token.unwrap().secret(), "r9");
        }
        let t = parse(200, r#"{"access_token":"a","expires_in":1e300}"#, None).unwrap();
        assert_eq!(t.lifetime(), MAX_LIFETIME);
        let t = parse(200, r#"{"access_token":"a","scope":["a","b"]}"#, None).unwrap();
        assert_eq!(t.scopes.to_string(), "a b");
    }

    #[test]
    fn errors_are_classified_and_keep_provider_text() {
        let e = parse(
            400,
            r#"{"error":"invalid_request","error_description":"Invalid refresh_token"}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(e.class(), FailureClass::RefreshTokenRejected);
        assert_eq!(e.error_description(), Some("Invalid refresh_token"));
        let e = parse(200, r#"{"error":"temporarily_unavailable"}"#, None).unwrap_err();
        assert_eq!(e.class(), FailureClass::Transient);
        let e = parse(503, "<html>down</html>", None).unwrap_err();
        assert!(e.is_transient());
        let e = parse(200, r#"{"access_token": "trunc"#, None).unwrap_err();
        assert_eq!(e.kind(), crate::oauth::ErrorKind::InvalidResponse);
        let e = parse(200, r#"{"token_type":"bearer"}"#, None).unwrap_err();
        assert!(e.to_string().contains("no access_token"), "{e}");
        let e = parse(200, r#"{"access_token":"a","token_type":"mac"}"#, None).unwrap_err();
        assert_eq!(e.class(), FailureClass::Configuration);
        let e = parse(500, r#"{"error":"invalid_grant"}"#, None).unwrap_err();
        assert!(e.is_transient(), "5xx is transient whatever the body says");
        let e = parse(401, "Unauthorized", None).unwrap_err();
        assert_eq!(e.class(), FailureClass::ConsumerCredentialsInvalid);
        assert!(!e.to_string().contains("a0"));
    }

    /// A success reply that rotated the refresh token is never thrown away over an anomaly
    /// in the rest of it (finding 13): the refresh token is what keeps the installation.
    #[test]
    fn a_rotation_survives_anomalies_in_its_reply() {
        let prev = parse(200, r#"{"access_token":"a0","refresh_token":"r0"}"#, None).unwrap();
        for body in [
            r#"{"access_token":"a1","refresh_token":"r1","token_type":"mac"}"#,
            r#"{"access_token":"a1","refresh_token":"r1","error":"something_odd"}"#,
            r#"{"refresh_token":"r1","expires_in":3600}"#,
            r#"{"access_token":"","refresh_token":"r1"}"#,
        ] {
            let t = parse(200, body, Some(&prev)).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(t.refresh_token.unwrap().secret(), "r1", "{body}");
        }
        // Without a usable access token the new one counts as expired: the next call
        // refreshes with the rotated refresh token.
        let t = parse(
            200,
            r#"{"refresh_token":"r1","expires_in":3600}"#,
            Some(&prev),
        )
        .unwrap();
        assert_eq!(t.expires_at, t0());
        // Without a new refresh token, the anomalies are still errors.
        let e = parse(
            200,
            r#"{"access_token":"a1","token_type":"mac"}"#,
            Some(&prev),
        )
        .unwrap_err();
        assert_eq!(e.class(), FailureClass::Configuration);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("42", now), Some(Duration::from_secs(42)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
