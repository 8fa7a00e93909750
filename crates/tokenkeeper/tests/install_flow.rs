//! The installation flow, tried as an attacker would (security review H1, H2, M1, M2, L12):
//! a callback from another browser, a state replayed with another code, duplicate callbacks
//! racing in one process and in two, a re-authorization approved with another account, and
//! state keys rotating under in-flight flows. Real HTTP to the mock provider; the stores are
//! memory, SQLite on disk and a real redis-server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokenkeeper::{
    AuthorizationCode, ConsumerConfig, Error, InstallError, InstallationId, StateKey, TokenManager,
    core::StateKind, core::TokenStore, oauth::AuthorizationError, oauth::AuthorizationRequest,
    profiles,
};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Endpoint, Fault, FaultRule, MockProfile,
    MockProvider, RevokedBy,
};

async fn mock() -> MockProvider {
    MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap()
}

fn manager_on(mock: &MockProvider, store: Arc<dyn TokenStore>) -> TokenManager {
    manager_builder(
        consumer_for(profiles::bitbucket(), mock, DEFAULT_CLIENT_SECRET),
        store,
    )
    .build()
    .unwrap()
}

/// The provider's half of a flow: `account` approves, the mock returns the code.
fn approve(mock: &MockProvider, begun: &AuthorizationRequest, account: &str) -> String {
    let q: std::collections::HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
    let challenge = q.get("code_challenge").map(|c| (c.as_str(), "S256"));
    mock.authorize_code_as(account, DEFAULT_CLIENT_ID, Some(REDIRECT), challenge)
        .unwrap()
}

fn authorization_error(e: Error) -> Arc<AuthorizationError> {
    match e {
        Error::Authorization(inner) => inner,
        other => panic!("expected an authorization error, got {other}"),
    }
}

fn install_error(e: Error) -> Arc<InstallError> {
    match e {
        Error::Install(inner) => inner,
        other => panic!("expected the manager's refusal, got {other}"),
    }
}

/// H2: whoever sees a callback URL (code and state) cannot complete it from another browser;
/// the flow still completes from the browser that began it.
#[tokio::test]
async fn a_callback_from_another_browser_is_refused_without_an_exchange() {
    let mock = mock().await;
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let victim = manager.begin_authorization(None).unwrap();
    let code = approve(&mock, &victim, "victim");
    // The attacker's browser began a flow of its own: it has a binding, just not this one.
    let attacker = manager.begin_authorization(None).unwrap();
    for binding in [
        &attacker.binding,
        &tokenkeeper::BrowserBinding::generate().unwrap(),
    ] {
        let e = manager
            .complete_authorization(AuthorizationCode::new(&code), &victim.state, binding)
            .await
            .unwrap_err();
        let e = authorization_error(e);
        assert!(
            matches!(&*e, AuthorizationError::BrowserMismatch { installation } if installation == &victim.installation),
            "{e}"
        );
        assert!(
            e.to_string().contains("did not come from the browser"),
            "{e}"
        );
    }
    assert_eq!(mock.counters().totals.code_exchanges, 0);
    assert!(
        manager
            .store()
            .get(&victim.installation)
            .await
            .unwrap()
            .is_none()
    );
    // The victim's own callback still works: nothing was spent.
    let done = manager
        .complete_authorization(
            AuthorizationCode::new(&code),
            &victim.state,
            &victim.binding,
        )
        .await
        .unwrap();
    assert!(done.created && !done.replayed);
    assert_eq!(mock.counters().totals.code_exchanges, 1);
}

/// H1: a state once completed cannot be completed again with any other code, even from the
/// same browser; the same code gets the first outcome, without a second exchange.
#[tokio::test]
async fn a_state_replayed_with_another_code_is_refused() {
    let mock = mock().await;
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let begun = manager
        .begin_authorization(Some(InstallationId::new("ws-1").unwrap()))
        .unwrap();
    let code = approve(&mock, &begun, "victim");
    let first = manager
        .complete_authorization(AuthorizationCode::new(&code), &begun.state, &begun.binding)
        .await
        .unwrap();
    let before = manager
        .store()
        .get(&first.installation)
        .await
        .unwrap()
        .unwrap();
    // A code the attacker obtained for its own account, or garbage: same answer.
    let attackers = approve(
        &mock,
        &manager.begin_authorization(None).unwrap(),
        "mallory",
    );
    for other in [attackers.as_str(), "x"] {
        let e = manager
            .complete_authorization(AuthorizationCode::new(other), &begun.state, &begun.binding)
            .await
            .unwrap_err();
        let e = install_error(e);
        assert!(matches!(&*e, InstallError::AlreadyUsed { .. }), "{e}");
    }
    let again = manager
        .complete_authorization(AuthorizationCode::new(&code), &begun.state, &begun.binding)
        .await
        .unwrap();
    assert!(again.replayed && again.created);
    assert_eq!(mock.counters().totals.code_exchanges, 1);
    let after = manager
        .store()
        .get(&first.installation)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, before, "the installation was not touched");
}

