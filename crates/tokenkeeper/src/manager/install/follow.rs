//! The callbacks that did not claim their flow: a duplicate follows the claimant's outcome
//! (waiting while it exchanges), and a callback whose claim failed in the store settles only
//! its own claim, if the store kept it after all.

use std::time::Duration;

use tokenkeeper_core::InstallationId;

use super::claim::{self, FlowClaim, Phase};
use super::error::{InstallError, Refusal};
use crate::manager::TokenManager;
use crate::oauth::Completed;

impl TokenManager {
    /// After a claim the store reported as failed: it may have been stored even so (its
    /// acknowledgement lost); then say that nothing was exchanged, so a retry of this callback
    /// does not wait for an exchange that never ran. Anything else there (another callback's
    /// live claim) is left alone (review N8: overwriting it told later duplicates the flow had
    /// failed while its claimant was completing it).
    pub(super) async fn settle_own_failed_claim(&self, key: &str, mine: &FlowClaim, ttl: Duration) {
        let store = &self.engine.store;
        let ours = mine.encode();
        if !matches!(store.get_flow(key).await, Ok(Some(stored)) if stored == ours) {
            return;
        }
        let failed = FlowClaim {
            code: mine.code.clone(),
            by: mine.by.clone(),
            phase: Phase::Failed {
                reason: "the flow could not be claimed in the store".into(),
                code_sent: false,
            },
        };
        let _ = store.settle_flow(key, &failed.encode(), ttl).await;
    }

    /// A duplicate callback: the flow was claimed already. The same code gets the claimant's
    /// outcome (waiting for it while the exchange runs); another code is refused.
    pub(super) async fn follow_claim(
        &self,
        key: &str,
        mut current: Vec<u8>,
        code: &str,
        installation: &InstallationId,
    ) -> Result<Completed, Refusal> {
        let engine = &self.engine;
        let give_up = give_up_at(engine.client.consumer().http_timeout());
        loop {
            if let Some(outcome) = claimant_outcome(&current, code, installation) {
                return outcome;
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(duplicate(
                    installation,
                    "did not finish in time (it may have stopped; the code may be spent)",
                )
                .into());
            }
            tokio::time::sleep(claim::POLL_INTERVAL).await;
            current = match engine.store.get_flow(key).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    return Err(duplicate(installation, "expired without an outcome").into());
                }
                Err(source) => {
                    return Err(InstallError::Store {
                        installation: installation.clone(),
                        source,
                    }
                    .into());
                }
            };
        }
    }
}

/// When a duplicate stops waiting for the claimant: its exchange and account check each take
/// at most the HTTP timeout, its store reads and writes a few seconds more. Checked: an
/// `http_timeout` near `Duration::MAX` must not panic here (review I2).
fn give_up_at(http_timeout: Duration) -> tokio::time::Instant {
    let patience = http_timeout
        .saturating_mul(3)
        .saturating_add(Duration::from_secs(5));
    let now = tokio::time::Instant::now();
    now.checked_add(patience)
        .unwrap_or_else(|| now + Duration::from_secs(24 * 3600))
}

/// What the claim in `current` tells a duplicate callback with `code`: the claimant's outcome,
/// a refusal (another code, or not a claim), or `None` while it is still exchanging.
fn claimant_outcome(
    current: &[u8],
    code: &str,
    installation: &InstallationId,
) -> Option<Result<Completed, Refusal>> {
    let claim = FlowClaim::decode(current).filter(|c| {
        // Constant-time enough: both are fixed-length hex fingerprints.
        c.code.len() == code.len()
            && c.code
                .bytes()
                .zip(code.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    });
    let Some(claim) = claim else {
        return Some(Err(InstallError::AlreadyUsed {
            installation: installation.clone(),
        }
        .into()));
    };
    match claim.phase {
        Phase::Completed { created } => Some(Ok(Completed {
            installation: installation.clone(),
            created,
            replayed: true,
            account: None,
            id_token: None,
            warnings: Vec::new(),
        })),
        Phase::Failed {
            reason,
            code_sent: false,
        } => Some(Err(duplicate(
            installation,
            &format!("failed before the code was sent to the provider ({reason})"),
        )
        .into())),
        Phase::Failed { reason, .. } => Some(Err(duplicate(
            installation,
            &format!("failed; the code is spent ({reason})"),
        )
        .into())),
        Phase::Exchanging => None,
    }
}

fn duplicate(installation: &InstallationId, outcome: &str) -> InstallError {
    InstallError::DuplicateCallback {
        installation: installation.clone(),
        outcome: outcome.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review I2: an `http_timeout` near `Duration::MAX` gives a far deadline, not a panic
    /// (`Instant + Duration` overflows).
    #[tokio::test]
    async fn a_huge_http_timeout_does_not_overflow_the_deadline() {
        let now = tokio::time::Instant::now();
        let far = give_up_at(Duration::MAX);
        assert!(far >= now + Duration::from_secs(3600), "{:?}", far - now);
        let near = give_up_at(Duration::from_secs(2));
        assert_eq!(near.duration_since(now).as_secs(), 11);
    }
}
