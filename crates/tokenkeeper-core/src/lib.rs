//! # tokenkeeper-core
//!
//! The model of tokenkeeper: one OAuth consumer installed many times, each installation with its
//! own access/refresh token pair and its own lifecycle. This crate holds the parts that know no
//! HTTP and no database:
//!
//! - [`InstallationId`], [`TokenSet`] and the secret types [`AccessToken`] / [`RefreshToken`]
//!   (their `Debug` prints `[redacted]`);
//! - [`Record`]: what a store keeps per installation: state, tokens, version, lease, failure
//!   bookkeeping and a bounded history for explaining *why*;
//! - the **pure** [`transition`] function `(Record, Event, now) -> Result<Record, IllegalTransition>`;
//! - the [`TokenStore`] trait: versioned compare-and-swap plus a due index, implemented by the
//!   memory, SQLite and Redis backends, and the conformance suite they all pass
//!   (feature `conformance`);
//! - the [`Clock`] trait with [`SystemClock`] and [`ManualClock`].
//!
//! ## Lifecycle
//!
//! ```text
//!                  Authorized (new grant or import)
//!      ┌──────────────────────────────────────────────────────────┐
//!      ▼                                                          │
//!  ┌────────┐  LeaseAcquired   ┌────────────┐  Refreshed     ┌────────┐
//!  │ Active │ ───────────────▶ │ Refreshing │ ─────────────▶ │ Active │
//!  └────────┘                  │  (lease,   │                └────────┘
//!      ▲                       │   fence)   │  LeaseReleased     ▲
//!      │       LeaseAcquired   └────────────┘ ───────────────────┘
//!      │     ┌──────────────────▲  │   │ ▲
//!  ┌─────────┴──┐ RefreshDeferred  │   │ └─ LeaseAcquired after the lease lapsed (takeover)
//!  │  Backoff   │ ◀────────────────┘   │    LeaseRenewed keeps it
//!  │ {until,    │                      │ RefreshRejected
//!  │  cause}    │                      ▼
//!  └────────────┘        ┌─────────────────────────────────┐
//!                        │ ReauthorizationRequired{reason} │ ── Authorized ─▶ Active
//!                        └─────────────────────────────────┘
//!  any live or reauth state ── Revoked ─▶ ┌─────────┐ ── Authorized ─▶ Active
//!                                         │ Revoked │
//!                                         └─────────┘
//! ```
//!
//! Every transition bumps the version by one. Terminal states (`ReauthorizationRequired`,
//! `Revoked`) are left only by `Authorized`. A lease exists only inside `Refreshing`; its
//! `fence` is the version at which it was taken, and every event under it must name that fence.
//!
//! ```
//! use std::time::Duration;
//! use tokenkeeper_core::*;
//!
//! let now = Timestamp::from_unix_secs(1_767_225_600);
//! let tokens = TokenSet::bearer(
//!     AccessToken::new("a1"),
//!     Some(RefreshToken::new("r1")),
//!     now,
//!     now.saturating_add(Duration::from_secs(7200)),
//! );
//! let id = InstallationId::new("workspace-1/install-1")?;
//! let record = Record::new(id, "bitbucket", tokens, now, now);
//!
//! let leased = record.apply(
//!     Event::LeaseAcquired { holder: LeaseHolder::new("p1:f1"), until: now.saturating_add(Duration::from_secs(30)) },
//!     now,
//! )?;
//! let fence = leased.state().lease().unwrap().fence;
//! let rejected = leased.apply(
//!     Event::RefreshRejected { fence, reason: ReauthReason::ScopesChanged, error: None },
//!     now,
//! )?;
//! assert!(rejected.state().is_terminal());
//! assert_eq!(rejected.version(), 3);
//! assert!(!format!("{rejected:?}").contains("r1"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
mod event;
mod id;
mod keycheck;
mod private_files;
mod record;
mod secret;
mod state;
mod store;
mod time;
mod token;
mod transition;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
#[cfg(feature = "encryption")]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub mod sealed;

pub use event::{
    EventCursor, EventPage, EventRetention, InvalidCursor, LifecycleEvent, LogPosition,
};
pub use id::{InstallationId, InvalidInstallationId, MAX_ID_BYTES};
pub use record::{
    CommitEvidence, DecodeError, ErrorDetail, EventKind, FailureClass, FailureStreak, HISTORY_LEN,
    HistoryEntry, RECORD_FORMAT, Record,
};
pub use secret::{AccessToken, IdToken, RefreshToken};
pub use state::{
    BackoffCause, Lease, LeaseHolder, ReauthReason, State, StateKind, UnknownStateKind,
};
pub use store::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, ListEntry, ListFilter, ListPage, NotDurable,
    Page, StateCounts, StoreError, TokenStore, UnsavedHome,
};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use token::{Scopes, TokenSet};
pub use transition::{Event, IllegalTransition, Refusal, transition};
