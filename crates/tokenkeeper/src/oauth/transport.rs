//! Not a stable API: a stand-in for the network under token requests, so the deterministic
//! simulator (`tests/simulation`) runs the real engine and the real reply parsing against an
//! in-process provider, on virtual time, with faults chosen from a seed. Production code never
//! sets one; token requests then go through tokenkeeper's own `reqwest` client.

use std::time::Duration;

/// Carries a built token request and brings back the reply, or fails like a network would.
#[async_trait::async_trait]
pub trait TokenTransport: Send + Sync + std::fmt::Debug + 'static {
    /// Sends `request` (method, URL, headers and body as tokenkeeper built them).
    async fn send(&self, request: reqwest::Request) -> Result<TransportReply, TransportFailure>;
}

/// A reply as read from the wire.
#[derive(Debug)]
pub struct TransportReply {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, as a duration.
    pub retry_after: Option<Duration>,
    /// The body.
    pub body: Vec<u8>,
}

/// No reply.
#[derive(Debug)]
pub struct TransportFailure {
    /// The request may have reached the provider (a reset or a lost reply after sending),
    /// as opposed to a connection that never opened.
    pub reached_provider: bool,
}
