//! A shard's index of the blobs it owns: key → size, attributes, creation time and
//! location. Ordered by key, for listing.
//!
//! The index holds only what is durable: the journal applies a record here after its
//! fdatasync succeeded, and recovery rebuilds it from a checkpoint and the journals.
//! Entries are reference-counted so that a snapshot for a checkpoint is cheap to take.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::rc::Rc;

use super::format::{Location, PutRecord, Record};
use super::types::{BlobKey, BlobMeta, ListQuery};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    pub created_unix_ns: u64,
    pub attributes: Attributes,
    pub location: Location,
    /// The data's CRC when it is kept here rather than in the stream (see
    /// [`PutRecord::data_crc`]).
    pub data_crc: Option<u32>,
}

impl Entry {
    pub fn meta(&self, key: BlobKey) -> BlobMeta {
        BlobMeta {
            key,
            size_bytes: self.size,
            attributes: self.attributes.to_map(),
            created_unix_ns: self.created_unix_ns,
        }
    }

    pub fn to_put(&self, key: BlobKey) -> PutRecord {
        PutRecord {
            key,
            size: self.size,
            created_unix_ns: self.created_unix_ns,
            location: self.location.clone(),
            attributes: self.attributes.to_map(),
            data_crc: self.data_crc,
        }
    }
}

impl From<PutRecord> for Entry {
    fn from(put: PutRecord) -> Entry {
        Entry {
            size: put.size,
            created_unix_ns: put.created_unix_ns,
            attributes: Attributes::from(put.attributes),
            location: put.location,
            data_crc: put.data_crc,
        }
    }
}

/// A blob's attributes as the index keeps them: packed into one allocation, none for a
/// blob without any. Each attribute is its name's length and its value's length (`u32`,
/// little-endian), then the name's and the value's UTF-8 bytes, in name order. A
/// `BTreeMap` of one attribute (a content type, the common case) allocates a whole node
/// of eleven, about 0.5 KiB per blob for as long as the blob lives, and a slice of
/// `String` pairs still three allocations (about 130 bytes); packed, it is one of the
/// attribute's own size plus 8. Measured by `graviton-engine-bench
/// --reopen-attributes 1` (BENCHMARKS.md §1). Turning them back into a map (a stat, a
/// listing, a checkpoint) costs a decode, which is small next to what those do.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Attributes(Box<[u8]>);

impl Attributes {
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        let mut rest = &self.0[..];
        while !rest.is_empty() {
            let (name, after) = rest.split_at(4);
            let (value, after) = after.split_at(4);
            let name_len = u32::from_le_bytes(name.try_into().expect("4 bytes")) as usize;
            let value_len = u32::from_le_bytes(value.try_into().expect("4 bytes")) as usize;
            let (name, after) = after.split_at(name_len);
            let (value, after) = after.split_at(value_len);
            map.insert(utf8(name), utf8(value));
            rest = after;
        }
        map
    }
}

/// Bytes [`Attributes`] packed from a `String`.
fn utf8(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("packed from a String")
}

impl From<BTreeMap<String, String>> for Attributes {
    fn from(map: BTreeMap<String, String>) -> Attributes {
        let len = map.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
        let mut packed = Vec::with_capacity(len);
        for (name, value) in &map {
            // Attributes are at most ATTRIBUTES_BYTES_MAX (64 KiB) in all: lengths fit.
            packed.extend_from_slice(&(name.len() as u32).to_le_bytes());
            packed.extend_from_slice(&(value.len() as u32).to_le_bytes());
            packed.extend_from_slice(name.as_bytes());
            packed.extend_from_slice(value.as_bytes());
        }
        Attributes(packed.into_boxed_slice())
    }
}

/// Every entry of an index at one moment, shared with the index (a checkpoint's input).
pub type Snapshot = Vec<(BlobKey, Rc<Entry>)>;

/// Builds the index a checkpoint's records describe (a checkpoint holds only puts, one
/// per key), in one pass at the end rather than by inserting one by one: a checkpoint is
/// in key order, and a `BTreeMap` filled in order by inserts leaves its nodes about half
/// full, where one built from a sorted sequence fills them (about 35 bytes less per
/// blob; BENCHMARKS.md §1).
#[derive(Default)]
pub struct CheckpointIndex {
    entries: Vec<(BlobKey, Rc<Entry>)>,
}

