//! The last resort for rotated tokens the store would not take, and the drain that lets a
//! process stop without abandoning a refresh between the provider's reply and its write.
//!
//! Once the provider has rotated an installation's refresh token, the new one exists only in
//! this process's memory. A flight retries the write for `RefreshPolicy::result_write_patience`;
//! if the store still refuses, the tokens go to the unsaved-tokens [`Place`] instead of being
//! dropped: never an ephemeral or shared default, but the application's callback, a private
//! directory (its own, or the one the store keeps beside its data), or memory for a store
//! that itself keeps nothing past the process. A manager restores what it finds there when it
//! starts, and [`TokenManager::restore_unsaved`](super::TokenManager::restore_unsaved) puts
//! back what a callback kept.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokenkeeper_core::{
    InstallationId, LeaseHolder, RefreshToken, Timestamp, TokenSet, UnsavedHome,
};
use tokio::sync::Notify;

use crate::oauth::ConfigError;

/// Rotated tokens the store would not take: the only copy of an installation's new refresh
/// token. `Debug` shows no secret; keep the value itself as carefully as the store.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct UnsavedTokens {
    /// The installation.
    pub installation: InstallationId,
    /// The refresh token the flight presented (what the store still holds, unless a peer
    /// changed it since): restoring needs it to prove no peer rotated in between.
    pub presented: RefreshToken,
    /// The lease the flight held when it obtained them (`None` in files written before it
    /// was recorded): restoring over a peer's lease remembers that the peer may have
    /// presented the retired token.
    #[serde(default)]
    pub obtained_under: Option<LeaseHolder>,
    /// The tokens the provider issued.
    pub tokens: TokenSet,
    /// When the flight gave up writing them.
    pub at: Timestamp,
    /// The store's last error, in words (no secret).
    pub error: String,
}

impl fmt::Debug for UnsavedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsavedTokens")
            .field("installation", &self.installation)
            .field("tokens", &self.tokens)
            .field("at", &self.at)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// A sink the application gives (see `TokenManagerBuilder::on_unsaved_tokens`).
pub(crate) type UnsavedSink = Arc<dyn Fn(UnsavedTokens) + Send + Sync>;

/// Where the engine hands rotated tokens the store would not take: never an ephemeral or
/// shared default. The application's callback; a private directory (the application's, or
/// the one the store keeps beside its data); or, for a store that itself keeps nothing past
/// the process, memory.
pub(crate) enum Place {
    /// The application's sink.
    Callback(UnsavedSink),
    /// One file per result in this private directory; what could not be written there is
    /// held in memory meanwhile (and logged), never dropped.
    Dir(PathBuf, Mutex<Vec<UnsavedTokens>>),
    /// Held in the manager (an ephemeral store), restored by `restore_unsaved_files`.
    Memory(Mutex<Vec<UnsavedTokens>>),
}

/// One result waiting to be restored: its file (if it has one) and what it holds.
pub(crate) type Pending = (Option<PathBuf>, Result<UnsavedTokens, UnsavedFileError>);

impl Place {
    /// Chooses the place from the builder's settings and the store's home, checking a
    /// directory before anything is written there.
    pub(crate) fn choose(
        callback: Option<UnsavedSink>,
        dir: Option<PathBuf>,
        home: UnsavedHome,
    ) -> Result<Self, ConfigError> {
        match (callback, dir, home) {
            (Some(sink), _, _) => Ok(Self::Callback(sink)),
            (None, Some(dir), _) | (None, None, UnsavedHome::Dir(dir)) => {
                prepare_dir(&dir)?;
                Ok(Self::Dir(dir, Mutex::default()))
            }
            (None, None, UnsavedHome::Ephemeral) => Ok(Self::Memory(Mutex::default())),
            (None, None, _) => Err(ConfigError::OutOfRange {
                field: "unsaved_tokens_dir",
                reason: "this store cannot say where rotated tokens it would not take may be kept durably (it is shared over the network): set TokenManagerBuilder::unsaved_tokens_dir to a private directory that survives restarts (a persistent volume, not /tmp), or TokenManagerBuilder::on_unsaved_tokens to keep them your way".into(),
            }),
        }
    }