/// L12: duplicate callbacks racing, in one process and across two processes' store handles,
/// exchange the code exactly once. The mock revokes a grant whose code is presented twice
/// (RFC 6749 §4.1.2, as OpenID servers do), so a second exchange would leave an installation
/// that reads healthy with dead tokens.
async fn duplicate_callbacks_exchange_once(backend: Backend) {
    let mock = mock().await;
    // The exchange takes a while, so the duplicates arrive while it runs.
    mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::Latency {
            min_ms: 300,
            max_ms: 300,
        },
    )]);
    let a = manager_on(&mock, backend.open().await);
    let b = manager_on(&mock, backend.open().await);
    let backend = backend.name();
    let begun = a.begin_authorization(None).unwrap();
    let code = approve(&mock, &begun, "victim");
    let begun = Arc::new(begun);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..8 {
        let manager = if n % 2 == 0 { a.clone() } else { b.clone() };
        let (begun, code) = (begun.clone(), code.clone());
        tasks.spawn(async move {
            manager
                .complete_authorization(AuthorizationCode::new(code), &begun.state, &begun.binding)
                .await
        });
    }
    let mut firsts = 0;
    while let Some(done) = tasks.join_next().await {
        let done = done.unwrap().unwrap_or_else(|e| panic!("{backend}: {e}"));
        assert_eq!(done.installation, begun.installation);
        firsts += usize::from(!done.replayed);
    }
    let totals = mock.counters().totals;
    assert_eq!(firsts, 1, "{backend}: one callback did the work");
    assert_eq!(totals.code_exchanges, 1, "{backend}");
    assert_eq!(
        totals.code_reuses, 0,
        "{backend}: the code was never presented twice"
    );
    // The installation's tokens are alive at the provider.
    let reply = a
        .send_authorized(
            &begun.installation,
            reqwest::Client::new().get(mock.resource_url()),
        )
        .await
        .unwrap();
    assert_eq!(reply.status(), 200, "{backend}");
    assert!(
        mock.counters().grants.values().all(|g| g.revoked.is_none()),
        "{backend}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_callbacks_exchange_once_on_memory() {
    // Two managers on one memory store: two "processes" sharing it.
    let store: Arc<dyn TokenStore> = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let mock = mock().await;
    mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::Latency {
            min_ms: 300,
            max_ms: 300,
        },
    )]);
    let a = manager_on(&mock, store.clone());
    let b = manager_on(&mock, store);
    let begun = Arc::new(a.begin_authorization(None).unwrap());
    let code = approve(&mock, &begun, "victim");
    let (x, y) = tokio::join!(
        a.complete_authorization(AuthorizationCode::new(&code), &begun.state, &begun.binding),
        b.complete_authorization(AuthorizationCode::new(&code), &begun.state, &begun.binding)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(x.replayed != y.replayed, "{x:?} {y:?}");
    assert_eq!(mock.counters().totals.code_exchanges, 1);
    assert_eq!(mock.counters().totals.code_reuses, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_callbacks_exchange_once_on_sqlite() {
    duplicate_callbacks_exchange_once(Backend::fresh_sqlite("dup-callbacks")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_callbacks_exchange_once_on_redis() {
    duplicate_callbacks_exchange_once(Backend::fresh_redis("dup-callbacks")).await;
}

/// The mock does what the OpenID server did: a second exchange of one code revokes
/// the grant the first made. (This is what the claim protects against.)
#[tokio::test]
async fn the_mock_revokes_a_grant_whose_code_is_presented_twice() {
    let mock = mock().await;
    let client = client_for(profiles::bitbucket(), &mock);
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let begun = manager.begin_authorization(None).unwrap();
    let code = AuthorizationCode::new(approve(&mock, &begun, "victim"));
    // The OAuth client alone (no store, no claim) exchanges whatever it is given.
    client
        .complete_authorization(&code, &begun.state, &begun.binding)
        .await
        .unwrap();
    assert!(
        client
            .complete_authorization(&code, &begun.state, &begun.binding)
            .await
            .is_err()
    );
    let counters = mock.counters();
    assert_eq!(counters.totals.code_reuses, 1);
    assert!(
        counters
            .grants
            .values()
            .any(|g| g.revoked == Some(RevokedBy::CodeReused))
    );
}

/// M2: a re-authorization approved with another provider account leaves the installation's
/// tokens untouched and revokes the stray grant; the same account re-authorizes.
#[tokio::test]
async fn reauthorizing_with_another_account_is_refused() {
    let mock = mock().await;
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let begun = manager.begin_authorization(None).unwrap();
    let code = approve(&mock, &begun, "alice");
    let id = manager
        .complete_authorization(AuthorizationCode::new(code), &begun.state, &begun.binding)
        .await
        .unwrap()
        .installation;
    let installed = manager.store().get(&id).await.unwrap().unwrap();
    assert_eq!(installed.account(), Some("{alice}"), "Bitbucket's uuid");

    let again = manager.begin_authorization(Some(id.clone())).unwrap();
    let code = approve(&mock, &again, "mallory");
    let e = manager
        .complete_authorization(AuthorizationCode::new(code), &again.state, &again.binding)
        .await
        .unwrap_err();
    let e = install_error(e);
    assert!(matches!(&*e, InstallError::DifferentAccount { .. }), "{e}");
    assert!(e.to_string().contains("another provider account"), "{e}");
    assert_eq!(manager.store().get(&id).await.unwrap().unwrap(), installed);
    // Mallory's grant is not stored and not revoked (revoking could end her other grants).
    assert!(mock.counters().grants.values().all(|g| g.revoked.is_none()));

    let third = manager.begin_authorization(Some(id.clone())).unwrap();
    let code = approve(&mock, &third, "alice");
    let done = manager
        .complete_authorization(AuthorizationCode::new(code), &third.state, &third.binding)
        .await
        .unwrap();
    assert!(!done.created);
    assert_eq!(done.account.as_deref(), Some("{alice}"));
    assert!(done.warnings.is_empty(), "{:?}", done.warnings);
    let record = manager.store().get(&id).await.unwrap().unwrap();
    assert_ne!(record.tokens(), installed.tokens());
    assert_eq!(record.generation(), installed.generation() + 1);
}

/// M1: the state key is its own secret, rotated with a previous key; without one no flow
/// begins.
#[tokio::test]
async fn state_keys_rotate_under_flows_in_progress() {
    let mock = mock().await;
    let store: Arc<dyn TokenStore> = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let (old, new) = (
        StateKey::generate(1).unwrap(),
        StateKey::generate(2).unwrap(),
    );
    let with_keys = |current: &StateKey, previous: Option<&StateKey>| {
        let mut b = ConsumerConfig::builder(pointed_at(profiles::bitbucket(), &mock))
            .client_id(DEFAULT_CLIENT_ID)
            .client_secret(DEFAULT_CLIENT_SECRET)
            .redirect_uri(REDIRECT)
            .state_key(current.clone());
        if let Some(p) = previous {
            b = b.previous_state_key(p.clone());
        }
        manager_builder(b.build().unwrap(), store.clone())
            .build()
            .unwrap()
    };
    let before = with_keys(&old, None);
    let during = with_keys(&new, Some(&old));
    let after = with_keys(&new, None);
    let begun = before.begin_authorization(None).unwrap();
    let code = approve(&mock, &begun, "alice");
    // After the rotation is complete, the old key's states are refused...
    let e = after
        .complete_authorization(AuthorizationCode::new(&code), &begun.state, &begun.binding)
        .await
        .unwrap_err();
    assert!(matches!(
        &*authorization_error(e),
        AuthorizationError::InvalidState
    ));
    // ...while a process holding it as the previous key completes the flow.
    during
        .complete_authorization(AuthorizationCode::new(&code), &begun.state, &begun.binding)
        .await
        .unwrap();
    // The same client secret with no state key begins nothing.
    let keyless = manager_builder(
        ConsumerConfig::builder(pointed_at(profiles::bitbucket(), &mock))
            .client_id(DEFAULT_CLIENT_ID)
            .client_secret(DEFAULT_CLIENT_SECRET)
            .redirect_uri(REDIRECT)
            .build()
            .unwrap(),
        store.clone(),
    )
    .build()
    .unwrap();
    let e = authorization_error(keyless.begin_authorization(None).unwrap_err());
    assert!(matches!(&*e, AuthorizationError::NoStateKey), "{e}");
    assert!(e.to_string().contains("state_key"), "{e}");
}

/// The binding never travels through the browser's URL: neither its value nor the PKCE
/// verifier derived from it appears in the authorization URL, and the challenge there is the
/// one the binding's holder can answer (the exchange above succeeds only with it).
#[tokio::test]
async fn the_binding_stays_out_of_the_url() {
    let mock = mock().await;
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let begun = manager.begin_authorization(None).unwrap();
    let url = begun.url.as_str();
    assert!(!url.contains(&begun.binding.expose_cookie_value()));
    let cookie = begun.set_cookie_header();
    assert_eq!(
        cookie,
        format!(
            "{}={}; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age=600",
            begun.state.cookie_name(),
            begun.binding.expose_cookie_value()
        )
    );
    // Two flows in one browser (two tabs) keep two cookies: each callback finds its own.
    let other = manager.begin_authorization(None).unwrap();
    let jar = format!(
        "{}; {}",
        cookie.split(';').next().unwrap(),
        other.set_cookie_header().split(';').next().unwrap()
    );
    for flow in [&begun, &other] {
        let found = tokenkeeper::BrowserBinding::from_cookie_header(&jar, &flow.state).unwrap();
        assert_eq!(
            found.expose_cookie_value(),
            flow.binding.expose_cookie_value()
        );
    }
    assert!(!format!("{begun:?}").contains(&begun.binding.expose_cookie_value()));
    assert!(!format!("{begun:?}").contains(begun.state.as_str()));
}

/// An installation with no recorded account (imported, or older than the check) takes the
/// account of its first re-authorization, and the application is told it could not be
/// checked; from then on the account is enforced.
#[tokio::test]
async fn a_record_without_an_account_is_flagged_then_enforced() {
    let mock = mock().await;
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let seed = manager.begin_authorization(None).unwrap();
    let code = approve(&mock, &seed, "alice");
    let grant = client_for(profiles::bitbucket(), &mock)
        .complete_authorization(&AuthorizationCode::new(code), &seed.state, &seed.binding)
        .await
        .unwrap();
    let id = InstallationId::new("imported-1").unwrap();
    manager
        .import_installation(id.clone(), grant.tokens)
        .await
        .unwrap();
    let again = manager.begin_authorization(Some(id.clone())).unwrap();
    let code = approve(&mock, &again, "alice");
    let done = manager
        .complete_authorization(AuthorizationCode::new(code), &again.state, &again.binding)
        .await
        .unwrap();
    assert!(matches!(
        done.warnings.as_slice(),
        [tokenkeeper::oauth::AuthorizationWarning::AccountNotVerified { account, .. }] if account == "{alice}"
    ));
    let next = manager.begin_authorization(Some(id.clone())).unwrap();
    let code = approve(&mock, &next, "mallory");
    let e = manager
        .complete_authorization(AuthorizationCode::new(code), &next.state, &next.binding)
        .await
        .unwrap_err();
    assert!(matches!(
        &*install_error(e),
        InstallError::DifferentAccount { .. }
    ));
}

/// Review N4: an import that knows its account records it, so the first re-authorization
/// by another account is refused instead of rebinding the installation to that account.
#[tokio::test]
async fn an_import_with_its_account_refuses_another_account() {
    let mock = mock().await;
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let seed = manager.begin_authorization(None).unwrap();
    let code = approve(&mock, &seed, "alice");
    let grant = client_for(profiles::bitbucket(), &mock)
        .complete_authorization(&AuthorizationCode::new(code), &seed.state, &seed.binding)
        .await
        .unwrap();
    let id = InstallationId::new("imported-2").unwrap();
    manager
        .import_installation_with_account(id.clone(), grant.tokens, Some("{alice}".into()))
        .await
        .unwrap();
    let again = manager.begin_authorization(Some(id.clone())).unwrap();
    let code = approve(&mock, &again, "mallory");
    let e = manager
        .complete_authorization(AuthorizationCode::new(code), &again.state, &again.binding)
        .await
        .unwrap_err();
    assert!(matches!(
        &*install_error(e),
        InstallError::DifferentAccount { .. }
    ));
    let again = manager.begin_authorization(Some(id.clone())).unwrap();
    let code = approve(&mock, &again, "alice");
    let done = manager
        .complete_authorization(AuthorizationCode::new(code), &again.state, &again.binding)
        .await
        .unwrap();
    assert!(done.warnings.is_empty(), "{:?}", done.warnings);
}

/// Review N4: the identity endpoint's reply is read under the same cap as the token
/// endpoint's, chunk by chunk: an endless chunked reply (no length to check up front) is cut
/// off at the cap, not buffered until the HTTP timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_identity_reply_is_cut_off_at_the_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = mock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endless = format!("http://{}/user", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = conn.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("4000\r\n{}\r\n", " ".repeat(0x4000));
                while conn.write_all(chunk.as_bytes()).await.is_ok() {}
            });
        }
    });
    let profile = pointed_at(profiles::bitbucket(), &mock)
        .with_identity_endpoint(tokenkeeper::reqwest::Url::parse(&endless).unwrap());
    let consumer = ConsumerConfig::builder(profile)
        .client_id(DEFAULT_CLIENT_ID)
        .client_secret(DEFAULT_CLIENT_SECRET)
        .redirect_uri(REDIRECT)
        .state_key(state_key())
        .http_timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap();
    let manager = manager_builder(consumer, Arc::new(tokenkeeper_memory::MemoryStore::new()))
        .build()
        .unwrap();
    let begun = manager.begin_authorization(None).unwrap();
    let code = approve(&mock, &begun, "alice");
    let started = std::time::Instant::now();
    let e = manager
        .complete_authorization(AuthorizationCode::new(code), &begun.state, &begun.binding)
        .await
        .unwrap_err();
    let e = authorization_error(e);
    assert!(e.to_string().contains("exceeds"), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "read until the timeout"
    );
}

