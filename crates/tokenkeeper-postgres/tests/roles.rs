//! The README's two PostgreSQL roles, checked (review N11): an owner role that creates and
//! migrates the schema, and a runtime role with row access to `installations` and `flows` and
//! read access to the outbox. The whole conformance suite runs as the runtime role (every
//! event is still written: the outbox trigger runs as the owner), and the runtime role cannot
//! forge, erase or switch off events. A trigger switched off by the owner is refused at
//! connect, by name.

mod common;

use tokenkeeper_postgres::{ConnectError, PostgresStore};

/// `url` with its user (and any password) replaced by `user`.
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres URL");
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{PASSWORD}@{rest}")
}

const PASSWORD: &str = "roles-test-password-0123456789";

/// The grants the README gives the runtime role on `schema` (keep in step with README.md).
fn runtime_grants(schema: &str, role: &str) -> String {
    format!(
        "GRANT USAGE ON SCHEMA {schema} TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.installations, {schema}.flows TO {role};
         GRANT SELECT ON {schema}.tokenkeeper_schema, {schema}.events, {schema}.event_log TO {role};"
    )
}

/// A raw connection as `role`.
async fn client_as(role: &str) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(&as_user(&common::url(), role), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    client
}

/// A store on `schema` connected as `role`.
async fn store_as(role: &str, schema: &str) -> Result<PostgresStore, ConnectError> {
    PostgresStore::builder(as_user(&common::url(), role))
        .schema(schema)
        .connect()
        .await
}

async fn superuser() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&common::url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// A fresh schema migrated by its own owner role, and the store connected as a runtime role
/// holding only the README's grants; returns the store, the schema and the two role names.
async fn runtime_store(tag: &str) -> (PostgresStore, String, String, String) {
    let schema = common::unique_schema(tag);
    let (owner, runtime) = (format!("{schema}_owner"), format!("{schema}_rt"));
    let admin = superuser().await;
    admin
        // Concurrent GRANTs on one database fail ("tuple concurrently updated"): one at a
        // time.
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7431);
             CREATE ROLE {owner} LOGIN PASSWORD '{PASSWORD}';
             CREATE ROLE {runtime} LOGIN PASSWORD '{PASSWORD}';
             GRANT CREATE ON DATABASE postgres TO {owner};
             COMMIT;"
        ))
        .await
        .unwrap();
    let owned = store_as(&owner, &schema)
        .await
        .unwrap_or_else(|e| panic!("the owner migrates: {e}"));
    drop(owned);
    let client = client_as(&owner).await;
    client
        .batch_execute(&runtime_grants(&schema, &runtime))
        .await
        .unwrap();
    let store = store_as(&runtime, &schema)
        .await
        .unwrap_or_else(|e| panic!("the runtime role connects: {e}"));
    (store, schema, owner, runtime)
}