    /// Hands `unsaved` over: blocking work (the application's sink, file writes and their
    /// `fsync`) runs on the blocking pool, not on the async workers.
    pub(crate) async fn keep(&self, seal: &Seal, unsaved: UnsavedTokens) {
        match self {
            Self::Callback(sink) => {
                let sink = sink.clone();
                if tokio::task::spawn_blocking(move || sink(unsaved))
                    .await
                    .is_err()
                {
                    tracing::error!("the unsaved-tokens sink panicked");
                }
            }
            Self::Dir(dir, fallback) => {
                let (dir, seal, copy) = (dir.clone(), seal.clone(), unsaved.clone());
                let written =
                    tokio::task::spawn_blocking(move || write_file(&dir, &seal, &copy)).await;
                match written {
                    Ok(Ok(path)) => tracing::error!(
                        installation = %unsaved.installation,
                        error = %unsaved.error,
                        file = %path.display(),
                        "the provider rotated this installation's tokens but the store would not take them; they were written to this file and are restored when a manager starts (or by TokenManager::restore_unsaved_files)"
                    ),
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "the write task ended early".to_owned(),
                        };
                        tracing::error!(
                            installation = %unsaved.installation,
                            error = %unsaved.error,
                            write_error = %why,
                            "the provider rotated this installation's tokens, the store would not take them and they could not be written to the unsaved-tokens directory: they are held in memory until TokenManager::restore_unsaved_files puts them back (they are lost if this process ends first)"
                        );
                        lock(fallback).push(unsaved);
                    }
                }
            }
            Self::Memory(held) => {
                tracing::error!(
                    installation = %unsaved.installation,
                    error = %unsaved.error,
                    "the provider rotated this installation's tokens but the store would not take them; they are held in memory until TokenManager::restore_unsaved_files puts them back"
                );
                lock(held).push(unsaved);
            }
        }
    }

    /// Everything waiting to be restored, oldest first (files are read on the blocking pool).
    pub(crate) async fn pending(&self, seal: &Seal) -> Vec<Pending> {
        let (dir, held) = match self {
            Self::Callback(_) => return Vec::new(),
            Self::Memory(held) => (None, held),
            Self::Dir(dir, held) => (Some(dir.clone()), held),
        };
        let mut pending: Vec<Pending> = std::mem::take(&mut *lock(held))
            .into_iter()
            .map(|u| (None, Ok(u)))
            .collect();
        if let Some(dir) = dir {
            let seal = seal.clone();
            let files = tokio::task::spawn_blocking(move || read_dir_files(&dir, &seal)).await;
            pending.extend(files.unwrap_or_default());
        }
        pending.sort_by_key(|(_, u)| u.as_ref().map(|u| u.at).ok());
        pending
    }

    /// Whether anything waits in the directory (a quick look, at build time).
    pub(crate) fn has_files(&self) -> bool {
        match self {
            Self::Dir(dir, _) => std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| is_unsaved_file(&e.path())),
            _ => false,
        }
    }

    /// Puts back one that could not be restored yet (a file stays where it is).
    pub(crate) fn keep_pending(&self, file: Option<PathBuf>, unsaved: UnsavedTokens) {
        if let (Self::Memory(held) | Self::Dir(_, held), None) = (self, file) {
            lock(held).push(unsaved);
        }
    }

    /// Done with one: a restored file is deleted.
    pub(crate) async fn remove(&self, file: Option<PathBuf>) {
        if let Some(file) = file {
            let f = file.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || std::fs::remove_file(f)).await {
                tracing::warn!(file = %file.display(), error = %e, "could not delete a restored unsaved-tokens file");
            }
        }
    }

    /// An obsolete one (the installation holds other tokens): a file is moved to the
    /// directory's `obsolete/` folder, never deleted (the tokens may still be live at the
    /// provider, and an operator decides).
    pub(crate) async fn set_aside(&self, file: Option<PathBuf>) {
        let (Self::Dir(dir, _), Some(file)) = (self, file) else {
            return;
        };
        let aside = dir.join("obsolete");
        let moved = tokio::task::spawn_blocking(move || {
            prepare_dir(&aside).map_err(std::io::Error::other)?;
            let name = file.file_name().map(ToOwned::to_owned).unwrap_or_default();
            std::fs::rename(&file, aside.join(name))
        })
        .await;
        if let Ok(Err(e)) = moved {
            tracing::warn!(error = %e, "could not move an obsolete unsaved-tokens file aside");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A file the default sink wrote (not a temporary one, not the probe).
fn is_unsaved_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "json")
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
}

