//! Whether key material looks random: the one check every secret key of the workspace goes
//! through (the state keys that sign authorization flows, the keyring that seals tokens), so
//! a key of zeros, a repeated pattern or a typed password is refused at configuration time
//! instead of quietly protecting nothing (review N13 for the keyring).

/// Why `key` is not acceptable as a secret key of at least `min_len` random bytes, if it is
/// not: too short, too few distinct byte values, a repeating pattern, or under 128 bits of
/// entropy by its byte frequencies.
///
/// ```
/// use tokenkeeper_core::backend::keycheck::weakness;
/// assert!(weakness(&[0u8; 32], 32).is_some());
/// assert!(weakness(b"correct horse battery staple!!!!", 32).is_some());
/// let random: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
/// assert_eq!(weakness(&random, 32), None);
/// ```
pub fn weakness(key: &[u8], min_len: usize) -> Option<String> {
    if key.len() < min_len {
        return Some(format!(
            "is {} bytes long; it must be at least {min_len} random bytes",
            key.len()
        ));
    }
    let mut counts = [0usize; 256];
    for &b in key {
        counts[usize::from(b)] += 1;
    }
    let distinct = counts.iter().filter(|&&c| c > 0).count();
    if distinct < 8 {
        return Some(format!(
            "uses only {distinct} distinct byte values: it is not random"
        ));
    }
    if (1..=key.len() / 2).any(|p| key.iter().zip(&key[p..]).all(|(a, b)| a == b)) {
        return Some("repeats a pattern: it is not random".into());
    }
    // Byte-frequency (Shannon) estimate of the key's entropy, in bits.
    let len = key.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / len;
            -p * p.log2() * len
        })
        .sum();
    if bits < 128.0 {
        return Some(format!(
            "carries about {bits:.0} bits of entropy by its byte frequencies; at least 128 are needed"
        ));
    }
    None
}
