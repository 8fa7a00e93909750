//! The `tokenkeeper-mock-provider` binary: `--help` documents every flag, and it serves a
//! working provider on the port it is given, logging requests without secrets.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tokenkeeper-mock-provider");

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--port",
        "--host",
        "--profile",
        "--client-id",
        "--client-secret",
        "--redirect-prefix",
        "--scopes",
        "--access-ttl-secs",
        "--seed",
        "--insecure-public",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
    let bad = Command::new(BIN)
        .args(["--profile", "nonsense"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bitbucket-legacy"));
    // A host others can reach needs the explicit flag.
    let public = Command::new(BIN)
        .args(["--host", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    assert!(!public.status.success());
    let said = String::from_utf8_lossy(&public.stderr);
    assert!(said.contains("--insecure-public"), "{said}");
}

#[tokio::test]
async fn serves_a_provider_and_logs_without_secrets() {
    let mut child = Command::new(BIN)
        .args([
            "--port",
            "0",
            "--profile",
            "atlassian-3lo",
            "--client-secret",
            "cli-secret-value",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    assert!(banner.starts_with("TEST DOUBLE"), "{banner}");
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let base = first.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{first}");

    let client = reqwest::Client::new();
    let r = client
        .post(format!("{base}/site/oauth2/access_token"))
        .basic_auth("tokenkeeper-test-key", Some("cli-secret-value"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let token = body["access_token"].as_str().unwrap().to_owned();
    let r = client
        .get(format!("{base}/2.0/user"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let logs = String::from_utf8_lossy(&out.stderr).into_owned() + &rest;
    assert!(
        logs.contains("/site/oauth2/access_token"),
        "requests are logged: {logs}"
    );
    assert!(!logs.contains(&token), "an access token reached the log");
    assert!(
        !logs.contains("cli-secret-value"),
        "the client secret reached the log"
    );
}
