//! The signed authorization `state`: a pure codec with no I/O.
//!
//! The state is an HMAC-SHA256-signed token holding its expiry, a random nonce (the flow's
//! id), what the flow is for (a new installation, or a re-authorization of a named one), the
//! installation id and a hash of the flow's [`BrowserBinding`](super::binding::BrowserBinding).
//! It is signed with a dedicated state key ([`StateKey`]) whose id it carries, so a fleet can
//! rotate keys; any process with the keys can verify a state another process issued, and a
//! tampered or foreign state fails the MAC check (compared in constant time).
//!
//! The state alone completes nothing: the callback must also bring the browser binding whose
//! hash it carries, and the store's flow claim lets the code be exchanged once.
//!
//! The MAC also covers the consumer the state was issued for (a hash of its profile name,
//! client id, redirect URI and token endpoint, not carried in the state): a state key shared by
//! two consumers cannot carry a flow from one to the other (review N1, the mix-up attack of RFC
//! 9700 §4.4), whatever callback URL the state comes back to.
//!
//! A re-authorization begun through the store (`TokenManager::begin_reauthorization`) also
//! carries what the installation's record was when the flow began ([`Expect`]: absent, or its
//! incarnation, authorization generation and whether it was revoked), so a flow begun before
//! a revocation, a deletion or another re-authorization cannot undo it (review N3).
//!
//! The body is encrypted, not only authenticated (review N12): the state travels in the
//! authorization URL, into the provider's logs, browser history, proxies and `Referer`
//! headers, and an installation id an application chose ("acme-corp", an e-mail address)
//! must not travel with it. XChaCha20-Poly1305 under a key derived from the state key, with
//! the consumer's tag, the version and the key id as associated data; the 24-byte nonce is
//! derived from the flow's random nonce (so a state decodes and re-encodes to the same text).
//!
//! Layout before base64url: `version 5 (1) | key id (1) | AEAD nonce (24) | encrypted body |
//! tag (16)`, the body being `expires_at unix nanos (8, big endian) | nonce (16) | purpose (1)
//! | binding hash (32) | expect (1: 0 unknown, 1 absent, 2 present) [| created unix nanos (8)
//! | generation (8) | revoked (1), when present] | id length (1) | id`. Version 4 (still
//! verified during a rolling deploy, never issued) carried that body in clear followed by an
//! HMAC-SHA256 (32); versions 2 and 3 also had no expect byte.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokenkeeper_core::{InstallationId, Timestamp};

use crate::oauth::keys::StateKey;

type HmacSha256 = Hmac<Sha256>;

const STATE_VERSION: u8 = 5;
/// The signed format before the body was encrypted: still verified (not issued), so flows
/// begun by a process of the previous release complete during a rolling deploy.
const V4: u8 = 4;
/// The format before states carried an [`Expect`]: still verified, likewise.
const V3: u8 = 3;
/// The format before states were bound to their consumer: still verified, likewise.
const PREVIOUS_VERSION: u8 = 2;
/// The length of a consumer's tag ([`consumer tags`](encode) are SHA-256 hashes).
pub(crate) const CONSUMER_TAG_LEN: usize = 32;
/// Bytes of randomness in each state.
pub(crate) const NONCE_LEN: usize = 16;
const HASH_LEN: usize = 32;
const MAC_LEN: usize = 32;
const AEAD_NONCE_LEN: usize = 24;
const AEAD_TAG_LEN: usize = 16;
/// The shortest body: no expectation details, an id of one byte.
const MIN_BODY_LEN: usize = 8 + NONCE_LEN + 1 + HASH_LEN + 1 + 1 + 1;
/// Bytes before the installation id in versions 2 and 3 (version 4 adds the expectation).
const HEAD_LEN: usize = 1 + 1 + 8 + NONCE_LEN + 1 + HASH_LEN + 1;

