//! `rediss://`: a real redis-server with TLS on a private CA (certificates made here with the
//! openssl command). With the CA trusted the store works; without it, connecting is a typed
//! error.
#![cfg(feature = "tls")]

use std::process::Command;

use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{InstallationId, TokenStore};
use tokenkeeper_redis::{ConnectError, RedisStore};
use tokenkeeper_testkit::redis::{Server, free_port};

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is needed for the TLS test (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let dir = std::env::temp_dir().join(format!("tokenkeeper-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tokenkeeper test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();
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
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let store = RedisStore::builder(&url)
        .tls_root_certificate(ca)
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
    let _ = std::fs::remove_dir_all(&dir);
}
