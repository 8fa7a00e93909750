//! At-rest encryption end to end: with a keyring configured, neither the SQLite file nor any
//! Redis value holds a token the provider issued; tampering with one sealed record, or copying
//! a sealed token into another record, is a typed error for that installation only; a wrong or
//! missing key names the key id; keys rotate and `reseal` moves every record to the new key.
#![cfg(feature = "encryption")]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::Fixture;
use tokenkeeper::{
    Error, InstallationId, core::Clock, core::ListFilter, core::StoreError, core::TokenStore,
    core::sealed::Keyring, core::sealed::SealError, core::sealed::Sealed, profiles,
};
use tokenkeeper_mock_provider::MockProfile;

/// Two fixed keys that pass the keyring's randomness check (review N13 refuses `[7; 32]`).
const K1: [u8; 32] = key(7);
const K2: [u8; 32] = key(9);

const fn key(seed: u8) -> [u8; 32] {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = (i as u8).wrapping_mul(37).wrapping_add(seed) ^ 0x5a;
        i += 1;
    }
    k
}

fn keyring() -> Keyring {
    Keyring::new("k1", &K1).unwrap()
}

async fn tokens_of(store: &Arc<dyn TokenStore>) -> HashSet<String> {
    let mut out = HashSet::new();
    for e in store
        .list(ListFilter::all(), None, 1000)
        .await
        .unwrap()
        .entries
    {
        let r = store.get(&e.id).await.unwrap().unwrap();
        out.insert(r.tokens().access_token.secret().to_owned());
        if let Some(t) = &r.tokens().refresh_token {
            out.insert(t.secret().to_owned());
        }
    }
    out
}

fn sqlite_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sealed-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Installs and refreshes a few installations through a sealed store; returns every token
/// issued (as the manager sees them, opened).
async fn exercise(f: &Fixture) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(f.install().await);
    }
    seen.extend(tokens_of(&f.store).await);
    for _ in 0..2 {
        f.advance(Duration::from_secs(7200));
        for id in &ids {
            seen.insert(
                f.manager
                    .access_token(id)
                    .await
                    .unwrap()
                    .secret()
                    .to_owned(),
            );
        }
        seen.extend(tokens_of(&f.store).await);
    }
    assert!(seen.len() >= 16);
    seen
}

fn assert_absent(haystack: &[u8], tokens: &HashSet<String>, what: &str) {
    let text = String::from_utf8_lossy(haystack);
    for t in tokens {
        assert!(!text.contains(t.as_str()), "a token is readable in {what}");
    }
}

