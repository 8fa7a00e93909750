//! Every `ReauthReason` and every `BackoffCause`, produced through the public API over real
//! HTTP to the mock provider, with the `explain` text that names the cause and the action;
//! and the reasons that must *not* be raised: a token without a refresh token is served until
//! it expires (a permanent one forever), a refresh token past its known expiry is recorded as
//! expired without being presented, and consumer-credential outages never spend the failure
//! budget.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Fixture;
use tokenkeeper::{
    AccessToken, Error, InstallationId, core::BackoffCause, core::StateKind, core::TokenSet,
    profiles,
};
use tokenkeeper_core::{ReauthReason, State};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Endpoint, Fault, FaultRule, MockProfile, MockProvider,
};

const DAY: u64 = 24 * 3600;

/// `access_token` fails with `reason`, and `explain` names it and says what to do.
async fn assert_condemned(f: &Fixture, id: &InstallationId, reason: ReauthReason, words: &[&str]) {
    match f.manager.access_token(id).await {
        Err(e @ Error::ReauthorizationRequired { .. }) => {
            assert!(e.needs_reauthorization());
            assert!(
                matches!(e, Error::ReauthorizationRequired { reason: r, .. } if r == reason),
                "expected {reason:?}, got {e}"
            );
        }
        other => panic!("expected ReauthorizationRequired({reason:?}), got {other:?}"),
    }
    let explained = f.manager.explain(id).await.unwrap();
    assert_eq!(explained.reauthorization_reason(), Some(reason));
    let text = explained.to_string();
    assert!(text.contains(reason.describe()), "{text}");
    assert!(text.contains("authorize the app again"), "{text}");
    for w in words {
        assert!(text.contains(w), "{w:?} missing from: {text}");
    }
}

/// The record is in backoff for `cause`, and `explain` names it and says what to do.
/// The provider refused this process's own configuration: the shared record is untouched
/// (not in backoff; other processes may be configured right), and `explain` names the
/// process's breaker with `words`.
async fn assert_process_breaker(f: &Fixture, id: &InstallationId, words: &[&str]) {
    let explained = f.manager.explain(id).await.unwrap();
    assert!(
        !matches!(explained.state, State::Backoff { .. }),
        "the record stays clear of this process's configuration: {explained}"
    );
    assert!(explained.process_breaker.is_some(), "{explained}");
    let text = explained.to_string();
    for w in words {
        assert!(text.contains(w), "{w:?} missing from: {text}");
    }
}

async fn assert_backoff(f: &Fixture, id: &InstallationId, cause: BackoffCause, words: &[&str]) {
    let explained = f.manager.explain(id).await.unwrap();
    assert!(
        matches!(explained.state, State::Backoff { cause: c, .. } if c == cause),
        "expected Backoff({cause:?}): {explained}"
    );
    let text = explained.to_string();
    for w in words {
        assert!(text.contains(w), "{w:?} missing from: {text}");
    }
}

fn fault(f: &Fixture, fault: Fault) {
    f.mock
        .set_faults(vec![FaultRule::next(Endpoint::Token, 1, fault)]);
}

fn error_reply(status: u16, error: &str, description: &str) -> Fault {
    Fault::ErrorReply {
        status,
        error: error.into(),
        description: description.into(),
    }
}

#[tokio::test]
async fn refresh_token_rejected_when_the_user_revoked_the_grant() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    let token = f.manager.access_token(&id).await.unwrap();
    f.mock.revoke_grant_of(token.secret()).unwrap();
    f.advance(Duration::from_secs(7200));
    assert_condemned(
        &f,
        &id,
        ReauthReason::RefreshTokenRejected,
        &["Invalid refresh_token"],
    )
    .await;
}

#[tokio::test]
async fn scopes_changed_on_invalid_scope() {
    let f = Fixture::new(profiles::atlassian_3lo(), MockProfile::Atlassian3lo).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(3600));
    fault(
        &f,
        error_reply(400, "invalid_scope", "The requested scope is invalid."),
    );
    assert_condemned(
        &f,
        &id,
        ReauthReason::ScopesChanged,
        &["scopes changed", "The requested scope is invalid."],
    )
    .await;
}

