//! How the Redis store says what went wrong: [`RedisFault`], the faults the store finds
//! beyond the driver's own errors, and the mapping of a driver error to a [`StoreError`]:
//! `Unavailable` when a retry can succeed (a failover, a restart, a replica shortfall, a
//! lost connection), `Backend` otherwise. It is a file of its own so that the rule every
//! caller's retries depend on, which server replies are retryable, sits beside the tests
//! that pin it down, apart from the code that sends commands.

use std::time::Duration;

use redis::{RedisError, Value};
use tokenkeeper_core::StoreError;

use crate::BACKEND;

/// What the Redis store can find wrong beyond the driver's own errors.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisFault {
    #[error("Redis did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error(
        "all {connections} connections for writes that wait for replicas stayed busy for {waited:?} (replicas slow or gone); the write was not sent"
    )]
    WritersBusy {
        connections: usize,
        waited: Duration,
    },
    #[error(
        "the write is on the primary but only {acked} of {wanted} replicas acknowledged it in time; it may not survive a failover"
    )]
    TooFewReplicas { acked: u32, wanted: u32 },
    #[error(
        "the script answered with an unexpected {0} reply; the scripts and this build disagree: check that every process runs the same tokenkeeper version"
    )]
    UnexpectedScriptReply(&'static str),
    #[error("a due-index member is malformed; remove it from the due index (ZREM)")]
    MalformedDueMember,
    #[error("an index holds an invalid installation id ({0}); remove that member")]
    InvalidIndexId(#[source] tokenkeeper_core::InvalidInstallationId),
}

/// Server replies that mean "not now" during a failover, a restart or a replica shortfall:
/// a demoted primary answers READONLY, a restarting one LOADING, a primary without its
/// replicas NOREPLICAS (`min-replicas-to-write`), a cluster mid-failover TRYAGAIN or
/// CLUSTERDOWN, a full one OOM. A retry can succeed, so they are `Unavailable`.
const RETRYABLE_CODES: [&str; 9] = [
    // A cluster's slot moved (a failover or resharding) and the client's redirections ran
    // out: the next attempt goes to the new owner.
    "MOVED",
    "ASK",
    "READONLY",
    "LOADING",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "OOM",
];

fn is_retryable(e: &RedisError) -> bool {
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        return true;
    }
    // A failed pipeline (`due`, `list`) carries one server error per failed command, and its
    // `code()` is only that of the first when the driver knows it: look at all of them.
    // Cloning shares the error's `Arc`s.
    match e.clone().into_server_errors() {
        Some(errors) if !errors.is_empty() => errors
            .iter()
            .all(|(_, server)| RETRYABLE_CODES.contains(&server.code())),
        _ => e.code().is_some_and(|code| RETRYABLE_CODES.contains(&code)),
    }
}

pub(crate) fn redis_error(operation: &'static str, e: RedisError) -> StoreError {
    if is_retryable(&e) {
        StoreError::unavailable(BACKEND, operation, e)
    } else {
        StoreError::backend(BACKEND, operation, e)
    }
}

pub(crate) fn unexpected_reply(operation: &'static str, reply: &Value) -> StoreError {
    // Name the reply's type only: a value could hold a record, and records hold tokens.
    let kind = match reply {
        Value::Nil => "nil",
        Value::Int(_) => "integer",
        Value::Array(_) => "array",
        Value::SimpleString(_) => "simple string",
        Value::BulkString(_) => "bulk string",
        _ => "other",
    };
    StoreError::backend(BACKEND, operation, RedisFault::UnexpectedScriptReply(kind))
}

/// Whether a (pipeline's) error says a script was not known to the server.
pub(crate) fn is_noscript(e: &RedisError) -> bool {
    e.code() == Some("NOSCRIPT")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, server)| server.code() == "NOSCRIPT"))
}

#[cfg(test)]
mod tests {
    use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
    use tokenkeeper_core::StoreError;

    use super::redis_error;

