//! The last resort for rotated tokens the store would not take, and the drain that lets a
//! process stop without abandoning a refresh between the provider's reply and its write.
//!
//! Once the provider has rotated an installation's refresh token, the new one exists only in
//! this process's memory. A flight retries the write for `RefreshPolicy::result_write_patience`;
//! if the store still refuses, the tokens go to the [`UnsavedTokens`] sink instead of being
//! dropped, and [`TokenManager::restore_unsaved`](super::TokenManager::restore_unsaved) puts
//! them back once the store works again.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokenkeeper_core::{InstallationId, RefreshToken, Timestamp, TokenSet};
use tokio::sync::Notify;

/// Rotated tokens the store would not take: the only copy of an installation's new refresh
/// token. `Debug` shows no secret; keep the value itself as carefully as the store.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct UnsavedTokens {
    /// The installation.
    pub installation: InstallationId,
    /// The refresh token the flight presented (what the store still holds, unless a peer
    /// changed it since): restoring needs it to prove no peer rotated in between.
    pub presented: RefreshToken,
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

/// Where unsaved tokens go (see `TokenManagerBuilder::on_unsaved_tokens`).
pub(crate) type UnsavedSink = Arc<dyn Fn(UnsavedTokens) + Send + Sync>;

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

/// The default sink: one file per unsaved result in `dir` (created owner-only), sealed with
/// the manager's keyring when it has one, and an error log line naming the installation and
/// the file. `TokenManager::restore_unsaved_file` reads such a file back.
pub(crate) fn file_sink(dir: std::path::PathBuf, seal: Seal) -> UnsavedSink {
    Arc::new(
        move |unsaved: UnsavedTokens| match write_file(&dir, &seal, &unsaved) {
            Ok(path) => tracing::error!(
                installation = %unsaved.installation,
                error = %unsaved.error,
                file = %path.display(),
                "the provider rotated this installation's tokens but the store would not take them; they were written to this file: restore them with TokenManager::restore_unsaved_file once the store works"
            ),
            Err(e) => tracing::error!(
                installation = %unsaved.installation,
                error = %unsaved.error,
                dir = %dir.display(),
                write_error = %e,
                "the provider rotated this installation's tokens, the store would not take them and they could not be written to the unsaved-tokens directory either: they are lost"
            ),
        },
    )
}

fn write_file(
    dir: &std::path::Path,
    seal: &Seal,
    unsaved: &UnsavedTokens,
) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write as _;
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    #[cfg(unix)]
    {
        // An existing directory must be ours alone: another user able to enter it could
        // read or delete the only copy of a token.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
    }
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
        "{}-{}.json",
        unsaved
            .installation
            .as_str()
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
        unsaved.at.unix_nanos()
    );
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
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
