//! What ties an authorization flow to the browser that began it, and the typed values of the
//! callback, so that code, state and binding cannot be passed in each other's place.
//!
//! The flow's [`BrowserBinding`] is 32 random bytes the application keeps in a cookie of the
//! browser that pressed "Install" (see [`BrowserBinding::set_cookie_header`]). It never travels
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

use crate::oauth::authorize::AuthorizationError;

/// Bytes of a browser binding.
const BINDING_LEN: usize = 32;

/// The secret that binds an authorization flow to one browser: keep it in an `HttpOnly`,
/// `Secure`, `SameSite=Lax` cookie when the flow begins, and pass it back, read from the
/// callback request's cookie, to `complete_authorization`. `Debug` prints `[redacted]`.
///
/// `SameSite=Lax` (not `Strict`): the callback is a top-level navigation from the provider's
/// site, which `Lax` cookies accompany and `Strict` ones do not.
///
/// ```
/// use tokenkeeper::BrowserBinding;
///
/// let binding = BrowserBinding::generate()?;
/// let header = binding.set_cookie_header("tk_flow", "/callback", std::time::Duration::from_secs(600));
/// assert!(header.starts_with("tk_flow="));
/// assert!(header.contains("; HttpOnly; Secure; SameSite=Lax; Path=/callback; Max-Age=600"));
/// // In the callback handler, from the request's Cookie header:
/// let value = header.split(';').next().unwrap().trim_start_matches("tk_flow=");
/// let back = BrowserBinding::from_cookie_value(value)?;
/// # let _ = back;
/// # Ok::<(), tokenkeeper::AuthorizationError>(())
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

    /// A complete `Set-Cookie` header value: `HttpOnly` (no script reads it), `Secure` (only
    /// over https; browsers accept it on `http://localhost` too), `SameSite=Lax` (sent on the
    /// provider's redirect back, not on cross-site subrequests), scoped to the callback's
    /// `path` and expiring with the flow (`max_age`: the consumer's `authorization_ttl`).
    pub fn set_cookie_header(&self, name: &str, path: &str, max_age: Duration) -> String {
        format!(
            "{name}={}; HttpOnly; Secure; SameSite=Lax; Path={path}; Max-Age={}",
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
        for bad in ["", "abc", "!!!!", &"A".repeat(44)] {
            assert!(matches!(
                BrowserBinding::from_cookie_value(bad),
                Err(AuthorizationError::InvalidBinding)
            ));
        }
        assert_eq!(format!("{b:?}"), "BrowserBinding([redacted])");
    }
}
