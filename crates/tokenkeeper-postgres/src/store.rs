//! The [`TokenStore`] operations on PostgreSQL: `impl TokenStore for PostgresStore`. Each
//! operation borrows a pooled connection under the operation timeout (`PostgresStore::run`)
//! and runs its statement from `ops`, where the SQL and the row conversions live. It is the
//! file to open for what an operation does on PostgreSQL.

use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventCursor, EventPage, InstallationId,
    ListFilter, ListPage, Record, StoreError, Timestamp, TokenStore, backend::check_cas_arguments,
};

use crate::{BACKEND, PostgresStore, ops};

#[async_trait]
impl TokenStore for PostgresStore {
    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        self.run("get", async |c| ops::get(c, &self.sql, id).await)
            .await
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.run("create", async |c| ops::create(c, &self.sql, record).await)
            .await
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<CasOutcome, StoreError> {
        check_cas_arguments(BACKEND, record, expected_version)?;
        self.run("compare_and_swap", async |c| {
            ops::compare_and_swap(c, &self.sql, record, expected_version).await
        })
        .await
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected_version: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        self.run("delete", async |c| {
            ops::delete(c, &self.sql, id, expected_version).await
        })
        .await
    }

    async fn due(
        &self,
        consumer: &str,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        self.run("due", async |c| {
            ops::due(c, &self.sql, consumer, before, after, limit).await
        })
        .await
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.run("list", async |c| {
            ops::list(c, &self.sql, filter, after, limit).await
        })
        .await
    }

    async fn count_states(&self, _cap: u64) -> Result<tokenkeeper_core::StateCounts, StoreError> {
        self.run("count_states", async |c| {
            ops::count_states(c, &self.sql).await
        })
        .await
    }

    async fn claim_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.run("claim_flow", async |c| {
            ops::claim_flow(c, &self.sql, flow, value, ttl).await
        })
        .await
    }

    async fn settle_flow(&self, flow: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        self.run("settle_flow", async |c| {
            ops::settle_flow(c, &self.sql, flow, value, ttl).await
        })
        .await
    }

    async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.run("get_flow", async |c| {
            ops::get_flow(c, &self.sql, flow).await
        })
        .await
    }

    async fn read_events(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.run("read_events", async |c| {
            ops::read_events(c, &self.sql, after, limit).await
        })
        .await
    }

    async fn event_head(&self) -> Result<EventCursor, StoreError> {
        self.run("event_head", async |c| ops::event_head(c, &self.sql).await)
            .await
    }
}
