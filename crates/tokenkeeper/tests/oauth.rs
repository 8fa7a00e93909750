//! The OAuth protocol layer over real HTTP against the mock provider, for every profile:
//! independent installations, repeated callbacks, state and PKCE tampering, the error
//! classification of the design document with the provider's text preserved, and every fault kind.

mod common;

use std::time::Duration;

use common::*;
use std::sync::Arc;

use tokenkeeper::{
    AuthorizationCode, AuthorizationState, core::FailureClass, core::TokenStore,
    oauth::AuthorizationError, oauth::ErrorKind, oauth::OAuthClient, oauth::Revocation, profiles,
};
use tokenkeeper_memory::MemoryStore;
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile, MockProvider};

async fn mock(profile: MockProfile) -> MockProvider {
    MockProvider::builder()
        .profile(profile)
        .start()
        .await
        .unwrap()
}

async fn resource_status(mock: &MockProvider, access: &str) -> u16 {
    reqwest::Client::new()
        .get(mock.resource_url())
        .bearer_auth(access)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn three_authorizations_are_three_independent_installations_for_every_profile() {
    for (profile, kind) in all_profiles() {
        let mock = mock(kind).await;
        let client = client_for(profile.clone(), &mock);
        let store = Arc::new(MemoryStore::new());
        let mut ids = Vec::new();
        for _ in 0..3 {
            let done = install(&client, store.clone()).await;
            assert!(done.created);
            ids.push(done.installation);
        }
        assert_eq!(store.len(), 3, "{}", profile.name);
        let records: Vec<_> = {
            let mut v = Vec::new();
            for id in &ids {
                v.push(store.get(id).await.unwrap().unwrap());
            }
            v
        };
        assert!(records.iter().all(|r| {
            r.consumer() == client.consumer().name()
                && r.consumer()
                    .starts_with(&format!("{}/tokenkeeper-test-key@", profile.name))
        }));
        // Refreshing the first leaves the other two valid.
        let refreshed = client.refresh(&ids[0], records[0].tokens()).await.unwrap();
        assert_ne!(refreshed.access_token, records[0].tokens().access_token);
        for r in &records[1..] {
            assert_eq!(
                resource_status(&mock, r.tokens().access_token.secret()).await,
                200,
                "{}",
                profile.name
            );
            client
                .refresh(r.id(), r.tokens())
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", profile.name));
        }
        let c = mock.counters();
        assert_eq!(c.totals.code_exchanges, 3);
        assert_eq!(c.totals.refreshes, 3);
        assert_eq!(c.totals.reuse_detections, 0);
    }
}

#[tokio::test]
async fn a_repeated_callback_returns_the_installation_already_created() {
    let mock = mock(MockProfile::Bitbucket).await;
    let client = client_for(profiles::bitbucket(), &mock);
    let store = Arc::new(MemoryStore::new());
    let chosen = tokenkeeper::InstallationId::new("workspace-7/install-a").unwrap();
    let begun = client.begin_authorization(Some(chosen.clone())).unwrap();
    let (code, _) = browser(&begun.url).await;
    let manager = manager_builder(client.consumer().clone(), store.clone())
        .build()
        .unwrap();
    let complete = || {
        manager.complete_authorization(
            AuthorizationCode::new(code.as_str()),
            &begun.state,
            &begun.binding,
        )
    };
    let first = complete().await.unwrap();
    let second = complete().await.unwrap();
    assert_eq!(first.installation, chosen);
    assert!(first.created && !first.replayed);
    assert!(second.created && second.replayed, "{second:?}");
    assert_eq!(second.installation, chosen);
    assert_eq!(
        mock.counters().totals.code_exchanges,
        1,
        "the code was exchanged once"
    );
    assert_eq!(mock.counters().totals.code_reuses, 0);
}

#[tokio::test]
async fn tampered_foreign_unknown_and_expired_states_are_rejected() {
    let mock = mock(MockProfile::Bitbucket).await;
    let clock = now_clock();
    let client = manual_client(profiles::bitbucket(), &mock, &clock);
    let store = Arc::new(MemoryStore::new());
    let begun = client.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    let state = begun.state.as_str().to_owned();

    let mut tampered = state.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    // Another consumer: same client, another state key.
    let other = OAuthClient::new(
        tokenkeeper::ConsumerConfig::builder(common::pointed_at(profiles::bitbucket(), &mock))
            .client_id(tokenkeeper_mock_provider::DEFAULT_CLIENT_ID)
            .client_secret(tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET)
            .redirect_uri(REDIRECT)
            .state_key(tokenkeeper::StateKey::generate(1).unwrap())
            .build()
            .unwrap(),
        std::sync::Arc::new(clock.clone()),
    )
    .unwrap();
    let code = AuthorizationCode::new(&code);
    let with = |c: &OAuthClient, text: &str| {
        let (c, code, state) = (c.clone(), code.clone(), AuthorizationState::new(text));
        let binding = &begun.binding;
        async move { c.complete_authorization(&code, &state, binding).await }
    };
    for (what, result) in [
        ("tampered", with(&client, &tampered).await),
        ("unknown", with(&client, "not-a-state").await),
        ("empty", with(&client, "").await),
        ("truncated", with(&client, &state[..state.len() - 4]).await),
        ("foreign", with(&other, &state).await),
    ] {
        assert!(
            matches!(result, Err(AuthorizationError::InvalidState)),
            "{what}: {result:?}"
        );
    }
    clock.advance(Duration::from_secs(601));
    match with(&client, &state).await {
        Err(e @ AuthorizationError::ExpiredState { .. }) => {
            assert!(
                e.to_string().contains("start the authorization again"),
                "{e}"
            );
        }
        other => panic!("expected ExpiredState, got {other:?}"),
    }
    assert_eq!(
        mock.counters().totals.code_exchanges,
        0,
        "no exchange for a bad state"
    );
    assert!(store.is_empty());
}

#[tokio::test]
async fn pkce_is_sent_and_a_wrong_or_missing_verifier_is_rejected() {
    let mock = mock(MockProfile::Bitbucket).await;
    let client = client_for(profiles::bitbucket(), &mock);
    let begun = client.begin_authorization(None).unwrap();
    assert!(begun.url.as_str().contains("code_challenge_method=S256"));
    let (code, _) = browser(&begun.url).await;
    let e = client
        .exchange_code(
            &AuthorizationCode::new(&code),
            Some("a-wrong-verifier-that-is-long-enough-0123456789"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.status(), e.error_code()),
        (ErrorKind::Provider, Some(400), Some("invalid_grant"))
    );
    let begun = client.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    assert!(
        client
            .exchange_code(&AuthorizationCode::new(&code), None)
            .await
            .is_err(),
        "a missing verifier is refused"
    );
}

#[tokio::test]
async fn rejected_refreshes_keep_the_providers_words_for_every_profile() {
    let expected = [
        ("bitbucket", "invalid_request", "Invalid refresh_token"),
        (
            "bitbucket-legacy",
            "invalid_request",
            "Invalid refresh_token",
        ),
        (
            "atlassian-3lo",
            "invalid_grant",
            "Unknown or invalid refresh token.",
        ),
        (
            "github-app",
            "bad_refresh_token",
            "The refresh token passed is incorrect or expired.",
        ),
        (
            "google",
            "invalid_grant",
            "Token has been expired or revoked.",
        ),
    ];
    for ((profile, kind), (name, code, description)) in all_profiles().into_iter().zip(expected) {
        assert_eq!(profile.name, name);
        let mock = mock(kind).await;
        let client = client_for(profile, &mock);
        let store = Arc::new(MemoryStore::new());
        let id = install(&client, store.clone()).await.installation;
        let tokens = store.get(&id).await.unwrap().unwrap().tokens().clone();
        mock.revoke_grant_of(tokens.access_token.secret()).unwrap();
        let e = client.refresh(&id, &tokens).await.unwrap_err();
        assert_eq!(e.class(), FailureClass::RefreshTokenRejected, "{name}: {e}");
        assert_eq!(
            (e.error_code(), e.error_description()),
            (Some(code), Some(description)),
            "{name}"
        );
        assert_eq!(e.installation(), Some(&id));
        let text = e.to_string();
        assert!(
            text.contains(description) && text.contains(id.as_str()),
            "{text}"
        );
        assert!(text.contains("authorize the app again"), "{text}");
        let secret = tokens.refresh_token.as_ref().unwrap().secret();
        assert!(!text.contains(secret) && !format!("{e:?}").contains(secret));
    }
}

#[tokio::test]
async fn a_scope_change_makes_every_installation_rejected_with_the_provider_text() {
    let mock = mock(MockProfile::Bitbucket).await;
    let client = client_for(profiles::bitbucket(), &mock);
    let store = Arc::new(MemoryStore::new());
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(install(&client, store.clone()).await.installation);
    }
    mock.set_consumer_scopes(
        tokenkeeper_mock_provider::DEFAULT_CLIENT_ID,
        &["repository", "webhook"],
    )
    .unwrap();
    for id in &ids {
        let tokens = store.get(id).await.unwrap().unwrap().tokens().clone();
        let e = client.refresh(id, &tokens).await.unwrap_err();
        assert_eq!(e.class(), FailureClass::RefreshTokenRejected);
        assert_eq!(e.status(), Some(400));
        assert_eq!(e.error_description(), Some("Invalid refresh_token"));
    }
}