/// Review N3: a re-authorization begun before support revoked the installation (an
/// offboarded employee's pending reconnect) completes afterwards: it must not undo the
/// revocation, and the code is not spent.
#[tokio::test]
async fn a_flow_begun_before_a_revocation_does_not_undo_it() {
    let mock = mock().await;
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let first = manager.begin_authorization(None).unwrap();
    let code = approve(&mock, &first, "alice");
    let id = manager
        .complete_authorization(AuthorizationCode::new(code), &first.state, &first.binding)
        .await
        .unwrap()
        .installation;
    let pending = manager.begin_authorization(Some(id.clone())).unwrap();
    let code = approve(&mock, &pending, "alice");
    manager.revoke(&id).await.unwrap();
    let exchanges = mock.counters().totals.code_exchanges;
    let e = manager
        .complete_authorization(
            AuthorizationCode::new(code),
            &pending.state,
            &pending.binding,
        )
        .await
        .expect_err("a revocation was undone by a flow begun before it");
    assert!(e.to_string().contains("is revoked"), "{e}");
    assert_eq!(
        manager
            .store()
            .get(&id)
            .await
            .unwrap()
            .unwrap()
            .state()
            .kind(),
        tokenkeeper::core::StateKind::Revoked
    );
    assert_eq!(
        mock.counters().totals.code_exchanges,
        exchanges,
        "code spent"
    );
}