/// Reads every unsaved-tokens file of `dir`.
fn read_dir_files(dir: &Path, seal: &Seal) -> Vec<Pending> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_unsaved_file(p))
        .map(|p| {
            let read = read_file(&p, seal);
            (Some(p), read)
        })
        .collect()
}

/// What `TokenManager::restore_unsaved_files` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnsavedRestore {
    /// Landed on their installations (their files deleted).
    pub restored: usize,
    /// No longer needed: the installation holds newer tokens, was authorized again or
    /// deleted (their files deleted).
    pub obsolete: usize,
    /// Still waiting: the store failed, or the file cannot be read with this manager's
    /// keyring (left in place, named in the log).
    pub kept: usize,
}

/// How the default sink protects the files it writes.
#[derive(Clone)]
pub(crate) enum Seal {
    /// Plain JSON in a file only the owner can read (no keyring configured).
    None,
    /// Sealed with the manager's encryption keyring (feature `encryption`).
    #[cfg(feature = "encryption")]
    Keyring(Arc<tokenkeeper_core::sealed::Keyring>),
}

/// The field name the keyring binds a sealed unsaved-tokens file to.
#[cfg(feature = "encryption")]
const SEAL_FIELD: &str = "unsaved-tokens";
/// The first line of a sealed file; the second is the sealed JSON.
const SEALED_HEADER: &str = "tokenkeeper-unsaved-tokens sealed v1";

/// A number no other file name of this process used (with the process id, of any process).
fn next_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Creates `dir` (owner-only) if needed and checks that it is private.
fn prepare_dir(dir: &Path) -> Result<(), ConfigError> {
    let refuse = |reason: String| ConfigError::OutOfRange {
        field: "unsaved_tokens_dir",
        reason: format!("{}: {reason}", dir.display()),
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| refuse(format!("cannot create it ({e})")))?;
    check_private(dir).map_err(refuse)
}

/// The directory must be this user's alone: a real directory (not a symbolic link), that no
/// other user can enter, owned by the user this process writes as, in a parent no other user
/// may rename entries of (owned by this user or root, not group/world writable unless sticky). Another user able to enter
/// it could read or delete the only copy of a token, and one who owns it could swap it; such
/// a directory is refused, never repaired.
fn check_private(dir: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot read it ({e})"))?;
        if !meta.is_dir() {
            return Err("it is not a directory (a symbolic link is refused)".into());
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "its mode {mode:o} lets other users in; make it private (chmod 700)"
            ));
        }
        // Who this process writes as: the owner of a file it creates there.
        let me = tokenkeeper_core::backend::private_files::creator_uid(dir)
            .map_err(|e| format!("cannot write in it ({e})"))?;
        if me != meta.uid() {
            return Err(format!(
                "it belongs to another user (uid {}), not to the user this process writes as (uid {me})",
                meta.uid()
            ));
        }
        // The check and each write are two steps: whoever may rename entries of the parent
        // could swap this directory for their own in between.
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        if let Some(reason) =
            tokenkeeper_core::backend::private_files::replaceable_by_others(parent, me)
                .map_err(|e| format!("cannot read its parent ({e})"))?
        {
            return Err(format!("its parent {}: {reason}", parent.display()));
        }
    }
    Ok(())
}

