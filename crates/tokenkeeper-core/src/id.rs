//! `InstallationId`: the validated key of one installation.
//!
//! Every backend uses the id verbatim as (part of) a key, and every error names it, so the only
//! way to get one is the fallible constructor that enforces the rules below. Several
//! installations may belong to the same provider account; the id is the application's own name
//! for one completed authorization, not the account.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest id accepted, in bytes of UTF-8.
pub const MAX_ID_BYTES: usize = 200;

/// The key of one installation: 1 to [`MAX_ID_BYTES`] bytes of UTF-8 without control
/// characters, and (for new ids) without invisible or direction-changing characters
/// (zero-width, bidi controls, BOM, soft hyphen, tag characters, variation selectors): they
/// would let one id pass for another in logs and user interfaces.
///
/// Any other printable text is allowed, including `:`, `{`, `}`, `/`, `%` and non-ASCII letters;
/// backends must store it unchanged. Ids read back from a store ([`InstallationId::from_bytes`],
/// deserialization) are held to the rules older versions wrote them under (no control
/// characters), so an id stored before the invisible-character rule stays readable.
///
/// ```
/// use tokenkeeper_core::InstallationId;
///
/// let id = InstallationId::new("workspace-42/install-1").unwrap();
/// assert_eq!(id.as_str(), "workspace-42/install-1");
/// assert!(InstallationId::new("").is_err());
/// assert!(InstallationId::new("bad\nid").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct InstallationId(String);

impl<'de> Deserialize<'de> for InstallationId {
    /// Stored data: the rules ids were written under (see the type).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::stored(text).map_err(serde::de::Error::custom)
    }
}

/// Why a string is not a valid [`InstallationId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInstallationId {
    /// The id was empty.
    #[error(
        "an installation id must not be empty; use the application's own key for the installation"
    )]
    Empty,
    /// The id was longer than [`MAX_ID_BYTES`].
    #[error(
        "an installation id may be at most {MAX_ID_BYTES} bytes of UTF-8, this one is {len} bytes; use a shorter key (a hash of a long one works)"
    )]
    TooLong {
        /// Length of the rejected id in bytes.
        len: usize,
    },
    /// The id contained a control character (newline, tab, NUL, ...).
    #[error(
        "an installation id must not contain control characters; found U+{code:04X} at byte {at}"
    )]
    ControlCharacter {
        /// Byte offset of the offending character.
        at: usize,
        /// Its code point.
        code: u32,
    },
    /// An invisible or direction-changing character (zero-width, bidi control, BOM, soft
    /// hyphen): it would let one id pass for another in logs and user interfaces.
    #[error(
        "an installation id must not contain invisible or direction-changing characters (U+{code:04X} at byte {at}); they let one id pass for another in logs"
    )]
    InvisibleCharacter {
        /// Byte offset of the character.
        at: usize,
        /// Its code point.
        code: u32,
    },
    /// The bytes were not UTF-8.
    #[error("an installation id must be valid UTF-8 (invalid byte sequence at byte {at})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        at: usize,
    },
}

impl InstallationId {
    /// Validates a new `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidInstallationId> {
        let id = Self::stored(id.into())?;
        if let Some((at, c)) = id.0.char_indices().find(|(_, c)| invisible(*c)) {
            return Err(InvalidInstallationId::InvisibleCharacter {
                at,
                code: u32::from(c),
            });
        }
        Ok(id)
    }

    /// The rules an id read back from a store is held to: those of every version that wrote
    /// one (length, no control characters).
    fn stored(id: String) -> Result<Self, InvalidInstallationId> {
        if id.is_empty() {
            return Err(InvalidInstallationId::Empty);
        }
        if id.len() > MAX_ID_BYTES {
            return Err(InvalidInstallationId::TooLong { len: id.len() });
        }
        if let Some((at, c)) = id.char_indices().find(|(_, c)| c.is_control()) {
            return Err(InvalidInstallationId::ControlCharacter {
                at,
                code: u32::from(c),
            });
        }
        Ok(Self(id))
    }

    /// Validates raw bytes as read from a store (or from a state this library signed) and
    /// wraps them, under the rules stored ids were written under (see the type).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidInstallationId> {
        let text = std::str::from_utf8(bytes).map_err(|e| InvalidInstallationId::NotUtf8 {
            at: e.valid_up_to(),
        })?;
        Self::stored(text.to_owned())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The format characters (Unicode category Cf) that are invisible or change text direction.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{180B}'..='\u{180F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FFA0}'
            | '\u{E0000}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

impl TryFrom<String> for InstallationId {
    type Error = InvalidInstallationId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<&str> for InstallationId {
    type Error = InvalidInstallationId;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<InstallationId> for String {
    fn from(id: InstallationId) -> Self {
        id.0
    }
}

impl std::str::FromStr for InstallationId {
    type Err = InvalidInstallationId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for InstallationId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstallationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InstallationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstallationId({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_boundaries_and_odd_characters() {
        assert!(InstallationId::new("a").is_ok());
        assert!(InstallationId::new("x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(InstallationId::new("ünïcødé/{tag}:%20 ok").is_ok());
    }

    #[test]
    fn invisible_and_direction_changing_characters_are_refused() {
        // Right-to-left override, zero-width space, zero-width joiner, BOM, soft hyphen,
        // isolates: each makes an id look like another in logs and UIs.
        for c in [
            '\u{202E}',
            '\u{200B}',
            '\u{200D}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{2066}',
            '\u{061C}',
            '\u{E0041}',
            '\u{FE0F}',
            '\u{3164}',
        ] {
            let id = format!("workspace{c}-1");
            match InstallationId::new(id) {
                Err(InvalidInstallationId::InvisibleCharacter { at: 9, code }) => {
                    assert_eq!(code, u32::from(c));
                }
                other => panic!("U+{:04X}: {other:?}", u32::from(c)),
            }
            // Stored by an older version: still readable, so one row never hides the rest.
            let stored = format!("workspace{c}-1");
            let read = InstallationId::from_bytes(stored.as_bytes()).unwrap();
            assert_eq!(read.as_str(), stored);
            let json = serde_json::to_string(&stored).unwrap();
            let back: InstallationId = serde_json::from_str(&json).unwrap();
            assert_eq!(back, read);
        }
    }

    #[test]
    fn rejects_with_typed_reasons() {
        assert_eq!(InstallationId::new(""), Err(InvalidInstallationId::Empty));
        assert_eq!(
            InstallationId::new("x".repeat(MAX_ID_BYTES + 1)),
            Err(InvalidInstallationId::TooLong { len: 201 })
        );
        // 'é' is two bytes: 100 of them are 200 bytes, 101 are too many.
        assert!(InstallationId::new("é".repeat(100)).is_ok());
        assert!(InstallationId::new("é".repeat(101)).is_err());
        assert_eq!(
            InstallationId::new("ab\tc"),
            Err(InvalidInstallationId::ControlCharacter { at: 2, code: 9 })
        );
        assert_eq!(
            InstallationId::new("\u{0}"),
            Err(InvalidInstallationId::ControlCharacter { at: 0, code: 0 })
        );
        assert_eq!(
            InstallationId::from_bytes(b"ok\xffno"),
            Err(InvalidInstallationId::NotUtf8 { at: 2 })
        );
    }

    #[test]
    fn serde_validates() {
        let bad: Result<InstallationId, _> = serde_json::from_str("\"a\\u0007b\"");
        assert!(bad.is_err());
        let good: InstallationId = serde_json::from_str("\"a:b\"").unwrap();
        assert_eq!(good.as_str(), "a:b");
    }
}