/// What a flow expects the installation's record to be when it completes, as it was when the
/// flow began (review N3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Not known (a flow begun without reading the store, or by an older release).
    Unknown,
    /// There was no record.
    Absent,
    /// This incarnation at this authorization generation, revoked or not.
    Present {
        created: Timestamp,
        generation: u64,
        revoked: bool,
    },
}

/// What a flow is for, signed into its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A new installation: its id must not exist yet.
    Install,
    /// A new authorization of a chosen id (existing or not).
    Reauthorize,
}

/// What a state says, once its signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateClaims {
    pub(crate) installation: InstallationId,
    pub(crate) nonce: [u8; NONCE_LEN],
    pub(crate) expires_at: Timestamp,
    pub(crate) purpose: Purpose,
    pub(crate) binding_hash: [u8; HASH_LEN],
    pub(crate) expect: Expect,
}

/// Why a state was refused: it is not one these keys signed (or not one at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Forged;

fn mac(key: &StateKey, consumer: &[u8; CONSUMER_TAG_LEN]) -> HmacSha256 {
    // HMAC accepts keys of any length: this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key.bytes()).unwrap_or_else(|_| unreachable!());
    m.update(b"tokenkeeper/state/v4/");
    m.update(consumer);
    m
}

/// The MAC of version 3 (consumer-bound, no expectation).
fn mac_v3(key: &StateKey, consumer: &[u8; CONSUMER_TAG_LEN]) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key.bytes()).unwrap_or_else(|_| unreachable!());
    m.update(b"tokenkeeper/state/v3/");
    m.update(consumer);
    m
}

/// The MAC of the previous format (no consumer in it).
fn previous_mac(key: &StateKey) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key.bytes()).unwrap_or_else(|_| unreachable!());
    m.update(b"tokenkeeper/state/v2/");
    m
}

/// The claims as the body every format since version 4 carries (after version and key id).
fn body(claims: &StateClaims) -> Vec<u8> {
    let id = claims.installation.as_str().as_bytes();
    let mut bytes = Vec::with_capacity(MIN_BODY_LEN + 17 + id.len());
    bytes.extend_from_slice(&claims.expires_at.unix_nanos().to_be_bytes());
    bytes.extend_from_slice(&claims.nonce);
    bytes.push(match claims.purpose {
        Purpose::Install => 0,
        Purpose::Reauthorize => 1,
    });
    bytes.extend_from_slice(&claims.binding_hash);
    match claims.expect {
        Expect::Unknown => bytes.push(0),
        Expect::Absent => bytes.push(1),
        Expect::Present {
            created,
            generation,
            revoked,
        } => {
            bytes.push(2);
            bytes.extend_from_slice(&created.unix_nanos().to_be_bytes());
            bytes.extend_from_slice(&generation.to_be_bytes());
            bytes.push(u8::from(revoked));
        }
    }
    // Installation ids are at most 200 bytes (`MAX_ID_BYTES`), so the length fits a byte.
    bytes.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    bytes.extend_from_slice(id);
    bytes
}

/// An HMAC-SHA256 under the state key over a label and `parts`: the derivations below.
fn derive(key: &StateKey, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key.bytes()).unwrap_or_else(|_| unreachable!());
    m.update(label);
    for part in parts {
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

/// The cipher of version 5: its key derived from the state key, never the state key itself.
fn cipher(key: &StateKey) -> XChaCha20Poly1305 {
    let k = derive(key, b"tokenkeeper/state/v5/encryption", &[]);
    XChaCha20Poly1305::new((&k).into())
}

/// The AEAD nonce of a state: derived from its flow's random nonce, so each state has its
/// own and encoding is deterministic.
fn aead_nonce(key: &StateKey, flow_nonce: &[u8]) -> [u8; AEAD_NONCE_LEN] {
    let d = derive(key, b"tokenkeeper/state/v5/nonce", &[flow_nonce]);
    let mut n = [0u8; AEAD_NONCE_LEN];
    n.copy_from_slice(&d[..AEAD_NONCE_LEN]);
    n
}

/// The associated data of version 5: the consumer, the version and the key id.
fn aad(consumer: &[u8; CONSUMER_TAG_LEN], key_id: u8) -> Vec<u8> {
    let mut a = b"tokenkeeper/state/v5/".to_vec();
    a.extend_from_slice(consumer);
    a.extend_from_slice(&[STATE_VERSION, key_id]);
    a
}

/// Encrypts `claims` with `key` for the consumer whose tag is `consumer` into a URL-safe
/// state string.
pub(crate) fn encode(
    key: &StateKey,
    consumer: &[u8; CONSUMER_TAG_LEN],
    claims: &StateClaims,
) -> String {
    let body = body(claims);
    let nonce = aead_nonce(key, &claims.nonce);
    let aad = aad(consumer, key.id());
    // Encryption fails only on a message longer than the cipher allows (gigabytes).
    let sealed = cipher(key)
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &body,
                aad: &aad,
            },
        )
        .unwrap_or_default();
    let mut bytes = Vec::with_capacity(2 + AEAD_NONCE_LEN + sealed.len());
    bytes.extend_from_slice(&[STATE_VERSION, key.id()]);
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&sealed);
    URL_SAFE_NO_PAD.encode(&bytes)
}