fn write_file(dir: &Path, seal: &Seal, unsaved: &UnsavedTokens) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    // Checked at build; checked again, since it may have changed hands meanwhile.
    check_private(dir).map_err(std::io::Error::other)?;
    let json = serde_json::to_string(unsaved).map_err(std::io::Error::other)?;
    let contents = match seal {
        Seal::None => json,
        #[cfg(feature = "encryption")]
        Seal::Keyring(keyring) => {
            let sealed = keyring
                .seal(&unsaved.installation, SEAL_FIELD, &json)
                .map_err(std::io::Error::other)?;
            format!(
                "{SEALED_HEADER}\n{}\n{sealed}",
                unsaved.installation.as_str()
            )
        }
    };
    let name = format!(
        "{}-{}-{}.json",
        unsaved
            .installation
            .as_str()
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
        unsaved.at.unix_nanos(),
        next_seq()
    );
    let path = dir.join(&name);
    // Written whole under a temporary name, then renamed, then the directory synced: after a
    // crash the file is either complete or absent, never half there.
    let temp = dir.join(format!(".{name}.{}.tmp", next_seq()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    drop(file);
    if path.exists() {
        std::fs::remove_file(&temp)?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists", path.display()),
        ));
    }
    std::fs::rename(&temp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

/// Why an unsaved-tokens file could not be read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnsavedFileError {
    /// The file could not be read.
    #[error("cannot read the unsaved-tokens file: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not one tokenkeeper wrote (or it was altered).
    #[error("the unsaved-tokens file is not one tokenkeeper wrote, or it was altered: {0}")]
    Malformed(String),
    /// The file is sealed and this manager has no keyring that opens it.
    #[error(
        "the unsaved-tokens file is sealed and this manager cannot open it ({0}); build it with the same encryption keyring"
    )]
    Sealed(String),
}

/// Reads a file the default sink wrote.
pub(crate) fn read_file(
    path: &std::path::Path,
    seal: &Seal,
) -> Result<UnsavedTokens, UnsavedFileError> {
    let text = std::fs::read_to_string(path)?;
    let json = match text.strip_prefix(SEALED_HEADER) {
        #[cfg(feature = "encryption")]
        None if matches!(seal, Seal::Keyring(_)) => {
            return Err(UnsavedFileError::Malformed(
                "the file is not sealed, but this manager has an encryption keyring: it restores only sealed files (an unsealed one could have been planted)".into(),
            ));
        }
        None => text,
        Some(rest) => {
            let mut lines = rest.trim_start_matches('\n').splitn(2, '\n');
            let (Some(id), Some(sealed)) = (lines.next(), lines.next()) else {
                return Err(UnsavedFileError::Malformed("no sealed payload".into()));
            };
            let id =
                InstallationId::new(id).map_err(|e| UnsavedFileError::Malformed(e.to_string()))?;
            match seal {
                #[cfg(feature = "encryption")]
                Seal::Keyring(keyring) => keyring
                    .open(&id, SEAL_FIELD, sealed.trim())
                    .map_err(|e| UnsavedFileError::Sealed(e.to_string()))?,
                Seal::None => {
                    let _ = (id, sealed);
                    return Err(UnsavedFileError::Sealed("no keyring configured".into()));
                }
            }
        }
    };
    serde_json::from_str(&json).map_err(|e| UnsavedFileError::Malformed(e.to_string()))
}

/// Counts the flights that hold a lease (from taking it to their last write) and refuses new
/// ones once the manager is shutting down.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    closing: AtomicBool,
    idle: Notify,
}

/// One flight under a lease; dropping it ends the flight's share of the drain.
pub(crate) struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    /// Enters a flight, unless the manager is shutting down.
    pub(crate) fn enter(&self) -> Option<InFlightGuard<'_>> {
        self.count.fetch_add(1, Ordering::SeqCst);
        let guard = InFlightGuard(self);
        (!self.closing.load(Ordering::SeqCst)).then_some(guard)
    }

    /// Whether `drain` has begun.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Refuses new flights and waits until every flight in progress has written its result.
    pub(crate) async fn drain(&self) {
        self.closing.store(true, Ordering::SeqCst);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
