//! A multi-process compare-and-swap race: each process takes a random shared record's lapsed
//! lease in a loop and reports its counts on one stdout line; the parent checks that the
//! stored versions account for exactly the successful swaps (no lost update).

use std::time::Duration;

use tokenkeeper_core::conformance::{T0, drain_events, sample_record};
use tokenkeeper_core::{
    CasOutcome, Clock, Event, EventCursor, InstallationId, LeaseHolder, SystemClock, TokenStore,
};

/// The ids of the shared records a multi-process race works on.
pub fn race_ids(n: usize) -> Vec<InstallationId> {
    (0..n)
        .map(|i| InstallationId::new(format!("shared-{i:03}")).expect("a valid id"))
        .collect()
}

/// Creates the shared records of a multi-process race, each at version 1.
pub async fn seed_race(store: &dyn TokenStore, ids: &[InstallationId]) {
    for i in ids {
        let record = sample_record(i, T0);
        store.create(&record).await.expect("seeding the race");
    }
}

/// What one process of a race did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaceReport {
    /// Swaps that succeeded.
    pub swaps: u64,
    /// Swaps that lost to another writer.
    pub conflicts: u64,
    /// Store errors (each one a failure: e.g. `database is locked` escaping).
    pub errors: u64,
}

impl RaceReport {
    /// One line for a child process to print: `RACE swaps conflicts errors`.
    pub fn to_line(&self) -> String {
        format!("RACE {} {} {}", self.swaps, self.conflicts, self.errors)
    }

    /// Finds and parses the `RACE` line in a child's output.
    pub fn from_output(text: &str) -> Option<Self> {
        let line = text
            .lines()
            .find_map(|l| l.find("RACE ").map(|at| &l[at + 5..]))?;
        let mut n = line.split_whitespace().map(|x| x.parse::<u64>().ok());
        Some(Self {
            swaps: n.next()??,
            conflicts: n.next()??,
            errors: n.next()??,
        })
    }
}

/// The next version of `current`: `holder` takes its (lapsed) lease now.
pub fn takeover(current: &tokenkeeper_core::Record, holder: &str) -> tokenkeeper_core::Record {
    let now = SystemClock.now();
    current
        .apply(
            Event::LeaseAcquired {
                holder: LeaseHolder::new(holder),
                until: now,
            },
            now,
        )
        .expect("a lapsed lease can always be retaken")
}

/// One process's share of a race: for `run_for`, read a random shared record and swap in the
/// next version (a lapsed-lease takeover), counting outcomes.
pub async fn race_worker(
    store: &dyn TokenStore,
    ids: &[InstallationId],
    run_for: Duration,
    holder: &str,
) -> RaceReport {
    let deadline = std::time::Instant::now() + run_for;
    let mut report = RaceReport::default();
    let mut seed = (std::process::id() as u64) << 16 | 1;
    while std::time::Instant::now() < deadline {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = &ids[(seed % ids.len() as u64) as usize];
        let current = match store.get(i).await {
            Ok(Some(r)) => r,
            other => {
                eprintln!("race get {i}: {other:?}");
                report.errors += 1;
                continue;
            }
        };
        let next = takeover(&current, holder);
        match store.compare_and_swap(&next, current.version()).await {
            Ok(CasOutcome::Swapped) => report.swaps += 1,
            Ok(CasOutcome::Conflict(_)) => report.conflicts += 1,
            other => {
                eprintln!("race cas {i}: {other:?}");
                report.errors += 1;
            }
        }
    }
    report
}

/// Checks a finished race: no process saw an error, there was contention, and the stored
/// versions account for exactly the successful swaps (no lost update).
pub async fn verify_race(store: &dyn TokenStore, ids: &[InstallationId], reports: &[RaceReport]) {
    let swaps: u64 = reports.iter().map(|r| r.swaps).sum();
    let conflicts: u64 = reports.iter().map(|r| r.conflicts).sum();
    assert!(
        reports.iter().all(|r| r.errors == 0),
        "a process saw store errors: {reports:?}"
    );
    assert!(swaps > 0 && conflicts > 0, "no contention: {reports:?}");
    let mut stored = 0;
    for i in ids {
        let record = store.get(i).await.expect("reading back").expect("present");
        stored += record.version() - 1;
    }
    assert_eq!(
        stored, swaps,
        "stored versions must equal the successful swaps: {reports:?}"
    );
    verify_events(store, ids).await;
    eprintln!(
        "{} processes: {swaps} swaps, {conflicts} conflicts, 0 errors",
        reports.len()
    );
}

