//! Runs the protocol model checker with bounds from the command line, for bigger runs than
//! the test suite's (`scripts/test-long.sh` runs some):
//! `cargo run --release -p tokenkeeper-model --example check -- KEY=VALUE...` with keys
//! `processes`, `ticks`, `rotations`, `leeway`, `crashes`, `losses`, `store_faults`,
//! `revoke` (0 or 1), `budget`, `expiry`; unset keys keep `Config::new`'s values.

use stateright::{Checker, Model};
use tokenkeeper_model::{Config, ProtocolModel};

fn main() {
    let args: Vec<(String, u8)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (k, v) = a.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect();
    let get = |key: &str| args.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
    let processes = usize::from(get("processes").unwrap_or(2)).clamp(1, 3);
    let mut config = Config::new(processes, get("leeway"));
    config.max_tick = get("ticks").unwrap_or(config.max_tick);
    config.max_rotations = get("rotations").unwrap_or(config.max_rotations);
    config.max_crashes = get("crashes").unwrap_or(config.max_crashes);
    config.max_losses = get("losses").unwrap_or(config.max_losses);
    config.max_store_faults = get("store_faults").unwrap_or(config.max_store_faults);
    config.user_revokes = get("revoke").is_none_or(|v| v != 0);
    config.budget_attempts = get("budget").map(u32::from);
    config.absolute_expiry = get("expiry");
    let started = std::time::Instant::now();
    let checker = ProtocolModel::new(config.clone())
        .checker()
        .threads(2)
        .spawn_bfs()
        .join();
    println!(
        "{config:?}: {} states, {} unique, in {:?}",
        checker.state_count(),
        checker.unique_state_count(),
        started.elapsed()
    );
    for (name, path) in checker.discoveries() {
        if !name.starts_with("sometimes:") && name != "a refresh lands" {
            println!("\"{name}\" breaks:");
            for (state, action) in path.into_vec() {
                println!("  {} | next: {action:?}", state.summary());
            }
        }
    }
    checker.assert_properties();
    println!("all properties hold");
}
