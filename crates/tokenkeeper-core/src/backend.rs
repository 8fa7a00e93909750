//! For store authors: the helpers every `TokenStore` of this workspace uses to keep the
//! contract the same way (argument checks, pages and cursors, the event log's rows and
//! payloads, connection URLs), kept out of the crate root so the root holds the model an
//! application sees. Applications never need this module; a new store does.

pub use crate::event::{
    EventRow, check_sequence_cursor, decode_event, delete_event_payload, new_log_id,
    sequence_event, write_event_payload,
};
pub use crate::store::{BoxError, PageEntry, check_cas_arguments};

/// Whether key material looks random (the state keys, the keyring).
pub mod keycheck {
    pub use crate::keycheck::weakness;
}

/// Files only this user may read or replace (SQLite's database, the unsaved-tokens
/// directory).
pub mod private_files {
    pub use crate::private_files::*;
}

/// Connection URLs of network stores: what may be shown of them, and where they point.
pub mod url {
    /// `url` with its password replaced by `***`: the user info's password (after the first
    /// `:` before the last `@`, since a password may hold `/`, `?` or `#` unencoded) and
    /// the query parameters named in `secret_keys` (compared without case). `None` when
    /// `url` is not a `scheme://` URL, whose parts cannot be told apart.
    ///
    /// ```
    /// use tokenkeeper_core::backend::url::redact;
    /// assert_eq!(
    ///     redact("redis://app:s3cret@cache:6379/0?password=x&db=1", &["password"]).unwrap(),
    ///     "redis://app:***@cache:6379/0?password=***&db=1"
    /// );
    /// assert_eq!(redact("redis://cache:6379", &[]).unwrap(), "redis://cache:6379");
    /// assert_eq!(redact("host=db password=x", &["password"]), None);
    /// ```
    pub fn redact(url: &str, secret_keys: &[&str]) -> Option<String> {
        let scheme_end = url.find("://")?;
        let rest = &url[scheme_end + 3..];
        let shown = match rest.rfind('@') {
            Some(at) if rest[..at].contains(':') => {
                let user = rest[..at].split(':').next().unwrap_or("");
                format!("{}{user}:***{}", &url[..scheme_end + 3], &rest[at..])
            }
            _ => url.to_owned(),
        };
        let Some((base, query)) = shown.split_once('?') else {
            return Some(shown);
        };
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if secret_keys.iter().any(|s| k.eq_ignore_ascii_case(s)) => {
                    format!("{k}=***")
                }
                _ => kv.to_owned(),
            })
            .collect();
        Some(format!("{base}?{}", query.join("&")))
    }

    /// Whether `host` (a URL's host, IPv6 in brackets or not) is this machine: `localhost`
    /// or a loopback address (an IPv4-mapped one too).
    ///
    /// ```
    /// use tokenkeeper_core::backend::url::is_loopback;
    /// assert!(is_loopback("localhost") && is_loopback("127.0.0.2") && is_loopback("[::1]"));
    /// assert!(is_loopback("::ffff:127.0.0.1"));
    /// assert!(!is_loopback("10.0.0.1") && !is_loopback("cache.internal"));
    /// ```
    pub fn is_loopback(host: &str) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.eq_ignore_ascii_case("localhost")
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_loopback())
    }
}