/// Review N8: a callback whose code cannot be an authorization code (empty, oversized, not
/// printable ASCII) costs no flow claim and no token request under the application's client
/// credentials; the flow still completes with the real code afterwards.
#[tokio::test]
async fn a_malformed_code_is_refused_before_anything_is_claimed_or_sent() {
    let mock = mock().await;
    let manager = manager_on(&mock, Arc::new(tokenkeeper_memory::MemoryStore::new()));
    let begun = manager.begin_authorization(None).unwrap();
    let calls = mock.counters().totals.token_calls;
    for bad in [
        String::new(),
        "x".repeat(5000),
        "abc\ndef".into(),
        "código".into(),
    ] {
        let e = manager
            .complete_authorization(
                AuthorizationCode::new(bad.clone()),
                &begun.state,
                &begun.binding,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                &*authorization_error(e),
                AuthorizationError::MalformedCode { .. }
            ),
            "{bad:?}"
        );
    }
    assert_eq!(
        mock.counters().totals.token_calls,
        calls,
        "a request was sent"
    );
    let code = approve(&mock, &begun, "alice");
    manager
        .complete_authorization(AuthorizationCode::new(code), &begun.state, &begun.binding)
        .await
        .expect("nothing was claimed: the real code completes the flow");
}

/// L11: a grant that lacks a requested scope is flagged at once, naming the scope.
#[tokio::test]
async fn a_grant_without_a_requested_scope_is_flagged() {
    let mock = mock().await;
    let consumer = ConsumerConfig::builder(pointed_at(profiles::bitbucket(), &mock))
        .client_id(DEFAULT_CLIENT_ID)
        .client_secret(DEFAULT_CLIENT_SECRET)
        .redirect_uri(REDIRECT)
        .state_key(state_key())
        .scopes(["repository", "pullrequest:write"])
        .build()
        .unwrap();
    let manager = TokenManager::builder(consumer, tokenkeeper_memory::MemoryStore::new())
        .build()
        .unwrap();
    let begun = manager.begin_authorization(None).unwrap();
    let code = approve(&mock, &begun, "alice");
    let done = manager
        .complete_authorization(AuthorizationCode::new(code), &begun.state, &begun.binding)
        .await
        .unwrap();
    match done.warnings.as_slice() {
        [w @ tokenkeeper::oauth::AuthorizationWarning::ScopesNotGranted { missing, .. }] => {
            assert_eq!(missing, &["pullrequest:write"]);
            assert!(w.to_string().contains("authorize again"), "{w}");
        }
        other => panic!("{other:?}"),
    }
}