#[tokio::test]
async fn rotated_token_lost_when_the_reply_of_a_rotation_is_dropped() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(28_800));
    fault(&f, Fault::CommitThenDrop);
    assert!(matches!(
        f.manager.access_token(&id).await,
        Err(Error::TemporarilyUnavailable { .. })
    ));
    f.advance(Duration::from_secs(60));
    assert_condemned(&f, &id, ReauthReason::RotatedTokenLost, &["reply was lost"]).await;
}

#[tokio::test]
async fn failure_budget_exhausted_after_days_of_transient_failures() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    f.mock.set_faults(vec![FaultRule::probability(
        Endpoint::Token,
        1.0,
        Fault::ServerError {
            status: 503,
            html: true,
        },
    )]);
    for _ in 0..6 {
        f.advance(Duration::from_secs(DAY));
        if f.manager.access_token(&id).await.is_err()
            && f.manager.explain(&id).await.unwrap().kind() == StateKind::ReauthorizationRequired
        {
            break;
        }
    }
    assert_condemned(
        &f,
        &id,
        ReauthReason::FailureBudgetExhausted,
        &["failure budget"],
    )
    .await;
}

/// Finding 8: an imported GitHub token without a refresh token is served for its whole
/// lifetime (the refresher leaves it alone) and becomes `NoRefreshToken` only once it expired;
/// nothing is ever sent to the token endpoint.
#[tokio::test]
async fn no_refresh_token_is_served_until_it_expires() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    let id = InstallationId::new("imported-without-refresh").unwrap();
    let now = tokenkeeper::core::Clock::now(&f.clock);
    let tokens = TokenSet::bearer(
        AccessToken::new("gho_imported"),
        None,
        now,
        now.saturating_add(Duration::from_secs(8 * 3600)),
    );
    f.manager
        .import_installation(id.clone(), tokens)
        .await
        .unwrap();
    f.advance(Duration::from_secs(7 * 3600 + 50 * 60));
    let refresher = f.manager.spawn_refresher_with(common::fast_refresher());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        f.manager.access_token(&id).await.unwrap().secret(),
        "gho_imported",
        "still valid: served"
    );
    assert_eq!(
        f.manager.explain(&id).await.unwrap().kind(),
        StateKind::Active
    );
    f.advance(Duration::from_secs(11 * 60));
    assert_condemned(
        &f,
        &id,
        ReauthReason::NoRefreshToken,
        &["no refresh token", "refresh token none"],
    )
    .await;
    refresher.shutdown().await;
    assert_eq!(f.mock.counters().totals.token_calls, 0, "nothing presented");
}

/// A token issued without `expires_in` and without a refresh token (a GitHub OAuth app) never
/// expires: ten years on, with the refresher running, it is still served and healthy.
#[tokio::test]
async fn a_permanent_token_is_never_condemned_by_a_timer() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::MissingFields {
            fields: vec!["expires_in".into(), "refresh_token".into()],
        },
    )]);
    let id = f.install().await;
    let token = f.manager.access_token(&id).await.unwrap();
    // Asking for a refresh of what cannot be refreshed serves the token, condemns nothing.
    assert_eq!(f.manager.force_refresh(&id).await.unwrap(), token);
    let refresher = f.manager.spawn_refresher_with(common::fast_refresher());
    for _ in 0..10 {
        f.advance(Duration::from_secs(365 * DAY));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(f.manager.access_token(&id).await.unwrap(), token);
    }
    refresher.shutdown().await;
    let explained = f.manager.explain(&id).await.unwrap();
    assert_eq!(explained.kind(), StateKind::Active);
    let text = explained.to_string();
    assert!(
        text.contains("does not expire") && text.contains("access expires never"),
        "{text}"
    );
    assert_eq!(f.mock.counters().totals.refresh_calls, 0);
}

