//! `rediss://`: a real redis-server with TLS on a private CA (certificates made by the test
//! kit with the openssl command). With the CA trusted the store works; without it, connecting is a typed
//! error.
#![cfg(feature = "tls")]

use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{InstallationId, TokenStore};
use tokenkeeper_redis::{ConnectError, RedisStore};
use tokenkeeper_testkit::redis::{Server, free_port};

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let ca = tokenkeeper_testkit::tls::PrivateCa::new("redis");
    let path = |f: &str| ca.path(f);
    let port = free_port();
    let _server = Server::start_on(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &path("server.crt"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.crt"),
            "--tls-auth-clients",
            "no",
        ],
    );
    let url = format!("rediss://127.0.0.1:{port}");
    let store = RedisStore::builder(&url)
        .tls_root_certificate(ca.ca_pem())
        .connect()
        .await
        .unwrap();
    let id = InstallationId::new("over-tls").unwrap();
    store.create(&sample_record(&id, T0)).await.unwrap();
    assert!(store.get(&id).await.unwrap().is_some());
    // Without the private CA the server's certificate is not trusted.
    let untrusted = RedisStore::builder(&url).connect().await;
    assert!(
        matches!(untrusted, Err(ConnectError::Unreachable { .. })),
        "{untrusted:?}"
    );
}