mod as_runtime_role {
    tokenkeeper_core::conformance_tests!(|| async { super::runtime_store("roles").await.0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_role_cannot_forge_erase_or_switch_off_events() {
    let (_store, schema, _owner, runtime) = runtime_store("forge").await;
    let client = client_as(&runtime).await;
    for attempt in [
        format!("INSERT INTO {schema}.events VALUES (999, 'x', 'c', 1, 0, '{{}}')"),
        format!("DELETE FROM {schema}.events"),
        format!("UPDATE {schema}.event_log SET last_seq = 0"),
        format!("ALTER TABLE {schema}.installations DISABLE TRIGGER installations_written"),
        format!("ALTER TABLE {schema}.installations DISABLE TRIGGER installations_versioned"),
        format!("DROP TRIGGER installations_written ON {schema}.installations"),
        format!("DROP FUNCTION {schema}.append_event() CASCADE"),
        format!(
            "CREATE OR REPLACE FUNCTION {schema}.append_event() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$"
        ),
    ] {
        let refused = client.batch_execute(&attempt).await.unwrap_err();
        let code = refused.code().map(|c| c.code().to_owned());
        assert!(
            matches!(code.as_deref(), Some("42501")),
            "`{attempt}` was not refused for lack of privilege: {refused:?}"
        );
    }
}

/// Second review of N11: an `UPDATE` by hand that keeps the version (tokens, state or account
/// changed with no event, unseen by every cache) is refused, by the owner too; a write through
/// the store still goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_keeps_the_version_is_refused() {
    let (store, schema, owner, runtime) = runtime_store("silent").await;
    let id = tokenkeeper_core::InstallationId::new("silent").unwrap();
    let record =
        tokenkeeper_core::conformance::sample_record(&id, tokenkeeper_core::conformance::T0);
    tokenkeeper_core::TokenStore::create(&store, &record)
        .await
        .unwrap();
    for role in [&runtime, &owner] {
        let client = client_as(role).await;
        let refused = client
            .batch_execute(&format!(
                "UPDATE {schema}.installations SET state = 'revoked' WHERE id = 'silent'"
            ))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("without raising its version")
                || format!("{refused:?}").contains("without raising its version"),
            "{role}: {refused:?}"
        );
    }
    let leased = tokenkeeper_core::conformance::lease(
        &record,
        "h",
        tokenkeeper_core::conformance::T0,
        tokenkeeper_core::conformance::T0,
    );
    assert_eq!(
        tokenkeeper_core::TokenStore::compare_and_swap(&store, &leased, 1)
            .await
            .unwrap(),
        tokenkeeper_core::CasOutcome::Swapped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switched_off_outbox_trigger_is_refused_at_connect() {
    let (_store, schema, owner, _runtime) = runtime_store("switched_off").await;
    let client = client_as(&owner).await;
    for trigger in ["installations_written", "installations_created_or_deleted"] {
        client
            .batch_execute(&format!(
                "ALTER TABLE {schema}.installations DISABLE TRIGGER {trigger}"
            ))
            .await
            .unwrap();
        let refused = store_as(&owner, &schema)
            .await
            .expect_err("a store whose writes would have no events");
        assert!(
            matches!(&refused, ConnectError::OutboxTrigger { trigger: t, .. } if *t == trigger),
            "{refused:?}"
        );
        let text = refused.to_string();
        assert!(
            text.contains(trigger) && text.contains("ENABLE TRIGGER"),
            "{text}"
        );
        client
            .batch_execute(&format!(
                "ALTER TABLE {schema}.installations ENABLE TRIGGER {trigger}"
            ))
            .await
            .unwrap();
    }
    client
        .batch_execute(&format!(
            "DROP TRIGGER installations_written ON {schema}.installations"
        ))
        .await
        .unwrap();
    let refused = store_as(&owner, &schema)
        .await
        .expect_err("a store whose updates would have no events");
    assert!(
        matches!(&refused, ConnectError::OutboxTrigger { trigger, .. } if *trigger == "installations_written"),
        "{refused:?}"
    );
}

/// A schema an earlier build wrote (version 2: the trigger running as whoever writes) is
/// brought to version 3 by the owner's next connect, after which the runtime role's writes
/// have their events again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_upgrades_a_version_2_schema() {
    let (_store, schema, owner, runtime) = runtime_store("upgrade").await;
    let client = client_as(&owner).await;
    client
        .batch_execute(&format!(
            "ALTER FUNCTION {schema}.append_event() SECURITY INVOKER RESET search_path;
             DROP TRIGGER installations_versioned ON {schema}.installations;
             DROP FUNCTION {schema}.refuse_silent_update();
             UPDATE {schema}.tokenkeeper_schema SET version = 2;"
        ))
        .await
        .unwrap();
    let before = store_as(&runtime, &schema)
        .await
        .expect_err("the runtime role cannot migrate");
    assert!(matches!(before, ConnectError::Schema(_)), "{before:?}");
    store_as(&owner, &schema).await.expect("the owner migrates");
    let row = client
        .query_one(
            "SELECT p.prosecdef, p.proconfig::TEXT FROM pg_catalog.pg_proc p
               JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 AND p.proname = 'append_event'",
            &[&schema],
        )
        .await
        .unwrap();
    let (definer, config): (bool, String) = (row.get(0), row.get(1));
    assert!(definer, "the trigger runs as its owner");
    assert!(
        config.contains("search_path=pg_catalog, pg_temp"),
        "{config}"
    );
    let store = store_as(&runtime, &schema)
        .await
        .expect("the runtime role opens the upgraded schema");
    tokenkeeper_core::conformance::events_follow_every_write(std::sync::Arc::new(store)).await;
}
