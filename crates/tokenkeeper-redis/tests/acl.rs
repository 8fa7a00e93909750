//! The README's Redis ACL, checked (review N6): the whole conformance suite against a user
//! that has exactly the commands the README grants, limited to its key prefix, connected with
//! `DurabilityCheck::Skip` (no `CONFIG GET` for the runtime user). A command the store needs
//! and the README forgot fails here with `NOPERM`.

use std::sync::OnceLock;

use tokenkeeper_redis::{DurabilityCheck, RedisStore};
use tokenkeeper_testkit::redis::{Server, cli, free_port, unique_prefix};

/// The commands the README grants the runtime user (keep in step with README.md).
const README_ACL: &str = "+get +set +del +exists +zadd +zrem +zrange +zrangebylex +zcard +xadd +xdel +xlen +xrange +xrevrange +time +multi +exec +evalsha +eval +script|load +wait +ping";
const PASSWORD: &str = "acl-test-secret-0123456789";

/// A server of this process's own with the README's user on `tk-test-acl-*`.
fn url() -> &'static str {
    static URL: OnceLock<(std::sync::Mutex<Server>, String)> = OnceLock::new();
    &URL.get_or_init(|| {
        let port = free_port();
        let server = Server::start_on(port, &[]);
        let mut args = vec![
            "ACL".to_owned(),
            "SETUSER".into(),
            "tokenkeeper".into(),
            "on".into(),
            format!(">{PASSWORD}"),
            "~tk-test-acl-*".into(),
            "resetchannels".into(),
            "-@all".into(),
        ];
        args.extend(README_ACL.split_whitespace().map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = cli(port, &args);
        assert!(reply.contains("OK"), "ACL SETUSER: {reply}");
        (
            std::sync::Mutex::new(server),
            format!("redis://tokenkeeper:{PASSWORD}@127.0.0.1:{port}"),
        )
    })
    .1
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
