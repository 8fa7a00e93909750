//! What the mock counts so a test can assert on it ("exactly one refresh per installation",
//! "zero reuse detections"): [`Totals`] over the whole provider, [`GrantCounters`] per grant
//! (with [`RevokedBy`], why a grant stopped working), and the [`Counters`] snapshot the admin
//! API and `MockProvider::counters` return. They are the mock's public reporting types,
//! apart from the provider logic that bumps them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Provider;

/// Why a grant stopped working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokedBy {
    /// The consumer's scopes changed.
    ScopeChange,
    /// An administrator (the test) revoked it.
    Admin,
    /// RFC 7009 revocation by the client.
    Client,
    /// A retired refresh token was used after the leeway (reuse detection).
    ReuseDetected,
    /// The authorization code it came from was presented again (RFC 6749 §4.1.2).
    CodeReused,
}

/// Counters of one grant (one installation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantCounters {
    /// The consumer it belongs to.
    pub consumer: String,
    /// Refresh requests naming one of its refresh tokens.
    pub refresh_calls: u64,
    /// Successful refreshes.
    pub refreshes: u64,
    /// Successful refreshes that issued a new refresh token.
    pub rotations: u64,
    /// Refused refreshes.
    pub rejected: u64,
    /// Uses of a retired refresh token past the leeway.
    pub reuse_detections: u64,
    /// Uses of a retired refresh token inside the leeway (allowed).
    pub leeway_reuses: u64,
    /// Why it was revoked, if it was.
    pub revoked: Option<RevokedBy>,
}

/// Counters over the whole provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Authorize requests.
    pub authorize_calls: u64,
    /// Token endpoint requests.
    pub token_calls: u64,
    /// Successful code exchanges (= grants created).
    pub code_exchanges: u64,
    /// Attempts to exchange an already-used code.
    pub code_reuses: u64,
    /// Refresh requests.
    pub refresh_calls: u64,
    /// Successful refreshes.
    pub refreshes: u64,
    /// Successful refreshes that rotated the refresh token.
    pub rotations: u64,
    /// Refused refreshes.
    pub rejected_refreshes: u64,
    /// Reuse detections.
    pub reuse_detections: u64,
    /// Allowed reuses inside the leeway.
    pub leeway_reuses: u64,
    /// Requests with wrong or missing client credentials.
    pub client_auth_failures: u64,
    /// Client-credentials grants issued.
    pub client_credentials: u64,
    /// RFC 7009 revocation requests.
    pub revocations: u64,
    /// Resource requests.
    pub resource_calls: u64,
    /// Resource requests refused with 401.
    pub resource_unauthorized: u64,
    /// Faults injected.
    pub faults_injected: u64,
}

/// A snapshot of all counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Provider-wide totals.
    pub totals: Totals,
    /// Per grant, by grant id.
    pub grants: BTreeMap<u64, GrantCounters>,
}

impl Provider {
    pub(crate) fn counters(&self) -> Counters {
        Counters {
            totals: self.totals.clone(),
            grants: self
                .grants
                .iter()
                .enumerate()
                .map(|(i, g)| (i as u64, g.counters.clone()))
                .collect(),
        }
    }

    /// Zeroes every counter (grants keep their revocation status).
    pub(crate) fn reset_counters(&mut self) {
        self.totals = Totals::default();
        for g in &mut self.grants {
            g.counters = GrantCounters {
                consumer: std::mem::take(&mut g.counters.consumer),
                revoked: g.counters.revoked,
                ..GrantCounters::default()
            };
        }
    }
}
