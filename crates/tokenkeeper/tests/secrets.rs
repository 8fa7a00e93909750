//! No secret reaches a log line, an error, a `Debug` or an explanation: a full run (installs,
//! refreshes, failures, re-authorization, revocation, the refresher) is traced at TRACE level
//! into a buffer, every error and `Debug` string is kept, and none contains any token the
//! provider issued or the client secret.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Fixture;
use tokenkeeper::{core::ListFilter, core::TokenStore, profiles, refresher::RefresherConfig};
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn harvest(store: &Arc<dyn TokenStore>, secrets: &mut HashSet<String>) {
    let page = store.list(ListFilter::all(), None, 1000).await.unwrap();
    for entry in page.entries {
        let r = store.get(&entry.id).await.unwrap().unwrap();
        secrets.insert(r.tokens().access_token.secret().to_owned());
        if let Some(t) = &r.tokens().refresh_token {
            secrets.insert(t.secret().to_owned());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_errors_debug_or_explanations() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mut secrets = HashSet::new();
    let mut texts: Vec<String> = Vec::new();
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    texts.push(format!("{:?}", f.manager));
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(f.install().await);
    }
    harvest(&f.store, &mut secrets).await;
    for round in 0..3 {
        f.advance(Duration::from_secs(7200));
        for id in &ids {
            match f.manager.access_token(id).await {
                Ok(t) => {
                    secrets.insert(t.secret().to_owned());
                    texts.push(format!("{t:?}"));
                }
                Err(e) => texts.push(format!("{e} {e:?}")),
            }
        }
        harvest(&f.store, &mut secrets).await;
        if round == 0 {
            f.mock.set_faults(vec![
                FaultRule::next(
                    Endpoint::Token,
                    2,
                    Fault::ServerError {
                        status: 503,
                        html: true,
                    },
                ),
                FaultRule::next(Endpoint::Token, 1, Fault::CommitThenDrop),
                FaultRule::next(Endpoint::Token, 1, Fault::MalformedJson),
            ]);
        }
    }
    let handle = f.manager.spawn_refresher_with(RefresherConfig {
        max_idle: Duration::from_millis(10),
        rate_per_second: None,
        ..RefresherConfig::default()
    });
    f.advance(Duration::from_secs(7000));
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.shutdown().await;
    harvest(&f.store, &mut secrets).await;
    let token = f.manager.force_refresh(&ids[1]).await;
    texts.push(format!("{token:?}"));
    f.mock
        .revoke_grant_of(f.record(&ids[2]).await.tokens().access_token.secret());
    f.advance(Duration::from_secs(7200));
    for id in &ids {
        if let Err(e) = f.manager.access_token(id).await {
            texts.push(format!("{e} {e:?}"));
        }
        texts.push(format!("{:?}", f.record(id).await));
        let explanation = f.manager.explain(id).await.unwrap();
        texts.push(format!("{explanation} {explanation:?}"));
    }
    if let Err(e) = f.manager.revoke(&ids[3]).await {
        texts.push(format!("{e} {e:?}"));
    }
    harvest(&f.store, &mut secrets).await;

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("tokenkeeper.refresh"),
        "refresh spans are logged"
    );
    assert!(
        logs.contains(ids[0].as_str()),
        "spans name the installation"
    );
    assert!(
        secrets.len() > 20,
        "the run issued tokens: {}",
        secrets.len()
    );
    secrets.insert(tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET.to_owned());
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret reached the logs");
        for text in &texts {
            assert!(
                !text.contains(secret.as_str()),
                "a secret reached an error or Debug: {text}"
            );
        }
    }
}

