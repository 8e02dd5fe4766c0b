//! How values are encoded in RocksDB and the changelog: JSON of the ledger's state types.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;

/// Decodes the value stored at `key`.
pub(super) fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).escape_default().to_string(),
        message: e.to_string(),
    })
}

/// Encodes a value.
pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialisable")
}
