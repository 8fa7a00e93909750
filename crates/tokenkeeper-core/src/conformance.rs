//! The conformance suite every [`TokenStore`] backend runs against the real thing.
//!
//! **Not a stable API**: these functions and the macro are for testing store backends, and
//! may change in any release, patch releases included.
//!
//! Plain public async functions (as object_store does), each taking a fresh, empty store and
//! panicking with a message that names the broken rule. [`conformance_tests!`] expands to one
//! `#[tokio::test]` per function, so a failure names its case:
//!
//! ```text
//! tokenkeeper_core::conformance_tests!(|| async { MemoryStore::new() });
//! ```
//!
//! [`conformance_tests!`]: crate::conformance_tests

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::*;

/// A fixed start time for records built by the suite: 2026-01-01T00:00:00Z.
pub const T0: Timestamp = Timestamp::from_unix_secs(1_767_225_600);

fn at(secs: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

fn id(s: &str) -> InstallationId {
    InstallationId::new(s).expect("suite ids are valid")
}

/// Tokens whose values embed `tag`, obtained at `obtained`, living 7200 s.
pub fn sample_tokens(tag: &str, obtained: Timestamp) -> TokenSet {
    let mut t = TokenSet::bearer(
        AccessToken::new(format!("access-{tag}")),
        Some(RefreshToken::new(format!("refresh-{tag}"))),
        obtained,
        obtained.saturating_add(Duration::from_secs(7200)),
    );
    t.scopes = Scopes::parse("repository account");
    t
}

/// The consumer of [`sample_record`]s.
pub const CONSUMER: &str = "conformance";

/// A fresh `Active` record for `id`, due at `due_at`.
pub fn sample_record(id: &InstallationId, due_at: Timestamp) -> Record {
    Record::new(
        id.clone(),
        CONSUMER,
        sample_tokens(id.as_str(), T0),
        due_at,
        T0,
    )
}

/// `r` with a refresh lease taken by `holder` until `until` (the usual first write of a test).
pub fn lease(r: &Record, holder: &str, until: Timestamp, now: Timestamp) -> Record {
    r.apply(
        Event::LeaseAcquired {
            holder: LeaseHolder::new(holder),
            until,
        },
        now,
    )
    .expect("lease from a live state")
}

fn fence(r: &Record) -> u64 {
    r.state().lease().expect("leased").fence
}

async fn must_create(store: &dyn TokenStore, r: &Record) {
    store
        .create(r)
        .await
        .unwrap_or_else(|e| panic!("create {} failed: {e}", r.id()));
}

async fn must_get(store: &dyn TokenStore, id: &InstallationId) -> Record {
    store
        .get(id)
        .await
        .unwrap_or_else(|e| panic!("get {id} failed: {e}"))
        .unwrap_or_else(|| panic!("get {id}: record missing"))
}

async fn must_swap(store: &dyn TokenStore, r: &Record, expected: u64) {
    let outcome = store
        .compare_and_swap(r, expected)
        .await
        .unwrap_or_else(|e| panic!("cas {} failed: {e}", r.id()));
    assert_eq!(
        outcome,
        CasOutcome::Swapped,
        "cas {} from {expected}",
        r.id()
    );
}

/// Drains `due(before)` page by page with `limit`, returning every entry.
async fn drain_due(store: &dyn TokenStore, before: Timestamp, limit: usize) -> Vec<DueEntry> {
    let mut all = Vec::new();
    let mut cursor: Option<DueEntry> = None;
    loop {
        let page = store
            .due(CONSUMER, before, cursor.as_ref(), limit)
            .await
            .expect("due");
        assert!(page.entries.len() <= limit, "due returned more than limit");
        all.extend(page.entries);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return all,
        }
    }
}

/// Every field survives create/get, including history, failures, scopes and backoff state.
pub async fn round_trip_every_field(store: Arc<dyn TokenStore>) {
    let i = id("every-field");
    let r0 = sample_record(&i, at(100)).with_account(Some("{account-uuid-1}".into()));
    let r1 = lease(&r0, "proc-a:1", at(130), at(100));
    let r2 = r1
        .apply(
            Event::RefreshDeferred {
                fence: fence(&r1),
                retry_at: at(160),
                cause: BackoffCause::Transient,
                error: ErrorDetail {
                    class: FailureClass::Transient,
                    status: Some(503),
                    error: Some("temporarily_unavailable".into()),
                    description: Some("ünïcødé \"quoted\" text".into()),
                },
                commit: crate::CommitEvidence::None,
            },
            at(101),
        )
        .unwrap();
    let r3 = lease(&r2, "proc-b:7", at(190), at(161));
    let mut tokens = sample_tokens("round-trip-2", at(161));
    tokens.token_type = "Bearer".into();
    tokens.refresh_expires_at = Some(at(15_000_000));
    let r4 = r3
        .apply(
            Event::Refreshed {
                fence: fence(&r3),
                tokens,
                refresh_at: at(6000),
                anomaly: None,
            },
            at(162),
        )
        .unwrap();
    let r5 = lease(&r4, "proc-c:2", at(6030), at(6001));
    let r6 = r5
        .apply(
            Event::RefreshDeferred {
                fence: fence(&r5),
                retry_at: at(6100),
                cause: BackoffCause::ConsumerCredentialsInvalid,
                error: ErrorDetail::new(FailureClass::ConsumerCredentialsInvalid),
                commit: crate::CommitEvidence::None,
            },
            at(6002),
        )
        .unwrap();
    must_create(&*store, &r6).await;
    let got = must_get(&*store, &i).await;
    assert_eq!(got, r6, "round trip changed the record");
    assert_eq!(got.history().len(), 7);
    assert_eq!(got.tokens().access_token.secret(), "access-round-trip-2");
    // A consumer-credential failure restarts the transient count.
    assert_eq!(got.failures().map(|f| f.consecutive), Some(0));
    assert_eq!(got.tokens().refresh_expires_at, Some(at(15_000_000)));
}

