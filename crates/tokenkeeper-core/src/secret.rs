//! Secret newtypes for the bearer credentials of an installation (and the OpenID ID token).
//!
//! Tokens are credentials to customers' repositories. They are wrapped in [`secrecy`] boxes so
//! that `Debug` prints `[redacted]`, there is no `Display`, and the memory is zeroed on drop
//! (of the last clone). The box is shared (`Arc`): a clone, which every cache hit hands out, is
//! a reference count, not an allocation and a copy of the secret.
//! Reading the value takes an explicit `.secret()` call, which makes every use easy to audit.
//!
//! Serialization *does* write the value: it is the storage encoding used by the backends (and
//! sealed by the encrypting store decorator). Never serialize a token into a log.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! secret_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone)]
        pub struct $name(std::sync::Arc<SecretString>);

        impl $name {
            /// Wraps a token value.
            pub fn new(value: impl Into<String>) -> Self {
                Self(std::sync::Arc::new(SecretString::from(value.into())))
            }

            /// The token value. Every call site is a place a secret leaves its box: keep them few.
            pub fn secret(&self) -> &str {
                self.0.expose_secret()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.secret() == other.secret()
            }
        }

        impl Eq for $name {}

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.secret())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer).map(Self::new)
            }
        }
    };
}

secret_newtype!(
    /// An OAuth access token: sent as `Authorization: Bearer` to the provider's API.
    AccessToken
);
secret_newtype!(
    /// An OAuth refresh token: exchanged at the token endpoint for a new access token (and, on
    /// rotating providers, a new refresh token).
    RefreshToken
);
secret_newtype!(
    /// An OpenID Connect ID token: the signed JWT an OpenID provider returns with a code
    /// exchange, saying who the user is. tokenkeeper hands it over untouched and does not
    /// verify it; verify its signature, issuer, audience and expiry before trusting it.
    IdToken
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let t = AccessToken::new("s3cr3t-value");
        assert_eq!(format!("{t:?}"), "AccessToken([redacted])");
        assert_eq!(
            format!("{:#?}", RefreshToken::new("s3cr3t")),
            "RefreshToken([redacted])"
        );
        assert_eq!(t.secret(), "s3cr3t-value");
    }

    #[test]
    fn serde_round_trip() {
        let t = RefreshToken::new("r1");
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(s, "\"r1\"");
        assert_eq!(serde_json::from_str::<RefreshToken>(&s).unwrap(), t);
    }
}
