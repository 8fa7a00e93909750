//! Exhaustive checks of the refresh protocol model (see the crate docs): the properties hold
//! for the protocol as built, on providers with and without a reuse leeway, with crashes,
//! lost replies, 5xx after a commit, requests handled after their client gave up, store
//! writes refused or applied and reported failed, a user who revokes, a failure budget and
//! an absolute expiry, pauses and skewed clocks; liveness holds under a fair scheduler; and
//! each safeguard, removed, yields a counterexample that the test prints.
//!
//! Each run enables a few faults at a time so the suite stays in minutes; the combined runs
//! (every fault at once, longer time, three processes with lost replies) are in
//! `scripts/test-long.sh`, through the `check` example.

use stateright::{Checker, HasDiscoveries, Model, Path};
use tokenkeeper_model::{Action, Config, Mutation, ProtocolModel, State};

/// Two processes to 4 ticks, no leeway, no fault: each test turns on what it checks (the
/// same families to 5 ticks, and combined, are in `scripts/test-long.sh`).
fn base() -> Config {
    Config {
        max_tick: 4,
        max_crashes: 0,
        max_losses: 0,
        max_store_faults: 0,
        ..Config::new(2, None)
    }
}

fn check(config: Config) {
    let checker = ProtocolModel::new(config.clone())
        .checker()
        .threads(1)
        .spawn_bfs()
        .join();
    eprintln!(
        "{config:?}: {} states ({} unique)",
        checker.state_count(),
        checker.unique_state_count()
    );
    for (name, path) in checker.discoveries() {
        if !name.starts_with("sometimes:") && name != "a refresh lands" {
            print_path(name, path);
        }
    }
    checker.assert_properties();
}

fn print_path(property: &str, path: Path<State, Action>) {
    eprintln!("\"{property}\" breaks:");
    for (state, action) in path.into_vec() {
        eprintln!("  {} | next: {action:?}", state.summary());
    }
}

#[test]
fn the_protocol_holds_through_crashes_and_a_user_revocation() {
    check(Config {
        max_crashes: 1,
        ..base()
    });
}

#[test]
fn the_protocol_holds_through_lost_replies_server_errors_and_late_requests() {
    check(Config {
        max_losses: 1,
        ..base()
    });
}

#[test]
fn the_protocol_holds_through_a_store_fault() {
    check(Config {
        max_store_faults: 1,
        ..base()
    });
}

#[test]
fn the_protocol_holds_with_a_reuse_leeway() {
    // Four ticks of leeway, two of them left once the clock skew is counted against it.
    check(Config {
        leeway: Some(4),
        max_crashes: 1,
        ..base()
    });
}

#[test]
fn budget_and_expiry_verdicts_are_reached_and_true() {
    check(Config {
        max_losses: 1,
        budget_attempts: Some(2),
        absolute_expiry: Some(3),
        ..base()
    });
}

/// Three contenders for one lease, without faults (with a crash and a lost reply as well it
/// takes about a minute: `scripts/test-long.sh`, `processes=3`).
#[test]
fn the_protocol_holds_with_three_processes() {
    check(Config {
        skews: vec![-1, 1, 0],
        max_tick: 3,
        user_revokes: false,
        ..base()
    });
}

#[test]
fn a_live_process_eventually_refreshes_under_a_fair_scheduler() {
    check(Config {
        fair_time: true,
        max_tick: 10,
        max_crashes: 1,
        max_losses: 1,
        ..base()
    });
}

/// Stops at the first counterexample of `property` under `config` with `mutation`.
fn counterexample(config: Config, mutation: Mutation, property: &'static str) {
    let checker = ProtocolModel::new(Config { mutation, ..config })
        .checker()
        .threads(1)
        .finish_when(HasDiscoveries::AnyOf([property].into()))
        .spawn_bfs()
        .join();
    let path = checker.assert_any_discovery(property);
    eprintln!("{mutation:?}:");
    print_path(property, path);
}

#[test]
fn without_the_fence_a_stale_writer_overwrites_newer_tokens() {
    let config = Config {
        max_crashes: 1,
        ..base()
    };
    counterexample(
        config,
        Mutation::NoFence,
        "no stale writer over newer tokens",
    );
}

#[test]
fn without_the_lease_a_token_is_presented_twice() {
    counterexample(
        base(),
        Mutation::NoLease,
        "no retired token presented outside the inherent window",
    );
}

#[test]
fn without_write_before_use_a_crash_loses_a_token_in_use() {
    let config = Config {
        max_crashes: 1,
        ..base()
    };
    counterexample(
        config,
        Mutation::UseBeforeWrite,
        "a used token is stored first",
    );
}

#[test]
fn without_recognising_its_own_write_a_recorded_condemnation_goes_unannounced() {
    let config = Config {
        max_store_faults: 1,
        ..base()
    };
    counterexample(
        config,
        Mutation::NoOwnWrite,
        "a recorded condemnation is announced",
    );
}

#[test]
fn without_the_presented_check_a_late_result_lands_over_newer_tokens() {
    let config = Config {
        leeway: Some(4),
        ..base()
    };
    counterexample(
        config,
        Mutation::NoPresentedCheck,
        "no stale writer over newer tokens",
    );
}

#[test]
fn without_the_send_window_a_stalled_holder_presents_a_retired_token() {
    counterexample(
        base(),
        Mutation::NoSendWindow,
        "no retired token presented outside the inherent window",
    );
}

#[test]
fn taking_over_before_a_whole_ttl_of_silence_presents_a_retired_token() {
    counterexample(
        base(),
        Mutation::EarlyTakeover,
        "no retired token presented outside the inherent window",
    );
}