/// Records in each state kind (with lease, backoff, terminal reasons) round-trip.
pub async fn every_state_round_trips(store: Arc<dyn TokenStore>) {
    let base = sample_record(&id("state-active"), at(10));
    must_create(&*store, &base).await;

    let r = sample_record(&id("state-refreshing"), at(10));
    let leased = lease(&r, "holder", at(40), at(5));
    must_create(&*store, &leased).await;

    let r = sample_record(&id("state-reauth"), at(10));
    let leased_then_rejected = lease(&r, "holder", at(40), at(5));
    let reauth = leased_then_rejected
        .apply(
            Event::RefreshRejected {
                fence: fence(&leased_then_rejected),
                reason: ReauthReason::ScopesChanged,
                error: Some(ErrorDetail {
                    class: FailureClass::RefreshTokenRejected,
                    status: Some(400),
                    error: Some("invalid_request".into()),
                    description: Some("Invalid refresh_token".into()),
                }),
            },
            at(6),
        )
        .unwrap();
    must_create(&*store, &reauth).await;

    let revoked = sample_record(&id("state-revoked"), at(10))
        .apply(Event::Revoked, at(7))
        .unwrap();
    must_create(&*store, &revoked).await;

    for want in [base, leased, reauth, revoked] {
        let got = must_get(&*store, want.id()).await;
        assert_eq!(
            got,
            want,
            "state {:?} did not round-trip",
            want.state().kind()
        );
    }
}

/// `get` of an unknown id is `None`, not an error.
pub async fn get_missing_is_none(store: Arc<dyn TokenStore>) {
    assert!(store.get(&id("never-created")).await.unwrap().is_none());
}

/// `create` of an existing id fails with `AlreadyExists` and leaves the stored record alone.
pub async fn create_twice_is_already_exists(store: Arc<dyn TokenStore>) {
    let i = id("twice");
    let first = sample_record(&i, at(1));
    must_create(&*store, &first).await;
    let mut second = sample_record(&i, at(2));
    second.consumer = "other".into();
    match store.create(&second).await {
        Err(StoreError::AlreadyExists { id: got, .. }) => assert_eq!(got, i),
        other => panic!("second create must be AlreadyExists, got {other:?}"),
    }
    assert_eq!(must_get(&*store, &i).await, first);
}

/// 64 tasks create the same id at once: exactly one succeeds.
pub async fn concurrent_creates_have_one_winner(store: Arc<dyn TokenStore>) {
    let i = id("create-race");
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..64u64 {
        let store = store.clone();
        let r = sample_record(&i, at(n));
        tasks.spawn(async move { store.create(&r).await });
    }
    let mut wins = 0;
    while let Some(res) = tasks.join_next().await {
        match res.expect("task") {
            Ok(()) => wins += 1,
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => panic!("unexpected create error: {e}"),
        }
    }
    assert_eq!(wins, 1, "exactly one concurrent create must win");
}

