//! Exhaustive checks of the refresh protocol model (see the crate docs): the properties hold
//! for the protocol as built, on providers with and without a reuse leeway, with crashes,
//! lost replies, pauses and skewed clocks; liveness holds under a fair scheduler; and each
//! safeguard, removed, yields a counterexample that the test prints.

use stateright::{Checker, HasDiscoveries, Model};
use tokenkeeper_model::{Config, Mutation, ProtocolModel};

fn config(processes: usize, leeway: Option<u8>, mutation: Mutation) -> Config {
    Config {
        mutation,
        ..Config::new(processes, leeway)
    }
}

fn check(config: Config) -> impl Checker<ProtocolModel> {
    let checker = ProtocolModel {
        config: config.clone(),
    }
    .checker()
    .threads(2)
    .spawn_bfs()
    .join();
    eprintln!(
        "{config:?}: {} states ({} unique)",
        checker.state_count(),
        checker.unique_state_count()
    );
    checker
}

#[test]
fn the_protocol_holds_without_a_reuse_leeway() {
    check(config(2, None, Mutation::None)).assert_properties();
}

#[test]
fn the_protocol_holds_with_a_reuse_leeway() {
    check(config(2, Some(2), Mutation::None)).assert_properties();
}

#[test]
fn the_protocol_holds_with_three_processes() {
    let mut c = config(3, None, Mutation::None);
    c.max_tick = 3;
    check(c).assert_properties();
}

#[test]
fn a_live_process_eventually_refreshes_under_a_fair_scheduler() {
    let mut c = config(2, None, Mutation::None);
    c.fair_time = true;
    c.max_tick = 10;
    c.max_losses = 1;
    check(c).assert_properties();
}

fn counterexample(mutation: Mutation, property: &'static str) {
    // Stops at the first counterexample of `property`.
    let checker = ProtocolModel {
        config: config(2, None, mutation),
    }
    .checker()
    .threads(2)
    .finish_when(HasDiscoveries::AnyOf([property].into()))
    .spawn_bfs()
    .join();
    let path = checker.assert_any_discovery(property);
    eprintln!("{mutation:?} breaks \"{property}\":");
    for (state, action) in path.into_vec() {
        let phases: Vec<&str> = state.procs.iter().map(|p| p.phase.name()).collect();
        eprintln!(
            "  t={} store v{} r{} {:?}, provider r{}{}, processes {phases:?} | next: {action:?}",
            state.tick,
            state.store.0.version(),
            state.store.token(),
            state.store.0.state().kind(),
            state.provider.current,
            if state.provider.revoked {
                " revoked"
            } else {
                ""
            },
        );
    }
}

#[test]
fn without_the_fence_a_stale_writer_overwrites_newer_tokens() {
    counterexample(Mutation::NoFence, "no stale writer over newer tokens");
}

#[test]
fn without_the_lease_a_token_is_presented_twice() {
    counterexample(
        Mutation::NoLease,
        "no retired token presented outside the inherent window",
    );
}

#[test]
fn without_write_before_use_a_crash_loses_a_token_in_use() {
    counterexample(Mutation::UseBeforeWrite, "a used token is stored first");
}
