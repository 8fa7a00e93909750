//! A fleet sharing one store: 4 OS processes (SQLite, Redis) or 4 managers as tasks (memory)
//! call `access_token` on the same 200 installations across 20 expiry cycles, against the
//! rotating `bitbucket` profile and `atlassian-3lo` (reuse detection). Exactly one refresh per
//! installation per cycle, zero reuse detections, zero installations lost.
//!
//! Children are this test binary re-invoked with `TK_FLEET_CHILD` set to the store's
//! [`Backend`] as text (`tokenkeeper_testkit::child`); they run `child_process_entry` and take
//! `cycle OFFSET` commands on stdin, answering `done ERRORS`.

mod common;

use common::Backend;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokenkeeper::{
    ConsumerConfig, InstallationId, ProviderProfile, TokenManager, core::Clock, core::ListFilter,
    core::StateKind, core::SystemClock, core::Timestamp, core::TokenStore, profiles,
};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

const INSTALLATIONS: usize = 200;
const CYCLES: usize = 20;
const PROCESSES: usize = 4;

/// The system clock moved forward by a shared offset, as the provider's clock is, plus this
/// process's own skew (milliseconds, either sign) as a machine's clock would have.
#[derive(Debug, Clone, Default)]
struct OffsetClock(Arc<AtomicI64>, i64);

impl OffsetClock {
    fn skewed(skew_ms: i64) -> Self {
        Self(Arc::default(), skew_ms)
    }

    fn set_offset(&self, secs: i64) {
        self.0.store(secs, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        let t = SystemClock
            .now()
            .saturating_add(Duration::from_secs(self.0.load(Ordering::SeqCst) as u64));
        if self.1 >= 0 {
            t.saturating_add(Duration::from_millis(self.1 as u64))
        } else {
            t.saturating_sub(Duration::from_millis(self.1.unsigned_abs()))
        }
    }
}

fn profile(name: &str) -> (ProviderProfile, MockProfile, Duration) {
    match name {
        "bitbucket" => (
            profiles::bitbucket(),
            MockProfile::Bitbucket,
            Duration::from_secs(7200),
        ),
        "atlassian-3lo" => (
            profiles::atlassian_3lo(),
            MockProfile::Atlassian3lo,
            Duration::from_secs(3600),
        ),
        other => panic!("no fleet profile {other:?}"),
    }
}

fn consumer(profile: ProviderProfile, base: &str) -> ConsumerConfig {
    consumer_builder(profile, base).build().unwrap()
}

/// The second consumer of the two-consumer fleet (another client id on the same store).
const OTHER_CLIENT: (&str, &str) = ("fleet-other-consumer", "fleet-other-secret");

fn consumer_builder(profile: ProviderProfile, base: &str) -> tokenkeeper::ConsumerConfigBuilder {
    // A member started with `TK_FLEET_OTHER_CLIENT` is the second consumer.
    let (id, secret) = if std::env::var("TK_FLEET_OTHER_CLIENT").is_ok() {
        OTHER_CLIENT
    } else {
        (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)
    };
    let url = |p: &str| reqwest::Url::parse(&format!("{base}{p}")).unwrap();
    ConsumerConfig::builder(
        profile
            .with_endpoints(
                url(tokenkeeper_mock_provider::paths::AUTHORIZE),
                url(tokenkeeper_mock_provider::paths::TOKEN),
                None,
            )
            .with_identity_endpoint(url(tokenkeeper_mock_provider::paths::RESOURCE)),
    )
    .client_id(id)
    .client_secret(secret)
    .redirect_uri(common::REDIRECT)
    .state_key(common::state_key())
}

fn manager(
    store: Arc<dyn TokenStore>,
    profile: ProviderProfile,
    base: &str,
    clock: &OffsetClock,
) -> TokenManager {
    common::manager_builder(consumer(profile, base), store)
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// Seconds a lease lasts in the chaos test: a killed holder's lease lapses quickly.
const SHORT_LEASE: u64 = 3;

/// A manager whose leases lapse after [`SHORT_LEASE`] seconds of silence (HTTP timeout 1 s),
/// or by their written expiry [`SHORT_LEASE`] + `margin_secs` (the clock skew tolerated) later.
fn short_lease_manager(
    store: Arc<dyn TokenStore>,
    profile: ProviderProfile,
    base: &str,
    clock: &OffsetClock,
    margin_secs: u64,
) -> TokenManager {
    let consumer = consumer_builder(profile, base)
        .http_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    common::manager_builder(consumer, store)
        .clock(clock.clone())
        .tune(|p| {
            p.lease_margin = Duration::from_secs(margin_secs);
            p.lease_ttl = Duration::from_secs(SHORT_LEASE);
            p.peer_wait = Duration::from_secs(SHORT_LEASE + 1);
        })
        .build()
        .unwrap()
}

fn ids_n(n: usize) -> Vec<InstallationId> {
    (0..n)
        .map(|n| InstallationId::new(format!("fleet-{n:03}")).unwrap())
        .collect()
}

/// One cycle of one fleet member: every installation, in a member-specific order, 8 at a time.
async fn sweep(manager: &TokenManager, member: usize) -> usize {
    sweep_n(manager, member, INSTALLATIONS).await
}

async fn sweep_n(manager: &TokenManager, member: usize, count: usize) -> usize {
    sweep_counting(manager, member, count).await.0
}

/// One sweep; returns (errors, of which `ForeignConsumer`).
async fn sweep_counting(manager: &TokenManager, member: usize, count: usize) -> (usize, usize) {
    let mut order = ids_n(count);
    order.rotate_left((member * count / PROCESSES) % count.max(1));
    let (mut errors, mut foreign) = (0, 0);
    for chunk in order.chunks(8) {
        let mut tasks = tokio::task::JoinSet::new();
        for id in chunk {
            let (m, id) = (manager.clone(), id.clone());
            tasks.spawn(async move { m.access_token(&id).await });
        }
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(_) => {}
                Err(tokenkeeper::Error::ForeignConsumer { .. }) => {
                    errors += 1;
                    foreign += 1;
                }
                Err(e) => {
                    eprintln!("fleet member {member}: {e}");
                    errors += 1;
                }
            }
        }
    }
    (errors, foreign)
}

/// Callers per installation per process in the contention mode.
const CALLERS: usize = 4;

/// One contention cycle: every installation in the same order as every other member, with
/// [`CALLERS`] concurrent callers each, 10 installations at a time.
async fn contend(manager: &TokenManager, member: usize, count: usize) -> usize {
    let mut errors = 0;
    for chunk in ids_n(count).chunks(10) {
        let mut tasks = tokio::task::JoinSet::new();
        for id in chunk {
            for _ in 0..CALLERS {
                let (m, id) = (manager.clone(), id.clone());
                tasks.spawn(async move { m.access_token(&id).await });
            }
        }
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r.unwrap() {
                eprintln!("fleet member {member}: {e}");
                errors += 1;
            }
        }
    }
    errors
}

/// One burst: every installation at once, one caller each (a cold start after an outage,
/// every token due together).
async fn burst(manager: &TokenManager, member: usize, count: usize) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids_n(count) {
        let m = manager.clone();
        tasks.spawn(async move { m.access_token(&id).await });
    }
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.unwrap() {
            eprintln!("fleet member {member}: {e}");
            errors += 1;
        }
    }
    errors
}

