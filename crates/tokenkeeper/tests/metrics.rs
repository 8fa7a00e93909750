//! What the engine reports through the `metrics` facade, read back from a real Prometheus
//! recorder (installed once for the whole process). Review I3: every refused callback is
//! counted by a bounded reason, so an attack on the callback (forged states, stolen callback
//! URLs, junk codes) is visible on a dashboard. Review E10: the refresher's state gauge comes
//! from the store's own count and follows the installations' states.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use common::*;
use tokenkeeper::{AuthorizationCode, AuthorizationState, profiles};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_SECRET, MockProfile, MockProvider};

/// The process's recorder (a recorder can be installed once per process).
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap()
    })
}

#[tokio::test]
async fn refused_callbacks_are_counted_by_reason() {
    let handle = recorder();
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    let manager = manager_builder(
        consumer_for(profiles::bitbucket(), &mock, DEFAULT_CLIENT_SECRET),
        Arc::new(tokenkeeper_memory::MemoryStore::new()),
    )
    .build()
    .unwrap();
    let begun = manager.begin_authorization(None).unwrap();
    let other = manager.begin_authorization(None).unwrap();
    let code = || AuthorizationCode::new("some-code");
    // A forged state, another browser's binding, and a junk code.
    let forged = AuthorizationState::new("AAAA");
    manager
        .complete_authorization(code(), &forged, &begun.binding)
        .await
        .unwrap_err();
    manager
        .complete_authorization(code(), &begun.state, &other.binding)
        .await
        .unwrap_err();
    manager
        .complete_authorization(AuthorizationCode::new(""), &begun.state, &begun.binding)
        .await
        .unwrap_err();
    manager
        .complete_authorization(AuthorizationCode::new(""), &begun.state, &begun.binding)
        .await
        .unwrap_err();
    let text = handle.render();
    let consumer = manager.client().consumer().name();
    for (reason, count) in [
        ("invalid_state", 1),
        ("browser_mismatch", 1),
        ("malformed_code", 2),
    ] {
        let line = format!(
            "tokenkeeper_authorizations_refused_total{{consumer=\"{consumer}\",reason=\"{reason}\"}} {count}"
        );
        assert!(text.contains(&line), "{line} not in:\n{text}");
    }
    assert!(!text.contains("some-code"), "a code reached the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_gauge_follows_the_installations() {
    let handle = recorder();
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let manager = &f.manager;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(f.install().await);
    }
    let refresher = manager.spawn_refresher_with(tokenkeeper::refresher::RefresherConfig {
        state_count_every: Some(Duration::from_millis(20)),
        ..fast_refresher()
    });
    let gauge = |state: &str, n: u64| format!("tokenkeeper_installations{{state=\"{state}\"}} {n}");
    let shows = |lines: &[String]| {
        let text = handle.render();
        lines.iter().all(|l| text.contains(l.as_str()))
    };
    let wait_for = async |lines: Vec<String>| {
        for _ in 0..500 {
            if shows(&lines) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{lines:?} not in:\n{}", handle.render());
    };
    wait_for(vec![gauge("active", 3), gauge("revoked", 0)]).await;
    manager.revoke(&ids[0]).await.unwrap();
    wait_for(vec![gauge("active", 2), gauge("revoked", 1)]).await;
    refresher.shutdown().await;
}
