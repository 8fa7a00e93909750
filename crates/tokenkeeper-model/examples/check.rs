//! Runs the protocol model checker with bounds from the command line, for bigger runs than
//! the test suite's:
//! `cargo run --release -p tokenkeeper-model --example check -- PROCESSES MAX_TICK MAX_ROTATIONS [leeway]`

use stateright::{Checker, Model};
use tokenkeeper_model::{Config, ProtocolModel};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |n: usize, default: u8| args.get(n).and_then(|a| a.parse().ok()).unwrap_or(default);
    let processes = usize::from(arg(0, 2)).clamp(1, 3);
    let config = Config {
        max_tick: arg(1, 6),
        max_rotations: arg(2, 2),
        ..Config::new(processes, args.get(3).map(|_| 2))
    };
    let started = std::time::Instant::now();
    let checker = ProtocolModel {
        config: config.clone(),
    }
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
    checker.assert_properties();
    println!("all properties hold");
}