/// Checks the event outbox against the records: each of `ids` has exactly one event per
/// version it was written at, in version order (no write without its event, no event
/// without its write, whatever process died when). Returns how many events it checked.
pub async fn verify_events(store: &dyn TokenStore, ids: &[InstallationId]) -> usize {
    let (events, _) = drain_events(store, &EventCursor::beginning(), 500).await;
    let mut versions: std::collections::HashMap<&InstallationId, Vec<u64>> =
        ids.iter().map(|i| (i, Vec::new())).collect();
    for e in &events {
        if let Some(v) = versions.get_mut(&e.installation) {
            v.push(e.version);
        }
    }
    let mut checked = 0;
    for i in ids {
        let record = store.get(i).await.expect("reading back").expect("present");
        let expected: Vec<u64> = (1..=record.version()).collect();
        assert_eq!(
            versions[i], expected,
            "{i}: the event log disagrees with the versions written"
        );
        checked += expected.len();
    }
    checked
}

/// How long each child process races.
pub const CHILD_RACE: std::time::Duration = std::time::Duration::from_secs(3);

/// In a child process: races compare-and-swap on `store` over the 100 race ids for
/// [`CHILD_RACE`] and prints its report line for the parent.
pub async fn race_child(store: &dyn TokenStore) {
    let me = format!("pid-{}", std::process::id());
    let report = race_worker(store, &race_ids(100), CHILD_RACE, &me).await;
    println!("{}", report.to_line());
}

/// Re-runs the current test binary `n` times as its `child_process_entry` test with `env` set
/// ([`crate::child::spawn_self`]; `env` makes that test run [`race_child`]), waits for all of them and returns their
/// reports. Panics, with the child's output, when a child fails.
pub fn run_race_children(n: usize, env: &[(&str, &str)]) -> Vec<RaceReport> {
    collect_reports(spawn_race_children(n, env))
}

/// Like [`run_race_children`], but SIGKILLs the first child `kill_after` into the race,
/// mid-write as likely as not; returns the survivors' reports.
pub fn run_race_children_killing_one(
    n: usize,
    env: &[(&str, &str)],
    kill_after: Duration,
) -> Vec<RaceReport> {
    let mut children = spawn_race_children(n, env);
    std::thread::sleep(kill_after);
    let mut victim = children.remove(0);
    victim.kill().expect("SIGKILL a child");
    let _ = victim.wait();
    collect_reports(children)
}

fn collect_reports(children: Vec<std::process::Child>) -> Vec<RaceReport> {
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().expect("a child's output");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "a child failed:\n{text}");
            RaceReport::from_output(&text).unwrap_or_else(|| panic!("no report in {text}"))
        })
        .collect()
}

fn spawn_race_children(n: usize, env: &[(&str, &str)]) -> Vec<std::process::Child> {
    (0..n).map(|_| crate::child::spawn_self(env)).collect()
}

/// The multi-process race for a store a child process reaches by one `String` (its
/// location): `fresh` makes a new location for a tag, `open` opens the store at a location (an
/// async closure taking the `String`). Expands to the children's `child_process_entry` (set
/// `child_env` in the environment to make a test binary one) and two tests: four processes
/// race without a lost update, and a racer SIGKILLed mid-write leaves events and records in
/// step. Each store crate's `tests/processes.rs` is one call of it.
#[macro_export]
macro_rules! process_race_tests {
    (child_env: $env:literal, fresh: $fresh:expr, open: $open:expr $(,)?) => {
        /// Not a test on its own: the body of the child processes the race spawns.
        #[test]
        fn child_process_entry() {
            let Ok(location) = ::std::env::var($env) else {
                return;
            };
            ::tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move {
                    let store = ($open)(location).await;
                    $crate::race::race_child(&store).await;
                });
        }

        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn four_processes_race_cas_without_lost_updates() {
            let location: String = ($fresh)("race");
            let store = ($open)(location.clone()).await;
            let ids = $crate::race::race_ids(100);
            $crate::race::seed_race(&store, &ids).await;
            let reports = $crate::race::run_race_children(4, &[($env, location.as_str())]);
            $crate::race::verify_race(&store, &ids, &reports).await;
        }

        /// A racer SIGKILLed mid-race (mid-write as likely as not) leaves no write without
        /// its event and no event without its write.
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_racer_killed_mid_write_leaves_events_and_records_in_step() {
            let location: String = ($fresh)("killed");
            let store = ($open)(location.clone()).await;
            let ids = $crate::race::race_ids(100);
            $crate::race::seed_race(&store, &ids).await;
            let survivors = $crate::race::run_race_children_killing_one(
                3,
                &[($env, location.as_str())],
                ::std::time::Duration::from_millis(1500),
            );
            let checked = $crate::race::verify_events(&store, &ids).await;
            let swaps: u64 = survivors.iter().map(|r| r.swaps).sum();
            assert!(
                checked as u64 >= ids.len() as u64 + swaps,
                "fewer events than the survivors' swaps"
            );
            eprintln!("{checked} events match the records after a SIGKILL mid-race");
        }
    };
}
