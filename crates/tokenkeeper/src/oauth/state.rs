//! The signed authorization `state`: a pure codec with no I/O.
//!
//! The state is not stored anywhere. It is an HMAC-SHA256-signed token holding its expiry, a
//! random nonce and the installation id; the PKCE verifier is derived from the nonce with the
//! same key. So any process with the consumer's configuration can complete an authorization
//! another process began, there is no pending-authorization table to share or clean up, and a
//! tampered or foreign state fails the MAC check (compared in constant time).
//!
//! Layout before base64url: `version (1) | expires_at unix nanos (8, big endian) | nonce (16)
//! | id length (1) | id | mac (32)`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokenkeeper_core::{InstallationId, Timestamp};

use crate::oauth::config::ConsumerConfig;

type HmacSha256 = Hmac<Sha256>;

const STATE_VERSION: u8 = 1;
/// Bytes of randomness in each state.
pub(crate) const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;

/// What a state says, once its signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateClaims {
    pub(crate) installation: InstallationId,
    pub(crate) nonce: [u8; NONCE_LEN],
    pub(crate) expires_at: Timestamp,
}

/// Why a state was refused: it is not one this key signed (or not one at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Forged;

/// The key that signs states: the configured state key, or one derived from the client secret.
pub(crate) fn signing_key(consumer: &ConsumerConfig) -> Vec<u8> {
    if let Some(key) = consumer.state_key() {
        return key.as_bytes().to_vec();
    }
    let mut mac = mac(consumer.client_secret().expose().as_bytes());
    mac.update(b"tokenkeeper/state-key/v1/");
    mac.update(consumer.client_id().as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length: this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// The PKCE verifier of the flow that `nonce` began.
pub(crate) fn pkce_verifier(key: &[u8], nonce: &[u8]) -> String {
    let mut m = mac(key);
    m.update(b"pkce/v1/");
    m.update(nonce);
    URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
}

/// Signs `claims` into a URL-safe state string.
pub(crate) fn encode(key: &[u8], claims: &StateClaims) -> String {
    let id = claims.installation.as_str().as_bytes();
    let mut bytes = Vec::with_capacity(1 + 8 + NONCE_LEN + 1 + id.len() + MAC_LEN);
    bytes.push(STATE_VERSION);
    bytes.extend_from_slice(&claims.expires_at.unix_nanos().to_be_bytes());
    bytes.extend_from_slice(&claims.nonce);
    // Installation ids are at most 200 bytes (`MAX_ID_BYTES`), so the length fits a byte.
    bytes.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    bytes.extend_from_slice(id);
    let mut m = mac(key);
    m.update(&bytes);
    bytes.extend_from_slice(&m.finalize().into_bytes());
    URL_SAFE_NO_PAD.encode(&bytes)
}

/// Checks the signature of `state` and reads its claims. Expiry is the caller's to judge.
pub(crate) fn decode(key: &[u8], state: &str) -> Result<StateClaims, Forged> {
    let bytes = URL_SAFE_NO_PAD.decode(state.trim()).map_err(|_| Forged)?;
    if bytes.len() < 1 + 8 + NONCE_LEN + 1 + 1 + MAC_LEN || bytes[0] != STATE_VERSION {
        return Err(Forged);
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut m = mac(key);
    m.update(body);
    m.verify_slice(tag).map_err(|_| Forged)?;
    let expires = i64::from_be_bytes(body[1..9].try_into().map_err(|_| Forged)?);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&body[9..9 + NONCE_LEN]);
    let id_len = usize::from(body[9 + NONCE_LEN]);
    let id_bytes = body
        .get(10 + NONCE_LEN..)
        .filter(|b| b.len() == id_len)
        .ok_or(Forged)?;
    let installation = InstallationId::from_bytes(id_bytes).map_err(|_| Forged)?;
    Ok(StateClaims {
        installation,
        nonce,
        expires_at: Timestamp::from_unix_nanos(expires),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> StateClaims {
        StateClaims {
            installation: InstallationId::new("inst-1").unwrap(),
            nonce: [7; NONCE_LEN],
            expires_at: Timestamp::from_unix_secs(1_800_000_000),
        }
    }

    #[test]
    fn round_trips_under_its_key() {
        let key = b"0123456789abcdef-state-key";
        let text = encode(key, &claims());
        assert_eq!(decode(key, &text), Ok(claims()));
        assert_eq!(decode(key, &format!("  {text}\n")), Ok(claims()));
    }

    #[test]
    fn refuses_other_keys_tampering_and_garbage() {
        let key = b"0123456789abcdef-state-key";
        let text = encode(key, &claims());
        assert_eq!(decode(b"another key of enough length", &text), Err(Forged));
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            assert_eq!(
                decode(key, &URL_SAFE_NO_PAD.encode(&bytes)),
                Err(Forged),
                "byte {i}"
            );
            bytes[i] ^= 1;
        }
        for cut in 0..text.len() {
            assert_eq!(decode(key, &text[..cut]), Err(Forged), "cut at {cut}");
        }
        assert_eq!(decode(key, "not base64 !"), Err(Forged));
    }

    #[test]
    fn the_verifier_depends_on_key_and_nonce() {
        let a = pkce_verifier(b"k1", &[1; NONCE_LEN]);
        assert_eq!(a, pkce_verifier(b"k1", &[1; NONCE_LEN]));
        assert_ne!(a, pkce_verifier(b"k2", &[1; NONCE_LEN]));
        assert_ne!(a, pkce_verifier(b"k1", &[2; NONCE_LEN]));
        assert!((43..=128).contains(&a.len()), "RFC 7636 length");
    }
}
