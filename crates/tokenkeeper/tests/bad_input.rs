//! The bad-input matrix: ids, provider replies and stored data that are wrong in every way we
//! could think of. Each case must give a typed error (or a documented, safe interpretation),
//! never a panic, and never affect another installation.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Fixture;
use tokenkeeper::{
    Error, InstallationId, core::FailureClass, core::StoreError, core::Timestamp, core::TokenStore,
    oauth::ErrorKind, oauth::Operation, oauth::RawResponse, oauth::parse_token_response, profiles,
};
use tokenkeeper_core::InvalidInstallationId;
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};

#[test]
fn bad_installation_ids_are_typed_errors() {
    let cases: Vec<(&str, Result<InstallationId, InvalidInstallationId>)> = vec![
        ("empty", InstallationId::new("")),
        ("201 bytes", InstallationId::new("x".repeat(201))),
        (
            "101 two-byte characters",
            InstallationId::new("é".repeat(101)),
        ),
        ("newline", InstallationId::new("a\nb")),
        ("tab", InstallationId::new("a\tb")),
        ("NUL", InstallationId::new("a\0b")),
        ("DEL", InstallationId::new("a\u{7f}b")),
        ("C1 control", InstallationId::new("a\u{85}b")),
        ("invalid UTF-8", InstallationId::from_bytes(b"ok\xc3\x28")),
        (
            "lone continuation byte",
            InstallationId::from_bytes(b"\x80"),
        ),
    ];
    for (name, result) in &cases {
        let e = result.as_ref().expect_err(name);
        assert!(!e.to_string().is_empty(), "{name}");
    }
    assert!(
        InstallationId::new("é".repeat(100)).is_ok(),
        "exactly 200 bytes is fine"
    );
    assert!(cases.len() >= 10);
}

fn reply(status: u16, body: &[u8]) -> RawResponse {
    RawResponse {
        status,
        retry_after: None,
        body: body.to_vec(),
    }
}