/// Not a test on its own: the body of the fleet's child processes.
#[test]
fn child_process_entry() {
    let Some(backend) = tokenkeeper_testkit::child::is_child("TK_FLEET_CHILD") else {
        return;
    };
    let backend: Backend = backend.parse().unwrap();
    let base = std::env::var("TK_FLEET_MOCK").unwrap();
    let member: usize = std::env::var("TK_FLEET_MEMBER").unwrap().parse().unwrap();
    let (profile, _, _) = profile(&std::env::var("TK_FLEET_PROFILE").unwrap());
    let count: usize =
        std::env::var("TK_FLEET_COUNT").map_or(INSTALLATIONS, |c| c.parse().unwrap());
    let short = std::env::var("TK_FLEET_SHORT_LEASE").is_ok();
    let graceful = std::env::var("TK_FLEET_GRACEFUL").is_ok();
    let contention = std::env::var("TK_FLEET_CONTENTION").is_ok();
    let bursting = std::env::var("TK_FLEET_BURST").is_ok();
    let skew_ms: i64 = std::env::var("TK_FLEET_SKEW_MS").map_or(0, |s| s.parse().unwrap());
    let margin: u64 = std::env::var("TK_FLEET_MARGIN_S").map_or(1, |s| s.parse().unwrap());
    let flaky = std::env::var("TK_FLEET_FLAKY").is_ok();
    let failover_ms: Option<u64> = std::env::var("TK_FLEET_FAILOVER_ON_TERM")
        .ok()
        .map(|ms| ms.parse().unwrap());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let clock = OffsetClock::skewed(skew_ms);
            let mut store = backend.open().await;
            let injected = Arc::new(std::sync::atomic::AtomicU64::new(0));
            if flaky {
                // The store refuses every result write 70 % of the time, in 1 s cycles: a
                // store failing between the lease and the result, over and over.
                let (flaky, switch) = tokenkeeper_testkit::wrappers::FlakyStore::flaky(store);
                let seen = injected.clone();
                tokio::spawn(async move {
                    loop {
                        seen.store(switch.injected(), Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        switch.fail(
                            tokenkeeper_testkit::wrappers::FaultTarget::WritesOf(
                                tokenkeeper::core::EventKind::Refreshed,
                            ),
                            tokenkeeper_testkit::wrappers::FaultKind::Unavailable,
                        );
                        tokio::time::sleep(Duration::from_millis(700)).await;
                        switch.heal();
                    }
                });
                store = Arc::new(flaky);
            }
            // A store that fails over when SIGTERM comes: every operation `Unavailable` for
            // `failover_ms`, then healed (the drain must ride it out).
            let mut failover = None;
            if failover_ms.is_some() {
                let (flaky, switch) = tokenkeeper_testkit::wrappers::FlakyStore::flaky(store);
                store = Arc::new(flaky);
                failover = Some(switch);
            }
            let (store, swaps) = tokenkeeper_testkit::wrappers::CountingStore::counting(store);
            let store: Arc<dyn TokenStore> = Arc::new(store);
            let manager = if short {
                short_lease_manager(store, profile, &base, &clock, margin)
            } else {
                manager(store, profile, &base, &clock)
            };
            if graceful {
                // A deploy's SIGTERM: stop starting refreshes, let those in flight record
                // their results, then exit.
                let m = manager.clone();
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .unwrap();
                tokio::spawn(async move {
                    term.recv().await;
                    if let (Some(switch), Some(ms)) = (failover, failover_ms) {
                        switch.fail(
                            tokenkeeper_testkit::wrappers::FaultTarget::Everything,
                            tokenkeeper_testkit::wrappers::FaultKind::Unavailable,
                        );
                        let healer = switch.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            healer.heal();
                        });
                        m.shutdown().await;
                        // What the outage refused during the drain, for the test to check.
                        println!("refused {}", switch.injected());
                    } else {
                        m.shutdown().await;
                    }
                    std::process::exit(0);
                });
            }
            let stdin = std::io::stdin();
            let mut out = std::io::stdout();
            for line in stdin.lock().lines() {
                let line = line.unwrap();
                let Some(args) = line.strip_prefix("cycle ") else {
                    break;
                };
                let mut args = args.split_whitespace();
                clock.set_offset(args.next().unwrap().parse().unwrap());
                let before = swaps.swaps();
                let errors = if contention {
                    // Everyone starts together (the barrier is a wall-clock instant).
                    let start_ms: u64 = args.next().unwrap().parse().unwrap();
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as u64;
                    tokio::time::sleep(Duration::from_millis(start_ms.saturating_sub(now_ms)))
                        .await;
                    (contend(&manager, member, count).await, 0)
                } else if bursting {
                    (burst(&manager, member, count).await, 0)
                } else {
                    sweep_counting(&manager, member, count).await
                };
                let (errors, foreign) = errors;
                let written = swaps.swaps() - before;
                let faults = injected.load(Ordering::SeqCst);
                writeln!(out, "done {errors} {written} {foreign} {faults}").unwrap();
                out.flush().unwrap();
            }
        });
}

struct Member {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

fn spawn_member(backend: &Backend, base: &str, profile: &str, member: usize) -> Member {
    spawn_member_with(backend, base, profile, member, &[])
}

fn spawn_member_with(
    backend: &Backend,
    base: &str,
    profile: &str,
    member: usize,
    extra_env: &[(&str, String)],
) -> Member {
    let (backend, member) = (backend.to_string(), member.to_string());
    let mut env = vec![
        ("TK_FLEET_CHILD", backend.as_str()),
        ("TK_FLEET_MOCK", base),
        ("TK_FLEET_PROFILE", profile),
        ("TK_FLEET_MEMBER", member.as_str()),
    ];
    env.extend(extra_env.iter().map(|(k, v)| (*k, v.as_str())));
    let mut child = tokenkeeper_testkit::child::spawn_self(&env);
    Member {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
    }
}

fn read_done(m: &mut Member) -> usize {
    read_done_counts(m).0
}

/// A member's report of one cycle: (errors, store compare-and-swaps).
fn read_done_counts(m: &mut Member) -> (usize, u64) {
    let (errors, swaps, _, _) = read_done_all(m);
    (errors, swaps)
}

/// A member's full report of one cycle: (errors, store compare-and-swaps, of the errors
/// those that were `ForeignConsumer`, store faults injected so far).
fn read_done_all(m: &mut Member) -> (usize, u64, usize, u64) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            m.stdout.read_line(&mut line).unwrap() > 0,
            "a fleet member died"
        );
        if let Some(at) = line.find("done ") {
            let mut n = line[at + 5..].split_whitespace();
            return (
                n.next().unwrap().parse().unwrap(),
                n.next().unwrap().parse().unwrap(),
                n.next().unwrap().parse().unwrap(),
                n.next().unwrap().parse().unwrap(),
            );
        }
    }
}

