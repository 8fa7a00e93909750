//! The stored value: a header line the Lua scripts read, then the record's own encoding.

use tokenkeeper_core::{BoxError, InstallationId, Record, StoreError};

use crate::BACKEND;
use crate::keys::due_member;

/// `version \t state \t due-member \n` + record bytes.
pub(crate) fn encode(record: &Record) -> Vec<u8> {
    let body = record.encode();
    let header = format!(
        "{}\t{}\t{}\n",
        record.version(),
        record.state().kind().as_str(),
        due_member(record.id(), record.due_at())
    );
    let mut out = Vec::with_capacity(header.len() + body.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    out
}

/// What can be wrong with a stored value.
#[derive(Debug, thiserror::Error)]
enum ValueFault {
    #[error("the value has no header line")]
    NoHeader,
    #[error("the header line is not UTF-8")]
    HeaderNotUtf8,
    #[error("the header (version, state, due) disagrees with the record")]
    HeaderMismatch,
}

fn corrupt(id: &InstallationId, why: impl Into<BoxError>) -> StoreError {
    StoreError::corrupt(BACKEND, id.clone(), why)
}

/// Decodes a value stored under `id`, checking the header agrees with the record.
pub(crate) fn decode(id: &InstallationId, bytes: &[u8]) -> Result<Record, StoreError> {
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt(id, ValueFault::NoHeader))?;
    let header = std::str::from_utf8(&bytes[..newline])
        .map_err(|_| corrupt(id, ValueFault::HeaderNotUtf8))?;
    let record = Record::decode(id, &bytes[newline + 1..]).map_err(|e| corrupt(id, e))?;
    let expected = format!(
        "{}\t{}\t{}",
        record.version(),
        record.state().kind().as_str(),
        due_member(record.id(), record.due_at())
    );
    if header != expected {
        return Err(corrupt(id, ValueFault::HeaderMismatch));
    }
    Ok(record)
}
