//! Checked conversions between wire messages and engine types.
//!
//! Every value a client sends is validated here before it reaches the engine: keys are
//! exactly 32 bytes, offsets and sizes are not negative, list limits are clamped. A
//! value that fails is a [`Failure::InvalidArgument`] naming the field and what was
//! wrong with it.

use prost_types::Timestamp;

use super::failure::Failure;
use crate::engine::{BlobKey, BlobMeta, ByteRange, ListQuery, KEY_BYTES};
use crate::proto;

/// Results of a listing when the request's `limit` is 0.
pub(crate) const LIST_LIMIT_DEFAULT: usize = 1000;
/// The most results one listing returns, whatever the request's `limit`.
pub(crate) const LIST_LIMIT_MAX: usize = 10_000;
/// The most keys one `BatchStatBlobs` call may ask about.
pub(crate) const BATCH_STAT_KEYS_MAX: usize = 10_000;

/// The key in `field`, which must be exactly 32 bytes.
pub(crate) fn key(bytes: &[u8], field: &str) -> Result<BlobKey, Failure> {
    BlobKey::from_slice(bytes).ok_or_else(|| {
        Failure::invalid(format!(
            "`{field}` must be a {KEY_BYTES}-byte BLAKE3 digest, got {} bytes",
            bytes.len()
        ))
    })
}

/// A non-negative `i64` wire value as `u64`.
pub(crate) fn non_negative(value: i64, field: &str) -> Result<u64, Failure> {
    u64::try_from(value)
        .map_err(|_| Failure::invalid(format!("`{field}` must not be negative, got {value}")))
}

pub(crate) fn range(range: proto::ByteRange) -> Result<ByteRange, Failure> {
    Ok(ByteRange {
        offset: non_negative(range.offset, "range.offset")?,
        length: range
            .length
            .map(|length| non_negative(length, "range.length"))
            .transpose()?,
    })
}

pub(crate) fn list_query(request: proto::ListBlobsRequest) -> Result<ListQuery, Failure> {
    let start_after = if request.start_after.is_empty() {
        None
    } else {
        Some(key(&request.start_after, "start_after")?)
    };
    if request.prefix.len() > KEY_BYTES {
        return Err(Failure::invalid(format!(
            "`prefix` is {} bytes but keys are {KEY_BYTES}; no key can start with it",
            request.prefix.len()
        )));
    }
    let limit = match request.limit as usize {
        0 => LIST_LIMIT_DEFAULT,
        limit => limit.min(LIST_LIMIT_MAX),
    };
    Ok(ListQuery {
        start_after,
        prefix: request.prefix.to_vec(),
        limit,
    })
}

pub(crate) fn batch_keys(request: &proto::BatchStatBlobsRequest) -> Result<Vec<BlobKey>, Failure> {
    if request.keys.len() > BATCH_STAT_KEYS_MAX {
        return Err(Failure::invalid(format!(
            "{} keys in one BatchStatBlobs call; send at most {BATCH_STAT_KEYS_MAX} per call",
            request.keys.len()
        )));
    }
    request
        .keys
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            BlobKey::from_slice(bytes).ok_or_else(|| {
                Failure::invalid(format!(
                    "`keys[{i}]` must be a {KEY_BYTES}-byte BLAKE3 digest, got {} bytes",
                    bytes.len()
                ))
            })
        })
        .collect()
}

/// The optional `expected_hash` of a `CompleteUpload`: empty means not given.
pub(crate) fn expected_hash(bytes: &[u8]) -> Result<Option<BlobKey>, Failure> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        key(bytes, "complete.expected_hash").map(Some)
    }
}

pub(crate) fn metadata(meta: BlobMeta) -> proto::BlobMetadata {
    const NANOS_PER_SECOND: u64 = 1_000_000_000;
    let created_at = Timestamp {
        seconds: (meta.created_unix_ns / NANOS_PER_SECOND) as i64,
        nanos: (meta.created_unix_ns % NANOS_PER_SECOND) as i32,
    };
    proto::BlobMetadata {
        key: key_bytes(&meta.key),
        size: wire_size(meta.size_bytes),
        content_type: meta.content_type().to_string(),
        attributes: meta.attributes,
        created_at: Some(created_at),
    }
}

pub(crate) fn key_bytes(key: &BlobKey) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(key.as_bytes())
}

/// A size or offset as the wire's `int64`. Sizes fit: no disk holds 2^63 bytes.
pub(crate) fn wire_size(size: u64) -> i64 {
    i64::try_from(size).expect("sizes below 2^63 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_32_bytes() {
        assert_eq!(key(&[9; 32], "key").unwrap(), BlobKey([9; 32]));
        for len in [0, 1, 31, 33, 64] {
            let Err(Failure::InvalidArgument(text)) = key(&vec![0; len], "key") else {
                panic!("{len} bytes accepted");
            };
            assert!(text.contains(&format!("got {len} bytes")), "{text}");
        }
    }

    #[test]
    fn ranges_reject_negative_values() {
        let whole = proto::ByteRange {
            offset: 0,
            length: None,
        };
        assert_eq!(
            range(whole).unwrap(),
            ByteRange {
                offset: 0,
                length: None
            }
        );
        let some = proto::ByteRange {
            offset: 5,
            length: Some(0),
        };
        assert_eq!(
            range(some).unwrap(),
            ByteRange {
                offset: 5,
                length: Some(0)
            }
        );
        assert!(range(proto::ByteRange {
            offset: -1,
            length: None
        })
        .is_err());
        assert!(range(proto::ByteRange {
            offset: 0,
            length: Some(-1)
        })
        .is_err());
    }

    #[test]
    fn list_limits_default_and_cap() {
        let query = |limit| {
            list_query(proto::ListBlobsRequest {
                limit,
                ..Default::default()
            })
            .unwrap()
        };
        assert_eq!(query(0).limit, LIST_LIMIT_DEFAULT);
        assert_eq!(query(7).limit, 7);
        assert_eq!(query(u32::MAX).limit, LIST_LIMIT_MAX);
        assert_eq!(query(0).start_after, None);
        let bad_start = proto::ListBlobsRequest {
            start_after: vec![1; 5].into(),
            ..Default::default()
        };
        assert!(list_query(bad_start).is_err());
        let long_prefix = proto::ListBlobsRequest {
            prefix: vec![1; 33].into(),
            ..Default::default()
        };
        assert!(list_query(long_prefix).is_err());
    }

    #[test]
    fn metadata_carries_every_field() {
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("content-type".to_string(), "text/plain".to_string());
        attributes.insert("owner".to_string(), "ops".to_string());
        let meta = BlobMeta {
            key: BlobKey([3; 32]),
            size_bytes: 12,
            attributes: attributes.clone(),
            created_unix_ns: 1_700_000_000_123_456_789,
        };
        let wire = metadata(meta);
        assert_eq!(&wire.key[..], &[3; 32]);
        assert_eq!(wire.size, 12);
        assert_eq!(wire.content_type, "text/plain");
        assert_eq!(wire.attributes, attributes);
        let created_at = wire.created_at.unwrap();
        assert_eq!(created_at.seconds, 1_700_000_000);
        assert_eq!(created_at.nanos, 123_456_789);
    }

    #[test]
    fn expected_hash_is_optional_but_must_be_a_key() {
        assert_eq!(expected_hash(&[]).unwrap(), None);
        assert_eq!(expected_hash(&[4; 32]).unwrap(), Some(BlobKey([4; 32])));
        assert!(expected_hash(&[4; 16]).is_err());
    }
}