/// Review N7: a cookie whose name only looks like the flow's after Unicode white space is
/// trimmed (`\u{2000}__Host-…`, which a sibling subdomain may set, since browsers enforce the
/// `__Host-` rules only on names that start with it) is not the flow's binding.
#[tokio::test]
async fn a_cookie_name_padded_with_unicode_space_is_not_the_binding() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let begun = f.manager.begin_authorization(None).unwrap();
    let name = begun.state.cookie_name();
    let value = begun.binding.expose_cookie_value();
    let honest = format!("a=b; {name}={value}");
    assert!(tokenkeeper::BrowserBinding::from_cookie_header(&honest, &begun.state).is_ok());
    for pad in ["\u{2000}", "\u{a0}", "\u{3000}"] {
        let planted = format!("a=b; {pad}{name}={value}");
        assert!(
            matches!(
                tokenkeeper::BrowserBinding::from_cookie_header(&planted, &begun.state),
                Err(tokenkeeper::oauth::AuthorizationError::MissingBinding)
            ),
            "padded with {pad:?}"
        );
    }
    // ASCII space and tab around a pair are fine (RFC 6265's OWS).
    let spaced = format!("a=b;\t {name}={value}");
    assert!(tokenkeeper::BrowserBinding::from_cookie_header(&spaced, &begun.state).is_ok());
}

