//! Every test of the fleet binary, one line each: a scenario on a fresh place of each backend
//! (`Backend::fresh_*`, a new SQLite file, Redis prefix or PostgreSQL schema per run), or an
//! outage on the backend it is written for.

use crate::common::Backend;

/// One `#[tokio::test]` (multi-threaded, 2 workers) per line:
///
/// - `name: scenarios::run(fresh, "tag") for ["profile", …];` runs `run(&fresh("tag"),
///   profile)` for the first profile, and for each of the others in turn when
///   `TK_FLEET_ALL_PROFILES` is set (`scripts/test-long.sh`), each on a fresh place;
/// - `name: scenarios::run(fresh, "tag");` runs `run(&fresh("tag"))`;
/// - `outages::name();` runs the outage `name` as the test `name`.
macro_rules! per_backend {
    () => {};
    (
        $name:ident: scenarios::$run:ident($fresh:expr, $tag:literal) for [$($profile:literal),+];
        $($rest:tt)*
    ) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let profiles = [$($profile),+];
            for (i, profile) in profiles.into_iter().enumerate() {
                if i == 0 || crate::harness::all_profiles() {
                    crate::scenarios::$run(&($fresh)($tag), profile).await;
                }
            }
        }
        per_backend!($($rest)*);
    };
    ($name:ident: scenarios::$run:ident($fresh:expr, $tag:literal); $($rest:tt)*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            crate::scenarios::$run(&($fresh)($tag)).await;
        }
        per_backend!($($rest)*);
    };
    (outages::$name:ident(); $($rest:tt)*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            crate::outages::$name().await;
        }
        per_backend!($($rest)*);
    };
}

per_backend! {
    // 4 members (managers as tasks on memory, processes elsewhere), 200 installations, 8
    // expiry cycles (TK_FLEET_CYCLES), on both rotating profiles.
    memory_fleet_of_tasks:
        scenarios::run_fleet(|_| Backend::Memory, "fleet") for ["bitbucket", "atlassian-3lo"];
    sqlite_fleet_of_processes:
        scenarios::run_fleet(Backend::fresh_sqlite, "fleet") for ["bitbucket", "atlassian-3lo"];
    redis_fleet_of_processes:
        scenarios::run_fleet(Backend::fresh_redis, "fleet") for ["bitbucket", "atlassian-3lo"];
    redis_cluster_fleet_of_processes:
        scenarios::run_fleet(Backend::fresh_redis_cluster, "fleet")
        for ["bitbucket", "atlassian-3lo"];
    postgres_fleet_of_processes:
        scenarios::run_fleet(Backend::fresh_postgres, "fleet") for ["bitbucket", "atlassian-3lo"];

    // Skewed clocks, short leases, one member frozen past its leases.
    contention_fleet_on_sqlite:
        scenarios::run_contention(Backend::fresh_sqlite, "contention")
        for ["bitbucket", "atlassian-3lo"];
    contention_fleet_on_redis:
        scenarios::run_contention(Backend::fresh_redis, "contention")
        for ["bitbucket", "atlassian-3lo"];
    contention_fleet_on_redis_cluster:
        scenarios::run_contention(Backend::fresh_redis_cluster, "contention") for ["bitbucket"];
    contention_fleet_on_postgres:
        scenarios::run_contention(Backend::fresh_postgres, "contention")
        for ["bitbucket", "atlassian-3lo"];

    // Every member's store refuses 70 % of result writes.
    flaky_store_fleet_on_sqlite: scenarios::run_flaky_fleet(Backend::fresh_sqlite, "flaky");
    flaky_store_fleet_on_redis: scenarios::run_flaky_fleet(Backend::fresh_redis, "flaky");
    flaky_store_fleet_on_postgres: scenarios::run_flaky_fleet(Backend::fresh_postgres, "flaky");

    // Two consumers (client ids) on one store.
    two_consumers_fleet_on_sqlite: scenarios::run_two_consumers(Backend::fresh_sqlite, "consumers");
    two_consumers_fleet_on_redis: scenarios::run_two_consumers(Backend::fresh_redis, "consumers");
    two_consumers_fleet_on_postgres:
        scenarios::run_two_consumers(Backend::fresh_postgres, "consumers");

    // SQLite: members stopped mid-refresh.
    outages::sigterm_mid_refresh_loses_nothing();
    outages::sigterm_during_a_store_failover_loses_nothing();
    outages::sigterm_without_shutdown_is_measured();
    outages::sigkill_mid_refresh_loses_nothing_inside_a_leeway_and_explains_every_loss_outside();
    outages::a_sigkill_during_a_burst_costs_at_most_the_rotations_in_flight();

    // Redis servers of their own, lost mid-sweep.
    outages::redis_crash_and_restart_mid_sweep_loses_nothing();
    outages::sigterm_during_a_redis_kill_loses_nothing();
    outages::redis_replica_promoted_mid_sweep_loses_nothing();
    outages::redis_cluster_primary_killed_mid_sweep_loses_nothing();
}