/// Authorizes `count` installations for real, then zeroes the mock's counters.
async fn authorize_all(admin: &TokenManager, mock: &MockProvider, count: usize) {
    for id in ids_n(count) {
        let begun = admin.begin_authorization(Some(id)).unwrap();
        let q: std::collections::HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
        let code = mock
            .authorize_code(
                DEFAULT_CLIENT_ID,
                Some(common::REDIRECT),
                Some((q["code_challenge"].as_str(), "S256")),
            )
            .unwrap();
        admin
            .complete_authorization(
                tokenkeeper::AuthorizationCode::new(code),
                &begun.state,
                &begun.binding,
            )
            .await
            .unwrap();
    }
    mock.reset_counters();
}

async fn run_fleet(backend: &Backend, profile_name: &str) {
    let name = backend.name();
    let (profile, kind, cycle) = profile(profile_name);
    let mock = MockProvider::builder().profile(kind).start().await.unwrap();
    let base = mock.base_url();
    let store = backend.open().await;
    let clock = OffsetClock::default();
    let admin = manager(store.clone(), profile.clone(), &base, &clock);
    authorize_all(&admin, &mock, INSTALLATIONS).await;

    let in_process = matches!(backend, Backend::Memory);
    let mut members: Vec<Member> = if in_process {
        Vec::new()
    } else {
        (0..PROCESSES)
            .map(|n| spawn_member(backend, &base, profile_name, n))
            .collect()
    };
    let peers: Vec<(TokenManager, OffsetClock)> = if in_process {
        (0..PROCESSES)
            .map(|_| {
                let c = OffsetClock::default();
                (manager(store.clone(), profile.clone(), &base, &c), c)
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut offset = 0i64;
    for n in 1..=CYCLES {
        mock.advance(cycle);
        offset += cycle.as_secs() as i64;
        let errors: usize = if in_process {
            let mut tasks = tokio::task::JoinSet::new();
            for (member, (m, c)) in peers.iter().enumerate() {
                c.set_offset(offset);
                let m = m.clone();
                tasks.spawn(async move { sweep(&m, member).await });
            }
            let mut errors = 0;
            while let Some(r) = tasks.join_next().await {
                errors += r.unwrap();
            }
            errors
        } else {
            for m in &mut members {
                writeln!(m.stdin, "cycle {offset}").unwrap();
                m.stdin.flush().unwrap();
            }
            members.iter_mut().map(read_done).sum()
        };
        assert_eq!(errors, 0, "{name}/{profile_name}: cycle {n} had errors");
        let c = mock.counters();
        assert_eq!(
            c.totals.refreshes,
            (INSTALLATIONS * n) as u64,
            "{name}/{profile_name}: cycle {n}: exactly one refresh per installation"
        );
    }
    stop_members(members);
    let c = mock.counters();
    assert_eq!(
        c.totals.reuse_detections, 0,
        "{name}/{profile_name}: reuse detected"
    );
    assert_eq!(c.totals.rejected_refreshes, 0);
    assert!(c.grants.values().all(|g| g.refreshes == CYCLES as u64));
    let lost = store
        .list(
            ListFilter::in_state(StateKind::ReauthorizationRequired),
            None,
            1000,
        )
        .await
        .unwrap();
    assert!(
        lost.entries.is_empty(),
        "{name}/{profile_name}: installations lost: {lost:?}"
    );
    eprintln!(
        "{name}/{profile_name}: {PROCESSES} members x {INSTALLATIONS} installations x {CYCLES} cycles: {} refreshes, 0 reuse detections",
        c.totals.refreshes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_fleet_of_tasks() {
    for profile in ["bitbucket", "atlassian-3lo"] {
        run_fleet(&Backend::Memory, profile).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_fleet_of_processes() {
    for profile in ["bitbucket", "atlassian-3lo"] {
        run_fleet(&Backend::fresh_sqlite("fleet"), profile).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fleet_of_processes() {
    for profile in ["bitbucket", "atlassian-3lo"] {
        run_fleet(&Backend::fresh_redis("fleet"), profile).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_fleet_of_processes() {
    for profile in ["bitbucket", "atlassian-3lo"] {
        run_fleet(&Backend::fresh_redis_cluster("fleet"), profile).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_fleet_on_redis_cluster() {
    run_contention(&Backend::fresh_redis_cluster("contention"), "bitbucket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fleet_of_processes() {
    for profile in ["bitbucket", "atlassian-3lo"] {
        run_fleet(&Backend::fresh_postgres("fleet"), profile).await;
    }
}

/// The set-up of the process-stopping tests: a mock of `profile_name`, a fresh SQLite store,
/// a short-lease survivor manager that authorized `count` installations.
struct StopFixture {
    mock: MockProvider,
    base: String,
    backend: Backend,
    store: Arc<dyn TokenStore>,
    clock: OffsetClock,
    survivor: TokenManager,
    cycle: Duration,
}

async fn stop_fixture(tag: &str, profile_name: &str, count: usize) -> StopFixture {
    let (profile, kind, cycle) = profile(profile_name);
    let mock = MockProvider::builder().profile(kind).start().await.unwrap();
    let base = mock.base_url();
    let backend = Backend::fresh_sqlite(tag);
    let store = backend.open().await;
    let clock = OffsetClock::default();
    let survivor = short_lease_manager(store.clone(), profile, &base, &clock, 1);
    authorize_all(&survivor, &mock, count).await;
    StopFixture {
        mock,
        base,
        backend,
        store,
        clock,
        survivor,
        cycle,
    }
}

/// Every token request commits its rotation and answers `ms` later.
fn slow_replies(mock: &MockProvider, ms: u64) {
    mock.set_faults(vec![tokenkeeper_mock_provider::FaultRule::probability(
        tokenkeeper_mock_provider::Endpoint::Token,
        1.0,
        tokenkeeper_mock_provider::Fault::SlowReply { ms },
    )]);
}

/// The adversarial fleet (review T1-T3): 4 processes whose clocks disagree by up to 60 s
/// (each ±30 s off) call every installation in the same order, 4 callers each, starting
/// together each cycle; leases are short (3 s of silence; their written expiry adds a 61 s skew
/// margin); in one cycle a member is frozen with SIGSTOP past its leases and thawed (SIGCONT). The provider's oracle must show exactly one refresh per installation per
/// cycle, no reuse detection and no installation lost; each member writes at most two
/// compare-and-swaps per installation per unpaused cycle (one lease, one result: in-process
/// single flight).
async fn run_contention(backend: &Backend, profile_name: &str) {
    let name = backend.name();
    const COUNT: usize = 50;
    const ROUNDS: usize = 5;
    const PAUSED_ROUND: usize = 3;
    const SKEWS_MS: [i64; PROCESSES] = [-30_000, -10_000, 10_000, 30_000];
    const MARGIN_S: u64 = 61;
    let (profile, kind, cycle) = profile(profile_name);
    let mock = MockProvider::builder().profile(kind).start().await.unwrap();
    let base = mock.base_url();
    let store = backend.open().await;
    let clock = OffsetClock::default();
    let admin = short_lease_manager(store.clone(), profile.clone(), &base, &clock, MARGIN_S);
    authorize_all(&admin, &mock, COUNT).await;
    // Every rotation is committed 100 ms before its reply: a frozen member holds results.
    slow_replies(&mock, 100);
    let mut members: Vec<Member> = (0..PROCESSES)
        .map(|n| {
            let env = [
                ("TK_FLEET_COUNT", COUNT.to_string()),
                ("TK_FLEET_SHORT_LEASE", "1".to_owned()),
                ("TK_FLEET_CONTENTION", "1".to_owned()),
                ("TK_FLEET_SKEW_MS", SKEWS_MS[n].to_string()),
                ("TK_FLEET_MARGIN_S", MARGIN_S.to_string()),
            ];
            spawn_member_with(backend, &base, profile_name, n, &env)
        })
        .collect();
    let mut offset = 0i64;
    let mut pause_errors = 0;
    let mut extra_refreshes = 0;
    for round in 1..=ROUNDS {
        mock.advance(cycle);
        offset += cycle.as_secs() as i64;
        let start_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 300;
        for m in &mut members {
            writeln!(m.stdin, "cycle {offset} {start_ms}").unwrap();
            m.stdin.flush().unwrap();
        }
        if round == PAUSED_ROUND {
            // Freeze member 0 mid-refresh, past its leases, then let it go on.
            tokio::time::sleep(Duration::from_millis(300 + 50)).await;
            let pid = members[0].child.id().to_string();
            assert!(
                Command::new("kill")
                    .args(["-STOP", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
            tokio::time::sleep(Duration::from_secs(SHORT_LEASE + 1)).await;
            assert!(
                Command::new("kill")
                    .args(["-CONT", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let reports: Vec<(usize, u64)> = members.iter_mut().map(read_done_counts).collect();
        let errors: usize = reports.iter().map(|r| r.0).sum();
        if round == PAUSED_ROUND {
            pause_errors = errors;
        } else {
            assert_eq!(errors, 0, "{name}/{profile_name}: round {round} had errors");
            for (member, (_, swaps)) in reports.iter().enumerate() {
                assert!(
                    *swaps <= 2 * COUNT as u64,
                    "{name}/{profile_name}: member {member} wrote {swaps} times for {COUNT} installations in round {round}: more than one flight per installation"
                );
            }
        }
        let c = mock.counters().totals;
        if round == PAUSED_ROUND {
            // The frozen member's requests were on their way: a peer that took a lapsed lease
            // over presented the same token again (inside the window the README names).
            assert!(c.refreshes >= (COUNT * round) as u64);
        } else {
            assert_eq!(
                c.refreshes - extra_refreshes,
                (COUNT * round) as u64,
                "{name}/{profile_name}: round {round}: exactly one refresh per installation"
            );
        }
        if round == PAUSED_ROUND {
            extra_refreshes = c.refreshes - (COUNT * round) as u64;
        }
    }
    stop_members(members);
    // Touch everything once more so every late result has landed and been read.
    mock.set_faults(Vec::new());
    clock.set_offset(offset);
    for id in ids_n(COUNT) {
        let _ = admin.access_token(&id).await;
    }
    let c = mock.counters().totals;
    let lost = store
        .list(
            ListFilter::in_state(StateKind::ReauthorizationRequired),
            None,
            1000,
        )
        .await
        .unwrap()
        .entries;
    assert!(
        lost.is_empty(),
        "{name}/{profile_name}: installations lost: {lost:?}"
    );
    if profile_name == "bitbucket" {
        // No reuse leeway: a peer that took over a frozen holder's lapsed lease presented
        // a token the frozen holder's request had already rotated (the inherent window).
        // At most one chunk (10 installations) was in flight in the frozen member, and the
        // late results revived every one of them (nothing lost, checked above).
        let per_grant: Vec<(u64, u64)> = mock
            .counters()
            .grants
            .iter()
            .filter(|(_, g)| g.reuse_detections > 0)
            .map(|(id, g)| (*id, g.reuse_detections))
            .collect();
        assert!(
            c.reuse_detections <= 10,
            "{name}/{profile_name}: {c:?}; detections per grant: {per_grant:?}"
        );
    } else {
        assert_eq!(c.reuse_detections, 0, "{name}/{profile_name}: {c:?}");
    }
    eprintln!(
        "contention {name}/{profile_name}: {PROCESSES} processes x {CALLERS} callers x {COUNT} installations x {ROUNDS} rounds, clocks up to 60 s apart, one member SIGSTOPped past its leases: {} refreshes ({extra_refreshes} extra during the pause), {} retired tokens presented and {} reuse detections (during the pause), {pause_errors} caller errors during the pause, 0 installations lost",
        c.refreshes, c.rejected_refreshes, c.reuse_detections
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_fleet_on_sqlite() {
    for profile in ["bitbucket", "atlassian-3lo"] {
        run_contention(&Backend::fresh_sqlite("contention"), profile).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_fleet_on_redis() {
    for profile in ["bitbucket", "atlassian-3lo"] {
        run_contention(&Backend::fresh_redis("contention"), profile).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_fleet_on_postgres() {
    for profile in ["bitbucket", "atlassian-3lo"] {
        run_contention(&Backend::fresh_postgres("contention"), profile).await;
    }
}

/// The Redis server crashes (SIGKILL) and restarts mid-sweep, under 4 worker processes
/// refreshing against a provider that commits 100 ms before answering. With
/// `appendfsync always` nothing acknowledged is lost; callers hitting the outage get errors,
/// flights holding rotated tokens retry their writes until the server is back, and no
/// installation is lost or presents a retired token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_and_restart_mid_sweep_loses_nothing() {
    const COUNT: usize = 60;
    const ROUNDS: usize = 3;
    let mut server = tokenkeeper_testkit::redis::Server::start_on(
        tokenkeeper_testkit::redis::free_port(),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let backend = Backend::Redis {
        url: server.url(),
        prefix: tokenkeeper_testkit::redis::unique_prefix("restart"),
        wait_for_replica: false,
    };
    let (profile, kind, cycle) = profile("bitbucket");
    let mock = MockProvider::builder().profile(kind).start().await.unwrap();
    let base = mock.base_url();
    let store = backend.open().await;
    let clock = OffsetClock::default();
    let admin = short_lease_manager(store.clone(), profile.clone(), &base, &clock, 1);
    authorize_all(&admin, &mock, COUNT).await;
    slow_replies(&mock, 100);
    let mut members: Vec<Member> = (0..PROCESSES)
        .map(|n| {
            let env = [
                ("TK_FLEET_COUNT", COUNT.to_string()),
                ("TK_FLEET_SHORT_LEASE", "1".to_owned()),
            ];
            spawn_member_with(&backend, &base, "bitbucket", n, &env)
        })
        .collect();
    let mut offset = 0i64;
    let mut outage_errors = 0;
    for round in 1..=ROUNDS {
        mock.advance(cycle);
        offset += cycle.as_secs() as i64;
        for m in &mut members {
            writeln!(m.stdin, "cycle {offset}").unwrap();
            m.stdin.flush().unwrap();
        }
        if round == 2 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            server.crash_and_restart();
        }
        let errors: usize = members.iter_mut().map(read_done).sum();
        if round == 2 {
            // Callers that hit the outage itself are told the store is unavailable.
            outage_errors = errors;
        } else {
            assert_eq!(errors, 0, "round {round} had errors");
        }
    }
    stop_members(members);
    let c = all_survive(&admin, &mock, &clock, offset, cycle, COUNT, "the restart").await;
    eprintln!(
        "Redis crashed and restarted mid-sweep under {PROCESSES} processes: {} refreshes, {outage_errors} caller errors during the outage, 0 retired tokens presented, 0 installations lost",
        c.refreshes
    );
}

/// Sends SIGTERM to every worker while refreshes are in flight against a provider that
/// commits each rotation and answers 200 ms later. Returns (installations lost, rotations the
/// provider committed during the run, rejected refreshes).
async fn run_sigterm(graceful: bool) -> (usize, u64, u64) {
    let (lost, committed, rejected, _) = run_sigterm_with(graceful, None).await;
    (lost, committed, rejected)
}

/// [`run_sigterm`], with the store failing over (every operation `Unavailable`) for
/// `failover_ms` from the moment each worker gets SIGTERM; also returns the store operations
/// the outage refused during the drains.
async fn run_sigterm_with(graceful: bool, failover_ms: Option<u64>) -> (usize, u64, u64, u64) {
    const COUNT: usize = 60;
    const WORKERS: usize = 3;
    let tag = match (graceful, failover_ms) {
        (true, Some(_)) => "sigterm-failover",
        (true, None) => "sigterm",
        (false, _) => "sigterm-abrupt",
    };
    let StopFixture {
        mock,
        base,
        backend,
        store,
        clock,
        survivor,
        cycle,
    } = stop_fixture(tag, "bitbucket", COUNT).await;
    slow_replies(&mock, 200);
    let mut env = vec![
        ("TK_FLEET_COUNT", COUNT.to_string()),
        ("TK_FLEET_SHORT_LEASE", "1".to_owned()),
    ];
    if graceful {
        env.push(("TK_FLEET_GRACEFUL", "1".to_owned()));
    }
    if let Some(ms) = failover_ms {
        env.push(("TK_FLEET_FAILOVER_ON_TERM", ms.to_string()));
    }
    mock.advance(cycle);
    let offset = cycle.as_secs() as i64;
    let mut workers: Vec<Member> = (0..WORKERS)
        .map(|n| spawn_member_with(&backend, &base, "bitbucket", n, &env))
        .collect();
    for w in &mut workers {
        writeln!(w.stdin, "cycle {offset}").unwrap();
        w.stdin.flush().unwrap();
    }
    // Mid-sweep: rotations are committed at the provider, their replies 200 ms away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for w in &workers {
        let status = Command::new("kill")
            .args(["-TERM", &w.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let mut refused = 0;
    for w in &mut workers {
        if failover_ms.is_some() {
            let mut line = String::new();
            while w.stdout.read_line(&mut line).unwrap() > 0 {
                // The harness may print its own text before the child's on the line.
                if let Some(at) = line.find("refused ") {
                    refused += line[at + 8..].trim().parse::<u64>().unwrap();
                }
                line.clear();
            }
        }
        let status = w.child.wait().unwrap();
        if graceful {
            assert!(status.success(), "a worker did not exit cleanly: {status}");
        }
    }
    let committed = mock.counters().totals.rotations;
    mock.set_faults(Vec::new());
    // Leases of the stopped workers lapse; the survivor touches everything.
    let lapse = SHORT_LEASE as i64 + 2;
    mock.advance(Duration::from_secs(lapse as u64));
    clock.set_offset(offset + lapse);
    for id in ids_n(COUNT) {
        let _ = survivor.access_token(&id).await;
    }
    let lost = store
        .list(
            ListFilter::in_state(StateKind::ReauthorizationRequired),
            None,
            1000,
        )
        .await
        .unwrap()
        .entries
        .len();
    (
        lost,
        committed,
        mock.counters().totals.rejected_refreshes,
        refused,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_refresh_loses_nothing() {
    let (lost, committed, rejected) = run_sigterm(true).await;
    assert!(committed > 0, "SIGTERM came before any refresh");
    assert_eq!(
        (lost, rejected),
        (0, 0),
        "a graceful stop waits for every committed rotation to be written"
    );
    eprintln!(
        "SIGTERM to 3 workers mid-sweep (provider answers 200 ms after committing): {committed} rotations committed, 0 installations lost"
    );
}

/// Review E3: the store fails over (every operation `Unavailable` for 1.5 s, within the
/// 5 s shutdown grace) just as the workers get SIGTERM; the drain retries the results of the
/// rotations in flight through the outage and loses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_store_failover_loses_nothing() {
    let (lost, committed, rejected, refused) = run_sigterm_with(true, Some(1500)).await;
    assert!(committed > 0, "SIGTERM came before any refresh");
    assert!(refused > 0, "the outage refused nothing during the drains");
    assert_eq!(
        (lost, rejected),
        (0, 0),
        "a graceful stop rides out a store failover within its grace"
    );
    eprintln!(
        "SIGTERM to 3 workers mid-sweep with the store failing over for 1.5 s: {committed} rotations committed, {refused} store operations refused during the drains, 0 installations lost"
    );
}

/// The same stop without `shutdown()` (the process dies on SIGTERM): what the drain saves.
/// Not an assertion of loss (timing decides how many replies were still on their way), only
/// a report that the graceful test above measures something real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_shutdown_is_measured() {
    let (lost, committed, rejected) = run_sigterm(false).await;
    eprintln!(
        "SIGTERM without shutdown(): {committed} rotations committed, {lost} installations lost, {rejected} retired tokens presented"
    );
}

/// What the chaos run saw: SIGKILLs, refreshes the killed process had in flight at each
/// kill (installations under its lease), installations lost, reuse detections.
struct Chaos {
    kills: usize,
    in_flight: usize,
    lost: usize,
    reuse: u64,
}

/// SIGKILLs a process at random moments of its refresh sweep, 12 times, against a provider
/// that answers 200 ms after committing each rotation, then lets a survivor take over after
/// the lease lapses. Every loss must be one of the refreshes the killed process had in flight
/// (an installation under its lease at the kill): the provider held the only copy of its new
/// tokens. Any other loss is ours.
async fn run_chaos(profile_name: &str) -> Chaos {
    const COUNT: usize = 40;
    let StopFixture {
        mock,
        base,
        backend,
        store,
        clock,
        survivor,
        cycle,
    } = stop_fixture("chaos", profile_name, COUNT).await;
    let env = [
        ("TK_FLEET_COUNT", COUNT.to_string()),
        ("TK_FLEET_SHORT_LEASE", "1".to_owned()),
    ];
    let slow = || slow_replies(&mock, 200);
    let mut offset = 0i64;
    let mut chaos = Chaos {
        kills: 0,
        in_flight: 0,
        lost: 0,
        reuse: 0,
    };
    let mut lost_before = std::collections::HashSet::new();
    for round in 0..12u64 {
        mock.advance(cycle);
        offset += cycle.as_secs() as i64;
        slow();
        let mut victim = spawn_member_with(&backend, &base, profile_name, round as usize, &env);
        let pid = victim.child.id();
        writeln!(victim.stdin, "cycle {offset}").unwrap();
        victim.stdin.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(100 + (round * 37) % 400)).await;
        victim.child.kill().unwrap(); // SIGKILL, wherever it is
        victim.child.wait().unwrap();
        chaos.kills += 1;
        mock.set_faults(Vec::new());
        // The refreshes it had in flight: installations under its lease.
        let mut leased_by_victim = std::collections::HashSet::new();
        for id in ids_n(COUNT) {
            let record = store.get(&id).await.unwrap().unwrap();
            if let tokenkeeper::core::State::Refreshing { lease } = record.state()
                && lease.holder.to_string().starts_with(&format!("{pid}-"))
            {
                leased_by_victim.insert(id);
            }
        }
        chaos.in_flight += leased_by_victim.len();
        // Let the victim's lease lapse, then a survivor sweeps everything.
        let lapse = SHORT_LEASE as i64 + 2;
        mock.advance(Duration::from_secs(lapse as u64));
        offset += lapse;
        clock.set_offset(offset);
        for id in ids_n(COUNT) {
            if let Err(e) = survivor.access_token(&id).await {
                assert!(
                    matches!(
                        e,
                        tokenkeeper::Error::ReauthorizationRequired {
                            reason: tokenkeeper::core::ReauthReason::RotatedTokenLost,
                            ..
                        }
                    ),
                    "{profile_name}: {id} failed other than by a lost rotation: {e}"
                );
            }
        }
        let lost_now: std::collections::HashSet<InstallationId> = store
            .list(
                ListFilter::in_state(StateKind::ReauthorizationRequired),
                None,
                1000,
            )
            .await
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.id)
            .collect();
        for id in lost_now.difference(&lost_before) {
            assert!(
                leased_by_victim.contains(id),
                "{profile_name}: {id} was lost although the killed process was not refreshing it"
            );
            let text = survivor.explain(id).await.unwrap().to_string();
            assert!(text.contains("reply was lost"), "{text}");
        }
        lost_before = lost_now;
    }
    chaos.lost = lost_before.len();
    chaos.reuse = mock.counters().totals.reuse_detections;
    chaos
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_refresh_loses_nothing_inside_a_leeway_and_explains_every_loss_outside() {
    let atlassian = run_chaos("atlassian-3lo").await;
    assert_eq!(
        (atlassian.lost, atlassian.reuse),
        (0, 0),
        "atlassian-3lo: the leeway must save every installation"
    );
    eprintln!(
        "atlassian-3lo: {} SIGKILLs with {} refreshes in flight: 0 installations lost",
        atlassian.kills, atlassian.in_flight
    );
    let bitbucket = run_chaos("bitbucket").await;
    assert!(
        bitbucket.lost <= bitbucket.in_flight,
        "a kill costs at most the refreshes it had in flight"
    );
    eprintln!(
        "bitbucket: {} SIGKILLs with {} refreshes in flight at the kills: {} installations lost (each one in flight at its kill, each explained)",
        bitbucket.kills, bitbucket.in_flight, bitbucket.lost
    );
}

/// Issue 25: with every installation due at once, one process took 20 leases within 0.2 s
/// and one SIGKILL during the provider's 200 ms reply lost 16. On a provider that rotates
/// without a reuse leeway a process has at most `max_rotations_in_flight` rotating refreshes
/// in flight, so one SIGKILL costs at most that many; the rest wait without a lease (a peer
/// may take them). Measured: in flight and lost at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_a_burst_costs_at_most_the_rotations_in_flight() {
    const COUNT: usize = 40;
    let StopFixture {
        mock,
        base,
        backend,
        store,
        clock,
        survivor,
        cycle,
    } = stop_fixture("burst", "bitbucket", COUNT).await;
    let cap = survivor
        .policy()
        .max_rotations_in_flight
        .expect("on by default");
    mock.advance(cycle);
    let mut offset = cycle.as_secs() as i64;
    slow_replies(&mock, 400);
    let env = [
        ("TK_FLEET_COUNT", COUNT.to_string()),
        ("TK_FLEET_SHORT_LEASE", "1".to_owned()),
        ("TK_FLEET_BURST", "1".to_owned()),
    ];
    let mut victim = spawn_member_with(&backend, &base, "bitbucket", 0, &env);
    let pid = victim.child.id();
    writeln!(victim.stdin, "cycle {offset}").unwrap();
    victim.stdin.flush().unwrap();
    // Well inside the provider's reply delay: the first requests are committed, unanswered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    mock.set_faults(Vec::new());
    let committed = mock.counters().totals.rotations;
    let mut in_flight = 0;
    for id in ids_n(COUNT) {
        if let tokenkeeper::core::State::Refreshing { lease } =
            store.get(&id).await.unwrap().unwrap().state()
            && lease.holder.to_string().starts_with(&format!("{pid}-"))
        {
            in_flight += 1;
        }
    }
    let lapse = SHORT_LEASE + 2;
    mock.advance(Duration::from_secs(lapse));
    offset += lapse as i64;
    clock.set_offset(offset);
    for id in ids_n(COUNT) {
        let _ = survivor.access_token(&id).await;
    }
    let lost = lost_installations(&store).await.len();
    assert!(
        committed as usize <= cap && lost <= cap,
        "{committed} rotations committed and {lost} installations lost at one SIGKILL; the bound is {cap}"
    );
    assert!(committed > 0, "the kill came before any request was sent");
    eprintln!(
        "burst of {COUNT} due installations, SIGKILL during the provider's reply: {in_flight} leases held, {committed} rotations committed, {lost} installations lost (bound {cap})"
    );
}

/// Starts one sweep of every member at clock offset `offset` and collects their reports.
fn fleet_round(members: &mut [Member], offset: i64) -> Vec<(usize, u64, usize, u64)> {
    for m in members.iter_mut() {
        writeln!(m.stdin, "cycle {offset}").unwrap();
        m.stdin.flush().unwrap();
    }
    members.iter_mut().map(read_done_all).collect()
}

/// The installations the store holds as `ReauthorizationRequired`.
async fn lost_installations(store: &Arc<dyn TokenStore>) -> Vec<tokenkeeper::core::ListEntry> {
    store
        .list(
            ListFilter::in_state(StateKind::ReauthorizationRequired),
            None,
            1000,
        )
        .await
        .unwrap()
        .entries
}

/// Every worker's store refuses the writes of refresh results 70 % of the time (a store
/// failing between lease and result, in 1 s cycles), against Bitbucket (no reuse leeway)
/// committing each rotation 100 ms before answering. Flights keep retrying their writes under
/// renewed leases: exactly one refresh per installation per round, no caller error, no reuse
/// detection, nothing lost.
async fn run_flaky_fleet(backend: &Backend) {
    let name = backend.name();
    const COUNT: usize = 50;
    const ROUNDS: usize = 4;
    let (profile, kind, cycle) = profile("bitbucket");
    let mock = MockProvider::builder().profile(kind).start().await.unwrap();
    let base = mock.base_url();
    let store = backend.open().await;
    let clock = OffsetClock::default();
    let admin = short_lease_manager(store.clone(), profile, &base, &clock, 1);
    authorize_all(&admin, &mock, COUNT).await;
    slow_replies(&mock, 100);
    let env = [
        ("TK_FLEET_COUNT", COUNT.to_string()),
        ("TK_FLEET_SHORT_LEASE", "1".to_owned()),
        ("TK_FLEET_FLAKY", "1".to_owned()),
    ];
    let mut members: Vec<Member> = (0..PROCESSES)
        .map(|n| spawn_member_with(backend, &base, "bitbucket", n, &env))
        .collect();
    let mut offset = 0i64;
    let mut injected = 0;
    for round in 1..=ROUNDS {
        mock.advance(cycle);
        offset += cycle.as_secs() as i64;
        let reports = fleet_round(&mut members, offset);
        let errors: usize = reports.iter().map(|r| r.0).sum();
        injected = reports.iter().map(|r| r.3).sum();
        assert_eq!(errors, 0, "{name}: round {round} had errors");
        assert_exact_refreshes(&mock, COUNT * round, &format!("{name}: round {round}"));
    }
    stop_members(members);
    let lost = lost_installations(&store).await;
    assert!(lost.is_empty(), "{name}: installations lost: {lost:?}");
    assert!(injected > 0, "{name}: no result write was refused");
    eprintln!(
        "flaky store {name}: {PROCESSES} processes x {COUNT} installations x {ROUNDS} rounds, result writes refused 70 % of the time ({injected} refusals): {} refreshes, 0 caller errors, 0 reuse detections, 0 installations lost",
        mock.counters().totals.refreshes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_store_fleet_on_sqlite() {
    run_flaky_fleet(&Backend::fresh_sqlite("flaky")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_store_fleet_on_redis() {
    run_flaky_fleet(&Backend::fresh_redis("flaky")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_store_fleet_on_postgres() {
    run_flaky_fleet(&Backend::fresh_postgres("flaky")).await;
}

/// Two consumers on one store: two workers run the consumer that authorized the
/// installations, two run another client id (a second app on the same database, or a deploy
/// with the wrong client id) and call the same installations. The second consumer's workers
/// get `ForeignConsumer` for every call and never reach the token endpoint; the first
/// consumer's refresh exactly once per installation per round; nothing is condemned.
async fn run_two_consumers(backend: &Backend) {
    let name = backend.name();
    const COUNT: usize = 40;
    const ROUNDS: usize = 3;
    let (profile, kind, cycle) = profile("bitbucket");
    let mock = MockProvider::builder()
        .profile(kind)
        .consumer(tokenkeeper_mock_provider::ConsumerSpec::new(
            DEFAULT_CLIENT_ID,
            DEFAULT_CLIENT_SECRET,
        ))
        .consumer(tokenkeeper_mock_provider::ConsumerSpec::new(
            OTHER_CLIENT.0,
            OTHER_CLIENT.1,
        ))
        .start()
        .await
        .unwrap();
    let base = mock.base_url();
    let store = backend.open().await;
    let clock = OffsetClock::default();
    let admin = manager(store.clone(), profile, &base, &clock);
    authorize_all(&admin, &mock, COUNT).await;
    let mut members: Vec<Member> = (0..PROCESSES)
        .map(|n| {
            let mut env = vec![("TK_FLEET_COUNT", COUNT.to_string())];
            if n >= PROCESSES / 2 {
                env.push(("TK_FLEET_OTHER_CLIENT", "1".to_owned()));
            }
            spawn_member_with(backend, &base, "bitbucket", n, &env)
        })
        .collect();
    let mut offset = 0i64;
    for round in 1..=ROUNDS {
        mock.advance(cycle);
        offset += cycle.as_secs() as i64;
        let reports = fleet_round(&mut members, offset);
        for (member, (errors, _, foreign, _)) in reports.iter().enumerate() {
            if member < PROCESSES / 2 {
                assert_eq!(*errors, 0, "{name}: owner member {member}, round {round}");
            } else {
                assert_eq!(
                    (*errors, *foreign),
                    (COUNT, COUNT),
                    "{name}: foreign member {member}, round {round}: every call is refused as another consumer's"
                );
            }
        }
        assert_exact_refreshes(
            &mock,
            COUNT * round,
            &format!("{name}: round {round}: only the owner refreshes"),
        );
    }
    stop_members(members);
    let lost = lost_installations(&store).await;
    assert!(lost.is_empty(), "{name}: installations lost: {lost:?}");
    let owner = admin.client().consumer().name();
    for id in ids_n(COUNT) {
        let record = store.get(&id).await.unwrap().unwrap();
        assert_eq!(
            record.consumer(),
            owner,
            "the owner's records stay the owner's"
        );
    }
    eprintln!(
        "two consumers {name}: 2 owner + 2 foreign processes x {COUNT} installations x {ROUNDS} rounds: {} refreshes, {} foreign calls refused without a provider call, 0 lost",
        mock.counters().totals.refreshes,
        2 * COUNT * ROUNDS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_fleet_on_sqlite() {
    run_two_consumers(&Backend::fresh_sqlite("consumers")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_fleet_on_redis() {
    run_two_consumers(&Backend::fresh_redis("consumers")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_fleet_on_postgres() {
    run_two_consumers(&Backend::fresh_postgres("consumers")).await;
}

/// A Redis primary with one replica behind a failover address (a forwarder the workers
/// connect to). Every write that stores tokens waits for the replica (`WAIT 1`). Mid-sweep,
/// with rotations committed at the provider 100 ms before their replies, the primary is
/// killed (SIGKILL), the replica promoted (`REPLICAOF NO ONE`) and the address moved to it.
/// Nothing acknowledged is lost: no retired token is presented and every installation
/// refreshes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replica_promoted_mid_sweep_loses_nothing() {
    const COUNT: usize = 60;
    const ROUNDS: usize = 3;
    use tokenkeeper_testkit::redis::{Server, free_port};
    let primary = Server::start_on(free_port(), &["--appendonly", "yes"]);
    let primary_port = primary.port.to_string();
    let replica = Server::start_on(
        free_port(),
        &[
            "--replicaof",
            "127.0.0.1",
            &primary_port,
            "--appendonly",
            "yes",
        ],
    );
    let proxy = tokenkeeper_testkit::proxy::Proxy::start(primary.port).await;
    let backend = Backend::Redis {
        url: proxy.redis_url(),
        prefix: tokenkeeper_testkit::redis::unique_prefix("failover"),
        wait_for_replica: true,
    };
    let (profile, kind, cycle) = profile("bitbucket");
    let mock = MockProvider::builder().profile(kind).start().await.unwrap();
    let base = mock.base_url();
    let store = backend.open().await;
    let clock = OffsetClock::default();
    let admin = short_lease_manager(store.clone(), profile, &base, &clock, 1);
    // The replica must be in sync before the run (every write waits for it).
    replica_synced(&proxy.redis_url()).await;
    authorize_all(&admin, &mock, COUNT).await;
    slow_replies(&mock, 100);
    let env = [
        ("TK_FLEET_COUNT", COUNT.to_string()),
        ("TK_FLEET_SHORT_LEASE", "1".to_owned()),
    ];
    let mut members: Vec<Member> = (0..PROCESSES)
        .map(|n| spawn_member_with(&backend, &base, "bitbucket", n, &env))
        .collect();
    let mut offset = 0i64;
    let mut primary = Some(primary);
    let mut rejoined = None;
    let mut outage_errors = 0;
    for round in 1..=ROUNDS {
        mock.advance(cycle);
        offset += cycle.as_secs() as i64;
        for m in &mut members {
            writeln!(m.stdin, "cycle {offset}").unwrap();
            m.stdin.flush().unwrap();
        }
        if round == 2 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            drop(primary.take()); // SIGKILL
            let mut conn = redis::Client::open(replica.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let _: () = redis::cmd("REPLICAOF")
                .arg("NO")
                .arg("ONE")
                .query_async(&mut conn)
                .await
                .unwrap();
            proxy.switch_to(replica.port);
            // The failed node comes back as a replica of the new primary (the writes wait for
            // one replica again).
            let replica_port = replica.port.to_string();
            rejoined = Some(Server::start_on(
                free_port(),
                &[
                    "--replicaof",
                    "127.0.0.1",
                    &replica_port,
                    "--appendonly",
                    "yes",
                ],
            ));
        }
        let errors: usize = members.iter_mut().map(read_done).sum();
        if round == 2 {
            // Before the next round the rejoined node has caught up (until then, writes are
            // refused as not replicated: callers get `Unavailable`, truthfully).
            replica_synced(&proxy.redis_url()).await;
        }
        if round == 2 {
            outage_errors = errors;
        } else {
            assert_eq!(errors, 0, "round {round} had errors");
        }
    }
    stop_members(members);
    let c = all_survive(&admin, &mock, &clock, offset, cycle, COUNT, "the failover").await;
    assert!(lost_installations(&store).await.is_empty());
    drop(rejoined);
    eprintln!(
        "Redis primary killed and replica promoted mid-sweep under {PROCESSES} processes (WAIT 1): {} refreshes, {outage_errors} caller errors during the failover, 0 retired tokens presented, 0 installations lost",
        c.refreshes
    );
}

/// A Redis Cluster of three primaries with a replica each. Every write that stores tokens
/// waits for the replica of the primary that took it (`WAIT 1`). Mid-sweep, under four worker
/// processes, one primary is killed (SIGKILL); its replica is promoted by the cluster itself
/// and the workers' cluster clients follow; the old primary comes back as a replica. Every
/// installation survives with its tokens, no retired token is presented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_primary_killed_mid_sweep_loses_nothing() {
    const COUNT: usize = 60;
    const ROUNDS: usize = 3;
    use tokenkeeper_testkit::redis::{Cluster, wait_cluster_ok};
    // (`wait_failover` waits for the promotion: restarting a killed primary before it, even
    // with its append-only file, could make it a primary again with writes the replica took.)
    let mut cluster = Cluster::start(3, 1);
    let backend = Backend::RedisCluster {
        nodes: cluster.urls(),
        prefix: tokenkeeper_testkit::redis::unique_prefix("cluster-failover"),
        wait_for_replica: true,
    };
    let (profile, kind, cycle) = profile("bitbucket");
    let mock = MockProvider::builder().profile(kind).start().await.unwrap();
    let base = mock.base_url();
    let store = backend.open().await;
    let clock = OffsetClock::default();
    let admin = short_lease_manager(store.clone(), profile, &base, &clock, 1);
    authorize_all(&admin, &mock, COUNT).await;
    slow_replies(&mock, 100);
    let env = [
        ("TK_FLEET_COUNT", COUNT.to_string()),
        ("TK_FLEET_SHORT_LEASE", "1".to_owned()),
    ];
    let mut members: Vec<Member> = (0..PROCESSES)
        .map(|n| spawn_member_with(&backend, &base, "bitbucket", n, &env))
        .collect();
    let mut offset = 0i64;
    let mut outage_errors = 0;
    for round in 1..=ROUNDS {
        mock.advance(cycle);
        offset += cycle.as_secs() as i64;
        for m in &mut members {
            writeln!(m.stdin, "cycle {offset}").unwrap();
            m.stdin.flush().unwrap();
        }
        let mut victim = None;
        if round == 2 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let port = cluster.primary_ports()[0];
            cluster.kill(port);
            victim = Some(port);
        }
        let errors: usize = members.iter_mut().map(read_done).sum();
        if let Some(port) = victim {
            // The cluster promotes the replica; the old primary rejoins as its replica, and
            // the writes that wait for one replica go through again.
            cluster.wait_failover(port, 3);
            cluster.restart(port);
            wait_cluster_ok(&cluster.ports());
            cluster.wait_replicas_synced();
            outage_errors = errors;
        } else {
            assert_eq!(errors, 0, "round {round} had errors");
        }
    }
    stop_members(members);
    let c = all_survive(
        &admin,
        &mock,
        &clock,
        offset,
        cycle,
        COUNT,
        "the cluster failover",
    )
    .await;
    assert!(lost_installations(&store).await.is_empty());
    eprintln!(
        "Redis Cluster primary killed mid-sweep under {PROCESSES} processes (WAIT 1): {} refreshes, {outage_errors} caller errors during the failover, 0 retired tokens presented, 0 installations lost",
        c.refreshes
    );
}

/// Waits until the Redis server at `url` has a replica that acknowledges its writes.
async fn replica_synced(url: &str) {
    let mut raw = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for _ in 0..200 {
        let _: () = redis::cmd("SET")
            .arg("tk-sync-probe")
            .arg(1)
            .query_async(&mut raw)
            .await
            .unwrap();
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(100)
            .query_async(&mut raw)
            .await
            .unwrap();
        if acked >= 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no replica of {url} caught up");
}

/// After a run: faults off, one more expiry cycle, and every installation refreshes through
/// `admin` without the provider ever seeing a retired token. Returns the provider's totals.
async fn all_survive(
    admin: &TokenManager,
    mock: &MockProvider,
    clock: &OffsetClock,
    offset: i64,
    cycle: Duration,
    count: usize,
    what: &str,
) -> tokenkeeper_mock_provider::Totals {
    mock.set_faults(Vec::new());
    mock.advance(cycle);
    clock.set_offset(offset + cycle.as_secs() as i64);
    for id in ids_n(count) {
        admin
            .access_token(&id)
            .await
            .unwrap_or_else(|e| panic!("{id} did not survive {what}: {e}"));
    }
    let c = mock.counters().totals;
    assert_eq!(
        (c.rejected_refreshes, c.reuse_detections),
        (0, 0),
        "no retired token presented: {c:?}"
    );
    c
}

/// Ends every member (closes its stdin, waits for it to exit).
fn stop_members(members: Vec<Member>) {
    for mut m in members {
        drop(m.stdin);
        m.child.wait().unwrap();
    }
}

/// The provider saw exactly `refreshes` refreshes so far, none refused, no reuse.
fn assert_exact_refreshes(mock: &MockProvider, refreshes: usize, what: &str) {
    let c = mock.counters().totals;
    assert_eq!(
        (c.refreshes, c.rejected_refreshes, c.reuse_detections),
        (refreshes as u64, 0, 0),
        "{what}: exactly one refresh per installation per round: {c:?}"
    );
}