/// A Bitbucket refresh token unused for longer than its inactivity expiry is recorded as
/// `RefreshTokenExpired`, without presenting it (the provider would only refuse it).
#[tokio::test]
async fn refresh_token_expired_by_inactivity_is_not_presented() {
    let f = Fixture::tuned_in_memory(profiles::bitbucket(), MockProfile::Bitbucket, |p| {
        p.keep_alive = None
    })
    .await;
    let id = f.install().await;
    f.advance(Duration::from_secs(91 * DAY));
    assert_condemned(
        &f,
        &id,
        ReauthReason::RefreshTokenExpired,
        &["inactivity limit", "it was not presented"],
    )
    .await;
    assert_eq!(f.mock.counters().totals.refresh_calls, 0);
}

/// GitHub says how long each refresh token lives (`refresh_token_expires_in`); past it the
/// installation is `RefreshTokenExpired`, named after the provider's word.
#[tokio::test]
async fn refresh_token_expired_by_the_providers_word() {
    let mut profile = profiles::github_app();
    profile.refresh_inactivity_expiry = None;
    let f =
        Fixture::tuned_in_memory(profile, MockProfile::GithubApp, |p| p.keep_alive = None).await;
    let id = f.install().await;
    let explained = f.manager.explain(&id).await.unwrap();
    let (at, why) = explained.refresh_token_expires.expect("the reply said");
    assert!(why.contains("the provider gave it"), "{why}");
    assert_eq!(
        at,
        explained
            .authorized_at
            .saturating_add(Duration::from_secs(15_897_600))
    );
    f.advance(Duration::from_secs(15_897_600 + 1));
    assert_condemned(
        &f,
        &id,
        ReauthReason::RefreshTokenExpired,
        &["the expiry the provider gave it"],
    )
    .await;
    assert_eq!(f.mock.counters().totals.refresh_calls, 0);
}

/// The provider expires the token a few seconds before this side's reckoning: its refusal
/// arrives within the skew margin of the known expiry, so it is an expiry, not a revocation.
#[tokio::test]
async fn a_refusal_at_the_known_expiry_is_an_expiry() {
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .refresh_inactivity(Some(Duration::from_secs(90 * DAY - 30)))
        .start()
        .await
        .unwrap();
    let f = Fixture::with_mock(
        mock,
        profiles::bitbucket(),
        Arc::new(tokenkeeper_memory::MemoryStore::new()),
        |p| p.keep_alive = None,
    );
    let id = f.install().await;
    f.advance(Duration::from_secs(90 * DAY - 10));
    assert_condemned(
        &f,
        &id,
        ReauthReason::RefreshTokenExpired,
        &["Invalid refresh_token"],
    )
    .await;
    assert_eq!(
        f.mock.counters().totals.rejected_refreshes,
        1,
        "presented once"
    );
}

#[tokio::test]
async fn backoff_transient_serves_the_valid_token_and_says_when_it_retries() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    let token = f.manager.access_token(&id).await.unwrap();
    // Stale but still valid: the refresh fails, the valid token is served.
    f.advance(Duration::from_secs(7200 - 30));
    fault(
        &f,
        Fault::ServerError {
            status: 503,
            html: true,
        },
    );
    assert_eq!(f.manager.access_token(&id).await.unwrap(), token);
    assert_backoff(
        &f,
        &id,
        BackoffCause::Transient,
        &["failed temporarily", "the next attempt is at", "HTTP 503"],
    )
    .await;
}

#[tokio::test]
async fn backoff_consumer_credentials_says_fix_the_secret() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(7200));
    f.mock
        .rotate_client_secret(DEFAULT_CLIENT_ID, "rotated-elsewhere");
    assert!(matches!(
        f.manager.access_token(&id).await,
        Err(Error::ConsumerCredentials { .. })
    ));
    assert_process_breaker(
        &f,
        &id,
        &[
            "refused this process's client credentials",
            "Fix the client id/secret",
        ],
    )
    .await;
}

#[tokio::test]
async fn backoff_configuration_says_check_the_profile() {
    let f = Fixture::new(profiles::google(), MockProfile::Google).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(3600));
    fault(
        &f,
        error_reply(400, "unsupported_grant_type", "Invalid grant_type: "),
    );
    assert!(matches!(
        f.manager.access_token(&id).await,
        Err(Error::Configuration { .. })
    ));
    assert_process_breaker(
        &f,
        &id,
        &[
            "refused this process's refresh request as malformed",
            "Check the provider profile",
        ],
    )
    .await;
}