/// 64 tasks claim the same authorization flow at once: exactly one claims it, every other
/// one reads the claimant's value; the claimant's settled value is what later reads see; and
/// flows are independent of each other.
pub async fn flow_claims_have_one_winner(store: Arc<dyn TokenStore>) {
    let ttl = Duration::from_secs(600);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..64u32 {
        let store = store.clone();
        tasks.spawn(async move {
            let value = format!("claimant-{n}").into_bytes();
            let got = store.claim_flow("consumer/flow-race", &value, ttl).await;
            (value, got)
        });
    }
    let mut winners = Vec::new();
    let mut seen = Vec::new();
    while let Some(res) = tasks.join_next().await {
        match res.expect("task") {
            (value, Ok(None)) => winners.push(value),
            (_, Ok(Some(existing))) => seen.push(existing),
            (_, Err(e)) => panic!("unexpected claim error: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one concurrent claim must win");
    assert!(
        seen.iter().all(|v| v == &winners[0]),
        "every loser must read the winner's value"
    );
    store
        .settle_flow("consumer/flow-race", b"settled", ttl)
        .await
        .expect("settle");
    assert_eq!(
        store.get_flow("consumer/flow-race").await.expect("get"),
        Some(b"settled".to_vec())
    );
    assert_eq!(
        store
            .claim_flow("consumer/flow-race", b"late", ttl)
            .await
            .expect("claim"),
        Some(b"settled".to_vec()),
        "a settled flow cannot be claimed again"
    );
    assert_eq!(store.get_flow("consumer/other").await.expect("get"), None);
    assert_eq!(
        store
            .claim_flow("consumer/other", b"mine", ttl)
            .await
            .expect("claim"),
        None
    );
}

/// A flow's value disappears once its time to live has passed (by the backend's clock), and
/// the flow can then be claimed again.
pub async fn flow_claims_expire(store: Arc<dyn TokenStore>) {
    let short = Duration::from_millis(300);
    assert_eq!(
        store
            .claim_flow("consumer/flow-expiry", b"first", short)
            .await
            .expect("claim"),
        None
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        store.get_flow("consumer/flow-expiry").await.expect("get"),
        None,
        "an expired flow reads as absent"
    );
    assert_eq!(
        store
            .claim_flow("consumer/flow-expiry", b"second", Duration::from_secs(60))
            .await
            .expect("claim"),
        None,
        "an expired flow can be claimed again"
    );
}

/// A swap from the stored version writes the new record.
pub async fn cas_swaps_and_bumps_version(store: Arc<dyn TokenStore>) {
    let i = id("cas-ok");
    let r1 = sample_record(&i, at(10));
    must_create(&*store, &r1).await;
    let r2 = lease(&r1, "h", at(50), at(9));
    must_swap(&*store, &r2, 1).await;
    let got = must_get(&*store, &i).await;
    assert_eq!(got.version(), 2);
    assert_eq!(got, r2);
}

/// A swap from a stale version is `Conflict` carrying the current record, and writes nothing.
pub async fn cas_stale_version_conflicts_with_current(store: Arc<dyn TokenStore>) {
    let i = id("cas-stale");
    let r1 = sample_record(&i, at(10));
    must_create(&*store, &r1).await;
    let r2 = lease(&r1, "winner", at(50), at(9));
    must_swap(&*store, &r2, 1).await;
    let loser = lease(&r1, "loser", at(50), at(9));
    match store.compare_and_swap(&loser, 1).await.unwrap() {
        CasOutcome::Conflict(current) => assert_eq!(*current, r2),
        other => panic!("stale cas must conflict, got {other:?}"),
    }
    assert_eq!(must_get(&*store, &i).await, r2);
}

/// A swap of an id that was never created is `Missing` and creates nothing.
pub async fn cas_missing_id(store: Arc<dyn TokenStore>) {
    let i = id("cas-missing");
    let r2 = lease(&sample_record(&i, at(1)), "h", at(5), at(0));
    assert_eq!(
        store.compare_and_swap(&r2, 1).await.unwrap(),
        CasOutcome::Missing
    );
    assert!(store.get(&i).await.unwrap().is_none());
}

/// A swap whose record is not newer than the expected version is refused as invalid.
pub async fn cas_rejects_non_increasing_version(store: Arc<dyn TokenStore>) {
    let i = id("cas-same-version");
    let r1 = sample_record(&i, at(1));
    must_create(&*store, &r1).await;
    match store.compare_and_swap(&r1, 1).await {
        Err(StoreError::InvalidArgument { id: got, .. }) => assert_eq!(got, i),
        other => panic!("cas with version == expected must be InvalidArgument, got {other:?}"),
    }
}

/// 128 tasks race a swap from the same version, for 12 rounds: exactly one wins each round,
/// versions strictly increase, and the winner's write is what is stored (no lost update).
pub async fn racing_cas_has_one_winner_per_version(store: Arc<dyn TokenStore>) {
    const TASKS: usize = 128;
    const ROUNDS: u64 = 12;
    let i = id("cas-race");
    must_create(&*store, &sample_record(&i, at(0))).await;
    let mut last_version = 1;
    for round in 0..ROUNDS {
        let current = must_get(&*store, &i).await;
        assert_eq!(
            current.version(),
            last_version,
            "round {round}: version moved"
        );
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..TASKS {
            let store = store.clone();
            let proposal = lease(&current, &format!("task-{n}"), at(1_000 + round), at(round));
            tasks.spawn(async move {
                let won = matches!(
                    store
                        .compare_and_swap(&proposal, proposal.version() - 1)
                        .await,
                    Ok(CasOutcome::Swapped)
                );
                (n, won)
            });
        }
        let mut winners = Vec::new();
        while let Some(res) = tasks.join_next().await {
            let (n, won) = res.expect("task");
            if won {
                winners.push(n);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let stored = must_get(&*store, &i).await;
        assert_eq!(stored.version(), last_version + 1);
        let holder = stored.state().lease().expect("leased").holder.clone();
        assert_eq!(
            holder.as_str(),
            format!("task-{}", winners[0]),
            "lost update"
        );
        // Release so the next round starts from Active again.
        let released = stored
            .apply(
                Event::LeaseReleased {
                    fence: fence(&stored),
                    refresh_at: at(round),
                },
                at(round),
            )
            .unwrap();
        must_swap(&*store, &released, stored.version()).await;
        last_version = released.version();
    }
}

/// Delete refuses a stale version (carrying the current record), reports a missing id, and
/// really removes the record (from `get` and `due`) so the id can be created again.
pub async fn delete_semantics(store: Arc<dyn TokenStore>) {
    let i = id("to-delete");
    let r1 = sample_record(&i, at(10));
    must_create(&*store, &r1).await;
    let r2 = lease(&r1, "h", at(20), at(1));
    must_swap(&*store, &r2, 1).await;
    match store.delete(&i, 1).await.unwrap() {
        DeleteOutcome::Conflict(current) => assert_eq!(*current, r2),
        other => panic!("stale delete must conflict, got {other:?}"),
    }
    assert!(
        store.get(&i).await.unwrap().is_some(),
        "stale delete removed the record"
    );
    assert_eq!(store.delete(&i, 2).await.unwrap(), DeleteOutcome::Deleted);
    assert!(store.get(&i).await.unwrap().is_none());
    assert_eq!(store.delete(&i, 2).await.unwrap(), DeleteOutcome::Missing);
    assert!(drain_due(&*store, Timestamp::MAX, 10).await.is_empty());
    assert!(
        store
            .list(ListFilter::all(), None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    must_create(&*store, &r1).await;
}

/// `due` returns only entries strictly before `before`, ordered by `(due_at, id)`, at most
/// `limit` of them.
pub async fn due_orders_and_limits(store: Arc<dyn TokenStore>) {
    // Insert out of order, with ties broken by id.
    let plan = [
        ("d", 30),
        ("a", 10),
        ("c", 20),
        ("b", 20),
        ("e", 40),
        ("f", 50),
    ];
    for (name, secs) in plan {
        must_create(&*store, &sample_record(&id(name), at(secs))).await;
    }
    let page = store.due(CONSUMER, at(40), None, 10).await.unwrap();
    let got: Vec<_> = page.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        got,
        ["a", "b", "c", "d"],
        "strictly before, by time then id"
    );
    assert_eq!(page.entries[1].due_at, at(20));
    assert_eq!(page.next, None, "a short page is the last");

    let page = store.due(CONSUMER, at(1_000), None, 3).await.unwrap();
    let got: Vec<_> = page.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got, ["a", "b", "c"]);
    let next = page.next.expect("full page has a cursor");
    let page = store
        .due(CONSUMER, at(1_000), Some(&next), 3)
        .await
        .unwrap();
    let got: Vec<_> = page.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got, ["d", "e", "f"]);
    assert!(
        store
            .due(CONSUMER, at(10), None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    assert!(
        store
            .due(CONSUMER, at(1_000), None, 0)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
}

/// Paging through 3,000 records (100 due times, 30 records each, so ties page by id), in pages
/// of 333 that split the ties, visits each exactly once, in order (10,000 records before: the
/// same nine page boundaries through ties, at a third of the suite's time).
pub async fn due_pages_without_skip_or_repeat(store: Arc<dyn TokenStore>) {
    const N: u64 = 3_000;
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..8u64 {
        let store = store.clone();
        tasks.spawn(async move {
            for n in (chunk..N).step_by(8) {
                // 100 distinct due times, 30 records each: ties must page by id.
                let r = sample_record(&id(&format!("due-{n:05}")), at((n * 7919) % 100));
                must_create(&*store, &r).await;
            }
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.expect("insert task");
    }
    let all = drain_due(&*store, Timestamp::MAX, 333).await;
    assert_eq!(all.len(), N as usize, "paging skipped or repeated entries");
    let unique: HashSet<_> = all.iter().map(|e| e.id.clone()).collect();
    assert_eq!(unique.len(), N as usize, "an entry was repeated");
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "not in (due_at, id) order"
    );
    let half = drain_due(&*store, at(50), 1_000).await;
    assert_eq!(half.len(), (N / 2) as usize);
    assert!(half.iter().all(|e| e.due_at < at(50)));
}

/// `due` moves with each swap, follows a lease to its expiry, and forgets terminal records.
pub async fn due_follows_updates_and_skips_terminal(store: Arc<dyn TokenStore>) {
    let i = id("moving");
    let r1 = sample_record(&i, at(100));
    must_create(&*store, &r1).await;
    must_create(&*store, &sample_record(&id("static"), at(200))).await;
    let ids = |v: Vec<DueEntry>| {
        v.into_iter()
            .map(|e| e.id.as_str().to_owned())
            .collect::<Vec<_>>()
    };

    let r2 = lease(&r1, "h", at(300), at(50));
    must_swap(&*store, &r2, 1).await;
    assert_eq!(
        ids(drain_due(&*store, Timestamp::MAX, 10).await),
        ["static", "moving"]
    );
    let entries = drain_due(&*store, Timestamp::MAX, 10).await;
    assert_eq!(
        entries[1].due_at,
        at(300),
        "a leased record falls due when its lease lapses"
    );

    let r3 = r2
        .apply(
            Event::RefreshRejected {
                fence: fence(&r2),
                reason: ReauthReason::RefreshTokenRejected,
                error: None,
            },
            at(60),
        )
        .unwrap();
    must_swap(&*store, &r3, 2).await;
    assert_eq!(
        ids(drain_due(&*store, Timestamp::MAX, 10).await),
        ["static"]
    );

    let r4 = r3
        .apply(
            Event::Authorized {
                tokens: sample_tokens("again", at(70)),
                refresh_at: at(150),
                account: None,
            },
            at(70),
        )
        .unwrap();
    must_swap(&*store, &r4, 3).await;
    assert_eq!(
        ids(drain_due(&*store, Timestamp::MAX, 10).await),
        ["moving", "static"]
    );
}

/// Two consumers on one store: each `due` sees only its own consumer's entries, through
/// every write (lease, result, terminal state), and paging never crosses into the other's.
pub async fn due_is_per_consumer(store: Arc<dyn TokenStore>) {
    let theirs = |name: &str, secs: u64| {
        Record::new(
            id(name),
            "another/consumer",
            sample_tokens(name, T0),
            at(secs),
            T0,
        )
    };
    for n in 0..6u64 {
        must_create(
            &*store,
            &sample_record(&id(&format!("ours-{n}")), at(n * 10)),
        )
        .await;
        must_create(&*store, &theirs(&format!("theirs-{n}"), n * 10 + 5)).await;
    }
    let names = |v: Vec<DueEntry>| {
        v.into_iter()
            .map(|e| e.id.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    let ours = names(drain_due(&*store, Timestamp::MAX, 2).await);
    assert_eq!(
        ours,
        ["ours-0", "ours-1", "ours-2", "ours-3", "ours-4", "ours-5"]
    );
    // A write of theirs moves only their entry.
    let t = store.get(&id("theirs-0")).await.unwrap().unwrap();
    must_swap(&*store, &lease(&t, "h", at(1), at(0)), 1).await;
    assert_eq!(
        names(drain_due(&*store, Timestamp::MAX, 100).await).len(),
        6
    );
    let mut cursor = None;
    let mut all = Vec::new();
    loop {
        let page = store
            .due("another/consumer", Timestamp::MAX, cursor.as_ref(), 4)
            .await
            .unwrap();
        all.extend(page.entries);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let theirs_due = names(all);
    assert_eq!(theirs_due.len(), 6, "{theirs_due:?}");
    assert!(theirs_due.iter().all(|n| n.starts_with("theirs-")));
    assert!(
        store
            .due("nobody/here", Timestamp::MAX, None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
}

/// `list` filters by state and pages in id order.
pub async fn list_by_state_pages(store: Arc<dyn TokenStore>) {
    for n in 0..25 {
        let r = sample_record(&id(&format!("list-{n:02}")), at(n));
        let r = match n % 3 {
            0 => r,
            1 => lease(&r, "h", at(100), at(0)),
            _ => r.apply(Event::Revoked, at(1)).unwrap(),
        };
        must_create(&*store, &r).await;
    }
    async fn drain(store: &dyn TokenStore, filter: ListFilter) -> Vec<ListEntry> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = store.list(filter, after.as_ref(), 4).await.expect("list");
            assert!(page.entries.len() <= 4);
            out.extend(page.entries);
            match page.next {
                Some(n) => after = Some(n),
                None => return out,
            }
        }
    }
    let all = drain(&*store, ListFilter::all()).await;
    assert_eq!(all.len(), 25);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "not in id order");
    for (kind, want) in [
        (StateKind::Active, 9),
        (StateKind::Refreshing, 8),
        (StateKind::Revoked, 8),
        (StateKind::Backoff, 0),
    ] {
        let got = drain(&*store, ListFilter::in_state(kind)).await;
        assert_eq!(got.len(), want, "list in state {kind}");
        assert!(got.iter().all(|e| e.state == kind));
    }
}

/// `count_states` counts what `list` lists, by state, and follows writes and deletes; a
/// cap bounds only the trait's default (the stores count exactly).
pub async fn states_are_counted(store: Arc<dyn TokenStore>) {
    let empty = store.count_states(u64::MAX).await.expect("count_states");
    assert!(
        empty.iter().all(|(_, n)| n == 0),
        "an empty store counts {empty:?}"
    );
    let mut records = Vec::new();
    for n in 0..30 {
        let r = sample_record(&id(&format!("count-{n:02}")), at(n));
        let r = match n % 3 {
            0 => r,
            1 => lease(&r, "h", at(100), at(0)),
            _ => r.apply(Event::Revoked, at(1)).unwrap(),
        };
        must_create(&*store, &r).await;
        records.push(r);
    }
    let counts = store.count_states(u64::MAX).await.expect("count_states");
    assert_eq!(counts.get(StateKind::Active), 10, "{counts:?}");
    assert_eq!(counts.get(StateKind::Refreshing), 10, "{counts:?}");
    assert_eq!(counts.get(StateKind::Revoked), 10, "{counts:?}");
    assert_eq!(counts.get(StateKind::Backoff), 0, "{counts:?}");
    // A lease released, a record deleted: the counts follow.
    let leased = &records[1];
    let released = leased
        .apply(
            Event::LeaseReleased {
                fence: fence(leased),
                refresh_at: at(500),
            },
            at(2),
        )
        .unwrap();
    must_swap(&*store, &released, leased.version()).await;
    let gone = &records[0];
    assert_eq!(
        store
            .delete(gone.id(), gone.version())
            .await
            .expect("delete"),
        DeleteOutcome::Deleted
    );
    let counts = store.count_states(u64::MAX).await.expect("count_states");
    assert_eq!(counts.get(StateKind::Active), 10, "{counts:?}");
    assert_eq!(counts.get(StateKind::Refreshing), 9, "{counts:?}");
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 29);
    // The trait's default, paging by 4, counts the same; capped at 5 it stops a state at the
    // first page that reaches the cap.
    let listed = crate::store::count_by_listing(&*store, u64::MAX, 4)
        .await
        .expect("count by listing");
    assert_eq!(listed, counts, "the default and the store disagree");
    let capped = crate::store::count_by_listing(&*store, 5, 4)
        .await
        .expect("count by listing");
    for (state, n) in capped.iter() {
        let exact = counts.get(state);
        let floor = exact.min(5);
        assert!(
            (floor..=exact.min(8)).contains(&n),
            "{state:?}: {n} counted with cap 5 in pages of 4 (exactly {exact})"
        );
    }
}

/// Unicode ids, 200-byte ids and ids with key-syntax characters round-trip unchanged.
pub async fn odd_ids_round_trip(store: Arc<dyn TokenStore>) {
    let long_multibyte = "é".repeat(100); // 200 bytes
    let names = [
        "ünïcødé-设置-🚀",
        "a:b:c",
        "{hash}tag}",
        "path/with/slashes",
        "percent%20%zz",
        "quote\"and'and\\",
        " leading and trailing ",
        long_multibyte.as_str(),
        &"x".repeat(MAX_ID_BYTES),
    ];
    for (n, name) in names.iter().enumerate() {
        let i = id(name);
        let r = sample_record(&i, at(n as u64));
        must_create(&*store, &r).await;
        let got = must_get(&*store, &i).await;
        assert_eq!(got.id().as_str(), *name);
        assert_eq!(got, r);
        let r2 = lease(&got, "h", at(100), at(1));
        must_swap(&*store, &r2, 1).await;
    }
    let listed: HashSet<String> = store
        .list(ListFilter::all(), None, 100)
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.id.as_str().to_owned())
        .collect();
    let due: HashSet<String> = drain_due(&*store, Timestamp::MAX, 3)
        .await
        .into_iter()
        .map(|e| e.id.as_str().to_owned())
        .collect();
    for name in names {
        assert!(listed.contains(name), "list lost {name:?}");
        assert!(due.contains(name), "due lost {name:?}");
    }
}

/// A version written under a lease lands only over the record holding that lease. Versions
/// can repeat when a store loses an acknowledged write (holder A's lease at v2 is lost, then
/// holder B takes the lease at v2 too); A's next write, expecting v2, must not land on B's
/// lease.
pub async fn cas_checks_the_lease_a_version_was_written_under(store: Arc<dyn TokenStore>) {
    let i = id("aba");
    let r1 = sample_record(&i, at(0));
    must_create(&*store, &r1).await;
    let lease_a = lease(&r1, "holder-a", at(60), at(1));
    let lease_b = lease(&r1, "holder-b", at(60), at(1));
    assert_eq!(lease_a.version(), lease_b.version());
    // The store holds B's lease at v2: A's lease write was lost.
    must_swap(&*store, &lease_b, 1).await;
    let failed = |leased: &Record| {
        leased
            .apply(
                Event::RefreshDeferred {
                    fence: fence(leased),
                    retry_at: at(120),
                    cause: BackoffCause::Transient,
                    error: ErrorDetail::new(FailureClass::Transient),
                    commit: crate::CommitEvidence::None,
                },
                at(2),
            )
            .expect("a deferral under the lease")
    };
    match store
        .compare_and_swap(&failed(&lease_a), 2)
        .await
        .expect("no store error")
    {
        CasOutcome::Conflict(current) => assert_eq!(*current, lease_b, "B's lease stays"),
        other => {
            panic!("a write under A's lease landed on B's lease at the same version: {other:?}")
        }
    }
    must_swap(&*store, &failed(&lease_b), 2).await;
}

/// The next version of `current` in round `round`: `holder` takes its lease, or gives back
/// the lease it holds.
fn toggle_lease(current: &Record, holder: &str, round: u64) -> Record {
    match current.state().lease() {
        Some(l) => current
            .apply(
                Event::LeaseReleased {
                    fence: l.fence,
                    refresh_at: at(round),
                },
                at(round),
            )
            .expect("the holder releases its lease"),
        None => lease(current, holder, at(100 + round), at(round)),
    }
}

/// Reads every event after `from`, `limit` at a time, and the cursor after the last.
pub async fn drain_events(
    store: &dyn TokenStore,
    from: &EventCursor,
    limit: usize,
) -> (Vec<LifecycleEvent>, EventCursor) {
    let mut cursor = from.clone();
    let mut events = Vec::new();
    loop {
        let page = store
            .read_events(&cursor, limit)
            .await
            .unwrap_or_else(|e| panic!("read_events after {cursor} failed: {e}"));
        assert!(page.events.len() <= limit, "a page longer than its limit");
        if let Some(last) = page.events.last() {
            assert_eq!(
                page.next, last.cursor,
                "next is not the last event's cursor"
            );
        } else {
            assert_eq!(page.next, cursor, "an empty page moved the cursor");
        }
        cursor = page.next;
        if page.events.is_empty() {
            return (events, cursor);
        }
        events.extend(page.events);
    }
}

/// Every successful write appends exactly one event carrying the installation, consumer,
/// states, reason, provider words and version, and never a token; failed and conflicting
/// writes append none; paging by one, resuming from a persisted cursor's text, gives the
/// same events as one read.
pub async fn events_follow_every_write(store: Arc<dyn TokenStore>) {
    let start = EventCursor::beginning();
    let (none, _) = drain_events(&*store, &start, 10).await;
    assert!(none.is_empty(), "a fresh store has events: {none:?}");
    let (r1, r2, words) = create_lease_and_reject(&*store).await;
    attempt_failing_writes(&*store, &r1, &r2).await;
    assert_eq!(
        store.delete(r1.id(), 3).await.unwrap(),
        DeleteOutcome::Deleted
    );

    let (events, end) = drain_events(&*store, &start, 100).await;
    assert_events_match_the_writes(&events);
    assert_events_carry_the_details(&events, &words);
    page_by_one_through_persisted_cursors(&*store, start, &events, &end).await;
    read_after_the_end_and_the_head(&*store, &r1, &end).await;
    foreign_cursors_are_typed_errors(&*store, &end).await;
    delivery_ids_are_stable_and_unique(&*store, &events).await;
}

/// The writes `events_follow_every_write` checks: a record created (version 1), leased (2)
/// and rejected with the provider's words (3). Returns the first two versions and the words.
async fn create_lease_and_reject(store: &dyn TokenStore) -> (Record, Record, ErrorDetail) {
    let r1 = sample_record(&id("evented"), at(10));
    must_create(store, &r1).await;
    let r2 = lease(&r1, "h", at(20), at(1));
    must_swap(store, &r2, 1).await;
    let words = ErrorDetail {
        class: FailureClass::RefreshTokenRejected,
        status: Some(400),
        error: Some("invalid_grant".into()),
        description: Some("Invalid refresh_token".into()),
    };
    let r3 = r2
        .apply(
            Event::RefreshRejected {
                fence: fence(&r2),
                reason: ReauthReason::ScopesChanged,
                error: Some(words.clone()),
            },
            at(2),
        )
        .unwrap();
    must_swap(store, &r3, 2).await;
    (r1, r2, words)
}

/// Failures append nothing: a create over an existing id, a stale swap, a stale delete and
/// a delete of a missing id.
async fn attempt_failing_writes(store: &dyn TokenStore, r1: &Record, r2: &Record) {
    assert!(
        store.create(r1).await.is_err(),
        "create over an existing id"
    );
    assert!(matches!(
        store.compare_and_swap(r2, 1).await.unwrap(),
        CasOutcome::Conflict(_)
    ));
    assert!(matches!(
        store.delete(r1.id(), 1).await.unwrap(),
        DeleteOutcome::Conflict(_)
    ));
    assert_eq!(
        store.delete(&id("nobody"), 1).await.unwrap(),
        DeleteOutcome::Missing
    );
}

/// One event per successful write, naming the installation, the states and the version.
fn assert_events_match_the_writes(events: &[LifecycleEvent]) {
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.installation.as_str(), e.kind, e.from, e.to, e.version))
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                "evented",
                EventKind::Created,
                None,
                Some(StateKind::Active),
                1
            ),
            (
                "evented",
                EventKind::LeaseAcquired,
                Some(StateKind::Active),
                Some(StateKind::Refreshing),
                2
            ),
            (
                "evented",
                EventKind::RefreshRejected,
                Some(StateKind::Refreshing),
                Some(StateKind::ReauthorizationRequired),
                3
            ),
            (
                "evented",
                EventKind::Deleted,
                Some(StateKind::ReauthorizationRequired),
                None,
                4
            ),
        ],
        "the event log does not match the writes"
    );
}

/// The events carry the consumer, the times, the provider's words and the reason, and never
/// a token.
fn assert_events_carry_the_details(events: &[LifecycleEvent], words: &ErrorDetail) {
    assert!(
        events.iter().all(|e| e.consumer == CONSUMER),
        "consumer lost"
    );
    assert_eq!(events[0].at, T0);
    assert_eq!(events[2].at, at(2));
    assert_eq!(events[2].error.as_ref(), Some(words), "provider words lost");
    assert_eq!(
        events[2].reauthorization_reason(),
        Some(ReauthReason::ScopesChanged)
    );
    assert!(events[2].ends_tokens() && events[3].ends_tokens() && !events[1].ends_tokens());
    let shown = format!("{events:?}");
    assert!(
        !shown.contains("access-") && !shown.contains("refresh-evented"),
        "an event shows a token: {shown}"
    );
}

/// Page by page, persisting the cursor as text in between, gives the same events and ends
/// at the same cursor; nothing follows the end.
async fn page_by_one_through_persisted_cursors(
    store: &dyn TokenStore,
    start: EventCursor,
    events: &[LifecycleEvent],
    end: &EventCursor,
) {
    let mut cursor = start;
    for (n, expected) in events.iter().enumerate() {
        let text = cursor.to_string();
        cursor = text.parse().expect("a cursor's text parses back");
        let page = store.read_events(&cursor, 1).await.unwrap();
        assert_eq!(
            page.events.as_slice(),
            std::slice::from_ref(expected),
            "event {n}"
        );
        cursor = page.next;
    }
    assert_eq!(&cursor, end);
    assert!(store.read_events(end, 10).await.unwrap().events.is_empty());
}

/// Writes after the end, or after the head, are read from there (`r1` is created again).
async fn read_after_the_end_and_the_head(store: &dyn TokenStore, r1: &Record, end: &EventCursor) {
    let head = store.event_head().await.expect("event_head");
    assert!(
        store
            .read_events(&head, 10)
            .await
            .unwrap()
            .events
            .is_empty(),
        "events after the head"
    );
    must_create(store, r1).await;
    for from in [end, &head] {
        let (again, _) = drain_events(store, from, 10).await;
        assert_eq!(again.len(), 1, "after {from}");
        assert_eq!((again[0].kind, again[0].version), (EventKind::Created, 1));
    }
}

/// A cursor of another log, or ahead of this one (a store restored from an older backup),
/// is a typed error, not a wrong read.
async fn foreign_cursors_are_typed_errors(store: &dyn TokenStore, end: &EventCursor) {
    let log = end.log().expect("a store's cursor names its log");
    let ahead: Vec<LogPosition> = end
        .positions()
        .iter()
        .map(|p| LogPosition {
            major: p.major + 1_000_000,
            minor: p.minor,
        })
        .collect();
    for (what, cursor) in [
        (
            "another log's",
            EventCursor::from_positions(log ^ 1, end.positions().to_vec()),
        ),
        (
            "a 7-part",
            EventCursor::from_positions(log, vec![LogPosition::seq(1); 7]),
        ),
        ("an ahead", EventCursor::from_positions(log, ahead)),
    ] {
        match store.read_events(&cursor, 10).await {
            Err(StoreError::InvalidCursor { .. }) => {}
            other => panic!("{what} cursor was accepted: {other:?}"),
        }
    }
}

/// Every event names its record's incarnation, and is identified the same way whatever
/// cursor it was read from.
async fn delivery_ids_are_stable_and_unique(store: &dyn TokenStore, events: &[LifecycleEvent]) {
    assert!(events.iter().all(|e| e.incarnation == T0), "incarnation");
    let ids: Vec<String> = events.iter().map(LifecycleEvent::delivery_id).collect();
    let (later, _) = drain_events(store, &events[1].cursor, 100).await;
    let later_ids: Vec<String> = later.iter().map(LifecycleEvent::delivery_id).collect();
    assert_eq!(
        later_ids[..2],
        ids[2..],
        "delivery ids depend on the start cursor"
    );
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "delivery ids repeat"
    );
}

/// Racing writers on several installations: each installation's events are exactly its
/// written versions, in order, once each (no transition without its event, no event without
/// its transition), and every event resumes exactly after itself.
pub async fn events_keep_order_per_installation(store: Arc<dyn TokenStore>) {
    const INSTALLATIONS: usize = 6;
    const TASKS: usize = 8;
    const ROUNDS: u64 = 6;
    let ids: Vec<_> = (0..INSTALLATIONS)
        .map(|n| id(&format!("ordered-{n}")))
        .collect();
    for i in &ids {
        must_create(&*store, &sample_record(i, at(0))).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in ids.clone() {
        for n in 0..TASKS {
            let store = store.clone();
            let i = i.clone();
            tasks.spawn(async move {
                for round in 0..ROUNDS {
                    let current = must_get(&*store, &i).await;
                    let next = toggle_lease(&current, &format!("t{n}"), round);
                    let _ = store.compare_and_swap(&next, current.version()).await;
                }
            });
        }
    }
    while let Some(res) = tasks.join_next().await {
        res.expect("task");
    }
    let (events, _) = drain_events(&*store, &EventCursor::beginning(), 7).await;
    for i in &ids {
        let stored = must_get(&*store, i).await;
        let versions: Vec<u64> = events
            .iter()
            .filter(|e| &e.installation == i)
            .map(|e| e.version)
            .collect();
        let expected: Vec<u64> = (1..=stored.version()).collect();
        assert_eq!(
            versions, expected,
            "{i}: event versions vs written versions"
        );
    }
    for (n, e) in events.iter().enumerate() {
        let page = store.read_events(&e.cursor, 1).await.unwrap();
        assert_eq!(
            page.events.first(),
            events.get(n + 1),
            "resume after event {n}"
        );
    }
}

/// Run with a store keeping at most 5 events per log: old events go, the newest stay, and a
/// cursor whose next events were removed is refused rather than skipping them.
pub async fn events_respect_retention(store: Arc<dyn TokenStore>) {
    // The head of the empty log: a reader that started there and was away must be told.
    let empty_head = store.event_head().await.expect("event_head");
    let i = id("retained");
    let mut current = sample_record(&i, at(0));
    must_create(&*store, &current).await;
    let (first, _) = drain_events(&*store, &EventCursor::beginning(), 10).await;
    let after_first = first[0].cursor.clone();
    for round in 1..12u64 {
        let next = toggle_lease(&current, "h", round);
        must_swap(&*store, &next, current.version()).await;
        current = next;
    }
    let (kept, _) = drain_events(&*store, &EventCursor::beginning(), 3).await;
    let versions: Vec<u64> = kept.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![8, 9, 10, 11, 12], "retention of 5 events");
    match store.read_events(&after_first, 10).await {
        Err(StoreError::EventsTrimmed { .. }) => {}
        other => panic!("a cursor behind retention read {other:?}"),
    }
    match store.read_events(&empty_head, 10).await {
        Err(StoreError::EventsTrimmed { .. }) => {}
        other => panic!("the empty log's head, behind retention now, read {other:?}"),
    }
    // Right before the oldest kept event is still complete.
    let (after_oldest, _) = drain_events(&*store, &kept[0].cursor, 10).await;
    assert_eq!(after_oldest.len(), 4);
}

/// Every case, by name (the list is written once, in [`conformance_tests!`]).
///
/// [`conformance_tests!`]: crate::conformance_tests
pub const CASES: &[&str] = crate::conformance_tests!(@list names);

/// A keyring for running the suite over [`Sealed`](crate::sealed::Sealed) stores (feature
/// `encryption`): at-rest encryption must keep every promise of the store it wraps.
#[cfg(feature = "encryption")]
pub fn test_keyring() -> crate::sealed::Keyring {
    let key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    crate::sealed::Keyring::new("conformance", &key).expect("a key that looks random")
}

/// Expands to one `#[tokio::test]` per conformance case. `$make` is a closure returning a
/// future of a fresh, empty store.
#[macro_export]
macro_rules! conformance_tests {
    // The one list of cases; `$mode` picks what to expand it into.
    (@list $mode:ident $($args:tt)*) => {
        $crate::conformance_tests! {@$mode $($args)*;
            round_trip_every_field,
            every_state_round_trips,
            get_missing_is_none,
            create_twice_is_already_exists,
            concurrent_creates_have_one_winner,
            flow_claims_have_one_winner,
            flow_claims_expire,
            cas_swaps_and_bumps_version,
            cas_stale_version_conflicts_with_current,
            cas_missing_id,
            cas_rejects_non_increasing_version,
            racing_cas_has_one_winner_per_version,
            cas_checks_the_lease_a_version_was_written_under,
            delete_semantics,
            due_orders_and_limits,
            due_pages_without_skip_or_repeat,
            due_follows_updates_and_skips_terminal,
            due_is_per_consumer,
            list_by_state_pages,
            states_are_counted,
            odd_ids_round_trip,
            events_follow_every_write,
            events_keep_order_per_installation
        }
    };
    (@names; $($case:ident),* $(,)?) => {
        &[$(stringify!($case)),*]
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let store = ($make)().await;
                $crate::conformance::$case(::std::sync::Arc::new(store)).await;
            }
        )*
    };
    // `events_respect_retention` on a store that keeps `max_events` events (per shard of the
    // log: the case's installation lives in one): `$make` takes that bound.
    (retention: $make:expr) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn events_respect_retention() {
            let store = ($make)(5).await;
            $crate::conformance::events_respect_retention(::std::sync::Arc::new(store)).await;
        }
    };
    ($make:expr) => {
        $crate::conformance_tests!(@list cases $make);
    };
}
