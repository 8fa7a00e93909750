//! The claim an authorization flow takes in the store before its code is exchanged
//! ([`TokenStore::claim_flow`](tokenkeeper_core::TokenStore::claim_flow)), so that of any number
//! of callbacks of one flow, in one process or many, exactly one exchanges the code; the
//! others read its outcome.
//!
//! A claim names the installation, the fingerprint of the code it was made with (a repeated
//! callback is recognised only with the same code: another code is a replayed or forged
//! callback) and a phase: exchanging (until a deadline), completed, or failed. It holds no
//! secret: the code's fingerprint is a domain-separated SHA-256.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a claim is kept after the flow's state expired: a process whose clock runs behind
/// still accepts the state for that long, and must still find the claim.
pub(crate) const CLAIM_SKEW_MARGIN: Duration = Duration::from_secs(600);

/// How often a duplicate callback looks at the first one's claim.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The stored claim of one flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FlowClaim {
    /// The fingerprint of the code the flow was claimed with.
    pub(crate) code: String,
    /// Who claimed it (random per claim): a store that resends a claim after a lost reply
    /// recognises its own first run by it, and two callbacks with the same code never write
    /// the same bytes.
    #[serde(default)]
    pub(crate) by: String,
    /// Where the flow is.
    pub(crate) phase: Phase,
}

/// Where a claimed flow is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Phase {
    /// The claimant is exchanging the code; duplicates wait for the outcome.
    Exchanging,
    /// The installation was recorded.
    Completed { created: bool },
    /// The flow failed: why (never a secret), and whether the code had been sent to the
    /// provider (if not, the user's retry with a new flow is all that is lost).
    Failed { reason: String, code_sent: bool },
}

impl FlowClaim {
    /// A new claim for `code`, by a random claimant, exchanging.
    pub(crate) fn exchanging(
        code: &crate::oauth::AuthorizationCode,
    ) -> Result<Self, crate::oauth::AuthorizationError> {
        let mut by = [0u8; 16];
        getrandom::fill(&mut by)
            .map_err(|e| crate::oauth::AuthorizationError::Random(e.to_string()))?;
        Ok(Self {
            code: code.fingerprint(),
            by: by.iter().map(|b| format!("{b:02x}")).collect(),
            phase: Phase::Exchanging,
        })
    }

    /// This claim settled with the claimant's `outcome` (`code_sent`: whether the code went
    /// to the provider).
    pub(crate) fn settled<T, E: std::fmt::Display>(
        self,
        outcome: &Result<(crate::oauth::Completed, T), E>,
        code_sent: bool,
    ) -> Self {
        let phase = match outcome {
            Ok((done, _)) => Phase::Completed {
                created: done.created,
            },
            Err(e) => Phase::Failed {
                reason: e.to_string(),
                code_sent,
            },
        };
        Self { phase, ..self }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Plain data to a Vec: cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `None` for bytes that are not a claim (treated like a claim with another code: the
    /// callback is refused, nothing is exchanged).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The store key of a flow: the consumer and the flow's id.
pub(crate) fn flow_key(consumer: &str, flow: &str) -> String {
    format!("{consumer}/{flow}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_round_trip_and_garbage_is_none() {
        for phase in [
            Phase::Exchanging,
            Phase::Completed { created: true },
            Phase::Failed {
                reason: "the provider refused the code".into(),
                code_sent: true,
            },
        ] {
            let claim = FlowClaim {
                code: "ab".into(),
                by: "c1".into(),
                phase,
            };
            assert_eq!(FlowClaim::decode(&claim.encode()), Some(claim));
        }
        assert_eq!(FlowClaim::decode(b"{}"), None);
        assert_eq!(FlowClaim::decode(b"\xff"), None);
    }
}
