//! The provider in the model: rotates the refresh token on every use; inside its reuse
//! leeway accepts the most recently retired token again and issues a *new* one (leaving the
//! first successor live); otherwise detects reuse and revokes the whole grant (Bitbucket,
//! GitHub; Atlassian past its leeway). The user may revoke the grant at any time, and the
//! grant may have an absolute lifetime.
//!
//! The leeway behaviour follows Auth0's documentation, on which Atlassian's rotation is built
//! ("Atlassian built on top of Auth0", Atlassian's announcement of rotating refresh tokens):
//! "During the leeway window the breach detection features don't apply and a new rotating
//! refresh token is issued. Only the previous token can be reused"
//! (<https://auth0.com/docs/secure/tokens/refresh-tokens/configure-refresh-token-rotation>).
//! The mock provider issues a new token inside the leeway too and keeps the first successor
//! live (review SU2); it accepts any retired token inside that token's own leeway, which is
//! looser than "only the previous token" and never matters with the model's two rotations.

/// Why the grant is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Death {
    /// Reuse detection: a retired token was presented outside the leeway.
    Reuse,
    /// The user revoked the app (or the consumer's scopes changed).
    User,
}

/// What the provider knows about the grant. Tokens are numbered in the order it issued them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Provider {
    /// Refresh tokens issued so far: `r0 .. r{issued - 1}`.
    pub issued: u8,
    /// Bit `k`: `r{k}` was used (retired).
    pub spent: u32,
    /// The most recently retired token and when (model tick): the one the leeway covers.
    pub last_retired: Option<(u8, u8)>,
    /// The grant is dead, and why.
    pub dead: Option<Death>,
    /// Rotations so far (new tokens issued).
    pub rotations: u8,
}

/// The provider's answer to a refresh request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Answer {
    /// New tokens.
    Tokens {
        /// The new refresh token is `r{new}`.
        new: u8,
        /// This request retired the presented token (a lost reply then loses that rotation).
        rotated: bool,
    },
    /// `invalid_grant`.
    Rejected,
    /// A 5xx, after the provider committed the request (it may have rotated the token).
    ServerError,
    /// A 429 (or a refused connection): the provider did not process the request.
    Throttled,
}

/// What handling one request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handled {
    /// The answer.
    pub answer: Answer,
    /// It presented a retired token outside the leeway (reuse detection fired).
    pub reuse: bool,
    /// It issued `r{k}` (a rotation, or a new token inside the leeway).
    pub issued: Option<u8>,
}

impl Provider {
    /// A grant whose live refresh token is `r0`.
    pub fn new() -> Self {
        Self {
            issued: 1,
            spent: 0,
            last_retired: None,
            dead: None,
            rotations: 0,
        }
    }

    /// Handles a refresh presenting `r{token}` at `tick`: `leeway` in ticks, `expired` when
    /// the grant's absolute lifetime has passed.
    pub fn refresh(&mut self, token: u8, tick: u8, leeway: Option<u8>, expired: bool) -> Handled {
        let rejected = Handled {
            answer: Answer::Rejected,
            reuse: false,
            issued: None,
        };
        if self.dead.is_some() || expired || token >= self.issued {
            return rejected;
        }
        if self.spent & (1 << token) == 0 {
            self.spent |= 1 << token;
            self.last_retired = Some((token, tick));
            return self.issue(true);
        }
        let inside_leeway = leeway
            .zip(self.last_retired)
            .is_some_and(|(l, (last, at))| last == token && tick.saturating_sub(at) <= l);
        if inside_leeway {
            return self.issue(false);
        }
        self.dead = Some(Death::Reuse);
        Handled {
            reuse: true,
            ..rejected
        }
    }

    fn issue(&mut self, rotated: bool) -> Handled {
        let new = self.issued;
        self.issued += 1;
        self.rotations += 1;
        Handled {
            answer: Answer::Tokens { new, rotated },
            reuse: false,
            issued: Some(new),
        }
    }

    /// Whether `r{token}` is still accepted outright (live, unspent).
    pub fn accepts(&self, token: u8) -> bool {
        self.dead.is_none() && token < self.issued && self.spent & (1 << token) == 0
    }

    /// Whether `r{token}` was used at the provider (a request presenting it was handled).
    pub fn was_spent(&self, token: u8) -> bool {
        token < 32 && self.spent & (1 << token) != 0
    }
}

impl Default for Provider {
    fn default() -> Self {
        Self::new()
    }
}
