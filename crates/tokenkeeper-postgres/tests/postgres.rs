//! PostgreSQL-specific behaviour against a real server: the due and list queries are served by
//! their indexes (`EXPLAIN`), the pool survives a server restart and a crash (typed
//! `Unavailable` while the server is down, recovery after, nothing acknowledged lost), the
//! schema refuses a newer version or a foreign table untouched, and URLs that would send the
//! password in cleartext to another host are refused.

mod common;

use std::time::Duration;

use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{Event, InstallationId, LeaseHolder, StoreError, TokenStore};
use tokenkeeper_postgres::{ConnectError, PostgresStore, SCHEMA_VERSION};

fn id(s: &str) -> InstallationId {
    InstallationId::new(s).unwrap()
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn due_and_list_are_served_by_indexes() {
    let store = common::fresh_store("explain").await;
    let url = common::url();
    // Enough rows, and fresh statistics, for the planner to prefer an index to a scan.
    for n in 0..3000 {
        let r = sample_record(&id(&format!("explain-{n:05}")), T0);
        store.create(&r).await.unwrap();
        // A few revoked ones, for the listing by state.
        if n % 300 == 0 {
            let revoked = r.apply(Event::Revoked, T0).unwrap();
            store.compare_and_swap(&revoked, r.version()).await.unwrap();
        }
    }
    raw(&url)
        .await
        .batch_execute(&format!("ANALYZE \"{}\".installations", store.schema()))
        .await
        .unwrap();
    let plan = store
        .explain_due(sample_record(&id("x"), T0).consumer())
        .await
        .unwrap();
    assert!(
        plan.contains("installations_by_consumer_due") && !plan.contains("Seq Scan"),
        "{plan}"
    );
    let client = raw(&url).await;
    let s = store.schema();
    for (sql, index) in [
        (
            format!(
                "EXPLAIN SELECT id, state FROM \"{s}\".installations WHERE id > '' ORDER BY id LIMIT 100"
            ),
            "installations_pkey",
        ),
        (
            format!(
                "EXPLAIN SELECT id, state FROM \"{s}\".installations WHERE state = 'revoked' AND id > '' ORDER BY id LIMIT 100"
            ),
            "installations_by_state",
        ),
    ] {
        let plan: Vec<String> = client
            .query(&sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains(index) && !plan.contains("Seq Scan"), "{plan}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_survives_a_restart_and_a_crash() {
    let server = tokenkeeper_testkit::postgres::Server::start();
    let store = PostgresStore::builder(server.url())
        .schema("restart")
        .operation_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let r = sample_record(&id("survivor"), T0);
    store.create(&r).await.unwrap();
    for crash in [false, true] {
        // An acknowledged write just before the server goes away is there afterwards.
        let current = store.get(r.id()).await.unwrap().unwrap();
        let next = current
            .apply(
                Event::LeaseAcquired {
                    holder: LeaseHolder::new(format!("before-{crash}")),
                    until: T0,
                },
                T0,
            )
            .unwrap();
        assert!(matches!(
            store
                .compare_and_swap(&next, current.version())
                .await
                .unwrap(),
            tokenkeeper_core::CasOutcome::Swapped
        ));
        if crash {
            server.crash();
        } else {
            server.stop();
        }
        let started = std::time::Instant::now();
        match store.get(r.id()).await {
            Err(StoreError::Unavailable { .. }) => {}
            other => panic!("while down: expected Unavailable, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "bounded by the timeout"
        );
        server.start_again();
        // Broken connections are replaced: within a few attempts the store answers again.
        let mut back = None;
        for _ in 0..20 {
            match store.get(r.id()).await {
                Ok(found) => {
                    back = found;
                    break;
                }
                Err(StoreError::Unavailable { .. }) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("after restart: {e}"),
            }
        }
        let back = back.expect("the record after the restart");
        assert_eq!(back, next, "crash={crash}: the acknowledged write survived");
    }
}

#[tokio::test]
async fn a_newer_schema_and_a_foreign_table_are_refused_untouched() {
    let url = common::url();
    let store = common::fresh_store("future").await;
    let schema = store.schema().to_owned();
    drop(store);
    let client = raw(&url).await;
    client
        .execute(
            &format!("UPDATE \"{schema}\".tokenkeeper_schema SET version = $1"),
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    match PostgresStore::builder(&url).schema(&schema).connect().await {
        Err(
            e @ ConnectError::FutureSchema {
                found, supported, ..
            },
        ) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            assert!(e.to_string().contains("upgrade tokenkeeper"), "{e}");
        }
        other => panic!("expected FutureSchema, got {other:?}"),
    }
    let foreign = common::unique_schema("foreign");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA \"{foreign}\"; CREATE TABLE \"{foreign}\".installations (x int)"
        ))
        .await
        .unwrap();
    assert!(matches!(
        PostgresStore::builder(&url)
            .schema(&foreign)
            .connect()
            .await,
        Err(ConnectError::NotTokenkeeper { .. })
    ));
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
            &[&foreign],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "nothing was created next to the foreign table");
}

#[tokio::test]
async fn two_processes_migrating_at_once_both_succeed() {
    let url = common::url();
    let schema = common::unique_schema("concurrent");
    let (a, b) = tokio::join!(
        PostgresStore::builder(&url).schema(&schema).connect(),
        PostgresStore::builder(&url).schema(&schema).connect()
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let r = sample_record(&id("both"), T0);
    a.create(&r).await.unwrap();
    assert_eq!(b.get(r.id()).await.unwrap(), Some(r));
}

#[tokio::test]
async fn plaintext_to_another_host_is_refused_and_errors_hide_the_password() {
    let e = PostgresStore::builder("postgres://app:hunter2@10.255.255.1/app?sslmode=disable")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectError::Plaintext { .. }), "{e}");
    // `hostaddr` is where the driver really connects: a loopback host name does not make a
    // remote address local, nor does leaving the host out.
    for sneaky in [
        "postgres://app:hunter2@localhost/app?hostaddr=10.255.255.1&sslmode=disable",
        "postgres://app:hunter2@/app?hostaddr=10.255.255.1&sslmode=disable",
    ] {
        let e = PostgresStore::builder(sneaky)
            .connect_timeout(Duration::from_millis(300))
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::Plaintext { .. }), "{sneaky}: {e}");
    }
    let text = e.to_string();
    assert!(
        text.contains("sslmode=require") && !text.contains("hunter2"),
        "{text}"
    );
    // Unreachable: a typed error within the connect timeout, the password not echoed.
    let e = PostgresStore::builder("postgres://app:hunter2@127.0.0.1:1/app")
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectError::Unreachable { .. }), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(
        !format!("{:?}", PostgresStore::builder("postgres://a:hunter2@h/d")).contains("hunter2")
    );
    for bad in ["mysql://h/d", "postgres://h/d?sslmode=sometimes"] {
        assert!(matches!(
            PostgresStore::builder(bad).connect().await,
            Err(ConnectError::InvalidUrl { .. })
        ));
    }
    assert!(matches!(
        PostgresStore::builder(common::url())
            .schema("Bad-Name")
            .connect()
            .await,
        Err(ConnectError::Config {
            field: "schema",
            ..
        })
    ));
}