#[test]
fn bad_provider_replies_are_classified_never_panics() {
    let profile = profiles::bitbucket();
    let t0 = Timestamp::from_unix_secs(1_000_000);
    let previous = parse_token_response(
        &profile,
        Operation::Refresh,
        &reply(
            200,
            br#"{"access_token":"a0","refresh_token":"r0","scope":"account","expires_in":7200}"#,
        ),
        t0,
        None,
    )
    .unwrap();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let huge = format!(
        r#"{{"access_token":"a","padding":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    // (name, status, body, expected: Err(kind, class) or Ok(lifetime secs))
    type Want = Result<u64, (ErrorKind, FailureClass)>;
    let transient = |kind| Err((kind, FailureClass::Transient));
    let cases: Vec<(&str, u16, Vec<u8>, Want)> = vec![
        (
            "truncated JSON",
            200,
            br#"{"access_token":"a","expi"#.to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "empty body",
            200,
            b"".to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "JSON array",
            200,
            b"[1,2]".to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "JSON string",
            200,
            br#""token""#.to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "access_token a number",
            200,
            br#"{"access_token":42}"#.to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "access_token empty",
            200,
            br#"{"access_token":""}"#.to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "access_token null",
            200,
            br#"{"access_token":null}"#.to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "HTML with 200",
            200,
            b"<html><body>maintenance</body></html>".to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "HTML with 500",
            500,
            b"<html>oops</html>".to_vec(),
            transient(ErrorKind::Provider),
        ),
        (
            "invalid UTF-8",
            200,
            b"{\"access_token\":\"\xff\xfe\"}".to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "nesting 10,000 deep",
            200,
            deep.into_bytes(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "error code a number",
            400,
            br#"{"error":400}"#.to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "token_type mac",
            200,
            br#"{"access_token":"a","token_type":"mac"}"#.to_vec(),
            Err((ErrorKind::InvalidResponse, FailureClass::Configuration)),
        ),
        (
            "expires_in an object",
            200,
            br#"{"access_token":"a","expires_in":{}}"#.to_vec(),
            Ok(7200),
        ),
        (
            "expires_in text",
            200,
            br#"{"access_token":"a","expires_in":"soon"}"#.to_vec(),
            Ok(7200),
        ),
        (
            "expires_in absent",
            200,
            br#"{"access_token":"a"}"#.to_vec(),
            Ok(7200),
        ),
        (
            "expires_in negative",
            200,
            br#"{"access_token":"a","expires_in":-100}"#.to_vec(),
            Ok(0),
        ),
        (
            "expires_in zero",
            200,
            br#"{"access_token":"a","expires_in":0}"#.to_vec(),
            Ok(0),
        ),
        (
            "expires_in one",
            200,
            br#"{"access_token":"a","expires_in":1}"#.to_vec(),
            Ok(1),
        ),
        (
            "access_token with CR LF",
            200,
            b"{\"access_token\":\"a\\r\\nX: 1\",\"expires_in\":7200}".to_vec(),
            transient(ErrorKind::InvalidResponse),
        ),
        (
            "expires_in huge",
            200,
            br#"{"access_token":"a","expires_in":1e308}"#.to_vec(),
            Ok(tokenkeeper::oauth::MAX_LIFETIME.as_secs()),
        ),
        (
            "expires_in u64 max",
            200,
            br#"{"access_token":"a","expires_in":18446744073709551615}"#.to_vec(),
            Ok(tokenkeeper::oauth::MAX_LIFETIME.as_secs()),
        ),
        (
            "scope a number",
            200,
            br#"{"access_token":"a","scope":5}"#.to_vec(),
            Ok(7200),
        ),
        (
            "refresh_token a number",
            200,
            br#"{"access_token":"a","refresh_token":7}"#.to_vec(),
            Ok(7200),
        ),
        ("1 MiB body", 200, huge.into_bytes(), Ok(7200)),
    ];
    for (name, status, body, want) in &cases {
        let got = parse_token_response(
            &profile,
            Operation::Refresh,
            &reply(*status, body),
            t0,
            Some(&previous),
        );
        match (got, want) {
            (Ok(t), Ok(secs)) => {
                assert_eq!(t.lifetime(), Duration::from_secs(*secs), "{name}");
                assert_eq!(
                    t.refresh_token, previous.refresh_token,
                    "{name}: the refresh token is kept"
                );
                assert_eq!(t.scopes, previous.scopes, "{name}: the scopes are kept");
            }
            (Err(e), Err((kind, class))) => {
                assert_eq!((e.kind(), e.class()), (*kind, *class), "{name}: {e}");
                assert!(!e.to_string().contains("r0"), "{name}");
            }
            (got, want) => panic!("{name}: got {got:?}, wanted {want:?}"),
        }
    }
    assert!(cases.len() >= 20);
}

#[tokio::test]
async fn bad_replies_over_http_leave_every_installation_intact() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let (victim, bystander) = (f.install().await, f.install().await);
    let faults = [
        Fault::OversizedBody {
            bytes: 10 * 1024 * 1024,
        },
        Fault::MalformedJson,
        Fault::ServerError {
            status: 502,
            html: true,
        },
    ];
    for fault in faults {
        f.advance(Duration::from_secs(7200));
        let before = f.record(&victim).await.tokens().clone();
        f.mock
            .set_faults(vec![FaultRule::next(Endpoint::Token, 1, fault.clone())]);
        match f.manager.access_token(&victim).await {
            Err(Error::TemporarilyUnavailable { .. }) => {}
            other => panic!("{fault:?}: expected TemporarilyUnavailable, got {other:?}"),
        }
        assert_eq!(
            f.record(&victim).await.tokens(),
            &before,
            "{fault:?}: tokens kept"
        );
        f.manager
            .access_token(&bystander)
            .await
            .expect("the other installation is unaffected");
        f.clock.advance(Duration::from_secs(3600)); // past the backoff
        f.manager
            .access_token(&victim)
            .await
            .expect("recovers after the backoff");
    }
}

async fn sqlite_with_rows(
    names: &[&str],
) -> (
    Arc<dyn TokenStore>,
    rusqlite::Connection,
    std::path::PathBuf,
) {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "bad-input-{}-{}",
        std::process::id(),
        names.join("-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("tokens.db");
    let store: Arc<dyn TokenStore> =
        Arc::new(tokenkeeper_sqlite::SqliteStore::open(&db).await.unwrap());
    for (n, name) in names.iter().enumerate() {
        let id = InstallationId::new(*name).unwrap();
        store
            .create(&tokenkeeper_core::conformance::sample_record(
                &id,
                Timestamp::from_unix_secs(n as i64),
            ))
            .await
            .unwrap();
    }
    (store, rusqlite::Connection::open(&db).unwrap(), db)
}

#[tokio::test]
async fn bad_stored_data_is_a_typed_error_for_that_installation_only() {
    let names = [
        "garbage",
        "truncated",
        "future",
        "version0",
        "swapped",
        "toolong",
        "terminaldue",
        "badstate",
        "healthy",
    ];
    let (store, raw, db) = sqlite_with_rows(&names).await;
    let healthy: Vec<u8> = raw
        .query_row(
            "SELECT record FROM installations WHERE id = 'healthy'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let text = String::from_utf8(healthy.clone()).unwrap();
    let set = |id: &str, bytes: &[u8]| {
        raw.execute(
            "UPDATE installations SET record = ?1 WHERE id = ?2",
            rusqlite::params![bytes, id],
        )
        .unwrap();
    };
    set("garbage", b"\x00\x01\x02 definitely not json");
    set("truncated", &healthy[..healthy.len() / 2]);
    set(
        "future",
        text.replacen("\"format\":1", "\"format\":7", 1)
            .replace("\"id\":\"healthy\"", "\"id\":\"future\"")
            .as_bytes(),
    );
    set(
        "version0",
        text.replace("\"id\":\"healthy\"", "\"id\":\"version0\"")
            .replacen("\"version\":1,", "\"version\":0,", 1)
            .as_bytes(),
    );
    set("swapped", &healthy);
    let history: String = (0..20)
        .map(|v| format!(r#"{{"at":0,"event":"Created","from":"Active","to":"Active","error":null,"version":{v}}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let long = text.replace("\"id\":\"healthy\"", "\"id\":\"toolong\"");
    let start = long.find("\"history\":[").unwrap() + "\"history\":[".len();
    let end = long[start..].find(']').unwrap() + start;
    set(
        "toolong",
        format!("{}{}{}", &long[..start], history, &long[end..]).as_bytes(),
    );
    set(
        "terminaldue",
        text.replace("\"id\":\"healthy\"", "\"id\":\"terminaldue\"")
            .replacen(
                "\"state\":\"Active\"",
                "\"state\":{\"Revoked\":{\"at\":0}}",
                1,
            )
            .as_bytes(),
    );
    raw.execute(
        "UPDATE installations SET state = 'zombie' WHERE id = 'badstate'",
        [],
    )
    .unwrap();

    let mut checked = 0;
    for name in &names[..names.len() - 1] {
        let id = InstallationId::new(*name).unwrap();
        match store.get(&id).await {
            Err(StoreError::Corrupt { id: got, .. }) => assert_eq!(got, id, "{name}"),
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
        checked += 1;
    }
    assert!(
        store
            .get(&InstallationId::new("healthy").unwrap())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(checked, 8);
    // A database from a newer schema is refused untouched.
    drop(store);
    raw.pragma_update(None, "user_version", 99).unwrap();
    drop(raw);
    assert!(matches!(
        tokenkeeper_sqlite::SqliteStore::open(&db).await,
        Err(tokenkeeper_sqlite::OpenError::FutureSchema { found: 99, .. })
    ));
}
