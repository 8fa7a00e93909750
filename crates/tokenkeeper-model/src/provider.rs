//! The provider in the model: rotates the refresh token on every use, re-issues the current
//! tokens for a retired one inside its reuse leeway, and otherwise detects reuse and revokes
//! the whole grant (Bitbucket, GitHub; Atlassian past its leeway).

/// What the provider knows about the grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Provider {
    /// The rotation number of the live refresh token.
    pub current: u8,
    /// When the previous token was retired (model tick).
    pub retired_at: u8,
    /// Reuse detection revoked the grant.
    pub revoked: bool,
    /// Rotations so far.
    pub rotations: u8,
}

/// The provider's answer to a refresh request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Answer {
    /// New tokens (rotation number); `rotated` when this request retired the presented one.
    Tokens { new: u8, rotated: bool },
    /// `invalid_grant`.
    Rejected,
}

impl Provider {
    /// A grant whose live refresh token is `r0`.
    pub fn new() -> Self {
        Self {
            current: 0,
            retired_at: 0,
            revoked: false,
            rotations: 0,
        }
    }

    /// Handles a refresh presenting `r{token}` at `tick`. Returns the answer and whether it
    /// was a reuse detection (a retired token outside the leeway).
    pub fn refresh(&mut self, token: u8, tick: u8, leeway: Option<u8>) -> (Answer, bool) {
        if self.revoked {
            return (Answer::Rejected, false);
        }
        if token == self.current {
            self.current += 1;
            self.rotations += 1;
            self.retired_at = tick;
            return (
                Answer::Tokens {
                    new: self.current,
                    rotated: true,
                },
                false,
            );
        }
        let inside_leeway = leeway.is_some_and(|l| {
            token + 1 == self.current && tick.saturating_sub(self.retired_at) <= l
        });
        if inside_leeway {
            return (
                Answer::Tokens {
                    new: self.current,
                    rotated: false,
                },
                false,
            );
        }
        self.revoked = true;
        (Answer::Rejected, true)
    }

    /// Whether `r{token}` is still accepted (for judging a condemnation's truth).
    pub fn accepts(&self, token: u8) -> bool {
        !self.revoked && token == self.current
    }
}

impl Default for Provider {
    fn default() -> Self {
        Self::new()
    }
}
