//! A fleet sharing one store: 4 OS processes (SQLite, Redis) or 4 managers as tasks (memory)
//! call `access_token` on the same 200 installations across 8 expiry cycles (40 in
//! `scripts/test-long.sh`, `TK_FLEET_CYCLES`), against the
//! rotating `bitbucket` profile and `atlassian-3lo` (reuse detection). Exactly one refresh per
//! installation per cycle, zero reuse detections, zero installations lost.
//!
//! Children are this test binary re-invoked with `TK_FLEET_CHILD` set to the store's
//! `Backend` as text (`tokenkeeper_testkit::child`); they run `child_process_entry` and take
//! `cycle OFFSET` commands on stdin, answering `done ERRORS`.
//!
//! - `harness.rs`: the members: their clock, managers and workloads, the child's body, and
//!   the line protocol between parent and child;
//! - `scenarios.rs`: the scenarios run on every backend, and the helpers they share;
//! - `outages.rs`: members stopped mid-refresh (SQLite) and Redis servers lost mid-sweep;
//! - `backends.rs`: every test, one line each: which scenario on which backend.

#[path = "../common/mod.rs"]
mod common;

mod backends;
mod harness;
mod outages;
mod scenarios;

/// Not a test on its own: the body of the fleet's child processes.
#[test]
fn child_process_entry() {
    if let Some(backend) = tokenkeeper_testkit::child::is_child("TK_FLEET_CHILD") {
        harness::run_child(backend.parse().unwrap());
    }
}