/// Review N1: two consumers that share a state key (one key for the whole application, as the
/// README once showed) cannot complete each other's flows: the state is bound to the consumer
/// that issued it (profile, client id, redirect URI, token endpoint), so a mix-up that routes
/// one provider's callback to another consumer's manager is refused.
#[tokio::test]
async fn a_state_of_one_consumer_is_refused_by_another_sharing_its_key() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let other = common::manager_builder(
        consumer_for(profiles::github_app(), &f.mock, DEFAULT_CLIENT_SECRET),
        f.store.clone(),
    )
    .build()
    .unwrap();
    let begun = f.manager.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    match other
        .complete_authorization(AuthorizationCode::new(code), &begun.state, &begun.binding)
        .await
    {
        Err(Error::Authorization(e)) if matches!(*e, AuthorizationError::InvalidState) => {}
        other => panic!("another consumer's state is refused: {other:?}"),
    }
}

/// Review N1, second half (RFC 9207): a callback whose `iss` names another authorization
/// server is refused before anything is claimed or exchanged; a provider that always sends
/// `iss` must have sent it; the right `iss` completes the flow.
#[tokio::test]
async fn a_callback_from_another_issuer_is_refused() {
    let mock = mock().await;
    let mut profile = profiles::bitbucket();
    profile.issuer = Some("https://bitbucket.org".into());
    profile.callback_iss_required = true;
    let f = Fixture::with_mock(
        mock,
        profile,
        Arc::new(tokenkeeper_memory::MemoryStore::new()),
        |_| {},
    );
    let begun = f.manager.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    let complete = |iss: Option<&'static str>| {
        let (m, code, begun) = (f.manager.clone(), code.clone(), &begun);
        async move {
            m.complete_authorization_with_issuer(
                AuthorizationCode::new(code),
                &begun.state,
                &begun.binding,
                iss,
            )
            .await
        }
    };
    match complete(Some("https://evil.example/\u{1b}[2J")).await {
        Err(Error::Authorization(e)) => match &*e {
            AuthorizationError::IssuerMismatch { received, .. } => {
                assert!(!received.contains('\u{1b}'), "{received:?}");
            }
            other => panic!("expected IssuerMismatch, got {other:?}"),
        },
        other => panic!("expected IssuerMismatch, got {other:?}"),
    }
    match complete(None).await {
        Err(Error::Authorization(e)) if matches!(*e, AuthorizationError::MissingIssuer) => {}
        other => panic!("expected MissingIssuer, got {other:?}"),
    }
    // The plain call cannot say which `iss` came: refused while the profile names an issuer.
    match f
        .manager
        .complete_authorization(
            AuthorizationCode::new(code.clone()),
            &begun.state,
            &begun.binding,
        )
        .await
    {
        Err(Error::Authorization(e)) if matches!(*e, AuthorizationError::IssuerNotPassed) => {}
        other => panic!("expected IssuerNotPassed, got {other:?}"),
    }
    // Requiring `iss` without naming the issuer would check nothing: refused at build.
    let mut lax = profiles::bitbucket();
    lax.callback_iss_required = true;
    assert!(matches!(
        ConsumerConfig::builder(lax)
            .client_id("id")
            .client_secret("secret")
            .redirect_uri("https://app.example/callback")
            .build(),
        Err(tokenkeeper::oauth::ConfigError::OutOfRange {
            field: "issuer",
            ..
        })
    ));
    assert_eq!(
        f.mock.counters().totals.code_exchanges,
        0,
        "nothing exchanged"
    );
    complete(Some("https://bitbucket.org"))
        .await
        .expect("the right issuer completes the flow");
}

