//! The grant and token bookkeeping of the mock: the grant a token belongs to, revoking a
//! grant (and every access token it issued), issuing access and refresh tokens, and the
//! refresh grant: accepting the presented refresh token (known, live or retired within the
//! leeway, not expired), reuse detection, and the profile's rotation rule. Every grant is
//! its own token family; this is where refreshing one is kept from touching another.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{AccessInfo, Provider, RefreshInfo, RefreshStatus, RevokedBy};
use crate::profile::{ErrorBody, RotationRule};

impl Provider {
    /// The grant a token (access or refresh) belongs to.
    pub(crate) fn grant_of(&self, token: &str) -> Option<u64> {
        self.refresh
            .get(token)
            .map(|r| r.grant)
            .or_else(|| self.access.get(token).and_then(|a| a.grant))
    }

    pub(crate) fn revoke_grant(&mut self, grant: u64, by: RevokedBy) -> bool {
        let Some(g) = self.grants.get_mut(grant as usize) else {
            return false;
        };
        if g.counters.revoked.is_none() {
            g.counters.revoked = Some(by);
        }
        for a in &g.access_tokens {
            if let Some(info) = self.access.get_mut(a) {
                info.dead = true;
            }
        }
        true
    }

    pub(super) fn issue_access(&mut self, grant: Option<u64>, consumer: &str) -> String {
        let access = self.token("at_");
        let expires = self.now() + self.rules.access_ttl;
        self.access.insert(
            access.clone(),
            AccessInfo {
                grant,
                consumer: consumer.to_owned(),
                expires,
                dead: false,
            },
        );
        if let Some(g) = grant.and_then(|g| self.grants.get_mut(g as usize)) {
            g.access_tokens.push(access.clone());
        }
        access
    }

    pub(super) fn issue_refresh(&mut self, grant: u64, access: &str) -> String {
        let refresh = self.token("rt_");
        let now = self.now();
        self.refresh.insert(
            refresh.clone(),
            RefreshInfo {
                grant,
                last_used: now,
                status: RefreshStatus::Live,
                access: access.to_owned(),
            },
        );
        refresh
    }

    pub(super) fn refresh(
        &mut self,
        consumer: &str,
        params: &HashMap<String, String>,
    ) -> Result<Map<String, Value>, ErrorBody> {
        self.totals.refresh_calls += 1;
        let now = self.now();
        let (token, grant_id, old_access) = self.accept_refresh_token(consumer, params, now)?;
        let grant = &mut self.grants[grant_id as usize];
        grant.counters.refreshes += 1;
        self.totals.refreshes += 1;
        let scopes = grant.scopes.clone();
        let access = self.issue_access(Some(grant_id), consumer);
        let reply_refresh = self.roll_refresh_token(&token, grant_id, &old_access, &access, now);
        Ok(self.success(&access, reply_refresh.as_deref(), &scopes, "refresh_token"))
    }

    /// The refresh token `params` present, with its grant and the access token issued
    /// beside it, when `consumer` may refresh with it at `now`: it is known, of this
    /// consumer's live grant, live (or retired within the leeway) and not expired. Counts the
    /// call against the grant, and each rejection.
    fn accept_refresh_token(
        &mut self,
        consumer: &str,
        params: &HashMap<String, String>,
        now: Duration,
    ) -> Result<(String, u64, String), ErrorBody> {
        let invalid = self.rules.errors.invalid_refresh.clone();
        let expired = self.rules.errors.expired_refresh.clone();
        let Some(token) = params.get("refresh_token").cloned() else {
            self.totals.rejected_refreshes += 1;
            return Err(invalid);
        };
        let Some(info) = self.refresh.get(&token) else {
            self.totals.rejected_refreshes += 1;
            return Err(invalid);
        };
        let (grant_id, status, last_used, old_access) =
            (info.grant, info.status, info.last_used, info.access.clone());
        let grant = &mut self.grants[grant_id as usize];
        grant.counters.refresh_calls += 1;
        if grant.counters.consumer != consumer || grant.counters.revoked.is_some() {
            return Err(self.reject_refresh(grant_id, invalid));
        }
        if let RefreshStatus::Retired { at } = status {
            self.check_reuse(grant_id, at, now, invalid)?;
        }
        let created = self.grants[grant_id as usize].created;
        if self
            .rules
            .refresh_inactivity
            .is_some_and(|limit| now.saturating_sub(last_used) > limit)
            || self
                .rules
                .refresh_absolute
                .is_some_and(|limit| now.saturating_sub(created) > limit)
        {
            return Err(self.reject_refresh(grant_id, expired));
        }
        Ok((token, grant_id, old_access))
    }

    /// Counts a rejected refresh against `grant_id` and the totals, and returns `body`.
    fn reject_refresh(&mut self, grant_id: u64, body: ErrorBody) -> ErrorBody {
        self.grants[grant_id as usize].counters.rejected += 1;
        self.totals.rejected_refreshes += 1;
        body
    }

    /// A refresh token retired at `at` presented again at `now`: within the rotation's
    /// leeway a counted reuse; after it a reuse detection, rejected with `invalid` (and the
    /// grant's whole family revoked when the profile says so).
    fn check_reuse(
        &mut self,
        grant_id: u64,
        at: Duration,
        now: Duration,
        invalid: ErrorBody,
    ) -> Result<(), ErrorBody> {
        let (leeway, revoke) = match self.rules.rotation {
            RotationRule::Rotate {
                leeway,
                reuse_revokes_family,
                ..
            } => (leeway, reuse_revokes_family),
            RotationRule::None => (None, false),
        };
        let grant = &mut self.grants[grant_id as usize];
        if leeway.is_some_and(|l| now.saturating_sub(at) <= l) {
            grant.counters.leeway_reuses += 1;
            self.totals.leeway_reuses += 1;
            return Ok(());
        }
        grant.counters.reuse_detections += 1;
        self.totals.reuse_detections += 1;
        let out = self.reject_refresh(grant_id, invalid);
        if revoke {
            self.revoke_grant(grant_id, RevokedBy::ReuseDetected);
        }
        Err(out)
    }

    /// The refresh token a successful refresh replies with, after the profile's rotation
    /// rule ran on the presented `token` (whose grant's new access token is `access`): kept
    /// (returned again if the profile does) or retired for a new one (the old access token
    /// dying with it if the profile says so).
    fn roll_refresh_token(
        &mut self,
        token: &str,
        grant_id: u64,
        old_access: &str,
        access: &str,
        now: Duration,
    ) -> Option<String> {
        match self.rules.rotation {
            RotationRule::None => {
                if let Some(info) = self.refresh.get_mut(token) {
                    info.last_used = now;
                    info.access = access.to_owned();
                }
                self.rules
                    .refresh_reply_has_refresh_token
                    .then(|| token.to_owned())
            }
            RotationRule::Rotate {
                old_access_dies, ..
            } => {
                if let Some(info) = self.refresh.get_mut(token)
                    && matches!(info.status, RefreshStatus::Live)
                {
                    info.status = RefreshStatus::Retired { at: now };
                }
                if old_access_dies && let Some(a) = self.access.get_mut(old_access) {
                    a.dead = true;
                }
                let g = &mut self.grants[grant_id as usize];
                g.counters.rotations += 1;
                self.totals.rotations += 1;
                Some(self.issue_refresh(grant_id, access))
            }
        }
    }
}
