//! The stored value: a header line the Lua scripts read, then the record's own encoding.
//!
//! The header carries what a write script must compare without parsing the record: the
//! version, the state, the due member and (since 2026-12-08) the lease holder, hex-encoded so
//! that no holder name can break the line. Before that field existed the CAS script decoded
//! the whole record with `cjson` to find the holder (the most expensive thing Redis did per
//! refresh, about half of each script's time); values written before still carry three fields,
//! and the script falls back to decoding them.

use tokenkeeper_core::{InstallationId, Record, StoreError};

use crate::BACKEND;
use crate::keys::due_member;

/// `version \t state \t due-member \t holder-hex \n` + record bytes.
pub(crate) fn encode(record: &Record) -> Vec<u8> {
    let body = record.encode();
    let header = format!(
        "{}\t{}\t{}\t{}\n",
        record.version(),
        record.state().kind().as_str(),
        due_member(record.id(), record.due_at()),
        leased_by(record)
    );
    let mut out = Vec::with_capacity(header.len() + body.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    out
}

/// A lease holder as the header and the CAS script's argument carry it: lowercase hex of its
/// bytes, empty for none.
pub(crate) fn holder_hex(holder: Option<&str>) -> String {
    use std::fmt::Write as _;
    let bytes = holder.unwrap_or_default().as_bytes();
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The holder of `record`'s lease as the header carries it.
fn leased_by(record: &Record) -> String {
    holder_hex(record.state().lease().map(|l| l.holder.as_str()))
}

/// What can be wrong with a stored value.
#[derive(Debug, thiserror::Error)]
enum ValueFault {
    #[error("the value has no header line; it was not written by tokenkeeper")]
    NoHeader,
    #[error("the value's header line is not UTF-8; it was not written by tokenkeeper")]
    HeaderNotUtf8,
    #[error(
        "the {field} in the value's header disagrees with the record it carries; the indexes cannot be trusted for this installation"
    )]
    HeaderMismatch {
        /// The first header field that disagrees (`version`, `state`, `due` or `holder`), or
        /// `layout` when the header does not have three or four fields.
        field: &'static str,
    },
}

/// Decodes a value stored under `id`, checking the header agrees with the record.
pub(crate) fn decode(id: &InstallationId, bytes: &[u8]) -> Result<Record, StoreError> {
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| StoreError::corrupt(BACKEND, id.clone(), ValueFault::NoHeader))?;
    let header = std::str::from_utf8(&bytes[..newline])
        .map_err(|_| StoreError::corrupt(BACKEND, id.clone(), ValueFault::HeaderNotUtf8))?;
    let record = Record::decode(id, &bytes[newline + 1..])
        .map_err(|e| StoreError::corrupt(BACKEND, id.clone(), e))?;
    if let Some(field) = header_mismatch(header, &record) {
        return Err(StoreError::corrupt(
            BACKEND,
            id.clone(),
            ValueFault::HeaderMismatch { field },
        ));
    }
    Ok(record)
}

/// The first header field that disagrees with `record`, if any. Names the field only: the
/// stored header of a corrupt value is not echoed into errors.
fn header_mismatch(header: &str, record: &Record) -> Option<&'static str> {
    let mut fields = header.split('\t');
    let (Some(version), Some(state), Some(due), holder, None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Some("layout");
    };
    if version != record.version().to_string() {
        Some("version")
    } else if state != record.state().kind().as_str() {
        Some("state")
    } else if due != due_member(record.id(), record.due_at()) {
        Some("due")
    } else if holder.is_some_and(|h| h != leased_by(record)) {
        Some("holder")
    } else {
        None
    }
}