/// Finding 12: a wrong client secret deployed over a long weekend, then one 503 after the fix,
/// must not condemn anything: only transient failures spend the failure budget.
#[tokio::test]
async fn a_credential_outage_never_spends_the_failure_budget() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    f.mock
        .rotate_client_secret(DEFAULT_CLIENT_ID, "deployed-elsewhere");
    f.advance(Duration::from_secs(7200));
    for _ in 0..(4 * 24) {
        f.advance(Duration::from_secs(3600));
        assert!(f.manager.access_token(&id).await.is_err());
    }
    f.mock
        .rotate_client_secret(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET);
    f.advance(Duration::from_secs(3600));
    fault(
        &f,
        Fault::ServerError {
            status: 503,
            html: false,
        },
    );
    match f.manager.access_token(&id).await {
        Err(Error::TemporarilyUnavailable { .. }) => {}
        other => panic!("one 503 after a credential outage: {other:?}"),
    }
    f.advance(Duration::from_secs(3600));
    f.manager
        .access_token(&id)
        .await
        .expect("healthy once the provider answers");
}

/// Finding 3's breaker: the provider suddenly refuses every refresh token (here a consumer
/// scope change, which revokes them all; a provider incident looks the same). The first
/// refusals condemn; from the threshold on they are held in `Backoff { MassRejection }` with
/// the tokens kept and an explanation. A successful refresh ends the episode, and a hold that
/// passes without one is believed.
#[tokio::test]
async fn mass_rejection_is_held_until_a_success_or_the_hold_ends() {
    let hold = Duration::from_secs(24 * 3600);
    let f = Fixture::tuned_in_memory(profiles::bitbucket(), MockProfile::Bitbucket, |p| {
        p.mass_rejection = Some(tokenkeeper::policy::MassRejectionGuard {
            threshold: 3,
            window: Duration::from_secs(600),
            hold,
        })
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(f.install().await);
    }
    f.mock
        .set_consumer_scopes(DEFAULT_CLIENT_ID, &["repository", "account", "webhook"])
        .unwrap();
    f.advance(Duration::from_secs(7200));
    let mut held = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        match f.manager.access_token(id).await {
            Err(Error::ReauthorizationRequired { reason, .. }) => {
                assert!(n < 2, "installation {n} condemned past the threshold");
                assert_eq!(reason, ReauthReason::RefreshTokenRejected);
            }
            Err(e @ Error::RefusalsHeld { .. }) => {
                assert!(n >= 2, "installation {n} held below the threshold");
                assert!(e.to_string().contains("check the token URL"), "{e}");
                held.push(id.clone());
            }
            other => panic!("installation {n}: {other:?}"),
        }
    }
    assert_eq!(held.len(), 4);
    assert_backoff(
        &f,
        &held[0],
        BackoffCause::MassRejection,
        &[
            "refused those of many other installations",
            "Check the token URL",
            "Invalid refresh_token",
            "held, not condemned",
        ],
    )
    .await;
    // A new grant refreshes fine: the provider works, the episode ends, and each held
    // installation is judged on its own at its next attempt, one window later (not a whole
    // hold later).
    let fresh = f.install().await;
    f.advance(Duration::from_secs(7200));
    f.manager.access_token(&fresh).await.unwrap();
    f.advance(Duration::from_secs(600));
    assert_condemned(
        &f,
        &held[0],
        ReauthReason::RefreshTokenRejected,
        &["Invalid refresh_token"],
    )
    .await;
    // No success since: the next refusals trip it again; held ones are retried every window
    // and stay held, and after a whole hold without a success they are believed.
    f.manager.access_token(&held[1]).await.unwrap_err();
    assert!(matches!(
        f.manager.access_token(&held[2]).await,
        Err(Error::RefusalsHeld { .. })
    ));
    f.advance(Duration::from_secs(600));
    assert!(matches!(
        f.manager.access_token(&held[2]).await,
        Err(Error::RefusalsHeld { .. })
    ));
    f.advance(hold);
    assert_condemned(
        &f,
        &held[3],
        ReauthReason::RefreshTokenRejected,
        &["Invalid refresh_token"],
    )
    .await;
}

