//! What the engine reports through the `metrics` facade, read back from a real Prometheus
//! recorder (the one test of this binary installs it for the whole process). Review I3: every
//! refused callback is counted by a bounded reason, so an attack on the callback (forged
//! states, stolen callback URLs, junk codes) is visible on a dashboard.

mod common;

use std::sync::Arc;

use common::*;
use tokenkeeper::{AuthorizationCode, AuthorizationState, profiles};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_SECRET, MockProfile, MockProvider};

#[tokio::test]
async fn refused_callbacks_are_counted_by_reason() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
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