    /// The failover and restart replies, as a server sends them.
    const RETRYABLE_REPLIES: [&str; 7] = [
        "-READONLY You can't write against a read only replica.\r\n",
        "-LOADING Redis is loading the dataset in memory\r\n",
        "-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n",
        "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
        "-CLUSTERDOWN The cluster is down\r\n",
        "-NOREPLICAS Not enough good replicas to write.\r\n",
        "-OOM command not allowed when used memory > 'maxmemory'.\r\n",
    ];

    const FATAL_REPLY: &str = "-ERR wrong number of arguments\r\n";

    /// A reply as the driver parses it off the wire (`Value::ServerError`).
    fn server_reply(reply: &str) -> Value {
        redis::parse_redis_value(reply.as_bytes()).unwrap()
    }

    /// The error a single command gets for `reply`.
    fn command_error(reply: &str) -> RedisError {
        server_reply(reply).extract_error().unwrap_err()
    }

    fn is_unavailable(e: RedisError) -> bool {
        match redis_error("compare_and_swap", e) {
            StoreError::Unavailable { .. } => true,
            StoreError::Backend { .. } => false,
            other => panic!("a driver error became {other:?}"),
        }
    }

    #[test]
    fn failover_and_restart_replies_are_unavailable() {
        for reply in RETRYABLE_REPLIES {
            assert!(is_unavailable(command_error(reply)), "{reply}");
        }
        assert!(!is_unavailable(command_error(FATAL_REPLY)));
        assert!(!is_unavailable(command_error("-NOPERM no permissions\r\n")));
    }

    #[test]
    fn failover_kinds_built_by_the_driver_are_unavailable() {
        for kind in [
            ServerErrorKind::ReadOnly,
            ServerErrorKind::BusyLoading,
            ServerErrorKind::MasterDown,
            ServerErrorKind::TryAgain,
            ServerErrorKind::ClusterDown,
        ] {
            let e = RedisError::from((ErrorKind::Server(kind), "failover"));
            assert!(is_unavailable(e), "{kind:?}");
        }
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_unavailable(io));
        let script = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "ERR"));
        assert!(!is_unavailable(script));
        let types = RedisError::from((ErrorKind::UnexpectedReturnType, "not an integer"));
        assert!(!is_unavailable(types));
    }

    /// A connection that answers every pipeline with fixed replies.
    struct Replies(Vec<Value>);

    impl redis::aio::ConnectionLike for Replies {
        fn req_packed_command<'a>(
            &'a mut self,
            _: &'a redis::Cmd,
        ) -> redis::RedisFuture<'a, Value> {
            Box::pin(async { Err((ErrorKind::Client, "pipelines only").into()) })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a redis::Pipeline,
            _: usize,
            _: usize,
        ) -> redis::RedisFuture<'a, Vec<Value>> {
            let replies = self.0.clone();
            Box::pin(async move { Ok(replies) })
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    /// The error of a two-command pipeline (as `due` and `list` send) answered with `replies`.
    async fn pipeline_error(replies: [&str; 2]) -> RedisError {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYLEX").arg("a").arg("-").arg("+");
        pipe.cmd("ZRANGEBYLEX").arg("b").arg("-").arg("+");
        let mut conn = Replies(replies.map(server_reply).to_vec());
        pipe.query_async::<Vec<Vec<Vec<u8>>>>(&mut conn)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn failed_pipelines_are_classified_by_every_reply() {
        for reply in RETRYABLE_REPLIES {
            assert!(
                is_unavailable(pipeline_error([reply, reply]).await),
                "{reply}"
            );
        }
        // Retryable only if every command failed for a reason a retry can fix.
        let [loading, oom] = [RETRYABLE_REPLIES[1], RETRYABLE_REPLIES[6]];
        assert!(is_unavailable(pipeline_error([oom, loading]).await));
        assert!(!is_unavailable(
            pipeline_error([loading, FATAL_REPLY]).await
        ));
        assert!(!is_unavailable(pipeline_error([FATAL_REPLY, oom]).await));
    }
}