impl CheckpointIndex {
    pub fn push(&mut self, put: PutRecord) {
        self.entries.push((put.key, Rc::new(Entry::from(put))));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn finish(mut self) -> Index {
        // Sorted already when the checkpoint is; of two records of one key the first
        // stays, as with `Index::apply`.
        self.entries.sort_by_key(|(key, _)| *key);
        self.entries.dedup_by_key(|(key, _)| *key);
        Index {
            entries: self.entries.into_iter().collect(),
        }
    }
}

#[derive(Default)]
pub struct Index {
    entries: BTreeMap<BlobKey, Rc<Entry>>,
}

impl Index {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, key: &BlobKey) -> Option<Rc<Entry>> {
        self.entries.get(key).cloned()
    }

    /// Applies a durable record. A Put for a key already present keeps the first copy
    /// (the content is identical: the key is its digest).
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Put(put) => {
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    self.entries.entry(put.key)
                {
                    slot.insert(Rc::new(Entry::from(put)));
                }
            }
            Record::Delete { key } => {
                self.entries.remove(&key);
            }
            Record::Relocate { key, location } => {
                if let Some(entry) = self.entries.get_mut(&key) {
                    let mut moved = Entry::clone(entry);
                    moved.location = location;
                    *entry = Rc::new(moved);
                }
            }
            Record::Seal | Record::End { .. } => {}
        }
    }

    /// Every entry, in key order, sharing the entries themselves.
    pub fn snapshot(&self) -> Snapshot {
        self.entries.iter().map(|(k, e)| (*k, e.clone())).collect()
    }

    /// Up to `query.limit` entries matching the query, in key order.
    pub fn list(&self, query: &ListQuery) -> Vec<BlobMeta> {
        let mut floor = [0u8; 32];
        floor[..query.prefix.len()].copy_from_slice(&query.prefix);
        let floor = BlobKey(floor);
        let lower = match query.start_after {
            Some(after) if after >= floor => Bound::Excluded(after),
            _ => Bound::Included(floor),
        };
        self.entries
            .range((lower, Bound::Unbounded))
            .take_while(|(key, _)| key.0.starts_with(&query.prefix))
            .take(query.limit)
            .map(|(key, entry)| entry.meta(*key))
            .collect()
    }

    /// Entries with an extent in a segment written by shard `writer`.
    pub fn written_by(&self, writer: usize) -> Vec<(BlobKey, Location)> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.location
                    .extents
                    .iter()
                    .any(|x| x.segment.writer() == writer)
            })
            .map(|(k, e)| (*k, e.location.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(first: u8, second: u8) -> Record {
        let mut key = [0u8; 32];
        key[0] = first;
        key[1] = second;
        Record::Put(PutRecord {
            key: BlobKey(key),
            size: 1,
            created_unix_ns: 0,
            location: Location::default(),
            attributes: BTreeMap::new(),
            data_crc: None,
        })
    }

    #[test]
    fn listing_honours_prefix_start_after_and_limit() {
        let mut index = Index::default();
        for first in [1u8, 2, 3] {
            for second in [1u8, 2, 3] {
                index.apply(put(first, second));
            }
        }
        let all = index.list(&ListQuery {
            limit: 100,
            ..Default::default()
        });
        assert_eq!(all.len(), 9);
        assert!(all.windows(2).all(|w| w[0].key < w[1].key));
        let twos = index.list(&ListQuery {
            prefix: vec![2],
            limit: 100,
            ..Default::default()
        });
        assert_eq!(twos.len(), 3);
        assert!(twos.iter().all(|m| m.key.0[0] == 2));
        let after = index.list(&ListQuery {
            prefix: vec![2],
            start_after: Some(twos[0].key),
            limit: 1,
        });
        assert_eq!(after, vec![twos[1].clone()]);
        let past = index.list(&ListQuery {
            prefix: vec![2],
            start_after: Some(BlobKey([9; 32])),
            limit: 10,
        });
        assert!(past.is_empty());
        let before = index.list(&ListQuery {
            prefix: vec![2],
            start_after: Some(BlobKey([0; 32])),
            limit: 10,
        });
        assert_eq!(before.len(), 3);
    }

    #[test]
    fn attributes_come_back_as_given_and_in_the_records_a_checkpoint_writes() {
        let given: BTreeMap<String, String> = [
            ("z", "last"),
            ("content-type", "text/plain; charset=utf-8"),
            ("a", ""),
            ("ünï", "ç€ 𝄞"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut index = Index::default();
        let Record::Put(mut record) = put(7, 7) else {
            unreachable!()
        };
        record.attributes = given.clone();
        let key = record.key;
        index.apply(Record::Put(record.clone()));
        let entry = index.get(&key).expect("applied");
        assert_eq!(entry.meta(key).attributes, given);
        assert_eq!(entry.to_put(key), record);
        assert_eq!(Attributes::default().to_map(), BTreeMap::new());
    }
}
