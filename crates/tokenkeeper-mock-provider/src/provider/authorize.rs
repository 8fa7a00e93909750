//! The authorization-code flow of the mock: the authorize request as parsed
//! ([`AuthorizeRequest`]) and why one is refused ([`AuthorizeError`]), the checks of its
//! redirect URI (under the consumer's callback URL) and its PKCE challenge, the single-use
//! code it issues, and the code's exchange at the token endpoint, which creates the grant
//! (with an unsigned ID token when `openid` is granted). It is apart from the provider's
//! state so the flow's RFC 6749 and RFC 7636 rules, which tests lean on to prove the client
//! is strict, read in one place.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Map, Value, json};
use sha2::Digest as _;

use super::{Grant, GrantCounters, Provider, RevokedBy};
use crate::profile::ErrorBody;

/// How long an authorization code may wait for its exchange.
pub const CODE_TTL: Duration = Duration::from_secs(600);

/// The authorize request, as parsed.
#[derive(Debug, Clone, Default)]
pub struct AuthorizeRequest {
    /// `client_id`
    pub client_id: Option<String>,
    /// `response_type`
    pub response_type: Option<String>,
    /// `redirect_uri`
    pub redirect_uri: Option<String>,
    /// `state`
    pub state: Option<String>,
    /// `code_challenge`
    pub code_challenge: Option<String>,
    /// `code_challenge_method`
    pub code_challenge_method: Option<String>,
    /// Who approves (the mock's stand-in for a login); [`DEFAULT_ACCOUNT`] when absent.
    pub account: Option<String>,
}

/// The account that approves an authorization when none is named.
pub const DEFAULT_ACCOUNT: &str = "mock-user";

/// Why an authorize request was refused (shown to the user, not redirected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}: {description}")]
pub struct AuthorizeError {
    /// RFC 6749 §4.1.2.1 error code.
    pub error: &'static str,
    /// What is wrong.
    pub description: String,
}

fn authorize_error(error: &'static str, description: impl Into<String>) -> AuthorizeError {
    AuthorizeError {
        error,
        description: description.into(),
    }
}

#[derive(Debug)]
pub(super) struct CodeInfo {
    consumer: String,
    redirect_uri: Option<String>,
    challenge: Option<(String, String)>,
    expires: Duration,
    used: bool,
    /// The user who approved it.
    account: String,
    /// The grant its exchange created (revoked if the code is presented again).
    grant: Option<u64>,
}

/// Whether `uri` is under the registered callback `prefix`: the prefix, then the end, or a
/// `/`, `:` (a port), `?` or `#` when the prefix does not end at a separator itself; so
/// `http://127.0.0.1.evil.example/` and `http://127.0.0.1@evil.example/` are not under
/// `http://127.0.0.1`.
fn redirect_allowed(uri: &str, prefix: &str) -> bool {
    let Some(rest) = uri.strip_prefix(prefix) else {
        return false;
    };
    let after_separator = prefix.ends_with(['/', '?', '&']);
    let authority_done = rest.is_empty() || rest.starts_with(['/', ':', '?', '#']);
    let port_ok = !rest.starts_with(':')
        || rest[1..]
            .split(['/', '?', '#'])
            .next()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (after_separator || authority_done) && port_ok && !uri.contains('@')
}

fn is_pkce_text(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// The redirect URI an authorization answers to: the requested one when the consumer's
/// callback URL (`prefix`) allows it, the callback URL when none is requested.
fn checked_redirect(requested: Option<&str>, prefix: &str) -> Result<String, AuthorizeError> {
    match requested {
        Some(uri) if redirect_allowed(uri, prefix) => Ok(uri.to_owned()),
        Some(uri) => Err(authorize_error(
            "invalid_request",
            format!("redirect_uri {uri:?} does not match the consumer's callback URL"),
        )),
        None => Ok(prefix.to_owned()),
    }
}

/// The PKCE challenge and its method (`plain` when unnamed) an authorization request
/// carries, if any; a method without a challenge, an unknown method or a malformed challenge
/// is an error.
fn checked_challenge(
    challenge: Option<&str>,
    method: Option<&str>,
) -> Result<Option<(String, String)>, AuthorizeError> {
    let Some(challenge) = challenge else {
        return match method {
            None => Ok(None),
            Some(_) => Err(authorize_error(
                "invalid_request",
                "code_challenge is missing",
            )),
        };
    };
    let method = method.unwrap_or("plain");
    if !matches!(method, "S256" | "plain") {
        return Err(authorize_error(
            "invalid_request",
            format!("code_challenge_method {method:?} is not supported"),
        ));
    }
    if !is_pkce_text(challenge) {
        return Err(authorize_error(
            "invalid_request",
            "code_challenge is malformed",
        ));
    }
    Ok(Some((challenge.to_owned(), method.to_owned())))
}

/// `BASE64URL(SHA256(verifier))` without padding (RFC 7636 §4.2).
pub fn s256_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
}