#[tokio::test]
async fn a_wrong_client_secret_is_consumer_wide_and_leaves_installations_untouched() {
    for (profile, kind) in all_profiles() {
        let mock = mock(kind).await;
        let good = client_for(profile.clone(), &mock);
        let store = Arc::new(MemoryStore::new());
        let id = install(&good, store.clone()).await.installation;
        let tokens = store.get(&id).await.unwrap().unwrap().tokens().clone();
        let bad = OAuthClient::new(
            consumer_for(profile.clone(), &mock, "the-wrong-secret"),
            std::sync::Arc::new(tokenkeeper::core::SystemClock),
        )
        .unwrap();
        let e = bad.refresh(&id, &tokens).await.unwrap_err();
        assert_eq!(
            e.class(),
            FailureClass::ConsumerCredentialsInvalid,
            "{}: {e}",
            profile.name
        );
        assert!(e.to_string().contains("installations are untouched"));
        assert!(!e.to_string().contains("the-wrong-secret"));
        good.refresh(&id, &tokens)
            .await
            .unwrap_or_else(|e| panic!("{}: tokens damaged: {e}", profile.name));
    }
}

#[tokio::test]
async fn a_json_body_sent_to_bitbucket_is_a_configuration_error() {
    let mock = mock(MockProfile::Bitbucket).await;
    let store = Arc::new(MemoryStore::new());
    let client = client_for(profiles::bitbucket(), &mock);
    let id = install(&client, store.clone()).await.installation;
    let tokens = store.get(&id).await.unwrap().unwrap().tokens().clone();
    let mut wrong = profiles::bitbucket();
    wrong.body_encoding = tokenkeeper::oauth::BodyEncoding::Json;
    let e = client_for(wrong, &mock)
        .refresh(&id, &tokens)
        .await
        .unwrap_err();
    assert_eq!(e.class(), FailureClass::Configuration, "{e}");
    assert_eq!(e.error_description(), Some("Unsupported grant type: None"));
}

