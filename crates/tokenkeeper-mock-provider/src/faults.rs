//! Fault injection: a plan of rules saying which endpoint misbehaves, how, and when.
//!
//! Rules are checked in order on every request to their endpoint; the first that fires decides
//! the fault. "Next N calls" rules count down; probability rules draw from the provider's
//! seeded generator, so a failing test replays exactly with the same seed.

use serde::{Deserialize, Serialize};

/// The endpoints a rule can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `GET /site/oauth2/authorize`
    Authorize,
    /// `POST /site/oauth2/access_token`
    Token,
    /// `POST /site/oauth2/revoke`
    Revoke,
    /// `GET /2.0/user`
    Resource,
}

/// What goes wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// A server error (500, 502, 503...) with an HTML page (as a proxy sends) or a JSON body.
    ServerError {
        /// The status.
        status: u16,
        /// HTML instead of JSON.
        html: bool,
    },
    /// 429 with `Retry-After` in seconds.
    TooManyRequests {
        /// The `Retry-After` value.
        retry_after_secs: u64,
    },
    /// Answer normally after a fixed or uniformly random delay (`min_ms..=max_ms`).
    Latency {
        /// Shortest delay.
        min_ms: u64,
        /// Longest delay.
        max_ms: u64,
    },
    /// Drop the connection before doing anything.
    ConnectionReset,
    /// 200 with a truncated JSON body; nothing is committed.
    MalformedJson,
    /// 200 whose body is an OAuth error (`temporarily_unavailable`); nothing is committed.
    ErrorIn200,
    /// An OAuth error reply of the caller's choosing (e.g. `invalid_scope`,
    /// `unsupported_grant_type`); nothing is committed.
    ErrorReply {
        /// The HTTP status.
        status: u16,
        /// The `error` code.
        error: String,
        /// The `error_description`.
        description: String,
    },
    /// Commit the grant normally, but leave these fields out of the reply (e.g. `expires_in`,
    /// `token_type`).
    MissingFields {
        /// Field names to drop.
        fields: Vec<String>,
    },
    /// 200 with a body of this many bytes; nothing is committed.
    OversizedBody {
        /// Body size.
        bytes: usize,
    },
    /// Commit the grant (rotate the refresh token), then drop the connection: the provider holds
    /// a token the client never saw.
    CommitThenDrop,
    /// Commit the grant (rotate the refresh token), then answer with a server error and
    /// `Retry-After`: a gateway or CDN that failed after the origin committed.
    CommitThenServerError {
        /// The status (502, 503, 504...).
        status: u16,
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u64,
    },
    /// Commit the grant, then answer only after `ms` milliseconds: a slow provider whose
    /// rotation is already final while the reply is on its way (a client that dies meanwhile
    /// never sees its new token).
    SlowReply {
        /// The delay between the commit and the reply.
        ms: u64,
    },
}

/// When a rule fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// On each of the next `count` calls.
    Next {
        /// Calls left.
        count: u64,
    },
    /// On each call with this probability (0.0 to 1.0).
    Probability {
        /// The probability.
        p: f64,
    },
}

/// One rule of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRule {
    /// The endpoint it targets.
    pub endpoint: Endpoint,
    /// What goes wrong.
    pub fault: Fault,
    /// When.
    pub trigger: Trigger,
}

impl FaultRule {
    /// `fault` on the next `count` calls to `endpoint`.
    pub fn next(endpoint: Endpoint, count: u64, fault: Fault) -> Self {
        Self {
            endpoint,
            fault,
            trigger: Trigger::Next { count },
        }
    }

    /// `fault` on each call to `endpoint` with probability `p`.
    pub fn probability(endpoint: Endpoint, p: f64, fault: Fault) -> Self {
        Self {
            endpoint,
            fault,
            trigger: Trigger::Probability { p },
        }
    }
}

/// The rules in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FaultPlan(pub Vec<FaultRule>);

impl FaultPlan {
    /// The fault for a call to `endpoint`, if a rule fires; counts "next N" rules down.
    pub(crate) fn pick(&mut self, endpoint: Endpoint, rng: &mut fastrand::Rng) -> Option<Fault> {
        let mut fired = None;
        for rule in self.0.iter_mut().filter(|r| r.endpoint == endpoint) {
            let fires = match &mut rule.trigger {
                Trigger::Next { count } if *count > 0 => {
                    *count -= 1;
                    true
                }
                Trigger::Next { .. } => false,
                Trigger::Probability { p } => rng.f64() < *p,
            };
            if fires {
                fired = Some(rule.fault.clone());
                break;
            }
        }
        self.0
            .retain(|r| !matches!(r.trigger, Trigger::Next { count: 0 }));
        fired
    }
}