/// TLS with rustls against a server on a private CA: `sslmode=require` with the CA trusted
/// works (also for `verify-full`); without the CA the certificate is not trusted and
/// connecting is a typed error; a server without TLS is refused for `require`.
#[tokio::test]
async fn tls_with_a_private_ca() {
    let ca = tokenkeeper_testkit::tls::PrivateCa::new("postgres");
    let server = tokenkeeper_testkit::postgres::Server::start_tls(&ca);
    for mode in ["require", "verify-full"] {
        let url = format!(
            "postgres://tokenkeeper@localhost:{}/postgres?sslmode={mode}",
            server.port
        );
        let store = PostgresStore::builder(&url)
            .schema("over_tls")
            .ca_certificate(ca.ca_pem())
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let r = sample_record(&id(&format!("over-tls-{mode}")), T0);
        store.create(&r).await.unwrap();
        assert_eq!(store.get(r.id()).await.unwrap(), Some(r));
    }
    let url = format!(
        "postgres://tokenkeeper@localhost:{}/postgres?sslmode=require",
        server.port
    );
    let untrusted = PostgresStore::builder(&url)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    assert!(
        matches!(untrusted, Err(ConnectError::Unreachable { .. })),
        "{untrusted:?}"
    );
    // The shared test server offers no TLS: `require` does not fall back to plaintext.
    let plain_server = common::url().replace("sslmode=disable", "sslmode=require");
    let refused = PostgresStore::builder(&plain_server)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    assert!(
        matches!(refused, Err(ConnectError::Unreachable { .. })),
        "{refused:?}"
    );
}