#[tokio::test]
async fn every_fault_kind_is_classified_without_panic() {
    let mock = mock(MockProfile::Bitbucket).await;
    let client = client_for(profiles::bitbucket(), &mock);
    let store = Arc::new(MemoryStore::new());
    let id = install(&client, store.clone()).await.installation;
    let mut tokens = store.get(&id).await.unwrap().unwrap().tokens().clone();
    let cases: Vec<(Fault, Option<(ErrorKind, FailureClass)>)> = vec![
        (
            Fault::ServerError {
                status: 500,
                html: false,
            },
            Some((ErrorKind::InvalidResponse, FailureClass::Transient)),
        ),
        (
            Fault::ServerError {
                status: 502,
                html: true,
            },
            Some((ErrorKind::Provider, FailureClass::Transient)),
        ),
        (
            Fault::ServerError {
                status: 503,
                html: true,
            },
            Some((ErrorKind::Provider, FailureClass::Transient)),
        ),
        (
            Fault::TooManyRequests {
                retry_after_secs: 7,
            },
            Some((ErrorKind::InvalidResponse, FailureClass::Transient)),
        ),
        (
            Fault::ConnectionReset,
            Some((ErrorKind::Transport, FailureClass::Transient)),
        ),
        (
            Fault::MalformedJson,
            Some((ErrorKind::InvalidResponse, FailureClass::Transient)),
        ),
        (
            Fault::ErrorIn200,
            Some((ErrorKind::Provider, FailureClass::Transient)),
        ),
        (
            Fault::OversizedBody {
                bytes: 10 * 1024 * 1024,
            },
            Some((ErrorKind::TooLarge, FailureClass::Transient)),
        ),
        (
            Fault::MissingFields {
                fields: vec!["expires_in".into(), "token_type".into()],
            },
            None,
        ),
        (
            Fault::CommitThenDrop,
            Some((ErrorKind::Transport, FailureClass::Transient)),
        ),
        // Last: the mock still processes the request after our timeout.
        (
            Fault::Latency {
                min_ms: 3000,
                max_ms: 3000,
            },
            Some((ErrorKind::Transport, FailureClass::Transient)),
        ),
    ];
    for (fault, expected) in cases {
        mock.set_faults(vec![FaultRule::next(Endpoint::Token, 1, fault.clone())]);
        let outcome = client.refresh(&id, &tokens).await;
        match (outcome, expected) {
            (Err(e), Some((kind, class))) => {
                assert_eq!((e.kind(), e.class()), (kind, class), "{fault:?}: {e}");
                if let Fault::TooManyRequests { .. } = fault {
                    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
                }
                if let Fault::OversizedBody { .. } = fault {
                    assert!(e.to_string().contains("65536-byte limit"), "{e}");
                }
                let secret = tokens.refresh_token.as_ref().unwrap().secret();
                assert!(!e.to_string().contains(secret) && !format!("{e:?}").contains(secret));
            }
            (Ok(t), None) => {
                assert_eq!(t.lifetime(), Duration::from_secs(7200), "default lifetime");
                assert_eq!(t.token_type, "bearer");
                tokens = t;
            }
            (other, expected) => panic!("{fault:?}: got {other:?}, expected {expected:?}"),
        }
    }
    // Commit-then-drop rotated the token we never saw: Bitbucket now refuses the old one.
    let e = client.refresh(&id, &tokens).await.unwrap_err();
    assert_eq!(e.class(), FailureClass::RefreshTokenRejected);
}

