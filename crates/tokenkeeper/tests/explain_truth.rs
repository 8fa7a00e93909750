//! `explain` never invents a provider's words: a verdict tokenkeeper reached without asking
//! the provider (no refresh token, an expiry, a leeway passed) says so, and a healthy
//! installation authorized again after a failure shows that failure as the earlier grant's.

mod common;

use std::time::Duration;

use common::*;
use tokenkeeper::{AccessToken, InstallationId, core::StateKind, core::TokenSet, profiles};
use tokenkeeper_mock_provider::MockProfile;

/// An imported token without a refresh token expires: the installation needs a new
/// authorization, and nothing was sent to the provider, so nothing is quoted from it.
#[tokio::test]
async fn a_verdict_reached_without_the_provider_quotes_no_provider() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    let id = InstallationId::new("imported-without-refresh").unwrap();
    let now = tokenkeeper::core::Clock::now(&f.clock);
    let tokens = TokenSet::bearer(
        AccessToken::new("gho_imported"),
        None,
        now,
        now.saturating_add(Duration::from_secs(3600)),
    );
    f.manager
        .import_installation(id.clone(), tokens)
        .await
        .unwrap();
    f.advance(Duration::from_secs(2 * 3600));
    assert!(f.manager.access_token(&id).await.is_err());
    assert_eq!(f.mock.counters().totals.token_calls, 0);
    let text = f.manager.explain(&id).await.unwrap().to_string();
    assert!(!text.contains("provider said"), "{text}");
    assert!(text.contains("Nothing was asked of the provider"), "{text}");
}

/// A grant revoked at the provider is condemned with the provider's words; the user
/// authorizes again and the installation is healthy: the old error is labelled as the
/// earlier grant's, not shown as the current one's.
#[tokio::test]
async fn a_reauthorized_installation_labels_the_old_grants_error() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    let current = f.record(&id).await.tokens().access_token.clone();
    f.mock.revoke_grant_of(current.secret()).unwrap();
    f.advance(Duration::from_secs(2 * 3600));
    assert!(f.manager.access_token(&id).await.is_err());
    let condemned = f.manager.explain(&id).await.unwrap();
    assert_eq!(condemned.kind(), StateKind::ReauthorizationRequired);
    assert!(!condemned.last_error_of_earlier_grant);
    authorize_with(&f.manager, &f.mock, Some(id.clone())).await;
    let healthy = f.manager.explain(&id).await.unwrap();
    assert!(healthy.is_healthy());
    assert!(healthy.last_error_of_earlier_grant);
    let text = healthy.to_string();
    assert!(text.contains("of an earlier grant"), "{text}");
}
