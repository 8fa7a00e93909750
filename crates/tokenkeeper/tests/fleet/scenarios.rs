//! The fleet's scenarios on any backend (the caller gives the store): the fleet itself, the
//! adversarial contention fleet, the flaky store and two consumers on one store; then the
//! helpers every scenario shares.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::{TokenManager, core::ListFilter, core::StateKind, core::TokenStore};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProvider};

use crate::common::{self, Backend};
use crate::harness::*;

pub async fn run_fleet(backend: &Backend, profile_name: &str) {
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
    let cycles = cycles();
    for n in 1..=cycles {
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
    assert!(c.grants.values().all(|g| g.refreshes == cycles as u64));
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
        "{name}/{profile_name}: {PROCESSES} members x {INSTALLATIONS} installations x {cycles} cycles: {} refreshes, 0 reuse detections",
        c.totals.refreshes
    );
}

/// The adversarial fleet (review T1-T3): 4 processes whose clocks disagree by up to 60 s
/// (each ±30 s off) call every installation in the same order, 4 callers each, starting
/// together each cycle; leases are short (3 s of silence; their written expiry adds a 61 s skew
/// margin); in one cycle a member is frozen with SIGSTOP past its leases and thawed (SIGCONT). The provider's oracle must show exactly one refresh per installation per
/// cycle, no reuse detection and no installation lost; each member writes at most two
/// compare-and-swaps per installation per unpaused cycle (one lease, one result: in-process
/// single flight).
pub async fn run_contention(backend: &Backend, profile_name: &str) {
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

/// Every worker's store refuses the writes of refresh results 70 % of the time (a store
/// failing between lease and result, in 1 s cycles), against Bitbucket (no reuse leeway)
/// committing each rotation 100 ms before answering. Flights keep retrying their writes under
/// renewed leases: exactly one refresh per installation per round, no caller error, no reuse
/// detection, nothing lost.
pub async fn run_flaky_fleet(backend: &Backend) {
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

/// Two consumers on one store: two workers run the consumer that authorized the
/// installations, two run another client id (a second app on the same database, or a deploy
/// with the wrong client id) and call the same installations. The second consumer's workers
/// get `ForeignConsumer` for every call and never reach the token endpoint; the first
/// consumer's refresh exactly once per installation per round; nothing is condemned.
pub async fn run_two_consumers(backend: &Backend) {
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

/// Authorizes `count` installations for real, then zeroes the mock's counters.
pub async fn authorize_all(admin: &TokenManager, mock: &MockProvider, count: usize) {
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

/// Every token request commits its rotation and answers `ms` later.
pub fn slow_replies(mock: &MockProvider, ms: u64) {
    mock.set_faults(vec![tokenkeeper_mock_provider::FaultRule::probability(
        tokenkeeper_mock_provider::Endpoint::Token,
        1.0,
        tokenkeeper_mock_provider::Fault::SlowReply { ms },
    )]);
}

/// The installations the store holds as `ReauthorizationRequired`.
pub async fn lost_installations(store: &Arc<dyn TokenStore>) -> Vec<tokenkeeper::core::ListEntry> {
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

/// The provider saw exactly `refreshes` refreshes so far, none refused, no reuse.
pub fn assert_exact_refreshes(mock: &MockProvider, refreshes: usize, what: &str) {
    let c = mock.counters().totals;
    assert_eq!(
        (c.refreshes, c.rejected_refreshes, c.reuse_detections),
        (refreshes as u64, 0, 0),
        "{what}: exactly one refresh per installation per round: {c:?}"
    );
}