/// Security review L3: a gateway that echoes the request (the refresh token, the client
/// secret) and forges log lines with control characters in its error text. The stored
/// history, the error and `explain` keep the provider's words without either.
#[tokio::test]
async fn provider_error_text_is_scrubbed_of_sent_secrets_and_control_characters() {
    let f = common::Fixture::new(
        tokenkeeper::profiles::bitbucket(),
        tokenkeeper_mock_provider::MockProfile::Bitbucket,
    )
    .await;
    let id = f.install().await;
    let refresh = f.record(&id).await.tokens().refresh_token.clone().unwrap();
    f.advance(std::time::Duration::from_secs(7200));
    let echoed = format!(
        "Invalid refresh_token {} for client {}\r\n\u{1b}[31mINFO forged line",
        refresh.secret(),
        tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET
    );
    f.mock
        .set_faults(vec![tokenkeeper_mock_provider::FaultRule::next(
            tokenkeeper_mock_provider::Endpoint::Token,
            1,
            tokenkeeper_mock_provider::Fault::ErrorReply {
                status: 400,
                error: "invalid_grant".into(),
                description: echoed,
            },
        )]);
    let err = f.manager.access_token(&id).await.unwrap_err();
    let explained = f.manager.explain(&id).await.unwrap();
    for text in [
        err.to_string(),
        format!("{err:?}"),
        explained.to_string(),
        format!("{:?}", f.record(&id).await.last_error()),
    ] {
        assert!(!text.contains(refresh.secret()), "refresh token in: {text}");
        assert!(
            !text.contains(tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET),
            "client secret in: {text}"
        );
        assert!(
            !text.contains('\u{1b}') && !text.contains("\r\n"),
            "{text:?}"
        );
        assert!(text.contains("[redacted]"), "{text}");
    }
}

/// Security review L2: the values that hold or lead to secrets print nothing of them in
/// `Debug`: a raw token reply, an authorization code, a state, a browser binding, a begun
/// authorization, a state key.
#[test]
fn debug_of_raw_replies_and_flow_values_holds_no_secret() {
    let body = br#"{"access_token":"at-0123456789","refresh_token":"rt-0123456789"}"#;
    let raw = tokenkeeper::oauth::RawResponse {
        status: 200,
        retry_after: None,
        body: body.to_vec(),
    };
    let binding = tokenkeeper::BrowserBinding::generate().unwrap();
    let key = tokenkeeper::StateKey::generate(1).unwrap();
    let printed = [
        format!("{raw:?}"),
        format!(
            "{:?}",
            tokenkeeper::AuthorizationCode::new("code-0123456789")
        ),
        format!(
            "{:?}",
            tokenkeeper::AuthorizationState::new("state-0123456789")
        ),
        format!("{binding:?}"),
        format!("{key:?}"),
    ]
    .join("\n");
    for secret in [
        "at-0123456789",
        "rt-0123456789",
        "code-0123456789",
        "state-0123456789",
        binding.expose_cookie_value().as_str(),
    ] {
        assert!(!printed.contains(secret), "{secret} in:\n{printed}");
    }
    assert!(printed.contains("body_bytes"), "{printed}");
}

/// Review N9: a gateway echoes the request in other spellings: the `Authorization: Basic`
/// value (client id and secret, base64) and the form body's percent-encoding of a secret; and
/// it disguises its text with invisible bidi and zero-width characters. None of it reaches
/// the error, `explain` or the stored history.
#[tokio::test]
async fn encoded_echoes_and_invisible_characters_are_scrubbed() {
    use base64::Engine as _;
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(7200));
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        tokenkeeper_mock_provider::DEFAULT_CLIENT_ID,
        tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET
    ));
    let echoed = format!("bad request: Authorization: Basic {basic} \u{202E}txt.exe\u{200B}");
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::ErrorReply {
            status: 400,
            error: "invalid_grant".into(),
            description: echoed,
        },
    )]);
    let err = f.manager.access_token(&id).await.unwrap_err();
    let explained = f.manager.explain(&id).await.unwrap();
    for text in [
        err.to_string(),
        explained.to_string(),
        format!("{:?}", f.record(&id).await.last_error()),
    ] {
        assert!(!text.contains(&basic), "Basic credentials in: {text}");
        assert!(
            !text.contains('\u{202E}') && !text.contains('\u{200B}'),
            "{text:?}"
        );
        assert!(text.contains("[redacted]"), "{text}");
    }
}
