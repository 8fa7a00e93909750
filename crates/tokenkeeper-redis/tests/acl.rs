//! The README's Redis ACL, checked (review N6): the whole conformance suite against a user
//! that has exactly the commands the README grants, limited to its key prefix, connected with
//! `DurabilityCheck::Skip` (no `CONFIG GET` for the runtime user). A command the store needs
//! and the README forgot fails here with `NOPERM`.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokenkeeper_redis::{DurabilityCheck, RedisStore};
use tokenkeeper_testkit::redis::{free_port, server_binary, unique_prefix};

/// The commands the README grants the runtime user (keep in step with README.md).
const README_ACL: &str = "+get +set +del +exists +zadd +zrem +zrange +zrangebylex +zcard +xadd +xdel +xlen +xrange +xrevrange +time +multi +exec +evalsha +eval +script|load +wait +ping";
const PASSWORD: &str = "acl-test-secret-0123456789";

/// A server of this process's own with the README's user on `tk-test-acl-*` (declared on
/// the command line, `--user`). It lives as long as the process: a static is never dropped,
/// so a `Server` held in one outlived every test run (and, under `flock`, kept the lock);
/// instead a shell wrapper kills it when our end of its stdin closes, however the process
/// ends.
fn url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let port = free_port();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &std::env::temp_dir().to_string_lossy(),
            "--user",
            "tokenkeeper",
            "on",
            &format!(">{PASSWORD}"),
            "~tk-test-acl-*",
            "resetchannels",
            "-@all",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(README_ACL.split_whitespace().map(str::to_owned));
        let wrapper = Command::new("sh")
            .args([
                "-c",
                "\"$@\" >/dev/null 2>&1 & pid=$!; read _; kill $pid",
                "sh",
            ])
            .arg(server_binary())
            .args(&args)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep the pipe's write end open for the life of the process.
        std::mem::forget(wrapper);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the ACL test's redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        format!("redis://tokenkeeper:{PASSWORD}@127.0.0.1:{port}")
    })
}

async fn store() -> RedisStore {
    RedisStore::builder(url())
        .prefix(unique_prefix("acl"))
        .durability_check(DurabilityCheck::Skip)
        .connect()
        .await
        .unwrap()
}

tokenkeeper_core::conformance_tests!(store);
