//! Group commit: every write of a file store goes to one writer connection on a thread of its
//! own, which drains the writes waiting for it into one `BEGIN IMMEDIATE` transaction, runs
//! each (each its own conditional statement, checking its own version and lease), commits
//! once, and only then answers each caller with its own outcome.
//!
//! Why: each autocommit write paid its own commit, and the pages every write touches (the
//! event log's row, the tail of `events`, the index pages) were written to the WAL once per
//! write; with `synchronous = FULL` each commit was an fsync. Measured on 2026-12-08 the store
//! refreshed at 0.23–0.32 of a naive composite on one connection (docs/benchmarks.md). A batch
//! shares one commit (one fsync) and writes each page once.
//!
//! What must hold, and how:
//! - **No caller hears `Ok` for a write that did not commit.** Outcomes are kept until the
//!   batch's `COMMIT` returns; a batch that did not commit answers its writes `Unavailable`
//!   (outcome unknown to the caller, which reads again before acting, as after any lost
//!   acknowledgement; a failed fsync after the commit frame may still let WAL recovery replay
//!   the batch).
//! - **Each write is judged alone.** A write's own failure that SQLite confines to its
//!   statement (a constraint) is that caller's error; the others commit. A write whose failure
//!   ended the whole transaction (SQLite does that on I/O errors, and on a full disk without a
//!   statement journal) hears its own error; the rest of its batch hears `Unavailable`.
//! - **A panicking write fails its batch**, not the thread: the transaction is rolled back,
//!   the panicking write hears a backend error, the rest `Unavailable`. A connection that
//!   cannot leave its transaction ends the thread (closing it releases SQLite's write lock);
//!   writes then fail with "the writer has ended".
//! - **Other processes** are serialised by SQLite's write lock, as before: `BEGIN IMMEDIATE`
//!   waits out the busy timeout, and when it gives up every write waiting at that moment
//!   hears `Unavailable`, so no write waits much longer than the busy timeout.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use rusqlite::Connection;
use tokenkeeper_core::StoreError;
use tokio::sync::oneshot;

use crate::BACKEND;
use crate::ops::sqlite_error;

/// Writes drained into one transaction at most.
const MAX_BATCH: usize = 256;

/// One write waiting for the writer: run inside the batch's transaction, answered after it.
trait Job: Send {
    /// Runs the write on the batch's connection; its outcome is kept for [`Job::answer`].
    fn run(&mut self, conn: &Connection);
    /// Answers the caller according to its batch's fate.
    fn answer(self: Box<Self>, fate: Fate<'_>);
}

/// What became of a write's batch, as far as that write is concerned.
#[derive(Debug, Clone, Copy)]
enum Fate<'a> {
    /// Committed: the write's own outcome stands.
    Committed,
    /// Not committed because of another write (or the commit itself).
    NotCommitted(&'a BatchFailure),
    /// Not committed because of this write: its own error, if it has one, else the failure.
    Culprit(&'a BatchFailure),
}

/// Why a batch did not commit, told to each of its callers.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}; the writes of its batch were not committed")]
pub(crate) struct BatchFailure {
    what: String,
    /// The write that caused it, by its place in the batch.
    culprit: Option<usize>,
}

impl BatchFailure {
    /// What a write that did not cause the failure hears: send it again.
    fn store_error(&self, operation: &'static str) -> StoreError {
        StoreError::unavailable(BACKEND, operation, self.clone())
    }

    /// What the write that caused it hears when it has no error of its own (it panicked, or
    /// ended the transaction and reported success): a retry would do the same.
    fn culprit_error(&self, operation: &'static str) -> StoreError {
        StoreError::backend(BACKEND, operation, self.clone())
    }

    fn fate(&self, place: usize) -> Fate<'_> {
        if self.culprit == Some(place) {
            Fate::Culprit(self)
        } else {
            Fate::NotCommitted(self)
        }
    }
}

struct Pending<R, F> {
    operation: &'static str,
    op: Option<F>,
    outcome: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<R, F> Job for Pending<R, F>
where
    R: Send + 'static,
    F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) {
        if let Some(op) = self.op.take() {
            self.outcome = Some(op(conn));
        }
    }