impl Provider {
    /// Auto-approves an authorization request and returns the single-use code.
    pub(crate) fn authorize(
        &mut self,
        req: &AuthorizeRequest,
    ) -> Result<(String, String), AuthorizeError> {
        self.totals.authorize_calls += 1;
        let client_id = req
            .client_id
            .as_deref()
            .ok_or_else(|| authorize_error("invalid_request", "client_id is missing"))?;
        let consumer = self.consumers.get(client_id).ok_or_else(|| {
            authorize_error("invalid_client", format!("unknown client_id {client_id:?}"))
        })?;
        let redirect = checked_redirect(req.redirect_uri.as_deref(), &consumer.redirect_prefix)?;
        if req.response_type.as_deref() != Some("code") {
            return Err(authorize_error(
                "unsupported_response_type",
                "response_type must be \"code\"",
            ));
        }
        if let Some(state) = &req.state
            && (state.len() > 2048 || state.chars().any(char::is_control))
        {
            return Err(authorize_error("invalid_request", "state is malformed"));
        }
        let challenge = checked_challenge(
            req.code_challenge.as_deref(),
            req.code_challenge_method.as_deref(),
        )?;
        let code = self.token("code_");
        let expires = self.now() + CODE_TTL;
        self.codes.insert(
            code.clone(),
            CodeInfo {
                consumer: client_id.to_owned(),
                redirect_uri: req.redirect_uri.clone(),
                challenge,
                expires,
                used: false,
                account: req
                    .account
                    .clone()
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| DEFAULT_ACCOUNT.to_owned()),
                grant: None,
            },
        );
        Ok((redirect, code))
    }

    pub(super) fn exchange_code(
        &mut self,
        consumer: &str,
        params: &HashMap<String, String>,
    ) -> Result<Map<String, Value>, ErrorBody> {
        let now = self.now();
        let bad_code = self.rules.errors.bad_code.clone();
        let code = params.get("code").ok_or_else(|| bad_code.clone())?;
        let info = self.codes.get_mut(code).ok_or_else(|| bad_code.clone())?;
        if info.used {
            self.totals.code_reuses += 1;
            // RFC 6749 §4.1.2: a code presented twice revokes what it was exchanged for.
            if let Some(grant) = info.grant {
                self.revoke_grant(grant, RevokedBy::CodeReused);
            }
            return Err(bad_code);
        }
        if info.consumer != consumer || info.expires <= now {
            return Err(bad_code);
        }
        if let Some(uri) = &info.redirect_uri
            && params.get("redirect_uri") != Some(uri)
        {
            return Err(bad_code);
        }
        if info.challenge.is_none() && params.contains_key("code_verifier") {
            // A verifier for a code issued without a challenge: a PKCE downgrade (RFC 9700
            // §4.8.2 requires refusing it).
            info.used = true;
            return Err(self.rules.errors.bad_verifier.clone());
        }
        if let Some((challenge, method)) = &info.challenge {
            let ok = match params.get("code_verifier") {
                Some(v) if is_pkce_text(v) => match method.as_str() {
                    "S256" => &s256_challenge(v) == challenge,
                    _ => v == challenge,
                },
                _ => false,
            };
            if !ok {
                // A failed verification burns the code, as RFC 7636 servers do.
                info.used = true;
                return Err(self.rules.errors.bad_verifier.clone());
            }
        }
        info.used = true;
        let account = info.account.clone();
        info.grant = Some(self.grants.len() as u64);
        self.totals.code_exchanges += 1;
        let scopes = self
            .consumers
            .get(consumer)
            .map(|c| c.scopes.clone())
            .unwrap_or_default();
        let grant = self.grants.len() as u64;
        self.grants.push(Grant {
            account: account.clone(),
            scopes: scopes.clone(),
            created: now,
            counters: GrantCounters {
                consumer: consumer.to_owned(),
                ..GrantCounters::default()
            },
            access_tokens: Vec::new(),
        });
        let access = self.issue_access(Some(grant), consumer);
        let refresh = self.issue_refresh(grant, &access);
        let mut body = self.success(&access, Some(&refresh), &scopes, "authorization_code");
        if scopes.iter().any(|s| s == "openid") {
            body.insert(
                "id_token".into(),
                json!(id_token(&self.issuer, consumer, &account, now)),
            );
        }
        Ok(body)
    }
}

/// An OpenID Connect ID token for `account` of `consumer`: a JWT-shaped value whose payload
/// names the issuer, subject (the account) and audience. Unsigned (`alg: none`): this is a
/// test double; a real provider signs it.
fn id_token(issuer: &str, consumer: &str, account: &str, now: Duration) -> String {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let iat = now.as_secs();
    let header = json!({"alg": "none", "typ": "JWT"});
    let claims = json!({
        "iss": issuer,
        "sub": account,
        "aud": consumer,
        "iat": iat,
        "exp": iat + 3600,
    });
    format!("{}.{}.", b64(&header), b64(&claims))
}

#[cfg(test)]
mod redirect_tests {
    use super::redirect_allowed;

    #[test]
    fn only_uris_under_the_registered_callback_are_allowed() {
        let prefix = "http://127.0.0.1";
        for ok in [
            "http://127.0.0.1",
            "http://127.0.0.1/callback",
            "http://127.0.0.1:8080/callback?x=1",
        ] {
            assert!(redirect_allowed(ok, prefix), "{ok}");
        }
        for bad in [
            "http://127.0.0.1.evil.example/",
            "http://127.0.0.1@evil.example/",
            "http://127.0.0.1:80@evil.example/",
            "http://127.0.0.1:evil.example/",
            "https://127.0.0.1/",
        ] {
            assert!(!redirect_allowed(bad, prefix), "{bad}");
        }
        assert!(redirect_allowed(
            "https://app.example/cb/done",
            "https://app.example/cb/"
        ));
    }
}
