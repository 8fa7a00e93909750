#!/usr/bin/env bash
# The long runs that do not fit the default suite (scripts/test.sh): thousands of
# simulation seeds in an optimised build. Run it before a release, or after touching the
# refresh engine.
#   TK_SIM_SEEDS=20000 (default) seeds of the fault simulation.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=${TK_SIM_SEEDS:-20000}
printf '\n==> %s\n' "fault simulation, $seeds seeds (release build)"
TK_SIM_SEEDS=$seeds cargo test --release -p tokenkeeper --test simulation -- --nocapture

printf '\n==> %s\n' "long runs passed"