/// The signed, unencrypted version 4 (verified, not issued; for tests and the fuzz target).
#[cfg(any(test, feature = "__fuzz"))]
fn encode_v4(key: &StateKey, consumer: &[u8; CONSUMER_TAG_LEN], claims: &StateClaims) -> String {
    let mut bytes = vec![V4, key.id()];
    bytes.extend_from_slice(&body(claims));
    let mut m = mac(key, consumer);
    m.update(&bytes);
    bytes.extend_from_slice(&m.finalize().into_bytes());
    URL_SAFE_NO_PAD.encode(&bytes)
}

/// Checks `state` under the key its id names (among `keys`), for the consumer whose tag is
/// `consumer`, and reads its claims. Expiry and binding are the caller's to judge.
pub(crate) fn decode(
    keys: &[StateKey],
    consumer: &[u8; CONSUMER_TAG_LEN],
    state: &str,
) -> Result<StateClaims, Forged> {
    let bytes = URL_SAFE_NO_PAD.decode(state.trim()).map_err(|_| Forged)?;
    let (&version, rest) = bytes.split_first().ok_or(Forged)?;
    let (&key_id, rest) = rest.split_first().ok_or(Forged)?;
    let key = keys.iter().find(|k| k.id() == key_id).ok_or(Forged)?;
    if version == STATE_VERSION {
        return decrypt(key, consumer, rest);
    }
    if bytes.len() < HEAD_LEN + 1 + MAC_LEN || !matches!(version, V4 | V3 | PREVIOUS_VERSION) {
        return Err(Forged);
    }
    let (signed, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut m = match version {
        PREVIOUS_VERSION => previous_mac(key),
        V4 => mac(key, consumer),
        _ => mac_v3(key, consumer),
    };
    m.update(signed);
    m.verify_slice(tag).map_err(|_| Forged)?;
    parse(&signed[2..], version == V4)
}

/// Opens a version 5 state's `nonce | ciphertext | tag` and reads its body. The nonce must be
/// the one its claims derive, so every accepted state is the one `encode` makes.
fn decrypt(
    key: &StateKey,
    consumer: &[u8; CONSUMER_TAG_LEN],
    sealed: &[u8],
) -> Result<StateClaims, Forged> {
    if sealed.len() < AEAD_NONCE_LEN + MIN_BODY_LEN + AEAD_TAG_LEN {
        return Err(Forged);
    }
    let (nonce, ciphertext) = sealed.split_at(AEAD_NONCE_LEN);
    let aad = aad(consumer, key.id());
    let body = cipher(key)
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| Forged)?;
    let claims = parse(&body, true)?;
    if aead_nonce(key, &claims.nonce) != nonce {
        return Err(Forged);
    }
    Ok(claims)
}

