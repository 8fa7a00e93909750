//! Several OS processes on one database file: racing compare-and-swap with no lost update and
//! no `database is locked` escaping, and a writer killed with SIGKILL losing nothing it
//! reported as committed.
//!
//! The children are this test binary re-invoked with `TK_SQLITE_CHILD` set, running
//! `child_process_entry` (which does nothing in a normal test run).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{
    CasOutcome, Clock, Event, InstallationId, LeaseHolder, SystemClock, TokenStore,
};
use tokenkeeper_sqlite::SqliteStore;
use tokenkeeper_testkit::race::{
    RaceReport, race_ids, race_worker, seed_race, verify_events, verify_race,
};

const CHILD_ENV: &str = "TK_SQLITE_CHILD";
const RECORDS: usize = 100;
const CHILDREN: usize = 4;

fn spawn_child(mode: &str, db: &Path) -> std::process::Child {
    let db = db.to_str().expect("a UTF-8 test path");
    tokenkeeper_testkit::child::self_command(&[(CHILD_ENV, mode), ("TK_SQLITE_DB", db)])
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
                let report =
                    race_worker(&store, &race_ids(RECORDS), Duration::from_secs(3), &me).await;
                writeln!(out, "{}", report.to_line()).unwrap();
            }
            "crash-writer" => {
                let out = std::sync::Mutex::new(out);
                for n in 0.. {
                    create_swap_report(&store, &format!("w-{n:06}"), &me, &out).await;
                }
            }
            "crash-batch-writer" => crash_batch_writer(std::sync::Arc::new(store), me).await,
            other => panic!("unknown child mode {other}"),
        }
    });
}

/// Creates installation `name`, swaps it once, and reports the swap on `out` once it was
/// acknowledged (a line the parent reads before it kills this process).
async fn create_swap_report(
    store: &SqliteStore,
    name: &str,
    me: &str,
    out: &std::sync::Mutex<std::io::Stdout>,
) {
    let id = InstallationId::new(name).unwrap();
    let r = sample_record(&id, T0);
    store.create(&r).await.unwrap();
    let next = bump(&r, me);
    assert_eq!(
        store.compare_and_swap(&next, 1).await.unwrap(),
        CasOutcome::Swapped
    );
    let mut out = out.lock().unwrap();
    writeln!(out, "COMMITTED {id} {}", next.version()).unwrap();
    out.flush().unwrap();
}

/// 32 writers at once (so the writer commits them in batches), each creating and swapping
/// its own records and reporting each swap once it was acknowledged.
async fn crash_batch_writer(store: std::sync::Arc<SqliteStore>, me: String) {
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut writers = Vec::new();
    for w in 0..32 {
        let (store, me, out) = (store.clone(), me.clone(), out.clone());
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                create_swap_report(&store, &format!("b{w:02}-{n:06}"), &me, &out).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_race_cas_without_lost_updates_or_lock_errors() {
    let db = common::fresh_db("race");
    let store = SqliteStore::open(&db).await.unwrap();
    let ids = race_ids(RECORDS);
    seed_race(&store, &ids).await;
    let children: Vec<_> = (0..CHILDREN).map(|_| spawn_child("race", &db)).collect();
    let mut reports = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a child failed");
        let text = String::from_utf8(out.stdout).unwrap();
        reports
            .push(RaceReport::from_output(&text).unwrap_or_else(|| panic!("no report in {text}")));
    }
    verify_race(&store, &ids, &reports).await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_write_loses_nothing_reported_committed() {
    sigkill_loses_nothing_reported_committed("crash-writer").await;
}

/// The same with writes committed in batches (group commit): a process killed mid-batch
/// loses no acknowledged write, and every write the kill interrupted is whole or absent.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing_reported_committed() {
    sigkill_loses_nothing_reported_committed("crash-batch-writer").await;
}

#[cfg(unix)]
async fn sigkill_loses_nothing_reported_committed(mode: &str) {
    let db = common::fresh_db("crash");
    drop(SqliteStore::open(&db).await.unwrap());
    let mut child = spawn_child(mode, &db);
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
    // The write the kill interrupted is whole or absent, with its event: records and
    // events agree for every id the child touched.
    let mut touched = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(tokenkeeper_core::ListFilter::all(), after.as_ref(), 500)
            .await
            .unwrap();
        touched.extend(page.entries.iter().map(|e| e.id.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let checked = verify_events(&store, &touched).await;
    assert!(checked >= 2 * committed.len());
    eprintln!(
        "SIGKILL after {} reported commits: all present",
        committed.len()
    );
}
