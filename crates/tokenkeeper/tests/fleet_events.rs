//! Fleet-wide events across OS processes, on each durable backend (SQLite, Redis, Redis
//! Cluster, PostgreSQL): another process revokes, condemns and re-authorizes installations
//! this process has cached; this process's cache drops each token within about a second
//! (its `cache_revalidate` is an hour, so only the event log can explain it) while a manager
//! with the watcher off keeps serving the old token (the control), and `events()` delivers
//! the other process's transitions.
//!
//! Children are this test binary re-invoked with `TK_EVT_CHILD` set to the store's
//! [`Backend`] as text (`tokenkeeper_testkit::child`); they run `child_process_entry`, do one
//! action and exit.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, manager_builder};
use tokenkeeper::core::{EventCursor, EventKind, LifecycleEvent, StateKind};
use tokenkeeper::{Error, InstallationId, TokenManager, core::TokenStore, profiles};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_SECRET, MockProfile, MockProvider};

fn manager(store: Arc<dyn TokenStore>, base: &str, watch: bool) -> TokenManager {
    manager_builder(
        common::consumer_at(profiles::bitbucket(), base, DEFAULT_CLIENT_SECRET),
        store,
    )
    .tune(|p| {
        p.cache_revalidate = Duration::from_secs(3600);
        if !watch {
            p.event_poll = Duration::ZERO;
        }
    })
    .build()
    .unwrap()
}

/// Not a test on its own: the body of the child processes.
#[test]
fn child_process_entry() {
    let Some(backend) = tokenkeeper_testkit::child::is_child("TK_EVT_CHILD") else {
        return;
    };
    let backend: Backend = backend.parse().unwrap();
    let var = |k: &str| std::env::var(k).unwrap();
    let (base, action) = (var("TK_EVT_MOCK"), var("TK_EVT_ACTION"));
    let id = InstallationId::new(var("TK_EVT_ID")).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let other = manager(backend.open().await, &base, true);
            match action.as_str() {
                "revoke" => {
                    other.revoke(&id).await.unwrap();
                }
                "condemn" => {
                    let refused = other.force_refresh(&id).await.unwrap_err();
                    assert!(refused.needs_reauthorization(), "{refused}");
                }
                "reauthorize" => {
                    let begun = other.begin_authorization(Some(id.clone())).unwrap();
                    let (code, _) = common::browser(&begun.url).await;
                    other
                        .complete_authorization(
                            tokenkeeper::AuthorizationCode::new(code),
                            &begun.state,
                            &begun.binding,
                        )
                        .await
                        .unwrap();
                }
                other => panic!("unknown action {other}"),
            }
            println!("DONE {action}");
        });
}