/// Reads the claims from a body (with the expectation byte from version 4 on).
fn parse(body: &[u8], with_expect: bool) -> Result<StateClaims, Forged> {
    let mut at = 0;
    let mut take = |n: usize| {
        let part = body.get(at..at + n).ok_or(Forged)?;
        at += n;
        Ok::<_, Forged>(part)
    };
    let expires = i64::from_be_bytes(take(8)?.try_into().map_err(|_| Forged)?);
    let nonce: [u8; NONCE_LEN] = take(NONCE_LEN)?.try_into().map_err(|_| Forged)?;
    let purpose = match take(1)?[0] {
        0 => Purpose::Install,
        1 => Purpose::Reauthorize,
        _ => return Err(Forged),
    };
    let binding_hash: [u8; HASH_LEN] = take(HASH_LEN)?.try_into().map_err(|_| Forged)?;
    let expect = if with_expect {
        match take(1)?[0] {
            0 => Expect::Unknown,
            1 => Expect::Absent,
            2 => Expect::Present {
                created: Timestamp::from_unix_nanos(i64::from_be_bytes(
                    take(8)?.try_into().map_err(|_| Forged)?,
                )),
                generation: u64::from_be_bytes(take(8)?.try_into().map_err(|_| Forged)?),
                revoked: match take(1)?[0] {
                    0 => false,
                    1 => true,
                    _ => return Err(Forged),
                },
            },
            _ => return Err(Forged),
        }
    } else {
        Expect::Unknown
    };
    let id_len = usize::from(take(1)?[0]);
    let id_bytes = take(id_len)?;
    if at != body.len() {
        return Err(Forged);
    }
    let installation = InstallationId::from_bytes(id_bytes).map_err(|_| Forged)?;
    Ok(StateClaims {
        installation,
        nonce,
        expires_at: Timestamp::from_unix_nanos(expires),
        purpose,
        binding_hash,
        expect,
    })
}

