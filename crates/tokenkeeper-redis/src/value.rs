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

fn corrupt(id: &InstallationId, why: impl Into<BoxError>) -> StoreError {
    StoreError::Corrupt {
        id: id.clone(),
        backend: BACKEND,
        source: why.into(),
    }
}

/// Decodes a value stored under `id`, checking the header agrees with the record.
pub(crate) fn decode(id: &InstallationId, bytes: &[u8]) -> Result<Record, StoreError> {
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt(id, "the value has no header line"))?;
    let header = std::str::from_utf8(&bytes[..newline])
        .map_err(|_| corrupt(id, "the header line is not UTF-8"))?;
    let record = Record::decode(id, &bytes[newline + 1..]).map_err(|e| corrupt(id, e))?;
    let expected = format!(
        "{}\t{}\t{}",
        record.version(),
        record.state().kind().as_str(),
        due_member(record.id(), record.due_at())
    );
    if header != expected {
        return Err(corrupt(
            id,
            "the header (version, state, due) disagrees with the record",
        ));
    }
    Ok(record)
}
