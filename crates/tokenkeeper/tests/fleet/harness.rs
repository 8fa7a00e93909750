//! The fleet's multi-process harness: the clock a member runs on ([`OffsetClock`]), the
//! consumers and managers it builds, its workloads (a sweep, a contention cycle, a burst), the
//! child process's body ([`run_child`]) and the parent's side of the line protocol ([`Member`]:
//! `cycle OFFSET [START_MS]` in, `done ERRORS SWAPS FOREIGN FAULTS` out).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokenkeeper::{
    ConsumerConfig, InstallationId, ProviderProfile, TokenManager, core::Clock, core::SystemClock,
    core::Timestamp, core::TokenStore, profiles,
};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile};

use crate::common::{self, Backend};

/// Installations in the fleet scenario.
pub const INSTALLATIONS: usize = 200;
/// Expiry cycles in the fleet scenario: `TK_FLEET_CYCLES`, default 8 (`scripts/test-long.sh`
/// runs 40).
pub fn cycles() -> usize {
    std::env::var("TK_FLEET_CYCLES").map_or(8, |c| c.parse().expect("TK_FLEET_CYCLES: a number"))
}
/// Whether the fleets run on every profile they list (`TK_FLEET_ALL_PROFILES`, set by
/// `scripts/test-long.sh`), or on the first only: `bitbucket`, whose provider refuses any
/// second use of a refresh token at once, so a race shows on the first reuse.
pub fn all_profiles() -> bool {
    std::env::var_os("TK_FLEET_ALL_PROFILES").is_some()
}

/// Members (processes, or tasks on memory) in a fleet.
pub const PROCESSES: usize = 4;

/// The system clock moved forward by a shared offset, as the provider's clock is, plus this
/// process's own skew (milliseconds, either sign) as a machine's clock would have.
#[derive(Debug, Clone, Default)]
pub struct OffsetClock(Arc<AtomicI64>, i64);

impl OffsetClock {
    pub fn skewed(skew_ms: i64) -> Self {
        Self(Arc::default(), skew_ms)
    }

    pub fn set_offset(&self, secs: i64) {
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

pub fn profile(name: &str) -> (ProviderProfile, MockProfile, Duration) {
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

pub fn consumer(profile: ProviderProfile, base: &str) -> ConsumerConfig {
    consumer_builder(profile, base).build().unwrap()
}

/// The second consumer of the two-consumer fleet (another client id on the same store).
pub const OTHER_CLIENT: (&str, &str) = ("fleet-other-consumer", "fleet-other-secret");

pub fn consumer_builder(
    profile: ProviderProfile,
    base: &str,
) -> tokenkeeper::ConsumerConfigBuilder {
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

pub fn manager(
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
pub const SHORT_LEASE: u64 = 3;

/// A manager whose leases lapse after [`SHORT_LEASE`] seconds of silence (HTTP timeout 1 s),
/// or by their written expiry [`SHORT_LEASE`] + `margin_secs` (the clock skew tolerated) later.
pub fn short_lease_manager(
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

pub fn ids_n(n: usize) -> Vec<InstallationId> {
    (0..n)
        .map(|n| InstallationId::new(format!("fleet-{n:03}")).unwrap())
        .collect()
}

/// One cycle of one fleet member: every installation, in a member-specific order, 8 at a time.
pub async fn sweep(manager: &TokenManager, member: usize) -> usize {
    sweep_n(manager, member, INSTALLATIONS).await
}

pub async fn sweep_n(manager: &TokenManager, member: usize, count: usize) -> usize {
    sweep_counting(manager, member, count).await.0
}

/// One sweep; returns (errors, of which `ForeignConsumer`).
pub async fn sweep_counting(manager: &TokenManager, member: usize, count: usize) -> (usize, usize) {
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
pub const CALLERS: usize = 4;

/// One contention cycle: every installation in the same order as every other member, with
/// [`CALLERS`] concurrent callers each, 10 installations at a time.
pub async fn contend(manager: &TokenManager, member: usize, count: usize) -> usize {
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
pub async fn burst(manager: &TokenManager, member: usize, count: usize) -> usize {
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

/// The body of a fleet member, a child process on the store of `backend`: its settings come
/// from the `TK_FLEET_*` variables [`spawn_member_with`] set; it answers each `cycle OFFSET`
/// line on stdin with a `done ERRORS SWAPS FOREIGN FAULTS` line until stdin closes.
pub fn run_child(backend: Backend) {
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

/// A fleet member: a child process on the line protocol.
pub struct Member {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
}

pub fn spawn_member(backend: &Backend, base: &str, profile: &str, member: usize) -> Member {
    spawn_member_with(backend, base, profile, member, &[])
}

pub fn spawn_member_with(
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

pub fn read_done(m: &mut Member) -> usize {
    read_done_counts(m).0
}

/// A member's report of one cycle: (errors, store compare-and-swaps).
pub fn read_done_counts(m: &mut Member) -> (usize, u64) {
    let (errors, swaps, _, _) = read_done_all(m);
    (errors, swaps)
}

/// A member's full report of one cycle: (errors, store compare-and-swaps, of the errors
/// those that were `ForeignConsumer`, store faults injected so far).
pub fn read_done_all(m: &mut Member) -> (usize, u64, usize, u64) {
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

/// Starts one sweep of every member at clock offset `offset` and collects their reports.
pub fn fleet_round(members: &mut [Member], offset: i64) -> Vec<(usize, u64, usize, u64)> {
    for m in members.iter_mut() {
        writeln!(m.stdin, "cycle {offset}").unwrap();
        m.stdin.flush().unwrap();
    }
    members.iter_mut().map(read_done_all).collect()
}

/// Ends every member (closes its stdin, waits for it to exit).
pub fn stop_members(members: Vec<Member>) {
    for mut m in members {
        drop(m.stdin);
        m.child.wait().unwrap();
    }
}
