//! Several OS processes on one database file: racing compare-and-swap with no lost update and
//! no `database is locked` escaping, and a writer killed with SIGKILL losing nothing it
//! reported as committed.
//!
//! The children are this test binary re-invoked with `TK_SQLITE_CHILD` set, running
//! `child_process_entry` (which does nothing in a normal test run).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{
    CasOutcome, Clock, Event, InstallationId, LeaseHolder, SystemClock, TokenStore,
};
use tokenkeeper_sqlite::SqliteStore;

const CHILD_ENV: &str = "TK_SQLITE_CHILD";
const RECORDS: usize = 100;
const CHILDREN: usize = 4;

fn rec_id(n: usize) -> InstallationId {
    InstallationId::new(format!("shared-{n:03}")).unwrap()
}

fn spawn_child(mode: &str, db: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .env("TK_SQLITE_DB", db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Takes a lapsed lease on `current`: a valid transition that bumps the version by one.
fn bump(current: &tokenkeeper_core::Record, holder: &str) -> tokenkeeper_core::Record {
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

/// Not a test on its own: the body of the child processes the tests below spawn.
#[test]
fn child_process_entry() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let db = std::env::var("TK_SQLITE_DB").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = SqliteStore::open(&db).await.unwrap();
        let me = format!("pid-{}", std::process::id());
        let mut out = std::io::stdout();
        match mode.as_str() {
            "race" => {
                let deadline = Instant::now() + Duration::from_secs(3);
                let (mut swaps, mut conflicts, mut errors) = (0u64, 0u64, 0u64);
                let mut seed = std::process::id() as usize | 1;
                while Instant::now() < deadline {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let id = rec_id(seed % RECORDS);
                    let current = match store.get(&id).await {
                        Ok(Some(r)) => r,
                        other => {
                            eprintln!("child get failed: {other:?}");
                            errors += 1;
                            continue;
                        }
                    };
                    match store
                        .compare_and_swap(&bump(&current, &me), current.version())
                        .await
                    {
                        Ok(CasOutcome::Swapped) => swaps += 1,
                        Ok(CasOutcome::Conflict(_)) => conflicts += 1,
                        other => {
                            eprintln!("child cas failed: {other:?}");
                            errors += 1;
                        }
                    }
                }
                writeln!(out, "RESULT {swaps} {conflicts} {errors}").unwrap();
            }
            "crash-writer" => {
                for n in 0.. {
                    let id = InstallationId::new(format!("w-{n:06}")).unwrap();
                    let r = sample_record(&id, T0);
                    store.create(&r).await.unwrap();
                    let next = bump(&r, &me);
                    assert_eq!(
                        store.compare_and_swap(&next, 1).await.unwrap(),
                        CasOutcome::Swapped
                    );
                    writeln!(out, "COMMITTED {id} {}", next.version()).unwrap();
                    out.flush().unwrap();
                }
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_race_cas_without_lost_updates_or_lock_errors() {
    let db = common::fresh_db("race");
    let store = SqliteStore::open(&db).await.unwrap();
    for n in 0..RECORDS {
        store.create(&sample_record(&rec_id(n), T0)).await.unwrap();
    }
    let children: Vec<_> = (0..CHILDREN).map(|_| spawn_child("race", &db)).collect();
    let (mut swaps, mut conflicts) = (0u64, 0u64);
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a child failed");
        let text = String::from_utf8(out.stdout).unwrap();
        // The harness prints "test child_process_entry ... " before the child's own output.
        let line = text
            .lines()
            .find_map(|l| l.find("RESULT ").map(|at| &l[at..]))
            .unwrap_or_else(|| panic!("no RESULT line in {text}"));
        let nums: Vec<u64> = line
            .split(' ')
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(nums[2], 0, "a child saw store errors (database is locked?)");
        swaps += nums[0];
        conflicts += nums[1];
    }
    let mut stored_bumps = 0;
    for n in 0..RECORDS {
        let r = store.get(&rec_id(n)).await.unwrap().unwrap();
        stored_bumps += r.version() - 1;
    }
    assert!(
        swaps > 0 && conflicts > 0,
        "the children did not contend: {swaps} swaps, {conflicts} conflicts"
    );
    assert_eq!(
        stored_bumps, swaps,
        "versions must equal the successful swaps (no lost update)"
    );
    eprintln!("4 processes: {swaps} swaps, {conflicts} conflicts, 0 errors");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_write_loses_nothing_reported_committed() {
    let db = common::fresh_db("crash");
    drop(SqliteStore::open(&db).await.unwrap());
    let mut child = spawn_child("crash-writer", &db);
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut committed = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.find("COMMITTED ").map(|at| &line[at + 10..]) {
                let (id, version) = rest.split_once(' ').unwrap();
                committed.push((id.to_owned(), version.parse::<u64>().unwrap()));
            }
        }
        committed
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let committed = reader.join().unwrap();
    assert!(
        committed.len() > 10,
        "the child wrote too little to test: {}",
        committed.len()
    );

    let raw = rusqlite::Connection::open(&db).unwrap();
    let check: String = raw
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(raw);
    let store = SqliteStore::open(&db).await.unwrap();
    for (id, version) in &committed {
        let r = store
            .get(&InstallationId::new(id.as_str()).unwrap())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} was reported committed but is gone"));
        assert!(r.version() >= *version, "{id} lost its committed swap");
    }
    eprintln!(
        "SIGKILL after {} reported commits: all present",
        committed.len()
    );
}
