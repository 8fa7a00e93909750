//! What ties an authorization flow to the browser that began it, and the typed values of the
//! callback, so that code, state and binding cannot be passed in each other's place.
//!
//! The flow's [`BrowserBinding`] is 32 random bytes the application keeps in a cookie of the
//! browser that pressed "Install" (`AuthorizationRequest::set_cookie_header`). It never travels
//! through a URL: the signed `state` carries only a hash of it, and the PKCE verifier is
//! derived from it. So whoever sees a `state` or a whole callback URL (browser history,
//! `Referer`, proxy or provider logs) cannot complete the flow from another browser, and a
//! stolen code cannot be redeemed without the cookie.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};

use crate::oauth::error::AuthorizationError;

/// Bytes of a browser binding.
const BINDING_LEN: usize = 32;

/// The secret that binds an authorization flow to one browser. `Debug` prints `[redacted]`.
///
/// When the flow begins, answer with `Set-Cookie: ` +
/// [`AuthorizationRequest::set_cookie_header`](crate::oauth::AuthorizationRequest::set_cookie_header),
/// which is
///
/// ```text
/// __Host-tkflow-<16 hex digits of the state's hash>=<binding>; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age=<authorization_ttl>
/// ```
///
/// - `HttpOnly`: no script reads it; `Secure`: sent over https only. Chromium (which the
///   test suite drives) also accepts it from `http://127.0.0.1` and `http://localhost`
///   during development; other browsers may not (Safari is not verified here): develop over
///   https, or with Chromium;
/// - `SameSite=Lax`, not `Strict`: the callback is a top-level navigation (a `GET`) from the
///   provider's site, which `Lax` cookies accompany and `Strict` ones do not. A callback by
///   `response_mode=form_post` is a cross-site `POST`, which no `Lax` cookie accompanies:
///   the flow uses the default query response mode, and `form_post` is not supported;
/// - the `__Host-` prefix makes browsers refuse the cookie unless it is `Secure`, has
///   `Path=/` and no `Domain`, so a sibling subdomain or a plain-http attacker cannot plant a
///   binding of theirs;
/// - one cookie per flow, named after its state: two tabs installing at once do not
///   overwrite each other's binding.
///
/// In the callback, [`BrowserBinding::from_cookie_header`] finds the flow's cookie in the
/// request's `Cookie` header; answer with
/// [`AuthorizationState::clear_cookie_header`] to remove it.
///
/// ```
/// use tokenkeeper::{AuthorizationState, BrowserBinding};
///
/// let binding = BrowserBinding::generate()?;
/// let state = AuthorizationState::new("the-state-from-the-callback");
/// // What the browser sends back, among its other cookies:
/// let cookie = format!("theme=dark; {}={}", state.cookie_name(), binding.expose_cookie_value());
/// let back = BrowserBinding::from_cookie_header(&cookie, &state)?;
/// assert!(state.clear_cookie_header().ends_with("Max-Age=0"));
/// # let _ = back;
/// # Ok::<(), tokenkeeper::oauth::AuthorizationError>(())
/// ```
pub struct BrowserBinding(SecretBox<[u8; BINDING_LEN]>);

impl BrowserBinding {
    /// A fresh random binding (what `begin_authorization` makes for each flow).
    ///
    /// # Errors
    ///
    /// [`AuthorizationError::Random`] only if the operating system's random generator fails.
    pub fn generate() -> Result<Self, AuthorizationError> {
        let mut bytes = Box::new([0u8; BINDING_LEN]);
        getrandom::fill(bytes.as_mut()).map_err(|e| AuthorizationError::Random(e.to_string()))?;
        Ok(Self(SecretBox::new(bytes)))
    }

    /// Reads the binding back from its cookie value.
    ///
    /// # Errors
    ///
    /// [`AuthorizationError::InvalidBinding`] for a value that is not one this library made
    /// (the value is not echoed).
    pub fn from_cookie_value(value: &str) -> Result<Self, AuthorizationError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(value.trim())
            .map_err(|_| AuthorizationError::InvalidBinding)?;
        let array: [u8; BINDING_LEN] = bytes
            .try_into()
            .map_err(|_| AuthorizationError::InvalidBinding)?;
        Ok(Self(SecretBox::new(Box::new(array))))
    }

    /// The cookie value (base64url). It is a secret: put it only in the `Set-Cookie` header.
    pub fn expose_cookie_value(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.expose_secret())
    }

    /// The binding of the flow `state` names, from a request's `Cookie` header (all its
    /// cookies, as the browser sent them).
    ///
    /// # Errors
    ///
    /// [`AuthorizationError::MissingBinding`] when the header holds no cookie of this flow
    /// (another browser, cookies blocked, or the flow began elsewhere), and
    /// [`AuthorizationError::InvalidBinding`] for a value this library did not make.
    pub fn from_cookie_header(
        header: &str,
        state: &AuthorizationState,
    ) -> Result<Self, AuthorizationError> {
        let name = state.cookie_name();
        let value = header
            .split(';')
            // Only the optional white space of RFC 6265 (SP and HTAB): `str::trim` would also
            // strip Unicode spaces, letting `\u{2000}__Host-…`, which a sibling domain may
            // set, pass for the flow's `__Host-` cookie.
            .filter_map(|c| c.trim_matches([' ', '\t']).split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .ok_or(AuthorizationError::MissingBinding)?;
        Self::from_cookie_value(value)
    }

    /// The `Set-Cookie` header value that keeps this binding for the flow `state`, for
    /// `max_age` (see the type's documentation for each attribute).
    pub(crate) fn set_cookie_header(
        &self,
        state: &AuthorizationState,
        max_age: Duration,
    ) -> String {
        format!(
            "{}={}; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age={}",
            state.cookie_name(),
            self.expose_cookie_value(),
            max_age.as_secs()
        )
    }

    /// The hash the signed state carries (domain-separated SHA-256: the binding cannot be
    /// recovered from it).
    pub(crate) fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"tokenkeeper/binding/v1/");
        h.update(self.0.expose_secret());
        h.finalize().into()
    }

    /// The PKCE verifier of the flow `nonce` began in this browser: only the holder of the
    /// binding can compute it, and it never travels through a URL.
    pub(crate) fn pkce_verifier(&self, nonce: &[u8]) -> String {
        // HMAC accepts keys of any length: this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.expose_secret())
            .unwrap_or_else(|_| unreachable!());
        m.update(b"tokenkeeper/pkce/v2/");
        m.update(nonce);
        URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
    }
}