/// The refresh token expired while the access token is still valid (a grant's absolute
/// expiry, here shortened to 1 h): the refresher presents nothing, the access token is served
/// until it expires, and only then is the installation `RefreshTokenExpired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_refresh_token_still_serves_its_valid_access_token() {
    let mut profile = profiles::bitbucket();
    profile.refresh_absolute_expiry = Some(Duration::from_secs(3600));
    let f =
        Fixture::tuned_in_memory(profile, MockProfile::Bitbucket, |p| p.keep_alive = None).await;
    let id = f.install().await;
    let token = f.manager.access_token(&id).await.unwrap();
    // Past the refresh-ahead point (15 min before expiry) and the 1 h absolute expiry.
    f.advance(Duration::from_secs(106 * 60));
    let refresher = f.manager.spawn_refresher_with(common::fast_refresher());
    tokio::time::sleep(Duration::from_millis(300)).await;
    refresher.shutdown().await;
    assert_eq!(f.manager.access_token(&id).await.unwrap(), token);
    let explained = f.manager.explain(&id).await.unwrap();
    assert_eq!(explained.kind(), StateKind::Active, "{explained}");
    assert!(explained.summary.contains("Expiring"), "{explained}");
    assert_eq!(
        explained.due_at,
        Some(explained.access_expires_at),
        "due again when the access token expires"
    );
    f.advance(Duration::from_secs(14 * 60));
    assert_condemned(
        &f,
        &id,
        ReauthReason::RefreshTokenExpired,
        &["absolute limit since the authorization"],
    )
    .await;
    assert_eq!(
        f.mock.counters().totals.refresh_calls,
        0,
        "nothing presented"
    );
}

/// A host whose clock jumped months ahead sees every refresh token as expired: past the
/// mass-rejection threshold its condemnations by timer are held, not written.
#[tokio::test]
async fn expiries_by_timer_count_against_the_mass_rejection_guard() {
    let f = Fixture::tuned_in_memory(profiles::bitbucket(), MockProfile::Bitbucket, |p| {
        p.keep_alive = None;
        p.mass_rejection = Some(tokenkeeper::policy::MassRejectionGuard {
            threshold: 3,
            ..tokenkeeper::policy::MassRejectionGuard::default()
        });
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(f.install().await);
    }
    f.clock.advance(Duration::from_secs(91 * DAY));
    let mut outcomes = Vec::new();
    for id in &ids {
        outcomes.push(match f.manager.access_token(id).await {
            Err(Error::ReauthorizationRequired { reason, .. }) => format!("{reason:?}"),
            Err(Error::RefusalsHeld { .. }) => "held".to_owned(),
            other => panic!("{other:?}"),
        });
    }
    assert_eq!(
        outcomes,
        [
            "RefreshTokenExpired",
            "RefreshTokenExpired",
            "held",
            "held",
            "held"
        ]
    );
}

/// Ordinary expiries are no incident: twelve installations without refresh tokens that expire
/// together (a provider that issues none) are all `NoRefreshToken` at once; the guard counts
/// an expiry only when it is long overdue by this clock.
#[tokio::test]
async fn ordinary_expiries_do_not_trip_the_mass_rejection_guard() {
    let f = Fixture::new(profiles::google(), MockProfile::Google).await;
    let now = tokenkeeper::core::Clock::now(&f.clock);
    let mut ids = Vec::new();
    for n in 0..12 {
        let id = InstallationId::new(format!("no-refresh-{n}")).unwrap();
        let tokens = TokenSet::bearer(
            AccessToken::new(format!("ya29.{n}")),
            None,
            now,
            now.saturating_add(Duration::from_secs(3600)),
        );
        f.manager
            .import_installation(id.clone(), tokens)
            .await
            .unwrap();
        ids.push(id);
    }
    f.advance(Duration::from_secs(3600 + 60));
    for id in &ids {
        match f.manager.access_token(id).await {
            Err(Error::ReauthorizationRequired {
                reason: ReauthReason::NoRefreshToken,
                ..
            }) => {}
            other => panic!("{id}: {other:?}"),
        }
    }
}

/// The API refused a token that has no refresh token (GitHub, a permanent token revoked by
/// its user): `NoRefreshToken` at once, with the API's refusal as the reason, even while the
/// guard holds refusals.
#[tokio::test]
async fn a_401_on_a_token_without_refresh_token_condemns_it() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::MissingFields {
            fields: vec!["expires_in".into(), "refresh_token".into()],
        },
    )]);
    let id = f.install().await;
    f.advance(Duration::from_secs(120));
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Resource,
        2,
        Fault::ServerError {
            status: 401,
            html: false,
        },
    )]);
    let url = f.mock.resource_url();
    match f
        .manager
        .send_authorized(&id, f.manager.client().http().get(&url))
        .await
    {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::NoRefreshToken,
            detail,
            ..
        }) => {
            let said = detail.and_then(|d| d.description).unwrap_or_default();
            assert!(said.contains("the API refused the access token"), "{said}");
        }
        other => panic!("{other:?}"),
    }
}