/// Review N12: the `state` travels in the authorization URL (the provider's logs, browser
/// history, proxies, `Referer`), so it must not show the installation id an application chose
/// ("acme-corp", an e-mail address): its body is encrypted, not only signed. The flow still
/// completes from it.
#[tokio::test]
async fn the_state_does_not_show_the_installation_id() {
    use base64::Engine as _;
    let mock = mock().await;
    let store: Arc<dyn TokenStore> = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let manager = manager_on(&mock, store);
    let id = InstallationId::new("acme-corp/billing@example.com").unwrap();
    let begun = manager.begin_installation(id.clone()).unwrap();
    let state = begun.state.as_str();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(state)
        .expect("the state is base64url");
    let shows = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(
        !shows(id.as_str().as_bytes()),
        "the state carries the id in clear"
    );
    assert!(
        !shows(b"acme-corp"),
        "the state carries part of the id in clear"
    );
    assert!(!begun.url.as_str().contains("acme-corp"), "{}", begun.url);
    let (code, state) = browser(&begun.url).await;
    let done = manager
        .complete_authorization(
            AuthorizationCode::new(code),
            &tokenkeeper::AuthorizationState::new(state),
            &begun.binding,
        )
        .await
        .unwrap();
    assert_eq!(done.installation, id);
}

/// Fails the second flow operation the store sees (a duplicate callback's claim), and lets
/// everything else through.
#[derive(Debug, Default)]
struct SecondFlowOpFails(std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl tokenkeeper_testkit::wrappers::Hook for SecondFlowOpFails {
    async fn before(
        &self,
        operation: tokenkeeper_testkit::wrappers::Operation<'_>,
    ) -> Result<(), tokenkeeper::core::StoreError> {
        if matches!(operation, tokenkeeper_testkit::wrappers::Operation::Flow)
            && self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1
        {
            return Err(tokenkeeper::core::StoreError::unavailable(
                "hooked",
                "claim_flow",
                "injected: the claim did not reach the store",
            ));
        }
        Ok(())
    }
}

/// Stores the first flow claim, then reports it failed (its acknowledgement lost).
#[derive(Debug, Default)]
struct FirstClaimAckLost(std::sync::atomic::AtomicBool);

#[async_trait::async_trait]
impl tokenkeeper_testkit::wrappers::Hook for FirstClaimAckLost {
    async fn before(
        &self,
        _: tokenkeeper_testkit::wrappers::Operation<'_>,
    ) -> Result<(), tokenkeeper::core::StoreError> {
        Ok(())
    }

    async fn flow_claimed(&self) -> Result<(), tokenkeeper::core::StoreError> {
        if self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        Err(tokenkeeper::core::StoreError::unavailable(
            "hooked",
            "claim_flow",
            "injected: the claim was stored, its acknowledgement lost",
        ))
    }
}

/// A callback whose claim was stored but reported failed never sent the code: the claim it
/// left is settled as failed before the code was sent, so the browser's retry hears that at
/// once (and starts over) instead of waiting out a claimant that never ran and being told
/// the code "may be spent".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_acknowledgement_was_lost_is_settled_as_never_sent() {
    let mock = mock().await;
    let (hooked, _) = tokenkeeper_testkit::wrappers::Hooked::new(
        tokenkeeper_memory::MemoryStore::new(),
        FirstClaimAckLost::default(),
    );
    let manager = manager_on(&mock, Arc::new(hooked));
    let begun = manager.begin_authorization(None).unwrap();
    let code = approve(&mock, &begun, "ack-lost");
    let complete = || {
        manager.complete_authorization(
            AuthorizationCode::new(code.clone()),
            &begun.state,
            &begun.binding,
        )
    };
    assert!(
        matches!(complete().await, Err(Error::Install(e)) if matches!(*e, InstallError::Store { .. })),
        "the failed claim is reported"
    );
    match complete().await {
        Err(Error::Install(e)) => match &*e {
            InstallError::DuplicateCallback { outcome, .. } => assert!(
                outcome.contains("before the code was sent"),
                "the retry is told the code was never sent: {outcome}"
            ),
            other => panic!("expected the duplicate's outcome, got {other:?}"),
        },
        other => panic!("expected the duplicate's outcome, got {other:?}"),
    }
    assert_eq!(
        mock.counters().totals.code_exchanges,
        0,
        "the code was never sent"
    );
}

