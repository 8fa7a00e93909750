#!/usr/bin/env bash
# The long runs that do not fit the default suite (scripts/test.sh): thousands of
# simulation seeds in an optimised build, the fleets at five times their length, and the
# protocol model with every fault at once.
# Run it before a release, or after touching the refresh engine.
#   TK_SIM_SEEDS=20000 (default) seeds of the fault simulation.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=${TK_SIM_SEEDS:-20000}
printf '\n==> %s\n' "fault simulation, $seeds seeds (release build)"
TK_SIM_SEEDS=$seeds cargo test --release -p tokenkeeper --features __sim --test simulation -- --nocapture

# The fleets at five times the suite's length (40 expiry cycles, 8,000 refreshes per store and
# profile), and every fleet on each profile it lists (the suite runs the first, bitbucket).
printf '\n==> %s\n' "fleets: 40 expiry cycles, every profile"
TK_FLEET_CYCLES=40 TK_FLEET_ALL_PROFILES=1 cargo nextest run --release -p tokenkeeper --all-features --test fleet

# The suite checks each fault family alone to 4 ticks; these run them to 5 ticks, then
# combined (seconds to minutes each, up to ~6 GB).
for bounds in \
    "crashes=1 losses=0 store_faults=0 revoke=1" \
    "crashes=0 losses=1 store_faults=0 revoke=1" \
    "crashes=0 losses=0 store_faults=1 revoke=1" \
    "crashes=1 losses=1 store_faults=0 revoke=1" \
    "crashes=1 losses=0 store_faults=1 revoke=1" \
    "leeway=4 crashes=1 losses=1 store_faults=0 revoke=1" \
    "leeway=3 ticks=6 crashes=1 losses=1 store_faults=0 revoke=1" \
    "crashes=0 losses=1 store_faults=1 revoke=1 budget=2 expiry=4" \
    "processes=3 ticks=3 crashes=1 losses=1 store_faults=0 revoke=1"; do
    printf '\n==> %s\n' "protocol model: $bounds"
    cargo run --quiet --release -p tokenkeeper-model --example check -- $bounds
done

# The fuzz target binaries compile (running them: scripts/fuzz.sh).
printf '\n==> %s\n' "fuzz targets compile (cargo check in fuzz/)"
CARGO_TARGET_DIR="$PWD/target" cargo check --quiet --manifest-path fuzz/Cargo.toml --bins

printf '\n==> %s\n' "long runs passed"