#[tokio::test]
async fn the_sqlite_file_holds_no_token() {
    let dir = sqlite_dir("file");
    let db = dir.join("tokens.db");
    let sqlite = tokenkeeper_sqlite::SqliteStore::open(&db).await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(sqlite, keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let tokens = exercise(&f).await;
    let mut raw = std::fs::read(&db).unwrap();
    if let Ok(wal) = std::fs::read(dir.join("tokens.db-wal")) {
        raw.extend(wal);
    }
    assert!(
        String::from_utf8_lossy(&raw).contains("tksealed1.k1.v3."),
        "tokens are stored sealed"
    );
    assert_absent(&raw, &tokens, "the SQLite file");
}

#[tokio::test]
async fn no_redis_value_holds_a_token() {
    let url = tokenkeeper_testkit::redis::server_url();
    let redis = tokenkeeper_redis::RedisStore::builder(&url)
        .prefix(tokenkeeper_testkit::redis::unique_prefix("sealed"))
        .connect()
        .await
        .unwrap();
    let prefix = redis.prefix().to_owned();
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(redis, keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let tokens = exercise(&f).await;
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut everything = Vec::new();
    for key in &keys {
        everything.extend_from_slice(key.as_bytes());
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if kind == "string" {
            let v: Vec<u8> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            everything.extend(v);
        } else if kind == "stream" {
            // The lifecycle events: every field of every entry.
            let entries: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(!entries.is_empty(), "an empty event stream {key}");
            for (_, fields) in entries {
                fields.into_iter().for_each(|f| everything.extend(f));
            }
        } else {
            let members: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            members.into_iter().for_each(|m| everything.extend(m));
        }
    }
    assert!(keys.len() > 4);
    assert_absent(&everything, &tokens, "Redis");
}

#[tokio::test]
async fn tampering_and_copying_are_typed_errors_for_that_installation_only() {
    let inner = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(inner.clone(), keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let (a, b, c) = (f.install().await, f.install().await, f.install().await);
    let sealed = |id: &InstallationId| {
        let inner = inner.clone();
        let id = id.clone();
        async move { inner.get(&id).await.unwrap().unwrap() }
    };
    // Flip one character of a's sealed refresh token.
    let ra = sealed(&a).await;
    let mut tokens = ra.tokens().clone();
    let mut chars: Vec<char> = tokens
        .refresh_token
        .as_ref()
        .unwrap()
        .secret()
        .chars()
        .collect();
    let at = chars.len() - 5;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    tokens.refresh_token = Some(tokenkeeper::core::RefreshToken::new(
        chars.into_iter().collect::<String>(),
    ));
    write_beneath(&inner, &a, &tokens).await;
    // Copy c's sealed access token into b.
    let (rb, rc) = (sealed(&b).await, sealed(&c).await);
    let mut tokens = rb.tokens().clone();
    tokens.access_token = rc.tokens().access_token.clone();
    write_beneath(&inner, &b, &tokens).await;

    // The version moved under each write, so either token may be the first that fails to
    // open: both are bound to their record.
    for id in [&a, &b] {
        match f.store.get(id).await {
            Err(StoreError::Corrupt {
                id: got, source, ..
            }) => {
                assert_eq!(&got, id);
                let text = source.to_string();
                assert!(text.contains("does not open with key \"k1\""), "{text}");
            }
            other => panic!("{id}: expected Corrupt, got {other:?}"),
        }
        assert!(matches!(
            f.manager.access_token(id).await,
            Err(Error::Store { .. })
        ));
    }
    f.manager
        .access_token(&c)
        .await
        .expect("other installations are unaffected");
}

#[tokio::test]
async fn a_wrong_or_missing_key_names_the_key_and_rotation_reseals_everything() {
    let inner = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(inner.clone(), keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let ids = [f.install().await, f.install().await, f.install().await];
    let expected = f.store.get(&ids[0]).await.unwrap().unwrap();

    let wrong = Sealed::new(inner.clone(), Keyring::new("k1", &K2).unwrap());
    match wrong.get(&ids[0]).await {
        Err(StoreError::Corrupt { source, .. }) => {
            assert!(
                source.to_string().contains("does not open with key \"k1\""),
                "{source}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let missing = Sealed::new(inner.clone(), Keyring::new("k2", &K2).unwrap());
    match missing.get(&ids[0]).await {
        Err(StoreError::Corrupt { source, .. }) => {
            let e = source.downcast_ref::<SealError>().unwrap();
            assert!(
                matches!(e, SealError::UnknownKey { key_id, .. } if key_id == "k1"),
                "{e}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }

    // Rotate: k2 current, k1 still opens old records.
    let rotated = Sealed::new(
        inner.clone(),
        Keyring::new("k2", &K2)
            .unwrap()
            .with_previous("k1", &K1)
            .unwrap(),
    );
    assert_eq!(
        rotated.get(&ids[0]).await.unwrap().unwrap().tokens(),
        expected.tokens()
    );
    let report = rotated.reseal(f.clock.now()).await.unwrap();
    assert_eq!(
        (report.resealed, report.current, report.skipped_leased),
        (3, 0, 0)
    );
    assert!(report.failed.is_empty());
    let again = rotated.reseal(f.clock.now()).await.unwrap();
    assert_eq!((again.resealed, again.current), (0, 3));
    // Only k2 is needed now; the tokens are unchanged and the history says why the version moved.
    let only_new = Sealed::new(inner.clone(), Keyring::new("k2", &K2).unwrap());
    let r = only_new.get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(r.tokens(), expected.tokens());
    assert_eq!(r.version(), expected.version() + 1);
    assert_eq!(
        r.history().last().unwrap().event,
        tokenkeeper::core::EventKind::Resealed
    );
    assert!(
        !format!("{:?}", rotated.keyring()).contains(&format!("{}, {}", K2[0], K2[1])),
        "no key material in Debug"
    );
}

#[test]
fn keyring_validation_is_typed() {
    assert!(matches!(
        Keyring::new("", &K1),
        Err(SealError::InvalidKeyId(_))
    ));
    assert!(matches!(
        Keyring::new("bad id", &K1),
        Err(SealError::InvalidKeyId(_))
    ));
    assert!(matches!(
        Keyring::new("k", &[1u8; 16]),
        Err(SealError::InvalidKeyLength { len: 16, .. })
    ));
    assert!(matches!(
        keyring().with_previous("k1", &K2),
        Err(SealError::DuplicateKeyId(_))
    ));
    // Review N13: a key that is not random protects nothing and is refused, current or
    // previous, with the fix in the message.
    for weak in [[0u8; 32], [7u8; 32], *b"0123456789abcdef0123456789abcdef"] {
        let e = Keyring::new("k", &weak).unwrap_err();
        assert!(matches!(e, SealError::WeakKey { .. }), "{e}");
        assert!(e.to_string().contains("openssl rand"), "{e}");
        // A previous key is not refused: what it sealed must stay readable until resealed.
        assert!(keyring().with_previous("k0", &weak).is_ok());
    }
}

/// Rewrites `id`'s record in the store beneath the sealing layer, as an attacker with write
/// access to the database or Redis would: the stored record as it is (generation included),
/// changed by `edit` on its JSON, the version bumped.
async fn rewrite_beneath(
    inner: &Arc<tokenkeeper_memory::MemoryStore>,
    id: &InstallationId,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let stored = inner.get(id).await.unwrap().unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&stored.encode()).unwrap();
    let record = &mut json["record"];
    edit(record);
    record["version"] = (stored.version() + 1).into();
    if let Some(fields) = record.as_object_mut() {
        fields.remove("written_under");
    }
    let forged =
        tokenkeeper::core::Record::decode(id, &serde_json::to_vec(&json).unwrap()).unwrap();
    assert!(matches!(
        inner
            .compare_and_swap(&forged, stored.version())
            .await
            .unwrap(),
        tokenkeeper::core::CasOutcome::Swapped
    ));
}

/// Writes `tokens` into `id`'s record beneath the sealing layer, only the token fields
/// replaced.
async fn write_beneath(
    inner: &Arc<tokenkeeper_memory::MemoryStore>,
    id: &InstallationId,
    tokens: &tokenkeeper::core::TokenSet,
) {
    rewrite_beneath(inner, id, |record| {
        record["tokens"]["access_token"] = tokens.access_token.secret().into();
        record["tokens"]["refresh_token"] = tokens
            .refresh_token
            .as_ref()
            .map(|r| r.secret().into())
            .unwrap_or(serde_json::Value::Null);
    })
    .await;
}

/// Review N13: the account and the consumer a record belongs to are sealed with its tokens,
/// so someone with write access to the database but no key cannot move an installation to
/// their own provider account (the identity check of a re-authorization compares against
/// it) or to another consumer: edited in place (same version, as an `UPDATE` by hand does),
/// the record no longer opens.
#[tokio::test]
async fn the_account_and_the_consumer_are_sealed_with_the_tokens() {
    let dir = sqlite_dir("bound");
    let db = dir.join("tokens.db");
    let sqlite = tokenkeeper_sqlite::SqliteStore::open(&db).await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(sqlite, keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let raw = rusqlite::Connection::open(&db).unwrap();
    let other_consumer = "bitbucket/someone-else@000000000000";
    let edits = [
        (
            "account",
            "json_set(CAST(record AS TEXT), '$.record.account', 'attacker-account')",
            None,
        ),
        (
            "no account",
            "json_set(CAST(record AS TEXT), '$.record.account', json('null'))",
            None,
        ),
        (
            "consumer",
            "json_set(CAST(record AS TEXT), '$.record.consumer', ?2)",
            Some(other_consumer),
        ),
    ];
    for (what, edit, consumer) in edits {
        let id = f.install().await;
        let before = f.store.get(&id).await.unwrap().unwrap();
        assert!(before.account().is_some(), "installed with an account");
        let changed = match consumer {
            None => raw.execute(
                &format!("UPDATE installations SET record = CAST({edit} AS BLOB) WHERE id = ?1"),
                [id.as_str()],
            ),
            Some(c) => raw.execute(
                &format!(
                    "UPDATE installations SET consumer = ?2, record = CAST({edit} AS BLOB) WHERE id = ?1"
                ),
                [id.as_str(), c],
            ),
        }
        .unwrap();
        assert_eq!(changed, 1);
        match f.store.get(&id).await {
            Err(StoreError::Corrupt {
                id: got, source, ..
            }) => {
                assert_eq!(got, id);
                let e = source.downcast_ref::<SealError>().unwrap();
                assert!(matches!(e, SealError::Tampered { .. }), "{what}: {e}");
            }
            other => panic!("a record with a rewritten {what} opened: {other:?}"),
        }
    }
}

/// M3: with encryption on, a plaintext token written beneath the sealing layer is refused
/// (it would otherwise be served, and sealed as legitimate by the next write or `reseal`).
#[tokio::test]
async fn a_plaintext_token_written_into_a_sealed_store_is_refused() {
    let inner = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(inner.clone(), keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let id = f.install().await;
    let mut tokens = f.store.get(&id).await.unwrap().unwrap().tokens().clone();
    tokens.access_token = tokenkeeper::AccessToken::new("attacker-chosen-access-token");
    tokens.refresh_token = Some(tokenkeeper::core::RefreshToken::new(
        "attacker-chosen-refresh",
    ));
    write_beneath(&inner, &id, &tokens).await;
    match f.store.get(&id).await {
        Err(StoreError::Corrupt {
            id: got, source, ..
        }) => {
            assert_eq!(got, id);
            assert!(source.to_string().contains("not sealed"), "{source}");
        }
        other => panic!("a plaintext token was accepted: {other:?}"),
    }
    // Migrating a store written before encryption: plaintext is let through and counted
    // while the switch is on, and reseal seals it; afterwards the strict store opens it.
    let migrating = Sealed::new(inner.clone(), keyring()).allow_plaintext_migration(true);
    let open = migrating.get(&id).await.unwrap().unwrap();
    assert_eq!(
        open.tokens().access_token.secret(),
        "attacker-chosen-access-token"
    );
    assert_eq!(migrating.plaintext_reads(), 2);
    let report = migrating.reseal(f.clock.now()).await.unwrap();
    assert_eq!(report.resealed, 1);
    let strict = Sealed::new(inner.clone(), keyring());
    assert_eq!(
        strict
            .get(&id)
            .await
            .unwrap()
            .unwrap()
            .tokens()
            .access_token
            .secret(),
        "attacker-chosen-access-token"
    );
}

/// M3: a sealed token of an older grant of the same installation, copied into the record of a
/// newer grant, does not open: the sealing binds the authorization generation.
#[tokio::test]
async fn a_sealed_token_of_an_older_grant_does_not_open_in_a_newer_one() {
    let inner = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(inner.clone(), keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let id = f.install().await;
    let old_sealed = inner.get(&id).await.unwrap().unwrap().tokens().clone();
    // A new grant for the same installation.
    common::authorize_with(&f.manager, &f.mock, Some(id.clone())).await;
    // Roll the old grant's sealed refresh token back into the new record.
    let mut tokens = inner.get(&id).await.unwrap().unwrap().tokens().clone();
    tokens.refresh_token = old_sealed.refresh_token.clone();
    write_beneath(&inner, &id, &tokens).await;
    match f.store.get(&id).await {
        Err(StoreError::Corrupt { source, .. }) => {
            let e = source.downcast_ref::<SealError>().unwrap();
            assert!(matches!(e, SealError::Tampered { .. }), "{e}");
        }
        other => panic!("an older grant's sealed token opened in a newer record: {other:?}"),
    }
}

/// M3: within one grant too: the refresh token of an earlier refresh (a rotated-away one,
/// which a rotating provider treats as reuse), copied into today's record, does not open.
#[tokio::test]
async fn a_sealed_token_of_an_earlier_refresh_does_not_open() {
    let inner = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(inner.clone(), keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let id = f.install().await;
    let before = inner.get(&id).await.unwrap().unwrap();
    f.advance(Duration::from_secs(7200));
    f.manager.access_token(&id).await.unwrap();
    let now = inner.get(&id).await.unwrap().unwrap();
    assert_eq!(now.generation(), before.generation(), "one grant");
    let mut tokens = now.tokens().clone();
    tokens.refresh_token = before.tokens().refresh_token.clone();
    write_beneath(&inner, &id, &tokens).await;
    assert!(matches!(
        f.store.get(&id).await,
        Err(StoreError::Corrupt { .. })
    ));
}

/// A token sealed in the first format (bound to installation and role only, as versions
/// before the record binding wrote) is refused like plaintext, and read while migrating.
#[tokio::test]
async fn a_token_of_the_first_sealed_format_is_refused_unless_migrating() {
    let inner = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(inner.clone(), keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let id = f.install().await;
    let open = f.store.get(&id).await.unwrap().unwrap().tokens().clone();
    let k = keyring();
    let mut legacy = open.clone();
    legacy.access_token =
        tokenkeeper::AccessToken::new(k.seal(&id, "access", open.access_token.secret()).unwrap());
    legacy.refresh_token = Some(tokenkeeper::core::RefreshToken::new(
        k.seal(
            &id,
            "refresh",
            open.refresh_token.as_ref().unwrap().secret(),
        )
        .unwrap(),
    ));
    write_beneath(&inner, &id, &legacy).await;
    match f.store.get(&id).await {
        Err(StoreError::Corrupt { source, .. }) => {
            let e = source.downcast_ref::<SealError>().unwrap();
            assert!(matches!(e, SealError::Plaintext { .. }), "{e}");
        }
        other => panic!("a first-format token opened: {other:?}"),
    }
    let migrating = Sealed::new(inner.clone(), keyring()).allow_plaintext_migration(true);
    assert_eq!(migrating.get(&id).await.unwrap().unwrap().tokens(), &open);
    assert_eq!(migrating.reseal(f.clock.now()).await.unwrap().resealed, 1);
    assert_eq!(migrating.plaintext_reads(), 4, "two reads of two tokens");
    assert_eq!(f.store.get(&id).await.unwrap().unwrap().tokens(), &open);
}

/// A process still sealing with the old key writes the record `reseal` is about to write.
#[derive(Debug)]
struct OldKeyWriterFirst {
    old: Sealed<Arc<tokenkeeper_memory::MemoryStore>>,
    now: tokenkeeper::core::Timestamp,
    done: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl tokenkeeper_testkit::wrappers::Hook for OldKeyWriterFirst {
    async fn before(
        &self,
        operation: tokenkeeper_testkit::wrappers::Operation<'_>,
    ) -> Result<(), StoreError> {
        if let tokenkeeper_testkit::wrappers::Operation::CompareAndSwap(record) = operation
            && !self.done.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let current = self.old.get(record.id()).await?.unwrap();
            let next = current
                .apply(tokenkeeper::core::Event::Resealed, self.now)
                .unwrap();
            self.old.compare_and_swap(&next, current.version()).await?;
        }
        Ok(())
    }
}

/// Review SU6: a reseal whose write loses to a process still sealing with the old key does
/// not count that record as current (it is not); the report says to run the pass again, and
/// the next pass reseals it.
#[tokio::test]
async fn a_reseal_that_loses_to_an_old_key_writer_says_so() {
    let inner = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(Sealed::new(inner.clone(), keyring()));
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store).await;
    let id = f.install().await;
    let (hooked, _) = tokenkeeper_testkit::wrappers::Hooked::new(
        inner.clone(),
        OldKeyWriterFirst {
            old: Sealed::new(inner.clone(), keyring()),
            now: f.clock.now(),
            done: std::sync::atomic::AtomicBool::new(false),
        },
    );
    let rotated = Sealed::new(
        hooked,
        Keyring::new("k2", &K2)
            .unwrap()
            .with_previous("k1", &K1)
            .unwrap(),
    );
    let report = rotated.reseal(f.clock.now()).await.unwrap();
    assert_eq!(
        (report.resealed, report.current, report.raced),
        (0, 0, 1),
        "{report:?}"
    );
    let only_old = Sealed::new(inner.clone(), keyring());
    assert!(
        only_old.get(&id).await.is_ok(),
        "the record is still sealed with k1"
    );
    let again = rotated.reseal(f.clock.now()).await.unwrap();
    assert_eq!((again.resealed, again.current, again.raced), (1, 0, 0));
}
