//! Re-authorizations that hold only while the installation stays as it was when they began
//! (review N3): `begin_reauthorization` signs the record's incarnation, authorization
//! generation and revocation into the state, so a callback after a deletion, a re-creation,
//! another flow's grant or a revocation is refused before the code is spent; a flow begun
//! after the revocation re-authorizes on purpose. `begin_installation` chooses a new id and
//! never replaces an existing installation.

mod common;

use std::sync::Arc;

use common::*;
use tokenkeeper::{
    AuthorizationCode, Error, InstallError, InstallationId, TokenManager, core::StateKind,
    core::TokenStore, oauth::AuthorizationRequest, profiles,
};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

async fn setup() -> (MockProvider, TokenManager, Arc<dyn TokenStore>) {
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let manager = manager_builder(
        consumer_for(profiles::bitbucket(), &mock, DEFAULT_CLIENT_SECRET),
        store.clone(),
    )
    .build()
    .unwrap();
    (mock, manager, store)
}

fn approve(mock: &MockProvider, begun: &AuthorizationRequest) -> AuthorizationCode {
    let q: std::collections::HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
    let challenge = q.get("code_challenge").map(|c| (c.as_str(), "S256"));
    AuthorizationCode::new(
        mock.authorize_code_as("alice", DEFAULT_CLIENT_ID, Some(REDIRECT), challenge)
            .unwrap(),
    )
}

async fn complete(
    manager: &TokenManager,
    mock: &MockProvider,
    begun: &AuthorizationRequest,
) -> Result<tokenkeeper::oauth::Completed, Error> {
    manager
        .complete_authorization(approve(mock, begun), &begun.state, &begun.binding)
        .await
}

async fn installed(manager: &TokenManager, mock: &MockProvider) -> InstallationId {
    let begun = manager.begin_authorization(None).unwrap();
    complete(manager, mock, &begun).await.unwrap().installation
}

fn superseded(e: Error) -> &'static str {
    match e {
        Error::Install(a) => match &*a {
            InstallError::Superseded { what, .. } => what,
            other => panic!("expected Superseded, got {other}"),
        },
        other => panic!("expected Superseded, got {other}"),
    }
}

#[tokio::test]
async fn a_deletion_or_another_grant_since_the_flow_began_supersedes_it() {
    let (mock, manager, store) = setup().await;
    let id = installed(&manager, &mock).await;
    // Deleted meanwhile: not created again by the old flow.
    let pending = manager.begin_reauthorization(&id).await.unwrap();
    let record = store.get(&id).await.unwrap().unwrap();
    store.delete(&id, record.version()).await.unwrap();
    let exchanges = mock.counters().totals.code_exchanges;
    let e = complete(&manager, &mock, &pending).await.unwrap_err();
    assert_eq!(superseded(e), "was deleted since this flow began");
    assert!(store.get(&id).await.unwrap().is_none());
    assert_eq!(
        mock.counters().totals.code_exchanges,
        exchanges,
        "code spent"
    );
    // Created again meanwhile (another incarnation): refused too.
    let pending = manager.begin_reauthorization(&id).await.unwrap();
    let again = manager.begin_installation(id.clone()).unwrap();
    complete(&manager, &mock, &again).await.unwrap();
    let e = complete(&manager, &mock, &pending).await.unwrap_err();
    assert_eq!(
        superseded(e),
        "was created by another flow since this one began"
    );
    // Two reconnects of one installation: the first to complete wins, the other is refused.
    let one = manager.begin_reauthorization(&id).await.unwrap();
    let two = manager.begin_reauthorization(&id).await.unwrap();
    complete(&manager, &mock, &one).await.unwrap();
    let e = complete(&manager, &mock, &two).await.unwrap_err();
    assert_eq!(
        superseded(e),
        "was authorized again by another flow since this one began"
    );
}

#[tokio::test]
async fn a_revoked_installation_is_reauthorized_only_by_a_flow_begun_after() {
    let (mock, manager, store) = setup().await;
    let id = installed(&manager, &mock).await;
    let before = manager.begin_reauthorization(&id).await.unwrap();
    manager.revoke(&id).await.unwrap();
    let after = manager.begin_reauthorization(&id).await.unwrap();
    let e = complete(&manager, &mock, &before).await.unwrap_err();
    assert_eq!(superseded(e), "was revoked since this flow began");
    complete(&manager, &mock, &after)
        .await
        .expect("a flow begun after the revocation re-authorizes on purpose");
    let record = store.get(&id).await.unwrap().unwrap();
    assert_eq!(record.state().kind(), StateKind::Active);
    manager.access_token(&id).await.unwrap();
}

#[tokio::test]
async fn a_chosen_id_for_a_new_installation_never_replaces_one() {
    let (mock, manager, _store) = setup().await;
    let id = InstallationId::new("workspace-acme").unwrap();
    let first = manager.begin_installation(id.clone()).unwrap();
    let second = manager.begin_installation(id.clone()).unwrap();
    let done = complete(&manager, &mock, &first).await.unwrap();
    assert!(done.created);
    assert_eq!(done.installation, id);
    match complete(&manager, &mock, &second).await {
        Err(Error::Install(a)) => {
            assert!(matches!(&*a, InstallError::AlreadyInstalled { .. }), "{a}")
        }
        other => panic!("a second user's flow replaced the installation: {other:?}"),
    }
}
