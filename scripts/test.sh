#!/usr/bin/env bash
# The whole test suite, runnable on a fresh machine: installs and starts what the tests need
# (redis-server on a free loopback port; PostgreSQL, Chromium and chromedriver, openssl and
# cargo-deny when missing; the PostgreSQL and Redis Cluster tests start their own servers),
# runs fmt, clippy, docs, cargo deny and every test, and stops what it started. CI (.ci/run)
# calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

apt_updated=0
need_pkg() { # need_pkg <command> <debian package>
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (needed for the tests)"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    if [ "$apt_updated" -eq 0 ]; then
        $sudo apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

started_pids=()
cleanup() {
    for pid in "${started_pids[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
    [ -n "${redis_dir:-}" ] && rm -rf "$redis_dir"
}
trap cleanup EXIT

# A real redis-server for the Redis backend's tests, unless one is given.
if [ -z "${TOKENKEEPER_REDIS_URL:-}" ]; then
    need_pkg redis-server redis-server
    redis_port=$(free_port)
    redis_dir=$(mktemp -d)
    log "starting redis-server on 127.0.0.1:$redis_port"
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$redis_dir" --daemonize no >"$redis_dir/redis.log" 2>&1 &
    started_pids+=("$!")
    for _ in $(seq 1 50); do
        redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    redis-cli -p "$redis_port" ping >/dev/null || { cat "$redis_dir/redis.log"; exit 1; }
    export TOKENKEEPER_REDIS_URL="redis://127.0.0.1:$redis_port"
fi
# A real PostgreSQL for the PostgreSQL store's tests: each test process starts its own
# throwaway server with initdb and pg_ctl (as an unprivileged user when run as root), unless
# TOKENKEEPER_POSTGRES_URL names one.
if [ -z "${TOKENKEEPER_POSTGRES_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && [ -z "${TOKENKEEPER_POSTGRES_BIN:-}" ]; then
    log "installing postgresql (needed for the tests)"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    if [ "$apt_updated" -eq 0 ]; then
        $sudo apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
fi
# The rediss:// test makes its certificates with the openssl command.
need_pkg openssl openssl
# The web install flow's end-to-end test drives a real headless Chromium over WebDriver.
need_pkg chromium chromium || true
need_pkg chromedriver chromium-driver || true
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    export TOKENKEEPER_REQUIRE_BROWSER=1
else
    log "!!! chromium/chromedriver could not be installed: the browser test will be SKIPPED !!!"
fi
# The Redis tests that start and stop their own server find it here.
export TOKENKEEPER_REDIS_SERVER="$(command -v redis-server)"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, all features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --quiet

log "cargo test"
cargo test --workspace --all-features

# Licenses, banned crates (no OpenSSL) and sources (crates.io only), per deny.toml. Advisories
# need the RustSec database, which these machines cannot download (see README).
if ! command -v cargo-deny >/dev/null 2>&1; then
    log "installing cargo-deny (locked)"
    cargo install --locked cargo-deny
fi
log "cargo deny check licenses bans sources"
cargo deny check licenses bans sources

# The fuzz targets live outside the workspace: make sure they still compile (running them
# takes cargo-fuzz and minutes each: see README, "Fuzzing").
log "fuzz targets compile (cargo check in fuzz/)"
cargo check --quiet --manifest-path fuzz/Cargo.toml --bins

log "the README's commands: the quickstart, the examples, the mock provider binary"
cargo run -q --example quickstart
cargo run -q --example web_install -- --self-test
cargo run -q --example webhook_relay -- --self-test
cargo run -q --example prometheus -- --self-test
cargo run -q --example redis_fleet -- "$TOKENKEEPER_REDIS_URL"
cargo run -q -p tokenkeeper-mock-provider -- --help >/dev/null

if [ -d benches ]; then
    log "benchmarks, each once (cargo bench -- --test)"
    cargo bench --workspace --all-features -- --test
fi

log "all checks passed"