/// Review N8: a duplicate callback whose claim failed in the store must not overwrite the
/// live claimant's record with its own failure. Before, it wrote `Failed` over the
/// claimant's `Exchanging`, and a third duplicate was told the flow "failed before the code
/// was sent" while the claimant was completing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_whose_claim_failed_leaves_the_claimant_alone() {
    let mock = mock().await;
    mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::Latency {
            min_ms: 600,
            max_ms: 600,
        },
    )]);
    let (hooked, _) = tokenkeeper_testkit::wrappers::Hooked::new(
        tokenkeeper_memory::MemoryStore::new(),
        SecondFlowOpFails::default(),
    );
    let manager = manager_on(&mock, Arc::new(hooked));
    let begun = Arc::new(manager.begin_authorization(None).unwrap());
    let code = approve(&mock, &begun, "victim");
    let complete = |delay_ms: u64| {
        let (manager, begun, code) = (manager.clone(), begun.clone(), code.clone());
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
            manager
                .complete_authorization(AuthorizationCode::new(code), &begun.state, &begun.binding)
                .await
        })
    };
    // The claimant, a duplicate whose claim fails, then a duplicate that follows the claim.
    let (a, b, c) = (complete(0), complete(100), complete(250));
    let a = a.await.unwrap().expect("the claimant completes");
    assert!(!a.replayed);
    assert!(
        matches!(b.await.unwrap(), Err(Error::Install(e)) if matches!(*e, InstallError::Store { .. })),
        "the duplicate whose claim failed says so"
    );
    let c = c
        .await
        .unwrap()
        .expect("the third callback follows the claimant's outcome");
    assert!(c.replayed, "{c:?}");
    assert_eq!(mock.counters().totals.code_exchanges, 1);
}

/// Review SU5: `shutdown()` waits for a callback that is exchanging its code, so a deploy
/// does not orphan a fresh grant between the provider's reply and the store; a callback that
/// arrives once shutdown began claims and exchanges nothing (its code stays unspent) and says
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_callback_in_progress_and_refuses_new_ones() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let begun = f.manager.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    let late = f.manager.begin_authorization(None).unwrap();
    let (late_code, _) = browser(&late.url).await;
    f.mock.set_faults(vec![FaultRule::probability(
        Endpoint::Token,
        1.0,
        Fault::SlowReply { ms: 500 },
    )]);
    let completing = {
        let m = f.manager.clone();
        tokio::spawn(async move {
            m.complete_authorization(AuthorizationCode::new(code), &begun.state, &begun.binding)
                .await
        })
    };
    while f.mock.counters().totals.token_calls == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.manager.shutdown().await;
    // When shutdown returns, the grant the callback was exchanging is stored.
    let stored = f
        .store
        .list(
            tokenkeeper::core::ListFilter::in_state(StateKind::Active),
            None,
            10,
        )
        .await
        .unwrap()
        .entries;
    assert_eq!(
        stored.len(),
        1,
        "shutdown returned before the callback in progress recorded its grant"
    );
    let done = completing
        .await
        .unwrap()
        .expect("the callback in progress completes");
    assert_eq!(stored[0].id, done.installation);
    let calls = f.mock.counters().totals.token_calls;
    match f
        .manager
        .complete_authorization(
            AuthorizationCode::new(late_code),
            &late.state,
            &late.binding,
        )
        .await
    {
        Err(Error::Install(e)) if matches!(*e, InstallError::ShuttingDown { .. }) => {}
        other => panic!("a callback after shutdown is refused as such: {other:?}"),
    }
    assert_eq!(
        f.mock.counters().totals.token_calls,
        calls,
        "nothing exchanged"
    );
}
