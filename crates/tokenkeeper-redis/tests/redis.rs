//! Redis-specific guarantees against a real redis-server: the cluster-compatible key layout
//! (every key of an installation in one slot, no token in any key), corrupt values as typed
//! errors for one installation only, scripts reloaded after `SCRIPT FLUSH`, prefixes that
//! isolate applications, AUTH with a password and with an ACL user, and an outage that yields
//! typed errors within a bounded time and heals when the server returns.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use tokenkeeper_core::conformance::{T0, lease, sample_record};
use tokenkeeper_core::{CasOutcome, InstallationId, ListFilter, StoreError, TokenStore};
use tokenkeeper_redis::{ConnectError, RedisStore};

fn id(s: &str) -> InstallationId {
    InstallationId::new(s).unwrap()
}

fn at(secs: u64) -> tokenkeeper_core::Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// CRC16/XMODEM of the hash tag (or whole key), modulo 16384: Redis Cluster's key slot.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for b in tagged {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

async fn keys_with(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(conn)
        .await
        .unwrap();
    keys.sort();
    keys
}

#[test]
fn crc16_matches_redis_reference_values() {
    // Values from the Redis Cluster specification.
    assert_eq!(key_slot(b"123456789"), 12739); // CRC16/XMODEM check value 0x31C3
    assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    assert_ne!(
        key_slot(b"foo{}{bar}"),
        key_slot(b"bar"),
        "an empty tag hashes the whole key"
    );
}

#[tokio::test]
async fn every_key_of_an_installation_is_in_one_slot_and_holds_no_token() {
    let store = common::fresh_store("layout").await;
    let mut conn = raw(&common::url()).await;
    let nasty = [
        "plain",
        "with{brace}s",
        "{leading}",
        "unicode-ключ",
        "a:b/c%d",
    ];
    for (n, name) in nasty.iter().enumerate() {
        let r = sample_record(&id(name), at(n as u64));
        store.create(&r).await.unwrap();
        let leased = lease(&r, "h", at(99), at(0));
        store.compare_and_swap(&leased, 1).await.unwrap();
    }
    let all_keys = keys_with(&mut conn, store.prefix()).await;
    for name in nasty {
        let i = id(name);
        // The keys this installation touches: its record and every index key holding it.
        let mut touched = vec![store.record_key(&i)];
        for key in &all_keys {
            let members: Vec<Vec<u8>> = match redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
            {
                Ok(m) => m,
                Err(_) => continue, // the record strings
            };
            if members.iter().any(|m| m.ends_with(name.as_bytes())) {
                touched.push(key.clone());
            }
        }
        assert!(
            touched.len() >= 3,
            "{name}: record, due and state entries expected: {touched:?}"
        );
        let slots: HashSet<u16> = touched.iter().map(|k| key_slot(k.as_bytes())).collect();
        assert_eq!(slots.len(), 1, "{name}: keys in several slots: {touched:?}");
    }
    for key in &all_keys {
        assert!(
            !key.contains("access-") && !key.contains("refresh-"),
            "a token in key {key}"
        );
    }
    // The value holds the tokens; nothing else in Redis does.
    let value: Vec<u8> = redis::cmd("GET")
        .arg(store.record_key(&id("plain")))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&value).contains("refresh-plain"));
}

