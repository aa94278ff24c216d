//! The engine's public value types: keys, metadata, ranges and list queries.
//!
//! These are plain data, shared by the engine, the gRPC layer and tests. A key is the
//! 32-byte BLAKE3 digest of a blob's content; people see it as 64 lowercase hex digits.

use std::collections::BTreeMap;
use std::fmt;

/// Length of a key in bytes.
pub const KEY_BYTES: usize = 32;

/// A blob's key: the BLAKE3 digest of its content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobKey(pub [u8; KEY_BYTES]);

impl BlobKey {
    /// The key of `content`.
    pub fn of(content: &[u8]) -> BlobKey {
        BlobKey(*blake3::hash(content).as_bytes())
    }

    /// A key from wire bytes; `None` unless exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<BlobKey> {
        Some(BlobKey(bytes.try_into().ok()?))
    }

    /// A key from 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Option<BlobKey> {
        let text = text.as_bytes();
        if text.len() != KEY_BYTES * 2 {
            return None;
        }
        let mut key = [0u8; KEY_BYTES];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            key[i] = (hi * 16 + lo) as u8;
        }
        Some(BlobKey(key))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// The shard that owns this key among `shard_count`: the key's first 8 bytes as a
    /// little-endian u64, modulo the count (BLAKE3 output is uniform).
    pub fn owner(&self, shard_count: usize) -> usize {
        let head = u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"));
        (head % shard_count as u64) as usize
    }
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobKey({self})")
    }
}

/// The attribute that holds a blob's content type.
pub const CONTENT_TYPE: &str = "content-type";

/// What the engine knows about a stored blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    pub key: BlobKey,
    pub size_bytes: u64,
    /// Free-form attributes given at upload; `content-type` among them.
    pub attributes: BTreeMap<String, String>,
    /// When the blob was first committed, in nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
}

impl BlobMeta {
    /// The `content-type` attribute, or "".
    pub fn content_type(&self) -> &str {
        self.attributes
            .get(CONTENT_TYPE)
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// A byte range of a blob: from `offset`, `length` bytes or to the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ByteRange {
    pub offset: u64,
    pub length: Option<u64>,
}

impl ByteRange {
    /// The absolute `[start, end)` of this range in a blob of `size` bytes, or `None`
    /// if any part of it lies past the end.
    pub fn resolve(&self, size: u64) -> Option<(u64, u64)> {
        if self.offset > size {
            return None;
        }
        let end = match self.length {
            None => size,
            Some(length) => self.offset.checked_add(length)?,
        };
        (end <= size).then_some((self.offset, end))
    }
}

/// A page of a listing: keys in ascending order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only keys strictly greater than this one.
    pub start_after: Option<BlobKey>,
    /// Only keys that begin with these bytes (at most 32).
    pub prefix: Vec<u8>,
    /// At most this many results.
    pub limit: usize,
}

impl ListQuery {
    pub fn matches(&self, key: &BlobKey) -> bool {
        key.0.starts_with(&self.prefix) && self.start_after.is_none_or(|after| *key > after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let key = BlobKey::of(b"graviton");
        let text = key.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(BlobKey::from_hex(&text), Some(key));
        assert_eq!(BlobKey::from_hex(&text.to_uppercase()), Some(key));
        assert_eq!(BlobKey::from_hex("abc"), None);
        assert_eq!(BlobKey::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn ranges_resolve_inside_the_blob_only() {
        let whole = ByteRange::default();
        assert_eq!(whole.resolve(10), Some((0, 10)));
        assert_eq!(whole.resolve(0), Some((0, 0)));
        let tail = ByteRange {
            offset: 7,
            length: None,
        };
        assert_eq!(tail.resolve(10), Some((7, 10)));
        let mid = ByteRange {
            offset: 2,
            length: Some(3),
        };
        assert_eq!(mid.resolve(10), Some((2, 5)));
        assert_eq!(
            ByteRange {
                offset: 10,
                length: Some(0)
            }
            .resolve(10),
            Some((10, 10))
        );
        assert_eq!(
            ByteRange {
                offset: 11,
                length: None
            }
            .resolve(10),
            None
        );
        assert_eq!(
            ByteRange {
                offset: 8,
                length: Some(3)
            }
            .resolve(10),
            None
        );
        assert_eq!(
            ByteRange {
                offset: 1,
                length: Some(u64::MAX)
            }
            .resolve(10),
            None
        );
    }

    #[test]
    fn owner_is_stable_and_in_range() {
        let key = BlobKey([7u8; 32]);
        let expected = (u64::from_le_bytes([7u8; 8]) % 3) as usize;
        assert_eq!(key.owner(3), expected);
        assert_eq!(key.owner(1), 0);
    }
}