impl fmt::Debug for BrowserBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrowserBinding([redacted])")
    }
}

/// The authorization code from the provider's callback (`?code=`). Single use; `Debug`
/// prints `[redacted]`.
#[derive(Clone)]
pub struct AuthorizationCode(SecretString);

impl AuthorizationCode {
    /// Wraps the callback's `code` parameter.
    pub fn new(code: impl Into<String>) -> Self {
        Self(SecretString::from(code.into()))
    }

    /// The code, for the token request.
    pub fn secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// The code's fingerprint, stored with the flow's claim so a repeated callback is
    /// recognised only with the same code (the code itself is never stored).
    pub(crate) fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tokenkeeper/code/v1/");
        h.update(self.0.expose_secret().as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for AuthorizationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthorizationCode([redacted])")
    }
}

/// The signed `state` of an authorization flow, as sent to the provider and returned in the
/// callback (`?state=`). Not a secret on its own (it is useless without the flow's
/// [`BrowserBinding`]), but `Debug` prints only its length: it names an installation and a
/// flow, which logs need not carry.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorizationState(String);

impl AuthorizationState {
    /// Wraps the callback's `state` parameter.
    pub fn new(state: impl Into<String>) -> Self {
        Self(state.into())
    }

    /// The state text (for the authorization URL, or to compare with a callback's).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of the cookie that holds this flow's [`BrowserBinding`]:
    /// `__Host-tkflow-` and 16 hex digits of a hash of the state.
    pub fn cookie_name(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tokenkeeper/cookie/v1/");
        h.update(self.0.as_bytes());
        let hex: String = h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("__Host-tkflow-{hex}")
    }

    /// A `Set-Cookie` header value that removes this flow's cookie (send it with the
    /// callback's answer).
    pub fn clear_cookie_header(&self) -> String {
        format!(
            "{}=; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age=0",
            self.cookie_name()
        )
    }
}

impl fmt::Debug for AuthorizationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthorizationState({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_round_trips_through_its_cookie_and_refuses_garbage() {
        let b = BrowserBinding::generate().unwrap();
        let back = BrowserBinding::from_cookie_value(&b.expose_cookie_value()).unwrap();
        assert_eq!(b.hash(), back.hash());
        assert_eq!(b.pkce_verifier(&[1; 16]), back.pkce_verifier(&[1; 16]));
        let other = BrowserBinding::generate().unwrap();
        assert_ne!(b.hash(), other.hash());
        assert_ne!(b.pkce_verifier(&[1; 16]), other.pkce_verifier(&[1; 16]));
        assert_ne!(b.pkce_verifier(&[1; 16]), b.pkce_verifier(&[2; 16]));
        assert!((43..=128).contains(&b.pkce_verifier(&[1; 16]).len()));
        let state = AuthorizationState::new("s1");
        let header = format!(
            "a=b; {}={}; c=d",
            state.cookie_name(),
            b.expose_cookie_value()
        );
        let found = BrowserBinding::from_cookie_header(&header, &state).unwrap();
        assert_eq!(found.hash(), b.hash());
        // Another flow's cookie is not this flow's binding.
        assert!(matches!(
            BrowserBinding::from_cookie_header(&header, &AuthorizationState::new("s2")),
            Err(AuthorizationError::MissingBinding)
        ));
        assert!(state.cookie_name().starts_with("__Host-tkflow-"));
        assert_eq!(state.cookie_name().len(), "__Host-tkflow-".len() + 16);
        for bad in ["", "abc", "!!!!", &"A".repeat(44)] {
            assert!(matches!(
                BrowserBinding::from_cookie_value(bad),
                Err(AuthorizationError::InvalidBinding)
            ));
        }
        assert_eq!(format!("{b:?}"), "BrowserBinding([redacted])");
    }
}