/// Equality of two hashes in time independent of where they differ.
pub(crate) fn same_hash(a: &[u8; HASH_LEN], b: &[u8; HASH_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The state parser's properties on arbitrary input (the fuzz target's body): `data` is
/// taken as a state string, and also as the body of a version 4 state signed with a fixed
/// key and of a version 5 state encrypted with it, so the parser past the MAC and AEAD checks
/// is reached too. Never panics unless a property breaks: whatever decodes re-encodes to the
/// same text in its format.
#[cfg(feature = "__fuzz")]
pub fn fuzz_decode(data: &[u8]) {
    let Ok(key) = StateKey::new(
        7,
        (0u8..32)
            .map(|b| b.wrapping_mul(37) ^ 0x5a)
            .collect::<Vec<_>>(),
    ) else {
        return;
    };
    let keys = std::slice::from_ref(&key);
    let consumer = [3u8; CONSUMER_TAG_LEN];
    let text = String::from_utf8_lossy(data);
    let version = URL_SAFE_NO_PAD
        .decode(text.trim())
        .ok()
        .and_then(|b| b.first().copied());
    if let Ok(claims) = decode(keys, &consumer, &text) {
        match version {
            Some(STATE_VERSION) => assert_eq!(encode(&key, &consumer, &claims), text.trim()),
            Some(V4) => assert_eq!(encode_v4(&key, &consumer, &claims), text.trim()),
            _ => {}
        }
    }
    let mut signed = vec![V4, key.id()];
    signed.extend_from_slice(data);
    let mut m = mac(&key, &consumer);
    m.update(&signed);
    signed.extend_from_slice(&m.finalize().into_bytes());
    let text = URL_SAFE_NO_PAD.encode(&signed);
    if let Ok(claims) = decode(keys, &consumer, &text) {
        assert_eq!(
            encode_v4(&key, &consumer, &claims),
            text,
            "a signed state round-trips"
        );
    }
    let flow_nonce = data.get(8..8 + NONCE_LEN).unwrap_or_default();
    let nonce = aead_nonce(&key, flow_nonce);
    let Ok(sealed) = cipher(&key).encrypt(
        XNonce::from_slice(&nonce),
        Payload {
            msg: data,
            aad: &aad(&consumer, key.id()),
        },
    ) else {
        return;
    };
    let mut bytes = vec![STATE_VERSION, key.id()];
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&sealed);
    let text = URL_SAFE_NO_PAD.encode(&bytes);
    if let Ok(claims) = decode(keys, &consumer, &text) {
        assert_eq!(
            encode(&key, &consumer, &claims),
            text,
            "an encrypted state round-trips"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u8) -> StateKey {
        StateKey::generate(id).unwrap()
    }

    const A: [u8; CONSUMER_TAG_LEN] = [1; CONSUMER_TAG_LEN];

    fn claims() -> StateClaims {
        StateClaims {
            installation: InstallationId::new("inst-1").unwrap(),
            nonce: [7; NONCE_LEN],
            expires_at: Timestamp::from_unix_secs(1_800_000_000),
            purpose: Purpose::Reauthorize,
            binding_hash: [9; HASH_LEN],
            expect: Expect::Present {
                created: Timestamp::from_unix_secs(1_700_000_000),
                generation: 3,
                revoked: false,
            },
        }
    }

    /// Review N3: what the record was when the flow began survives the round trip, in each
    /// of its forms.
    #[test]
    fn the_expectation_round_trips() {
        let k = key(1);
        for expect in [
            Expect::Unknown,
            Expect::Absent,
            Expect::Present {
                created: Timestamp::from_unix_nanos(-5),
                generation: u64::MAX,
                revoked: true,
            },
        ] {
            let c = StateClaims { expect, ..claims() };
            let text = encode(&k, &A, &c);
            assert_eq!(decode(std::slice::from_ref(&k), &A, &text), Ok(c));
        }
    }

    /// A version 3 state (no expectation) from a process of the previous release verifies,
    /// expecting nothing.
    #[test]
    fn a_version_3_state_still_verifies() {
        let k = key(1);
        let c = StateClaims {
            expect: Expect::Unknown,
            ..claims()
        };
        let mut bytes = URL_SAFE_NO_PAD.decode(encode_v4(&k, &A, &c)).unwrap();
        bytes.truncate(bytes.len() - MAC_LEN);
        bytes.remove(HEAD_LEN - 1); // the expect byte (0) sits where v3's id length was
        bytes[0] = V3;
        let mut m = mac_v3(&k, &A);
        m.update(&bytes);
        bytes.extend_from_slice(&m.finalize().into_bytes());
        let v3 = URL_SAFE_NO_PAD.encode(&bytes);
        assert_eq!(decode(std::slice::from_ref(&k), &A, &v3), Ok(c));
    }

    #[test]
    fn round_trips_under_its_key_and_after_rotation() {
        let (old, new) = (key(1), key(2));
        let text = encode(&old, &A, &claims());
        assert_eq!(decode(std::slice::from_ref(&old), &A, &text), Ok(claims()));
        assert_eq!(
            decode(&[new.clone(), old.clone()], &A, &format!("  {text}\n")),
            Ok(claims())
        );
        assert_eq!(
            decode(std::slice::from_ref(&new), &A, &text),
            Err(Forged),
            "retired key"
        );
        // A key with the same id but other bytes does not verify it either.
        assert_eq!(decode(&[key(1)], &A, &text), Err(Forged));
    }

    #[test]
    fn refuses_tampering_and_garbage() {
        let k = key(1);
        let keys = std::slice::from_ref(&k);
        let text = encode(&k, &A, &claims());
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            assert_eq!(
                decode(keys, &A, &URL_SAFE_NO_PAD.encode(&bytes)),
                Err(Forged),
                "byte {i}"
            );
            bytes[i] ^= 1;
        }
        for cut in 0..text.len() {
            assert_eq!(decode(keys, &A, &text[..cut]), Err(Forged), "cut at {cut}");
        }
        assert_eq!(decode(keys, &A, "not base64 !"), Err(Forged));
        assert_eq!(decode(&[], &A, &text), Err(Forged));
    }

    /// Review N1: a state issued for one consumer does not verify for another, even under the
    /// same key (a state key shared by two consumers cannot carry a flow across).
    #[test]
    fn a_state_is_bound_to_its_consumer() {
        let k = key(1);
        let text = encode(&k, &A, &claims());
        let b = [2u8; CONSUMER_TAG_LEN];
        assert_eq!(decode(std::slice::from_ref(&k), &b, &text), Err(Forged));
        assert_eq!(decode(std::slice::from_ref(&k), &A, &text), Ok(claims()));
    }

    /// A state of the previous format (issued by a process of the previous release during a
    /// rolling deploy) still verifies; it carries no consumer.
    #[test]
    fn a_previous_format_state_still_verifies() {
        let k = key(1);
        let c = StateClaims {
            expect: Expect::Unknown,
            ..claims()
        };
        let text = encode_v4(&k, &A, &c);
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        bytes.truncate(bytes.len() - MAC_LEN);
        bytes.remove(HEAD_LEN - 1);
        bytes[0] = PREVIOUS_VERSION;
        let mut m = previous_mac(&k);
        m.update(&bytes);
        bytes.extend_from_slice(&m.finalize().into_bytes());
        let old = URL_SAFE_NO_PAD.encode(&bytes);
        assert_eq!(decode(std::slice::from_ref(&k), &A, &old), Ok(c.clone()));
        assert_eq!(
            decode(std::slice::from_ref(&k), &[2; CONSUMER_TAG_LEN], &old),
            Ok(c)
        );
    }

    /// Review N12: the issued state hides its body (the id most of all), a version 4 state of
    /// the previous release (signed, in clear) still verifies, and the encrypted one is bound
    /// to its consumer and key like the signed one was.
    #[test]
    fn the_body_is_encrypted_and_version_4_still_verifies() {
        let k = key(1);
        let c = StateClaims {
            installation: InstallationId::new("acme-corp").unwrap(),
            ..claims()
        };
        let text = encode(&k, &A, &c);
        let raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
        assert_eq!(raw[0], STATE_VERSION);
        assert!(!raw.windows(9).any(|w| w == b"acme-corp"));
        assert!(
            !raw.windows(NONCE_LEN).any(|w| w == c.nonce),
            "the flow nonce is hidden"
        );
        assert_eq!(encode(&k, &A, &c), text, "encoding is deterministic");
        assert_eq!(decode(std::slice::from_ref(&k), &A, &text), Ok(c.clone()));
        let v4 = encode_v4(&k, &A, &c);
        assert!(
            URL_SAFE_NO_PAD
                .decode(&v4)
                .unwrap()
                .windows(9)
                .any(|w| w == b"acme-corp")
        );
        assert_eq!(decode(std::slice::from_ref(&k), &A, &v4), Ok(c.clone()));
        assert_eq!(
            decode(std::slice::from_ref(&k), &[2; CONSUMER_TAG_LEN], &v4),
            Err(Forged)
        );
        // Another nonce for the same body (a state not made by `encode`) is refused.
        let mut other = raw.clone();
        let forged_nonce = aead_nonce(&k, &[0; NONCE_LEN]);
        other[2..2 + AEAD_NONCE_LEN].copy_from_slice(&forged_nonce);
        let body = body(&c);
        let sealed = cipher(&k)
            .encrypt(
                XNonce::from_slice(&forged_nonce),
                Payload {
                    msg: &body,
                    aad: &aad(&A, k.id()),
                },
            )
            .unwrap();
        other.truncate(2 + AEAD_NONCE_LEN);
        other.extend_from_slice(&sealed);
        assert_eq!(
            decode(
                std::slice::from_ref(&k),
                &A,
                &URL_SAFE_NO_PAD.encode(&other)
            ),
            Err(Forged)
        );
    }

    #[test]
    fn hashes_compare_by_value() {
        assert!(same_hash(&[1; 32], &[1; 32]));
        let mut b = [1; 32];
        b[31] = 0;
        assert!(!same_hash(&[1; 32], &b));
    }
}
