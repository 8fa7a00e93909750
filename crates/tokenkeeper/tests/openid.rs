//! The generic profile against an OpenID Connect server, end to end over HTTP (the mock in its
//! Google behaviour, which issues an `id_token` when the consumer has the `openid` scope):
//! authorization with `offline_access` and `prompt=consent`, the ID token handed back by
//! `complete_authorization`, then refreshes through the manager.

mod common;

use std::time::Duration;

use base64::Engine as _;
use tokenkeeper::stores::MemoryStore;
use tokenkeeper::{ConsumerConfig, ProviderProfile, TokenManager, reqwest::Url};
use tokenkeeper_mock_provider::{
    ConsumerSpec, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

#[tokio::test]
async fn the_generic_profile_completes_an_openid_authorization_and_refreshes() {
    let mock = MockProvider::builder()
        .profile(MockProfile::Google)
        .consumer(
            ConsumerSpec::new(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET).scopes([
                "openid",
                "email",
                "offline_access",
            ]),
        )
        .start()
        .await
        .unwrap();
    // What an application writes for any OpenID server: the two endpoints, the scopes that
    // make it issue a refresh token, and consent every time.
    let mut profile = ProviderProfile::generic(
        "openid-server",
        Url::parse(&mock.authorize_url()).unwrap(),
        Url::parse(&mock.token_url()).unwrap(),
    );
    profile.required_scopes = vec!["openid".into(), "offline_access".into()];
    // The account is the ID token's subject.
    profile.identity = tokenkeeper::oauth::IdentityCheck::IdTokenSubject;
    profile
        .extra_authorize_params
        .push(("prompt".into(), "consent".into()));
    let consumer = ConsumerConfig::builder(profile)
        .client_id(DEFAULT_CLIENT_ID)
        .client_secret(DEFAULT_CLIENT_SECRET)
        .redirect_uri(common::REDIRECT)
        .state_key(common::state_key())
        .scopes(["email"])
        .build()
        .unwrap();
    let clock = common::now_clock();
    let manager = TokenManager::builder(consumer, MemoryStore::new())
        .clock(clock.clone())
        .build()
        .unwrap();

    let begun = manager.begin_authorization(None).unwrap();
    let query: std::collections::HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
    assert_eq!(query["scope"], "email openid offline_access");
    assert_eq!(query["prompt"], "consent");
    let (code, _) = common::browser(&begun.url).await;
    let done = manager
        .complete_authorization(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
        )
        .await
        .unwrap();
    assert!(done.created);

    // The ID token is handed back, not dropped, and says who the user is.
    let id_token = done.id_token.expect("an OpenID server sends an id_token");
    assert_eq!(format!("{id_token:?}"), "IdToken([redacted])");
    let payload = id_token.secret().split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], DEFAULT_CLIENT_ID);
    assert_eq!(claims["sub"], tokenkeeper_mock_provider::DEFAULT_ACCOUNT);
    // The identity check read the account from it.
    let record = manager
        .store()
        .get(&done.installation)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        record.account(),
        Some(tokenkeeper_mock_provider::DEFAULT_ACCOUNT)
    );

    // The installation works and refreshes through the generic profile.
    let first = manager.access_token(&done.installation).await.unwrap();
    clock.advance(Duration::from_secs(3600));
    mock.advance(Duration::from_secs(3600));
    let second = manager.access_token(&done.installation).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(mock.counters().totals.refreshes, 1);
    let explained = manager.explain(&done.installation).await.unwrap();
    assert!(explained.is_healthy(), "{explained}");
}

/// A mock in its OpenID behaviour and a generic profile whose ID token subject is the
/// account, with the issuer `issuer` picks (given the running mock) as the profile's issuer.
async fn openid_manager(
    issuer: impl FnOnce(&MockProvider) -> Option<String>,
) -> (MockProvider, TokenManager) {
    let mock = MockProvider::builder()
        .profile(MockProfile::Google)
        .consumer(
            ConsumerSpec::new(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)
                .scopes(["openid", "offline_access"]),
        )
        .start()
        .await
        .unwrap();
    let mut profile = ProviderProfile::generic(
        "openid-server",
        Url::parse(&mock.authorize_url()).unwrap(),
        Url::parse(&mock.token_url()).unwrap(),
    );
    profile.required_scopes = vec!["openid".into(), "offline_access".into()];
    profile.identity = tokenkeeper::oauth::IdentityCheck::IdTokenSubject;
    profile.issuer = issuer(&mock);
    let consumer = ConsumerConfig::builder(profile)
        .client_id(DEFAULT_CLIENT_ID)
        .client_secret(DEFAULT_CLIENT_SECRET)
        .redirect_uri(common::REDIRECT)
        .state_key(common::state_key())
        .build()
        .unwrap();
    let manager = TokenManager::builder(consumer, MemoryStore::new())
        .clock(common::now_clock())
        .build()
        .unwrap();
    (mock, manager)
}

async fn install(
    manager: &TokenManager,
) -> Result<tokenkeeper::oauth::Completed, tokenkeeper::Error> {
    let begun = manager.begin_authorization(None).unwrap();
    let (code, _) = common::browser(&begun.url).await;
    manager
        .complete_authorization_with_issuer(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
            None,
        )
        .await
}

/// Review N4: the account comes from the ID token's `sub`, which is unique per issuer only;
/// an ID token from another issuer than the profile names is refused before anything is
/// stored (OpenID Connect Core 1.0 §3.1.3.7 item 2), and one from the named issuer passes.
#[tokio::test]
async fn an_id_token_of_another_issuer_is_refused() {
    let elsewhere = "https://another-issuer.example";
    let (_mock, manager) = openid_manager(|_| Some(elsewhere.to_owned())).await;
    match install(&manager).await {
        Err(tokenkeeper::Error::Authorization(e)) => {
            assert!(e.to_string().contains(elsewhere), "{e}");
        }
        other => panic!("an ID token of another issuer was believed: {other:?}"),
    }
    let stored = manager.store().list(Default::default(), None, 10).await;
    assert!(stored.unwrap().entries.is_empty());
    let (_mock, manager) = openid_manager(|mock| Some(mock.issuer())).await;
    install(&manager)
        .await
        .expect("the named issuer's ID token passes");
}