fn in_other_process(backend: &Backend, base: &str, action: &str, id: &InstallationId) {
    let out = tokenkeeper_testkit::child::self_command(&[
        ("TK_EVT_CHILD", &backend.to_string()),
        ("TK_EVT_MOCK", base),
        ("TK_EVT_ACTION", action),
        ("TK_EVT_ID", id.as_str()),
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("DONE"),
        "the other process failed to {action}:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until this process stops serving the cached token of `id`; returns how long that
/// took after the other process finished.
async fn dropped_within(manager: &TokenManager, id: &InstallationId) -> Duration {
    let since = Instant::now();
    while manager.cached_token(id).is_some() {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{id}: the cached token is still served 10 s after another process ended it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    since.elapsed()
}

async fn next_event(stream: &mut tokenkeeper::events::EventStream) -> LifecycleEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream goes on")
        .expect("no stream error")
}

async fn run(backend: Backend) {
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    let base = mock.base_url();
    let store = backend.open().await;
    let watching = manager(store.clone(), &base, true);
    let blind = manager(store.clone(), &base, false);
    let head = watching.event_head().await.unwrap();
    let ids: Vec<InstallationId> = ["revoked", "condemned", "reauthorized"]
        .iter()
        .map(|n| InstallationId::new(format!("events-{n}")).unwrap())
        .collect();
    let mut old = Vec::new();
    for id in &ids {
        common::authorize_with(&watching, &mock, Some(id.clone())).await;
        let token = watching.access_token(id).await.unwrap();
        assert_eq!(blind.access_token(id).await.unwrap(), token);
        old.push(token);
    }
    // The provider revokes the second grant, so the other process's refresh is refused.
    mock.revoke_grant_of(old[1].secret()).unwrap();

    let mut took = Vec::new();
    for (id, action) in ids.iter().zip(["revoke", "condemn", "reauthorize"]) {
        in_other_process(&backend, &base, action, id);
        took.push(dropped_within(&watching, id).await);
        assert!(
            blind.cached_token(id).is_some(),
            "{id}: the control without the watcher dropped its token too: the test proves nothing"
        );
    }
    assert!(matches!(
        watching.access_token(&ids[0]).await,
        Err(Error::Revoked { .. })
    ));
    assert!(matches!(
        watching.access_token(&ids[1]).await,
        Err(Error::ReauthorizationRequired { .. })
    ));
    let fresh = watching.access_token(&ids[2]).await.unwrap();
    assert_ne!(fresh, old[2], "the new grant's token is served");

    // The stream from the head saw the three installations created here and what the other
    // process did to them, in order per installation.
    let mut stream = watching.events(head);
    let mut seen: Vec<(String, EventKind, Option<StateKind>)> = Vec::new();
    let wanted = [
        (&ids[0], EventKind::Revoked),
        (&ids[1], EventKind::RefreshRejected),
        (&ids[2], EventKind::Authorized),
    ];
    while !wanted
        .iter()
        .all(|(id, kind)| seen.iter().any(|(i, k, _)| i == id.as_str() && k == kind))
    {
        let e = next_event(&mut stream).await;
        seen.push((e.installation.as_str().to_owned(), e.kind, e.to));
    }
    let revoked_to = seen
        .iter()
        .find(|(i, k, _)| i == ids[0].as_str() && *k == EventKind::Revoked)
        .and_then(|(_, _, to)| *to);
    assert_eq!(revoked_to, Some(StateKind::Revoked));
    eprintln!(
        "{}: another process's revoke, condemnation and re-authorization stopped this process serving the old token after {:?}, {:?}, {:?}",
        backend.name(),
        took[0],
        took[1],
        took[2]
    );
    // Resuming from a persisted cursor's text reads nothing twice.
    let saved: EventCursor = stream.cursor().to_string().parse().unwrap();
    let page = store.read_events(&saved, 10).await.unwrap();
    assert!(
        page.events.is_empty(),
        "events after the stream's cursor: {page:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_ends_tokens_on_sqlite() {
    run(Backend::fresh_sqlite("events")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_ends_tokens_on_redis() {
    run(Backend::fresh_redis("events")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_ends_tokens_on_redis_cluster() {
    run(Backend::fresh_redis_cluster("events")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_ends_tokens_on_postgres() {
    run(Backend::fresh_postgres("events")).await;
}

/// The cache's watcher dies with the runtime that started it (a first call made from a
/// short-lived runtime); the next flight starts it again, forgetting what was cached while
/// nobody watched, and it follows the log from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_whose_runtime_ended_starts_again() {
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let watching = manager(store.clone(), &mock.base_url(), true);
    let other = manager(store, &mock.base_url(), true);
    let id = common::authorize_with(&watching, &mock, None)
        .await
        .installation;
    let (m, i) = (watching.clone(), id.clone());
    tokio::task::spawn_blocking(move || {
        let short = tokio::runtime::Runtime::new().unwrap();
        short.block_on(m.access_token(&i)).unwrap();
        // The watcher it started ends here.
    })
    .await
    .unwrap();
    watching.invalidate(&id);
    watching.access_token(&id).await.unwrap();
    assert!(watching.cached_token(&id).is_some());
    other.revoke(&id).await.unwrap();
    let took = dropped_within(&watching, &id).await;
    eprintln!("a restarted watcher dropped the revoked token after {took:?}");
}
