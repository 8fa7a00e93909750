#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time (TK_FUZZ_SECONDS each, default 60)
# and prints one line per target: runs, coverage and whether it found anything. Not part of
# scripts/test.sh (minutes of CPU); run it before a release or after touching a parser.
# Installs cargo-fuzz when missing; uses the stable toolchain (RUSTC_BOOTSTRAP for the
# sanitizer flags cargo-fuzz passes).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${TK_FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
status=0
for target in $(cargo fuzz list); do
    corpus="corpus/$target"
    mkdir -p "$corpus"
    [ -d "seeds/$target" ] && cp -n seeds/"$target"/* "$corpus"/ 2>/dev/null || true
    log=$(mktemp)
    if cargo fuzz run "$target" "$corpus" -- -max_total_time="$seconds" >"$log" 2>&1; then
        verdict="no crash"
    else
        verdict="FOUND A CRASH (see fuzz/artifacts/$target)"
        status=1
    fi
    runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 | grep -o '[0-9]*' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || echo "?")
    printf '%-16s %4ss  %10s runs  cov %6s  %s\n' "$target" "$seconds" "$runs" "$cov" "$verdict"
    rm -f "$log"
done
exit "$status"