    fn answer(self: Box<Self>, fate: Fate<'_>) {
        let outcome = match (fate, self.outcome) {
            (Fate::Culprit(_), Some(Err(own))) => Err(own),
            (Fate::Culprit(f), _) => Err(f.culprit_error(self.operation)),
            (Fate::NotCommitted(f), _) => Err(f.store_error(self.operation)),
            (Fate::Committed, Some(outcome)) => outcome,
            (Fate::Committed, None) => Err(StoreError::backend(
                BACKEND,
                self.operation,
                BatchFailure {
                    what: "the write was not run".into(),
                    culprit: None,
                },
            )),
        };
        // A caller that gave up (its future dropped) no longer listens: nothing to tell.
        let _ = self.reply.send(outcome);
    }
}

/// The handle to the writer thread; dropping the last one ends the thread once its queue is
/// drained.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: mpsc::Sender<Box<dyn Job>>,
}

impl Writer {
    /// Starts the writer thread on `conn`.
    pub(crate) fn start(conn: Connection) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::channel::<Box<dyn Job>>();
        std::thread::Builder::new()
            .name("tokenkeeper-sqlite-writer".into())
            .spawn(move || write_batches(&conn, &jobs))?;
        Ok(Self { queue })
    }

    /// Runs `op` in the next batch and returns its outcome once the batch committed.
    pub(crate) async fn write<R, F>(&self, operation: &'static str, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Pending {
            operation,
            op: Some(op),
            outcome: None,
            reply,
        };
        let gone = || {
            StoreError::backend(
                BACKEND,
                operation,
                BatchFailure {
                    what: "the SQLite writer thread has ended".into(),
                    culprit: None,
                },
            )
        };
        self.queue.send(Box::new(job)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The writer thread: waits for a write, drains what else is waiting, commits them as one.
fn write_batches(conn: &Connection, jobs: &mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let failed = commit_batch(conn, &mut batch).err();
        if let Some(f) = &failed
            && f.culprit.is_none()
        {
            // BEGIN gave up on another process's lock (or COMMIT failed): everything waiting
            // now hears it too, rather than queueing behind another busy timeout.
            batch.extend(jobs.try_iter());
        }
        for (place, job) in batch.into_iter().enumerate() {
            job.answer(failed.as_ref().map_or(Fate::Committed, |f| f.fate(place)));
        }
        if !conn.is_autocommit() {
            tracing::error!("the SQLite writer cannot leave its transaction; it stops");
            return;
        }
    }
}

