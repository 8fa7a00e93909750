//! `TokenSet`: what one successful grant or refresh hands back, in absolute terms.
//!
//! Providers answer with a relative `expires_in`; the protocol layer turns it into an absolute
//! `expires_at` counted from when the request was *sent* (docs/design.md, "Provider facts"), filling in the
//! profile's default lifetime when a provider omits it. From then on every decision compares
//! absolute times, which makes records comparable across processes and restarts.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::secret::{AccessToken, RefreshToken};
use crate::time::Timestamp;

/// The scopes a grant holds, sorted and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Scopes(Vec<String>);

impl Scopes {
    /// From any list of scope names (empty names dropped, sorted, deduplicated).
    pub fn new<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut v: Vec<String> = scopes
            .into_iter()
            .map(Into::into)
            .filter(|s| !s.is_empty())
            .collect();
        v.sort();
        v.dedup();
        Self(v)
    }

    /// From the RFC 6749 wire form: names separated by spaces (Bitbucket, most providers) or
    /// commas (GitHub).
    pub fn parse(text: &str) -> Self {
        Self::new(text.split([' ', ',']).map(str::trim))
    }

    /// True when no scope is recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scope names.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// Whether `scope` is among them.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.binary_search_by(|s| s.as_str().cmp(scope)).is_ok()
    }
}

/// Space separated, as on the wire.
impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

/// One installation's credentials at one moment.
///
/// `Debug` never shows either token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSet {
    /// The bearer token for API calls.
    pub access_token: AccessToken,
    /// The token that obtains the next access token. `None` when the provider issued none, in
    /// which case the installation needs a new authorization once the access token expires.
    pub refresh_token: Option<RefreshToken>,
    /// The token type as the provider spelled it (`bearer`, `Bearer`).
    pub token_type: String,
    /// When the access token stops working, absolute.
    pub expires_at: Timestamp,
    /// The scopes granted (empty when the provider did not say).
    pub scopes: Scopes,
    /// When the request that produced these tokens was sent.
    pub obtained_at: Timestamp,
    /// When the refresh token stops working, when the provider said so (GitHub's
    /// `refresh_token_expires_in`). The profile's inactivity and absolute limits apply besides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_expires_at: Option<Timestamp>,
}

impl TokenSet {
    /// A bearer token set obtained at `obtained_at`, expiring at `expires_at`, with no scopes
    /// recorded.
    pub fn bearer(
        access_token: AccessToken,
        refresh_token: Option<RefreshToken>,
        obtained_at: Timestamp,
        expires_at: Timestamp,
    ) -> Self {
        Self {
            access_token,
            refresh_token,
            token_type: "bearer".to_owned(),
            expires_at,
            scopes: Scopes::default(),
            obtained_at,
            refresh_expires_at: None,
        }
    }

    /// Whether the access token expires at all: a token the provider issued without
    /// `expires_in` or refresh token may be permanent (see the profile), written as
    /// [`Timestamp::MAX`].
    pub fn expires(&self) -> bool {
        self.expires_at != Timestamp::MAX
    }

    /// The lifetime the provider granted the access token.
    pub fn lifetime(&self) -> std::time::Duration {
        self.expires_at.duration_since(self.obtained_at)
    }

    /// Whether this reply to a refresh that presented `presented` rotated the refresh token
    /// (carries a new one). Only a rotation makes a reply the sole copy of a live token.
    pub fn rotated_from(&self, presented: &RefreshToken) -> bool {
        self.refresh_token.as_ref().is_some_and(|r| r != presented)
    }

    /// Applies the RFC 6749 §6 merge rules to a refresh response: a response without a refresh
    /// token keeps the previous one, and a response without scopes keeps the previous scopes.
    pub fn merged_onto(mut self, previous: &TokenSet) -> TokenSet {
        if self.refresh_token.is_none() {
            self.refresh_token = previous.refresh_token.clone();
            self.refresh_expires_at = previous.refresh_expires_at;
        }
        if self.scopes.is_empty() {
            self.scopes = previous.scopes.clone();
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_both_separators() {
        let s = Scopes::parse("repository account,repository  ");
        assert_eq!(s.to_string(), "account repository");
        assert!(s.contains("account"));
        assert!(!s.contains("pullrequest"));
    }

    #[test]
    fn merge_keeps_previous_refresh_token_and_scopes() {
        let t0 = Timestamp::from_unix_secs(0);
        let mut prev = TokenSet::bearer(
            AccessToken::new("a0"),
            Some(RefreshToken::new("r0")),
            t0,
            Timestamp::from_unix_secs(7200),
        );
        prev.scopes = Scopes::parse("account");
        let next = TokenSet::bearer(AccessToken::new("a1"), None, t0, t0).merged_onto(&prev);
        assert_eq!(next.refresh_token, Some(RefreshToken::new("r0")));
        assert_eq!(next.scopes, prev.scopes);
        assert_eq!(next.access_token, AccessToken::new("a1"));
        assert!(!format!("{next:?}").contains("a1"));
    }
}