/// One authorization through the manager, the browser leg done at the mock in process.
async fn authorize(f: &Fixture) -> tokenkeeper::oauth::Completed {
    common::authorize_with(&f.manager, &f.mock, None).await
}

/// Security review / #14: an authorization that brings no refresh token, for a profile that
/// expects one, is flagged at once in `Completed::warnings` (and `explain` says so), not
/// discovered at the first refresh.
#[tokio::test]
async fn an_authorization_without_refresh_token_is_flagged_at_once() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::MissingFields {
            fields: vec!["refresh_token".into()],
        },
    )]);
    let done = authorize(&f).await;
    match done.warnings.as_slice() {
        [w @ tokenkeeper::oauth::AuthorizationWarning::NoRefreshToken { .. }] => {
            assert!(w.to_string().contains("offline_access"), "{w}")
        }
        other => panic!("{other:?}"),
    }
    let text = f
        .manager
        .explain(&done.installation)
        .await
        .unwrap()
        .to_string();
    assert!(text.contains("issued no refresh token"), "{text}");
    // A normal authorization has no warning.
    let done = authorize(&f).await;
    assert!(done.warnings.is_empty());
}

/// A guard that trips at the second refusal within ten minutes (held up to a day); a scope
/// change refuses three installations: two are condemned, the third is held.
async fn one_held_installation() -> (Fixture, InstallationId) {
    let f = Fixture::tuned_in_memory(profiles::bitbucket(), MockProfile::Bitbucket, |p| {
        p.mass_rejection = Some(tokenkeeper::policy::MassRejectionGuard {
            threshold: 2,
            window: Duration::from_secs(600),
            hold: Duration::from_secs(DAY),
        })
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(f.install().await);
    }
    f.mock
        .set_consumer_scopes(DEFAULT_CLIENT_ID, &["repository", "account", "webhook"])
        .unwrap();
    f.advance(Duration::from_secs(7200));
    for id in &ids {
        let _ = f.manager.access_token(id).await;
    }
    assert!(matches!(
        f.manager.access_token(&ids[2]).await,
        Err(Error::RefusalsHeld { .. })
    ));
    (f, ids[2].clone())
}

/// Review E14: a held installation is not presented to the provider every window for the
/// whole hold (144 refused presentations in a day): the retries of one installation's hold
/// space out, doubling each time, so a day's hold presents its refused token a handful of
/// times.
#[tokio::test]
async fn a_held_refusal_is_presented_a_handful_of_times_a_day() {
    let (f, held) = one_held_installation().await;
    let held = &held;
    let before = f.mock.counters().totals.token_calls;
    // A caller asks every ten minutes for most of the day.
    for _ in 0..(23 * 6) {
        f.advance(Duration::from_secs(600));
        let _ = f.manager.access_token(held).await;
    }
    let presented = f.mock.counters().totals.token_calls - before;
    assert!(
        presented <= 8,
        "the refused token was presented {presented} times in a day"
    );
}

/// The other side of E14's spacing: a hold ends as soon as this process sees the provider
/// work again (a successful refresh a lease span after the hold, so a stalled holder's late
/// result could land first), not when its ever longer backoff runs out.
#[tokio::test]
async fn a_success_lifts_a_mass_rejection_hold() {
    let (f, held) = one_held_installation().await;
    let held = &held;
    let p = f.manager.policy();
    f.advance(p.lease_ttl + p.lease_margin);
    let fresh = f.install().await;
    f.manager
        .force_refresh(&fresh)
        .await
        .expect("the provider works");
    match f.manager.access_token(held).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RefreshTokenRejected,
            ..
        }) => {}
        other => panic!("the hold ends with the episode: {other:?}"),
    }
}

