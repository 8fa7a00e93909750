//! How the Redis store talks to the server: [`RedisStore::run`] (one interaction under the
//! operation timeout, its error mapped), [`RedisStore::write`] (a write, and with
//! `wait_for_replicas` its `WAIT` in the same pipeline on a connection of the write pool,
//! with a script the server lost loaded again on `NOSCRIPT`) and [`RedisStore::fan_out`]
//! (one read per shard, pipelined where the server allows it). Every store operation goes
//! through here, so the timeouts, the replica wait and the cluster's routing rules live in
//! one place instead of in each operation.

use std::time::Duration;

use redis::{RedisError, Value};
use tokenkeeper_core::StoreError;

use crate::conn::{self, Conn};
use crate::durability::ReplicaWait;
use crate::error::{RedisFault, is_noscript, redis_error};
use crate::{BACKEND, RedisStore};

/// What writes wait for with `wait_for_replicas`, and the connections they go on: one
/// option, so that neither exists without the other.
#[derive(Clone)]
pub(crate) struct ReplicaWrites {
    pub(crate) wait: ReplicaWait,
    pub(crate) pool: std::sync::Arc<conn::WritePool>,
}

/// A pool connection unused this long is pinged before a write goes on it (a round trip
/// without the `WAIT`, paid only after a pause).
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// One write for [`RedisStore::write`].
#[derive(Clone, Copy)]
pub(crate) enum Write<'a> {
    Script(&'a redis::ScriptInvocation<'a>),
    Command(&'a redis::Cmd),
}

impl RedisStore {
    /// Sends one write and returns its reply. With replicas to wait for, the write and
    /// `WAIT` go in one pipeline, so both run on one connection to the primary that owns the
    /// write's keys and `WAIT` counts this very write: sent apart, a `WAIT` that went out on a
    /// fresh connection (after a reconnect, or resent to a slot's new owner) would count
    /// nothing and report a lost write as replicated. A client that resends the pipeline
    /// resends both. A script the server does not know (`NOSCRIPT`: not run) is loaded and
    /// the pipeline sent once more.
    pub(crate) async fn write(
        &self,
        operation: &'static str,
        write: Write<'_>,
    ) -> Result<Value, StoreError> {
        let Some(ReplicaWrites { wait, pool }) = &self.replica_writes else {
            return match write {
                Write::Script(invocation) => {
                    self.run(operation, async |c| invocation.invoke_async(c).await)
                        .await
                }
                Write::Command(cmd) => {
                    self.run(operation, async |c| cmd.query_async(c).await)
                        .await
                }
            };
        };
        let millis = u64::try_from(wait.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut pipe = redis::pipe();
        match write {
            Write::Script(invocation) => pipe.invoke_script(invocation),
            Write::Command(cmd) => pipe.add_command(cmd.clone()),
        };
        pipe.cmd("WAIT").arg(wait.replicas).arg(millis);
        let held = pool.checkout(self.operation_timeout).await.ok_or_else(|| {
            StoreError::unavailable(
                BACKEND,
                operation,
                RedisFault::WritersBusy {
                    connections: pool.size(),
                    waited: self.operation_timeout,
                },
            )
        })?;
        let on = held.conn();
        if held.idle_for() >= IDLE_CHECK {
            // A read first: one that finds the connection dead is sent again once it has
            // reconnected, so the write is not the one to find out.
            self.run_on(on.clone(), self.operation_timeout, operation, async |c| {
                redis::cmd("PING").query_async::<()>(c).await
            })
            .await?;
        }
        let until = tokio::time::Instant::now() + self.operation_timeout + wait.timeout;
        let sent = self
            .send_waiting(&on, until, operation, write, &pipe)
            .await?;
        let (reply, acked) = sent.map_err(|e| redis_error(operation, e))?;
        if acked < wait.replicas {
            return Err(StoreError::not_durable(
                BACKEND,
                operation,
                RedisFault::TooFewReplicas {
                    acked,
                    wanted: wait.replicas,
                },
            ));
        }
        Ok(reply)
    }

    /// Sends a write and its `WAIT` on `on`, all of it by `until`; a script the server does
    /// not know (`NOSCRIPT`: not run) is loaded and the pipeline sent once more.
    async fn send_waiting(
        &self,
        on: &Conn,
        until: tokio::time::Instant,
        operation: &'static str,
        write: Write<'_>,
        pipe: &redis::Pipeline,
    ) -> Result<Result<(Value, u32), RedisError>, StoreError> {
        let left = || until.saturating_duration_since(tokio::time::Instant::now());
        let send = async || {
            self.run_on(on.clone(), left(), operation, async |c| {
                Ok(pipe.query_async::<(Value, u32)>(c).await)
            })
            .await
        };
        let sent = send().await?;
        if let (Write::Script(invocation), Err(e)) = (write, &sent)
            && is_noscript(e)
        {
            self.run_on(on.clone(), left(), operation, async |c| {
                invocation.load_async(c).await
            })
            .await?;
            return send().await;
        }
        Ok(sent)
    }

    /// Runs one read per shard: one pipeline on a single server; on a cluster, where the
    /// shards' keys live in different slots (a pipeline across slots is refused), each
    /// command on its own (routed to the primary of its slot), one after the other.
    pub(crate) async fn fan_out<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        if !self.conn.is_cluster() {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd);
            }
            return self
                .run(operation, async |c| pipe.query_async(c).await)
                .await;
        }
        self.run(operation, async |c| {
            let mut pages = Vec::with_capacity(cmds.len());
            for cmd in &cmds {
                pages.push(cmd.query_async::<T>(c).await?);
            }
            Ok(pages)
        })
        .await
    }

    /// Runs one Redis interaction under the operation timeout, mapping errors.
    pub(crate) async fn run<T>(
        &self,
        operation: &'static str,
        f: impl AsyncFnOnce(&mut Conn) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        self.run_on(self.conn.clone(), self.operation_timeout, operation, f)
            .await
    }

    /// Runs `f` on `conn`, giving up after `timeout`.
    async fn run_on<T>(
        &self,
        mut conn: Conn,
        timeout: Duration,
        operation: &'static str,
        f: impl AsyncFnOnce(&mut Conn) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(timeout, f(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(redis_error(operation, e)),
            Err(_) => Err(StoreError::unavailable(
                BACKEND,
                operation,
                RedisFault::NoAnswer(timeout),
            )),
        }
    }
}