#[tokio::test]
async fn client_credentials_and_rfc7009_revocation() {
    let mock = mock(MockProfile::Bitbucket).await;
    let client = client_for(profiles::bitbucket(), &mock);
    let cc = client.client_credentials().await.unwrap();
    assert!(cc.refresh_token.is_none());
    assert_eq!(resource_status(&mock, cc.access_token.secret()).await, 200);

    let store = Arc::new(MemoryStore::new());
    let id = install(&client, store.clone()).await.installation;
    let tokens = store.get(&id).await.unwrap().unwrap().tokens().clone();
    let revoked = client
        .revoke(
            Some(&id),
            tokens.refresh_token.as_ref().unwrap().secret(),
            "refresh_token",
        )
        .await
        .unwrap();
    assert_eq!(revoked, Revocation::Revoked);
    assert_eq!(
        client.refresh(&id, &tokens).await.unwrap_err().class(),
        FailureClass::RefreshTokenRejected
    );
    let mut no_endpoint = profiles::bitbucket();
    no_endpoint.revoke_url = None;
    let plain = OAuthClient::new(
        tokenkeeper::ConsumerConfig::builder(no_endpoint)
            .client_id("k")
            .client_secret("s")
            .redirect_uri(REDIRECT)
            .build()
            .unwrap(),
        std::sync::Arc::new(tokenkeeper::core::SystemClock),
    )
    .unwrap();
    assert_eq!(
        plain.revoke(None, "x", "refresh_token").await.unwrap(),
        Revocation::Unsupported
    );
}

#[tokio::test]
async fn expires_at_counts_from_when_the_request_was_sent() {
    let mock = mock(MockProfile::Bitbucket).await;
    let clock = now_clock();
    let client = manual_client(profiles::bitbucket(), &mock, &clock);
    let store = Arc::new(MemoryStore::new());
    let id = install(&client, store.clone()).await.installation;
    let before = store.get(&id).await.unwrap().unwrap().tokens().clone();
    let sent = clock.now_for_test();
    // The reply arrives after a delay; the clock moves meanwhile.
    mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::Latency {
            min_ms: 300,
            max_ms: 300,
        },
    )]);
    let advance = {
        let clock = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            clock.advance(Duration::from_secs(50));
        })
    };
    let after = client.refresh(&id, &before).await.unwrap();
    advance.await.unwrap();
    assert_eq!(after.obtained_at, sent);
    assert_eq!(
        after.expires_at,
        sent.saturating_add(Duration::from_secs(7200))
    );
}

trait NowForTest {
    fn now_for_test(&self) -> tokenkeeper::core::Timestamp;
}

impl NowForTest for tokenkeeper::core::ManualClock {
    fn now_for_test(&self) -> tokenkeeper::core::Timestamp {
        tokenkeeper::core::Clock::now(self)
    }
}