/// Runs `batch` in one immediate transaction and commits it; `Err` when nothing of it was
/// committed.
fn commit_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), BatchFailure> {
    let failure = |step: &'static str| {
        move |e: rusqlite::Error| BatchFailure {
            what: sqlite_error(step, e).to_string(),
            culprit: None,
        }
    };
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(failure("begin"))?;
    for (place, job) in batch.iter_mut().enumerate() {
        if catch_unwind(AssertUnwindSafe(|| job.run(conn))).is_err() {
            rollback(conn);
            return Err(BatchFailure {
                what: "a write panicked".into(),
                culprit: Some(place),
            });
        }
        if conn.is_autocommit() {
            // The write's failure ended the transaction: the batch's earlier writes are gone
            // with it.
            return Err(BatchFailure {
                what: "a write's failure rolled the transaction back".into(),
                culprit: Some(place),
            });
        }
    }
    conn.execute_batch("COMMIT").map_err(|e| {
        rollback(conn);
        failure("commit")(e)
    })
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{Location, Synchronous, connect};

    fn writer(path: &std::path::Path) -> Writer {
        writer_waiting(path, std::time::Duration::from_secs(5))
    }

    fn writer_waiting(path: &std::path::Path, busy: std::time::Duration) -> Writer {
        let conn = connect(&Location::File(path.to_owned()), busy, Synchronous::Normal).unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        Writer::start(conn).unwrap()
    }

    fn db() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tk-writer-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::File::create(dir.join("t.db")).unwrap();
        dir.join("t.db")
    }

    fn insert(k: i64) -> impl FnOnce(&Connection) -> Result<usize, StoreError> + Send {
        move |c: &Connection| {
            c.execute("INSERT INTO t VALUES (?1, 'x')", [k])
                .map_err(|e| sqlite_error("insert", e))
        }
    }

    fn rows(path: &std::path::Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_write_of_a_batch_is_judged_alone() {
        let path = db();
        let w = std::sync::Arc::new(writer(&path));
        let mut calls = Vec::new();
        for k in 0..200 {
            let w = w.clone();
            // Every tenth key repeats the one before: a constraint failure of its own.
            let key = if k % 10 == 9 { k - 1 } else { k };
            calls.push(tokio::spawn(
                async move { w.write("insert", insert(key)).await },
            ));
        }
        let mut ok = 0;
        for call in calls {
            match call.await.unwrap() {
                Ok(1) => ok += 1,
                Ok(n) => panic!("{n} rows"),
                Err(e) => assert!(
                    matches!(e, StoreError::Backend { .. }),
                    "a constraint is no outage: {e}"
                ),
            }
        }
        assert_eq!(ok, 180);
        assert_eq!(rows(&path), 180, "every write answered Ok is committed");
    }

    /// A write of `key` that holds the writer for 200 ms, so the writes sent meanwhile queue
    /// into the next batch.
    fn slow_insert(
        w: &std::sync::Arc<Writer>,
        key: i64,
    ) -> tokio::task::JoinHandle<Result<usize, StoreError>> {
        let w = w.clone();
        tokio::spawn(async move {
            w.write("slow", move |c: &Connection| {
                std::thread::sleep(std::time::Duration::from_millis(200));
                insert(key)(c)
            })
            .await
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_write_is_answered_ok_when_its_batch_did_not_commit() {
        let path = db();
        let w = std::sync::Arc::new(writer(&path));
        // Hold the writer on a slow write so that the next ones queue into one batch; one of
        // them ends the transaction (as a full disk would), another panics in the batch
        // after.
        let slow = slow_insert(&w, 1_000);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut batch = Vec::new();
        for k in 0..5 {
            let w = w.clone();
            batch.push(tokio::spawn(
                async move { w.write("insert", insert(k)).await },
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let ender = {
            let w = w.clone();
            tokio::spawn(async move {
                w.write("ender", |c: &Connection| {
                    c.execute_batch("ROLLBACK")
                        .map_err(|e| sqlite_error("ender", e))
                })
                .await
            })
        };
        slow.await.unwrap().unwrap();
        for call in batch {
            let e = call.await.unwrap().expect_err("its batch was rolled back");
            assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
        }
        assert!(ender.await.unwrap().is_err());
        assert_eq!(rows(&path), 1, "only the slow write's batch committed");
        // A panicking write fails its batch (its neighbours may send again, it may not) and
        // the writer goes on.
        let slow = slow_insert(&w, 1_001);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let panicking = {
            let w = w.clone();
            tokio::spawn(async move {
                w.write("panic", |_: &Connection| -> Result<usize, StoreError> {
                    panic!("a bug in a write")
                })
                .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let neighbour = {
            let w = w.clone();
            tokio::spawn(async move { w.write("insert", insert(8)).await })
        };
        slow.await.unwrap().unwrap();
        let e = panicking.await.unwrap().unwrap_err();
        assert!(matches!(e, StoreError::Backend { .. }), "{e}");
        let e = neighbour.await.unwrap().unwrap_err();
        assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
        assert_eq!(w.write("insert", insert(7)).await.unwrap(), 1);
        assert_eq!(rows(&path), 3);
    }

    /// Another process holds the write lock past the busy timeout: every write waiting then
    /// hears `Unavailable` (300 writes, more than one batch's worth), and the writer goes on
    /// once the lock is released.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_held_elsewhere_fails_every_waiting_write_then_passes() {
        let path = db();
        let w = std::sync::Arc::new(writer_waiting(&path, std::time::Duration::from_millis(300)));
        w.write("insert", insert(-1)).await.unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let calls: Vec<_> = (0..300)
            .map(|k| {
                let w = w.clone();
                tokio::spawn(async move { w.write("insert", insert(k)).await })
            })
            .collect();
        for call in calls {
            let e = call.await.unwrap().expect_err("the lock is held elsewhere");
            assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
        }
        other.execute_batch("COMMIT").unwrap();
        assert_eq!(w.write("insert", insert(7)).await.unwrap(), 1);
        assert_eq!(rows(&path), 2);
    }
}