/// Review E2, the guard's half: a process's whole hold without a success of its own is not
/// enough to believe its refusals when other processes of the fleet refreshed successfully
/// meanwhile (read from the store's event log): the provider works, so this process's wave is
/// suspect (its configuration, its clock) and stays held. Without a success anywhere in the
/// fleet, a whole hold is believed as before.
#[tokio::test]
async fn a_hold_is_not_believed_while_other_processes_refresh() {
    let (f, held) = one_held_installation().await;
    let held = &held;
    // Another process of the fleet refreshes a new grant successfully during the hold.
    let peer = f.peer(profiles::bitbucket());
    let fresh = common::authorize_with(&peer, &f.mock, None)
        .await
        .installation;
    f.advance(Duration::from_secs(7200));
    peer.access_token(&fresh).await.expect("the provider works");
    // This process never succeeded; its hold runs out.
    f.advance(Duration::from_secs(DAY));
    match f.manager.access_token(held).await {
        Err(Error::RefusalsHeld { .. }) => {}
        other => panic!("believed although the fleet refreshed meanwhile: {other:?}"),
    }
    // A whole hold later, with no success anywhere: believed.
    f.advance(Duration::from_secs(2 * DAY));
    match f.manager.access_token(held).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RefreshTokenRejected,
            ..
        }) => {}
        other => panic!("a whole hold without a success anywhere is believed: {other:?}"),
    }
}

/// The event log could not be read when the hold began (where it stood is unknown): a hold
/// that runs out cannot be checked against the fleet's successes, so it is held again, not
/// believed on no evidence.
#[tokio::test]
async fn a_hold_whose_log_position_is_unknown_is_not_believed() {
    #[derive(Debug, Default)]
    struct EventsDown(std::sync::atomic::AtomicBool);
    #[async_trait::async_trait]
    impl tokenkeeper_testkit::wrappers::Hook for EventsDown {
        async fn before(
            &self,
            operation: tokenkeeper_testkit::wrappers::Operation<'_>,
        ) -> Result<(), tokenkeeper::core::StoreError> {
            match operation {
                tokenkeeper_testkit::wrappers::Operation::Events
                    if self.0.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    Err(tokenkeeper::core::StoreError::unavailable(
                        "test", "events", "down",
                    ))
                }
                _ => Ok(()),
            }
        }
    }
    let (store, down) = tokenkeeper_testkit::wrappers::Hooked::new(
        tokenkeeper_memory::MemoryStore::new(),
        EventsDown::default(),
    );
    down.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let f = Fixture::tuned(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
        |p| {
            p.mass_rejection = Some(tokenkeeper::policy::MassRejectionGuard {
                threshold: 1,
                window: Duration::from_secs(600),
                hold: Duration::from_secs(DAY),
            })
        },
    )
    .await;
    let id = f.install().await;
    f.mock
        .set_consumer_scopes(DEFAULT_CLIENT_ID, &["repository", "account", "webhook"])
        .unwrap();
    f.advance(Duration::from_secs(7200));
    assert!(matches!(
        f.manager.access_token(&id).await,
        Err(Error::RefusalsHeld { .. })
    ));
    down.0.store(false, std::sync::atomic::Ordering::SeqCst);
    f.advance(Duration::from_secs(DAY));
    match f.manager.access_token(&id).await {
        Err(Error::RefusalsHeld { .. }) => {}
        other => panic!("believed without knowing where the log stood: {other:?}"),
    }
}