#[tokio::test]
async fn corrupt_values_are_typed_errors_for_that_installation_only() {
    let store = common::fresh_store("corrupt").await;
    let mut conn = raw(&common::url()).await;
    for (n, name) in ["garbage", "header", "healthy"].iter().enumerate() {
        store
            .create(&sample_record(&id(name), at(n as u64)))
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg(store.record_key(&id("garbage")))
        .arg(b"\x00\xffnot a record".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    let good: Vec<u8> = redis::cmd("GET")
        .arg(store.record_key(&id("header")))
        .query_async(&mut conn)
        .await
        .unwrap();
    let tampered = String::from_utf8(good)
        .unwrap()
        .replacen("1\tactive", "9\tactive", 1);
    let _: () = redis::cmd("SET")
        .arg(store.record_key(&id("header")))
        .arg(tampered)
        .query_async(&mut conn)
        .await
        .unwrap();

    for name in ["garbage", "header"] {
        match store.get(&id(name)).await {
            Err(StoreError::Corrupt { id: got, .. }) => assert_eq!(got.as_str(), name),
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
    }
    // A swap against the garbage value (no header) reports the corruption.
    let r = sample_record(&id("garbage"), at(0));
    let leased = lease(&r, "h", at(9), at(0));
    assert!(matches!(
        store.compare_and_swap(&leased, 1).await,
        Err(StoreError::Corrupt { .. })
    ));
    // Everyone else is unaffected.
    let healthy = store.get(&id("healthy")).await.unwrap().unwrap();
    let leased = lease(&healthy, "h", at(9), at(0));
    assert_eq!(
        store.compare_and_swap(&leased, 1).await.unwrap(),
        CasOutcome::Swapped
    );
    assert_eq!(
        store
            .list(ListFilter::all(), None, 10)
            .await
            .unwrap()
            .entries
            .len(),
        3
    );
}

/// A leased value as a store before 2026-12-08 wrote it: a header of three fields, the lease
/// holder only inside the record. Its holder is still checked, read from the record.
#[tokio::test]
async fn a_value_whose_header_does_not_name_the_holder_is_still_fenced() {
    let store = common::fresh_store("old-header").await;
    let mut conn = raw(&common::url()).await;
    let r = sample_record(&id("old"), at(0));
    store.create(&r).await.unwrap();
    let leased = lease(&r, "holder\twith a tab", at(9), at(0));
    assert_eq!(
        store.compare_and_swap(&leased, 1).await.unwrap(),
        CasOutcome::Swapped
    );
    let key = store.record_key(&id("old"));
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (header, body) = stored.split_at(stored.iter().position(|b| *b == b'\n').unwrap());
    let fields: Vec<&[u8]> = header.split(|b| *b == b'\t').collect();
    assert_eq!(fields.len(), 4, "a new value's header names the holder");
    let old = [fields[..3].join(&b'\t'), body.to_vec()].concat();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(old)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.get(&id("old")).await.unwrap().unwrap(), leased);
    let result = |holder: &str| {
        let mut tokens = tokenkeeper_core::conformance::sample_tokens("next", at(1));
        tokens.scopes = leased.tokens().scopes.clone();
        let mut under = leased.clone();
        if holder != "holder\twith a tab" {
            under = lease(&r, holder, at(9), at(0));
        }
        under
            .apply(
                tokenkeeper_core::Event::Refreshed {
                    fence: under.state().lease().unwrap().fence,
                    tokens,
                    refresh_at: at(100),
                    anomaly: None,
                },
                at(1),
            )
            .unwrap()
    };
    // Written under another lease of the same version: refused, the stored value returned.
    assert!(matches!(
        store.compare_and_swap(&result("someone else"), 2).await.unwrap(),
        CasOutcome::Conflict(current) if *current == leased
    ));
    // Written under the stored lease: lands.
    assert_eq!(
        store
            .compare_and_swap(&result("holder\twith a tab"), 2)
            .await
            .unwrap(),
        CasOutcome::Swapped
    );
}

#[tokio::test]
async fn scripts_are_reloaded_after_script_flush() {
    let store = common::fresh_store("noscript").await;
    let mut conn = raw(&common::url()).await;
    let r = sample_record(&id("x"), at(1));
    store.create(&r).await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let leased = lease(&r, "h", at(9), at(0));
    assert_eq!(
        store.compare_and_swap(&leased, 1).await.unwrap(),
        CasOutcome::Swapped
    );
}

#[tokio::test]
async fn prefixes_isolate_applications() {
    let a = common::fresh_store("app-a").await;
    let b = common::fresh_store("app-b").await;
    a.create(&sample_record(&id("shared-name"), at(1)))
        .await
        .unwrap();
    assert!(b.get(&id("shared-name")).await.unwrap().is_none());
    assert!(
        b.due("conformance", tokenkeeper_core::Timestamp::MAX, None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    b.create(&sample_record(&id("shared-name"), at(2)))
        .await
        .unwrap();
    assert_eq!(
        a.get(&id("shared-name")).await.unwrap().unwrap().due_at(),
        Some(at(1))
    );
    assert!(matches!(
        RedisStore::builder(common::url())
            .prefix("bad{prefix}")
            .connect()
            .await,
        Err(ConnectError::Config { .. })
    ));
}

/// Builder values out of range are refused by name before any connection is opened.
#[tokio::test]
async fn out_of_range_settings_are_refused_by_name() {
    let refused = |result: Result<RedisStore, ConnectError>| match result {
        Err(ConnectError::Config { field, .. }) => field,
        other => panic!(
            "expected a configuration error, got {:?}",
            other.map(|_| ())
        ),
    };
    for connections in [0, 65] {
        let result = RedisStore::builder(common::url())
            .replica_wait_connections(connections)
            .connect()
            .await;
        assert_eq!(refused(result), "replica_wait_connections", "{connections}");
    }
    for shards in [0, 257] {
        let result = RedisStore::builder(common::url())
            .index_shards(shards)
            .connect()
            .await;
        assert_eq!(refused(result), "index_shards", "{shards}");
    }
    RedisStore::builder(common::url())
        .replica_wait_connections(64)
        .index_shards(256)
        .connect()
        .await
        .expect("the largest values in range");
}

#[tokio::test]
async fn auth_with_password_and_acl_user() {
    let server = tokenkeeper_testkit::redis::Server::start_on(
        tokenkeeper_testkit::redis::free_port(),
        &[
            "--requirepass",
            "s3cret-pass",
            "--user",
            "app",
            "on",
            ">app-pass",
            "~*",
            "&*",
            "+@all",
        ],
    );
    let port = server.port;
    let err = RedisStore::connect(format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err}");
    let err = RedisStore::connect(format!("redis://:wrong@127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(
        !err.to_string().contains("wrong"),
        "the password leaked: {err}"
    );

    let store = RedisStore::connect(format!("redis://:s3cret-pass@127.0.0.1:{port}"))
        .await
        .unwrap();
    store
        .create(&sample_record(&id("authed"), at(1)))
        .await
        .unwrap();
    assert!(!format!("{store:?}").contains("s3cret-pass"));

    let acl = RedisStore::connect(format!("redis://app:app-pass@127.0.0.1:{port}"))
        .await
        .unwrap();
    assert!(acl.get(&id("authed")).await.unwrap().is_some());
    assert!(!format!("{acl:?}").contains("app-pass"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_gives_typed_errors_in_bounded_time_and_heals_after_restart() {
    let port = tokenkeeper_testkit::redis::free_port();
    let server = tokenkeeper_testkit::redis::Server::start_on(port, &[]);
    let store = RedisStore::builder(server.url())
        .prefix("restart")
        .operation_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    store
        .create(&sample_record(&id("before"), at(1)))
        .await
        .unwrap();

    drop(server); // kill -9 equivalent: the process is gone
    for op in 0..3 {
        let outcome = tokio::time::timeout(Duration::from_secs(10), store.get(&id("before")))
            .await
            .unwrap_or_else(|_| panic!("operation {op} hung during the outage"));
        match outcome {
            Err(e @ StoreError::Unavailable { .. }) => {
                assert!(e.to_string().contains("unavailable"), "{e}");
            }
            other => panic!("expected Unavailable during the outage, got {other:?}"),
        }
    }

    let _server = tokenkeeper_testkit::redis::Server::start_on(port, &[]);
    let mut healed = false;
    for _ in 0..50 {
        if store
            .create(&sample_record(&id("after"), at(2)))
            .await
            .is_ok()
        {
            healed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        healed,
        "the same store object never worked again after the restart"
    );
    assert!(store.get(&id("after")).await.unwrap().is_some());
}

/// A store written before the due index was per consumer kept one `{prefix}:{sNN}:due` set per
/// shard. `connect` moves each member to its record's consumer's set (dropping ghosts whose
/// record is gone), and `due` finds them under that consumer only.
#[tokio::test]
async fn connect_moves_a_shared_due_index_to_per_consumer_sets() {
    let store = common::fresh_store("legacy-due").await;
    let prefix = store.prefix().to_owned();
    let mut conn = raw(&common::url()).await;
    for name in ["old-1", "old-2", "old-3"] {
        store
            .create(&sample_record(&id(name), at(5)))
            .await
            .unwrap();
    }
    // Rewrite the index as the old layout had it: every member in the shard's shared set.
    let mut moved = 0;
    for key in keys_with(&mut conn, &prefix).await {
        if let Some(shared) = key.strip_suffix(":due:conformance") {
            let members: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            for m in members {
                let _: () = redis::cmd("ZADD")
                    .arg(format!("{shared}:due"))
                    .arg(0)
                    .arg(&m)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                moved += 1;
            }
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    assert_eq!(moved, 3);
    // A ghost: a member whose record was deleted long ago.
    let shared = keys_with(&mut conn, &prefix)
        .await
        .into_iter()
        .find(|k| k.ends_with(":due"))
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(&shared)
        .arg(0)
        .arg("8000000000000000ghost")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        store
            .due("conformance", at(10), None, 10)
            .await
            .unwrap()
            .entries
            .is_empty(),
        "the old layout is invisible until migrated"
    );

    let again = RedisStore::builder(common::url())
        .prefix(&prefix)
        .connect()
        .await
        .unwrap();
    let names: Vec<_> = again
        .due("conformance", at(10), None, 10)
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.id.as_str().to_owned())
        .collect();
    assert_eq!(names, ["old-1", "old-2", "old-3"]);
    let leftover: Vec<String> = keys_with(&mut conn, &prefix)
        .await
        .into_iter()
        .filter(|k| k.ends_with(":due"))
        .collect();
    assert!(leftover.is_empty(), "shared sets emptied: {leftover:?}");
}

/// Review finding 16c: `due` asked every one of the 16 shards for a whole page and kept one
/// page, moving 16 times what it returned. Now each shard is asked for its share: on a server
/// of its own (so the byte counter is this test's), paging 1,600 due entries 100 at a time
/// makes the server send under 3 times the bytes of the members returned (it was about 16).
#[tokio::test]
async fn due_fetches_about_what_it_returns() {
    let server =
        tokenkeeper_testkit::redis::Server::start_on(tokenkeeper_testkit::redis::free_port(), &[]);
    let store = RedisStore::builder(server.url())
        .prefix("fetch")
        .connect()
        .await
        .unwrap();
    for n in 0..1_600u64 {
        store
            .create(&sample_record(&id(&format!("due-{n:05}")), at(n % 97)))
            .await
            .unwrap();
    }
    let mut conn = raw(&server.url()).await;
    let sent = async |conn: &mut redis::aio::MultiplexedConnection| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = sent(&mut conn).await;
    let (mut cursor, mut returned, mut member_bytes, mut pages) = (None, 0u64, 0u64, 0);
    loop {
        let page = store
            .due("conformance", at(1_000), cursor.as_ref(), 100)
            .await
            .unwrap();
        pages += 1;
        returned += page.entries.len() as u64;
        // A member is 16 hex digits of the due time and the id.
        member_bytes += page
            .entries
            .iter()
            .map(|e| 16 + e.id.as_str().len() as u64)
            .sum::<u64>();
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let moved = sent(&mut conn).await - before;
    assert_eq!(returned, 1_600, "paging skipped or repeated entries");
    assert!(
        moved < 3 * member_bytes,
        "{moved} bytes sent for {member_bytes} bytes of members in {pages} pages"
    );
    println!("due: {moved} bytes sent for {member_bytes} bytes of members in {pages} pages");
}

/// Security review L6: a plaintext `redis://` URL to a host other than this machine carries
/// the AUTH password (and any unsealed token) in cleartext, so it is refused unless allowed
/// explicitly; loopback and `rediss://` need nothing.
#[tokio::test]
async fn plaintext_to_a_remote_host_is_refused_unless_allowed() {
    let refused = RedisStore::builder("redis://:secret-password@10.255.255.1:6379/0")
        .connection_timeout(std::time::Duration::from_millis(200))
        .operation_timeout(std::time::Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    let text = refused.to_string();
    assert!(
        matches!(refused, tokenkeeper_redis::ConnectError::Plaintext { .. }),
        "{text}"
    );
    assert!(
        text.contains("rediss://") && text.contains("allow_plaintext"),
        "{text}"
    );
    assert!(!text.contains("secret-password"), "{text}");
    // Allowed: it gets as far as trying to connect (nothing listens there).
    let tried = RedisStore::builder("redis://10.255.255.1:6379/0")
        .allow_plaintext(true)
        .connection_timeout(std::time::Duration::from_millis(200))
        .operation_timeout(std::time::Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(tried, tokenkeeper_redis::ConnectError::Unreachable { .. }),
        "{tried}"
    );
}

/// A write whose event cannot be appended (its shard's stream key holds another type) fails
/// whole: Redis does not roll a script back, so the script appends the event before it writes
/// anything. No record without its event.
#[tokio::test]
async fn a_write_whose_event_cannot_be_appended_writes_nothing() {
    let store = common::fresh_store("event-first").await;
    let mut conn = raw(&common::url()).await;
    let i = id("blocked");
    let record_key = store.record_key(&i);
    let stream = format!(
        "{}events",
        record_key
            .trim_end_matches(i.as_str())
            .trim_end_matches("rec:")
    );
    let _: () = redis::cmd("SET")
        .arg(&stream)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(store.create(&sample_record(&i, at(0))).await.is_err());
    assert!(
        store.get(&i).await.unwrap().is_none(),
        "a record without its event"
    );
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    let r1 = sample_record(&i, at(0));
    store.create(&r1).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&stream)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let r2 = lease(&r1, "h", at(60), at(1));
    assert!(store.compare_and_swap(&r2, 1).await.is_err());
    assert_eq!(
        store.get(&i).await.unwrap(),
        Some(r1),
        "a swap without its event"
    );
    assert!(store.delete(&i, 1).await.is_err());
    assert!(
        store.get(&i).await.unwrap().is_some(),
        "a deletion without its event"
    );
}

/// The event log's id lives in one key; when it is lost (a flush, an eviction), the next
/// store to connect draws another, and a store that connected before follows the new id when
/// it meets a cursor naming it, while cursors of the lost log are refused.
#[tokio::test]
async fn a_lost_log_id_is_drawn_again_and_every_store_follows_it() {
    let prefix = common::unique_prefix("log-id");
    let connect = || RedisStore::builder(common::url()).prefix(&prefix).connect();
    let old = connect().await.unwrap();
    old.create(&sample_record(&id("a"), at(0))).await.unwrap();
    let before = old.event_head().await.unwrap();
    let mut conn = raw(&common::url()).await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:events:log"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let new = connect().await.unwrap();
    let head = new.event_head().await.unwrap();
    assert_ne!(before.log(), head.log(), "a new id was drawn");
    old.read_events(&head, 10)
        .await
        .expect("the older store follows the new id");
    assert!(matches!(
        new.read_events(&before, 10).await,
        Err(StoreError::InvalidCursor { .. })
    ));
}
