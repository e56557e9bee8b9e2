//! Byte layouts of everything the state machine keeps in RocksDB.
//!
//! Column family `kv` holds every version of every key:
//!
//! ```text
//! escape(user_key) ++ be64(!mod_revision)  ->  flags(1) ++ le64(create_revision) ++ le64(version) ++ value
//! ```
//!
//! `escape` is order-preserving and prefix-free (`0x00` becomes `0x00 0xFF`, and the key ends
//! with `0x00 0x01`), so versions of one key are contiguous and sorted newest first, and keys
//! sort as the raw keys do. Column family `rev` indexes writes by revision, for watches and
//! compaction:
//!
//! ```text
//! be64(revision) ++ be32(sub)  ->  user_key
//! ```

use crate::error::{Error, Result};

/// A version record is a tombstone (the key was deleted at this revision).
const FLAG_TOMBSTONE: u8 = 1;

/// Appends the escaped form of `key` to `out`.
pub fn escape_into(key: &[u8], out: &mut Vec<u8>) {
    out.reserve(key.len() + 2 + 8);
    for &b in key {
        if b == 0 {
            out.extend_from_slice(&[0, 0xFF]);
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// The escaped form of `key`: every version of `key` starts with it.
pub fn escaped(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    escape_into(key, &mut out);
    out
}

/// The `kv` key of `key` at `revision`.
pub fn version_key(key: &[u8], revision: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 10);
    escape_into(key, &mut out);
    out.extend_from_slice(&(!(revision as u64)).to_be_bytes());
    out
}

/// The smallest `kv` key after every version of `key`.
pub fn after_versions(key: &[u8]) -> Vec<u8> {
    let mut out = escaped(key);
    out.extend_from_slice(&[0xFF; 9]);
    out
}

/// Splits a `kv` key into the user key and the revision.
pub fn decode_version_key(raw: &[u8]) -> Result<(Vec<u8>, i64)> {
    if raw.len() < 10 {
        return Err(Error::Corrupt(format!(
            "version key too short: {} bytes",
            raw.len()
        )));
    }
    let (body, rev) = raw.split_at(raw.len() - 8);
    let rev = !u64::from_be_bytes(rev.try_into().expect("8 bytes"));
    let mut key = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b != 0 {
            key.push(b);
            i += 1;
            continue;
        }
        match body.get(i + 1) {
            Some(0xFF) => {
                key.push(0);
                i += 2;
            }
            Some(1) if i + 2 == body.len() => return Ok((key, rev as i64)),
            _ => break,
        }
    }
    Err(Error::Corrupt(
        "version key is not escaped correctly".into(),
    ))
}

/// The `rev` key of the `sub`-th write of `revision`.
pub fn rev_key(revision: i64, sub: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&(revision as u64).to_be_bytes());
    out[8..].copy_from_slice(&sub.to_be_bytes());
    out
}

/// Splits a `rev` key into revision and sub.
pub fn decode_rev_key(raw: &[u8]) -> Result<(i64, u32)> {
    if raw.len() != 12 {
        return Err(Error::Corrupt(format!(
            "rev key has {} bytes, want 12",
            raw.len()
        )));
    }
    let rev = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes")) as i64;
    let sub = u32::from_be_bytes(raw[8..].try_into().expect("4 bytes"));
    Ok((rev, sub))
}

/// One stored version of a key (the mod revision lives in the record's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The key was deleted at this revision.
    pub tombstone: bool,
    /// Revision that created the key.
    pub create_revision: i64,
    /// Writes since creation.
    pub version: i64,
    /// The value.
    pub value: Vec<u8>,
}

impl Version {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.value.len());
        out.push(if self.tombstone { FLAG_TOMBSTONE } else { 0 });
        out.extend_from_slice(&self.create_revision.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    /// Decodes a record; with `keys_only` the value is not copied.
    pub fn decode(raw: &[u8], keys_only: bool) -> Result<Version> {
        if raw.len() < 17 || raw[0] & !FLAG_TOMBSTONE != 0 {
            return Err(Error::Corrupt("bad version record".into()));
        }
        Ok(Version {
            tombstone: raw[0] & FLAG_TOMBSTONE != 0,
            create_revision: i64::from_le_bytes(raw[1..9].try_into().expect("8 bytes")),
            version: i64::from_le_bytes(raw[9..17].try_into().expect("8 bytes")),
            value: if keys_only {
                Vec::new()
            } else {
                raw[17..].to_vec()
            },
        })
    }
}

/// Keys of the `meta` column family of the state machine.
pub mod meta {
    /// Current revision (le64).
    pub const REVISION: &[u8] = b"revision";
    /// Logical compaction revision (le64): reads below it fail.
    pub const COMPACT_REVISION: &[u8] = b"compact_revision";
    /// Physical compaction progress (le64): history below it has been removed.
    pub const COMPACTED_UPTO: &[u8] = b"compacted_upto";
    /// Number of live keys (le64).
    pub const KEYS: &[u8] = b"keys";
    /// The last applied Raft log id, opaque to the store.
    pub const APPLIED: &[u8] = b"applied";
    /// The last applied membership, opaque to the store.
    pub const MEMBERSHIP: &[u8] = b"membership";
}

/// Reads an le64 meta value.
pub fn decode_i64(raw: &[u8]) -> Result<i64> {
    raw.try_into()
        .map(i64::from_le_bytes)
        .map_err(|_| Error::Corrupt(format!("meta value has {} bytes, want 8", raw.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn versions_of_a_key_sort_newest_first() {
        assert!(version_key(b"a", 5) < version_key(b"a", 3));
        assert!(version_key(b"a", 1) < version_key(b"a\0", 9));
        assert!(version_key(b"a", 1) < after_versions(b"a"));
        assert!(after_versions(b"a") < version_key(b"a\0", 1));
        assert!(after_versions(b"a") < version_key(b"b", i64::MAX));
    }

    proptest! {
        #[test]
        fn escaping_preserves_key_order(a in proptest::collection::vec(any::<u8>(), 0..8),
                                        b in proptest::collection::vec(any::<u8>(), 0..8),
                                        ra in 1i64..1000, rb in 1i64..1000) {
            let ka = version_key(&a, ra);
            let kb = version_key(&b, rb);
            if a != b {
                prop_assert_eq!(a < b, ka < kb);
            }
            prop_assert_eq!(decode_version_key(&ka).unwrap(), (a.clone(), ra));
            prop_assert!(ka < after_versions(&a));
        }
    }
}
