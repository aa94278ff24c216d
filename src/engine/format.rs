//! Graviton's on-disk format: every file, every record, byte by byte. Pure functions:
//! nothing here does I/O.
//!
//! # Files
//!
//! A data directory holds one directory per shard, `shard-NNN/`, with three kinds of
//! files, and two more without content (`segments.rs`):
//! - the shard's space reserve [`RESERVE_FILE`], a preallocated file as large as a
//!   segment that becomes a segment for compaction on a full disk;
//! - free segments `free-seg-….dat` ([`FREE_PREFIX`]): segments compaction emptied,
//!   kept to become new segments under a new name, so that their blocks are not freed
//!   and allocated again.
//!
//! A file that compaction emptied may be renamed to either, so their content is stale
//! blob bytes or zeros, and is never read; after it becomes a segment again, only the
//! records written from then on name places in it. All integers are little-endian. All
//! offsets and lengths of I/O are multiples of [`ALIGN`] (4096).
//!
//! **Segments** `seg-SSSS-QQQQQQQQQQQQ.dat` (S: writer shard, Q: sequence, hex) hold blob
//! data. A segment is preallocated to its full size and written only by its shard, by
//! bump allocation of *extents*. A blob occupies one or more extents; concatenated, they
//! form the blob's *stream*:
//!
//! ```text
//! stream = data (size bytes) | chunk CRCs (u32 per 64 KiB data chunk) | zero padding
//! stream = data (size bytes) | zero padding      (a blob whose CRC is in its record)
//! ```
//!
//! Chunk `c` covers data bytes `[c*65536, min((c+1)*65536, size))`; its CRC is
//! `crc32(data of the chunk)`. A blob of at most one chunk that was written whole (the
//! small-blob path) keeps its one CRC in its Put record (kind 6) instead of in its
//! stream, so a 4 KiB blob takes one 4 KiB block, not two. Every extent but the last
//! has a length that is a multiple of [`UNIT_BYTES`] (1 MiB), so a read unit of the
//! stream never straddles two extents.
//! A segment has no header: everything about it is in the journal records that point
//! into it. Space between live extents is dead and is reclaimed by compaction.
//!
//! **Journals** `journal-GGGGGGGGGGGGGGGG.log` (G: generation) are append-only logs of
//! records, preallocated and zero-filled past the end of the log. A journal starts with
//! a one-block [header](encode_header) and is followed by a stream of records:
//!
//! ```text
//! record = len: u32 | crc: u32 | kind: u8 | payload   (len = 1 + payload length,
//!                                                       crc = crc32(kind | payload))
//! kind 1 Put      = key[32] | size: u64 | created_unix_ns: u64 | location | attributes
//! kind 2 Delete   = key[32]
//! kind 3 Relocate = key[32] | location
//! kind 4 Seal     = (empty)            the journal is complete; a newer one follows
//! kind 5 End      = count: u64         last record of a checkpoint
//! kind 6 PutCrc   = key[32] | size: u64 | created_unix_ns: u64 | location | crc: u32
//!                   | attributes       a Put whose data CRC is here, not in the stream;
//!                                      only for size <= 64 KiB (one chunk)
//! location   = n: u16 | n × (segment_id: u64 | offset: u64 | len: u32)
//! attributes = n: u16 | n × (key_len: u16 | key | value_len: u32 | value)  (UTF-8)
//! segment_id = writer_shard << 48 | sequence
//! ```
//!
//! A `len` of zero ends the log. Records may cross block boundaries.
//!
//! **Checkpoints** `checkpoint-GGGGGGGGGGGGGGGG.idx` hold a shard's whole index as it was
//! when journal G began: a header, one Put record per live blob in key order, and an End
//! record whose count equals the number of Puts. A checkpoint without a valid End record
//! is ignored.
//!
//! # Invariants
//!
//! - A Put or Relocate record is written only after the extents it names are durable
//!   (an fdatasync of their segments, or the `O_DSYNC` write that wrote them), so a
//!   durable record never points at data that may be missing.
//! - A shard's journal holds exactly the keys that shard owns; replaying its newest valid
//!   checkpoint, then its journals from that generation on, in order, rebuilds its
//!   index. Every journal but the newest ends with a Seal record; a journal that is not
//!   the newest and has no Seal was damaged, and opening fails rather than losing
//!   records silently.
//! - Names (new segments, journals, checkpoints, removals) are made durable with an
//!   fsync of the shard directory before anything depends on them.
//! - A journal's header is durable before its first record, so a journal whose header
//!   fields and first record block are zeros holds nothing and may be removed. Any
//!   other header that does not check is damage, and a well-formed header of another
//!   [`VERSION`] is another format: both stop the open, and no file is touched.
//! - Journals are written one append at a time, each from the block holding the durable
//!   end and at most an eighth of the file (≤ 256 KiB) of records. So a crash leaves
//!   torn bytes only within that reach of where the valid log ends; any other nonzero
//!   byte past the end means a damaged record with records after it, which stops the
//!   open instead of being taken for a torn tail.
//! - Journal generations are consecutive, and journals older than a checkpoint are
//!   removed only after that checkpoint is durable: a gap in the generations from the
//!   newest valid checkpoint to the newest journal means lost blobs, and stops the open.
//!
//! # What it assumes of the disk
//!
//! - A write of one 512-byte sector is atomic: after power loss it holds the old or the
//!   new bytes. The journal rewrites its partial last block on every flush with the same
//!   prefix, so any mix of old and new sectors keeps every record already flushed.
//! - fdatasync means durable, and so does the completion of an `O_DSYNC` write for its
//!   bytes; a failed one of either means unknown: the shard stops taking writes instead
//!   of retrying.
//! - Bit rot is possible and is caught by CRCs on every read; it is reported, not
//!   repaired (there is one copy).

use std::collections::BTreeMap;

use super::types::{BlobKey, KEY_BYTES};

/// Alignment of every I/O offset and length.
pub const ALIGN: u64 = 4096;
/// Data bytes covered by one CRC.
pub const CHUNK_BYTES: u64 = 64 * 1024;
/// The unit in which streams are read and written; non-final extents are multiples.
pub const UNIT_BYTES: u64 = 1024 * 1024;
/// Largest total size of a blob's attributes, in bytes.
pub const ATTRIBUTES_BYTES_MAX: usize = 64 * 1024;
/// Largest number of attributes.
pub const ATTRIBUTES_COUNT_MAX: usize = 256;
/// Size of a journal's or checkpoint's header.
pub const HEADER_BYTES: u64 = ALIGN;
/// Record framing: len + crc.
pub const FRAME_BYTES: usize = 8;

const _: () = assert!(UNIT_BYTES.is_multiple_of(CHUNK_BYTES));
const _: () = assert!(CHUNK_BYTES.is_multiple_of(ALIGN));

pub const JOURNAL_MAGIC: [u8; 8] = *b"GRVJRNL1";
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"GRVCKPT1";
/// The format version this build writes, and the only one it reads. Version 1 includes
/// kind 6 (PutCrc); builds older than that record kind read it as the end of the log.
pub const VERSION: u32 = 1;

/// A segment, named by its writer shard and sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u64);

impl SegmentId {
    pub fn new(writer: usize, sequence: u64) -> SegmentId {
        assert!(writer < 1 << 16 && sequence < 1 << 48);
        SegmentId((writer as u64) << 48 | sequence)
    }

    pub fn writer(self) -> usize {
        (self.0 >> 48) as usize
    }

    pub fn sequence(self) -> u64 {
        self.0 & ((1 << 48) - 1)
    }

    pub fn file_name(self) -> String {
        format!("seg-{:04x}-{:012x}.dat", self.writer(), self.sequence())
    }

    pub fn parse_file_name(name: &str) -> Option<SegmentId> {
        let rest = name.strip_prefix("seg-")?.strip_suffix(".dat")?;
        let (writer, sequence) = rest.split_once('-')?;
        let writer = usize::from_str_radix(writer, 16).ok()?;
        let sequence = u64::from_str_radix(sequence, 16).ok()?;
        (writer < 1 << 16 && sequence < 1 << 48).then(|| SegmentId::new(writer, sequence))
    }
}

/// A run of bytes in a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub segment: SegmentId,
    pub offset: u64,
    pub len: u32,
}

/// Where a blob's stream lies: its extents, in stream order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Location {
    pub extents: Vec<Extent>,
}

impl Location {
    pub fn stream_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len as u64).sum()
    }

    /// Splits the stream range `[start, start+len)` into `(extent, offset in segment,
    /// length)` pieces.
    pub fn map(&self, start: u64, len: u64) -> Vec<(Extent, u64, u64)> {
        let mut pieces = Vec::new();
        let mut base = 0u64;
        let (mut at, end) = (start, start + len);
        for extent in &self.extents {
            let extent_end = base + extent.len as u64;
            if at < extent_end && at < end {
                let take = end.min(extent_end) - at;
                pieces.push((*extent, extent.offset + (at - base), take));
                at += take;
            }
            base = extent_end;
        }
        assert_eq!(at, end, "stream range past the blob's extents");
        pieces
    }
}

/// Number of CRC chunks of a blob of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_BYTES)
}

/// Bytes of a blob's stream before padding: data plus CRC table.
pub fn stream_payload_bytes(size: u64) -> u64 {
    size + 4 * chunk_count(size)
}

/// True if a blob of `size` bytes may keep its CRC in its record (one chunk at most).
pub fn crc_fits_record(size: u64) -> bool {
    size <= CHUNK_BYTES
}

/// A journal or checkpoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Put(PutRecord),
    Delete { key: BlobKey },
    Relocate { key: BlobKey, location: Location },
    Seal,
    End { count: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutRecord {
    pub key: BlobKey,
    pub size: u64,
    pub created_unix_ns: u64,
    pub location: Location,
    pub attributes: BTreeMap<String, String>,
    /// The CRC of the data, for a blob whose stream has no CRC table (kind 6); `None`
    /// when the table follows the data in the stream (kind 1).
    pub data_crc: Option<u32>,
}

impl PutRecord {
    /// Bytes of the stream before padding: the data, then the CRC table unless the CRC
    /// is in the record.
    pub fn stream_payload_bytes(&self) -> u64 {
        match self.data_crc {
            Some(_) => self.size,
            None => stream_payload_bytes(self.size),
        }
    }
}

const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;
const KIND_RELOCATE: u8 = 3;
const KIND_SEAL: u8 = 4;
const KIND_END: u8 = 5;
const KIND_PUT_CRC: u8 = 6;

/// Appends `record`, framed, to `out`.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) {
    let frame_at = out.len();
    out.extend_from_slice(&[0; FRAME_BYTES]);
    match record {
        Record::Put(put) => {
            out.push(if put.data_crc.is_some() {
                KIND_PUT_CRC
            } else {
                KIND_PUT
            });
            out.extend_from_slice(put.key.as_bytes());
            out.extend_from_slice(&put.size.to_le_bytes());
            out.extend_from_slice(&put.created_unix_ns.to_le_bytes());
            encode_location(&put.location, out);
            if let Some(crc) = put.data_crc {
                assert!(
                    crc_fits_record(put.size),
                    "a CRC in the record covers one chunk"
                );
                out.extend_from_slice(&crc.to_le_bytes());
            }
            out.extend_from_slice(&(put.attributes.len() as u16).to_le_bytes());
            for (key, value) in &put.attributes {
                out.extend_from_slice(&(key.len() as u16).to_le_bytes());
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(value.as_bytes());
            }
        }
        Record::Delete { key } => {
            out.push(KIND_DELETE);
            out.extend_from_slice(key.as_bytes());
        }
        Record::Relocate { key, location } => {
            out.push(KIND_RELOCATE);
            out.extend_from_slice(key.as_bytes());
            encode_location(location, out);
        }
        Record::Seal => out.push(KIND_SEAL),
        Record::End { count } => {
            out.push(KIND_END);
            out.extend_from_slice(&count.to_le_bytes());
        }
    }
    let body = &out[frame_at + FRAME_BYTES..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[frame_at..frame_at + 4].copy_from_slice(&len.to_le_bytes());
    out[frame_at + 4..frame_at + 8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_location(location: &Location, out: &mut Vec<u8>) {
    out.extend_from_slice(&(location.extents.len() as u16).to_le_bytes());
    for extent in &location.extents {
        out.extend_from_slice(&extent.segment.0.to_le_bytes());
        out.extend_from_slice(&extent.offset.to_le_bytes());
        out.extend_from_slice(&extent.len.to_le_bytes());
    }
}

/// What [`decode_record`] found at a position of a log.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record and the bytes it took.
    Record(Record, usize),
    /// A zero length: the end of the log.
    End,
    /// Not enough bytes for the record the frame announces.
    Truncated,
    /// The frame or the checksum is wrong, or the payload does not parse.
    Invalid,
}

/// Largest record accepted when decoding (a Put with maximal attributes and extents).
pub const RECORD_BYTES_MAX: usize =
    1 + 32 + 16 + 2 + 20 * 4096 + 4 + 2 + ATTRIBUTES_BYTES_MAX + 6 * 256;

/// Decodes the record at the start of `bytes`. Checks the checksum before parsing.
pub fn decode_record(bytes: &[u8]) -> Decoded {
    if bytes.len() < FRAME_BYTES {
        return if bytes.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Truncated
        };
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4")) as usize;
    if len == 0 {
        return Decoded::End;
    }
    if len > RECORD_BYTES_MAX {
        return Decoded::Invalid;
    }
    if bytes.len() < FRAME_BYTES + len {
        return Decoded::Truncated;
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4"));
    let body = &bytes[FRAME_BYTES..FRAME_BYTES + len];
    if crc32fast::hash(body) != crc {
        return Decoded::Invalid;
    }
    match parse_body(body) {
        Some(record) => Decoded::Record(record, FRAME_BYTES + len),
        None => Decoded::Invalid,
    }
}

/// A cursor over a record body; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn key(&mut self) -> Option<BlobKey> {
        BlobKey::from_slice(self.take(KEY_BYTES)?)
    }
    fn string(&mut self, len: usize) -> Option<String> {
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
    fn location(&mut self) -> Option<Location> {
        let count = self.u16()? as usize;
        let mut extents = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let segment = SegmentId(self.u64()?);
            let offset = self.u64()?;
            let len = self.u32()?;
            if !offset.is_multiple_of(ALIGN) || !(len as u64).is_multiple_of(ALIGN) || len == 0 {
                return None;
            }
            extents.push(Extent {
                segment,
                offset,
                len,
            });
        }
        Some(Location { extents })
    }
}

fn parse_body(body: &[u8]) -> Option<Record> {
    let (&kind, rest) = body.split_first()?;
    let mut reader = Reader { bytes: rest };
    let record = match kind {
        KIND_PUT | KIND_PUT_CRC => {
            let key = reader.key()?;
            let size = reader.u64()?;
            let created_unix_ns = reader.u64()?;
            let location = reader.location()?;
            let data_crc = if kind == KIND_PUT_CRC {
                if !crc_fits_record(size) {
                    return None;
                }
                Some(reader.u32()?)
            } else {
                None
            };
            let count = reader.u16()? as usize;
            let mut attributes = BTreeMap::new();
            for _ in 0..count {
                let key_len = reader.u16()? as usize;
                let name = reader.string(key_len)?;
                let value_len = reader.u32()? as usize;
                let value = reader.string(value_len)?;
                attributes.insert(name, value);
            }
            let put = PutRecord {
                key,
                size,
                created_unix_ns,
                location,
                attributes,
                data_crc,
            };
            if put.location.stream_bytes() < put.stream_payload_bytes() {
                return None;
            }
            Record::Put(put)
        }
        KIND_DELETE => Record::Delete { key: reader.key()? },
        KIND_RELOCATE => Record::Relocate {
            key: reader.key()?,
            location: reader.location()?,
        },
        KIND_SEAL => Record::Seal,
        KIND_END => Record::End {
            count: reader.u64()?,
        },
        _ => return None,
    };
    reader.bytes.is_empty().then_some(record)
}

/// The header block of a journal or checkpoint:
/// `magic[8] | version: u32 | shard: u32 | generation: u64 | crc32(previous 24 bytes): u32`,
/// zero-padded to [`HEADER_BYTES`].
pub fn encode_header(magic: [u8; 8], shard: usize, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES as usize);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(shard as u32).to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.resize(HEADER_BYTES as usize, 0);
    out
}

/// What a header block holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// A header of this format: the file's records can be read.
    Valid { shard: usize, generation: u64 },
    /// Zeros: the header was never written (a file being created, or a journal's spare).
    Blank,
    /// A well-formed header (magic and checksum match) of a format version this build
    /// does not read. The file must be left alone, not taken for damage or removed.
    Unsupported { version: u32 },
    /// Anything else: another magic, a checksum that does not match, a short block.
    Damaged,
}

/// Bytes of a header that carry its fields and checksum; the rest of the block is zero.
const HEADER_FIELD_BYTES: usize = 28;

/// Reads a header block.
pub fn decode_header(magic: [u8; 8], bytes: &[u8]) -> Header {
    let Some(fields) = bytes.get(..HEADER_FIELD_BYTES) else {
        return Header::Damaged;
    };
    if fields.iter().all(|&byte| byte == 0) {
        return Header::Blank;
    }
    let u32_at = |at: usize| u32::from_le_bytes(fields[at..at + 4].try_into().expect("4 bytes"));
    if fields[0..8] != magic || crc32fast::hash(&fields[0..24]) != u32_at(24) {
        return Header::Damaged;
    }
    let version = u32_at(8);
    if version != VERSION {
        return Header::Unsupported { version };
    }
    Header::Valid {
        shard: u32_at(12) as usize,
        generation: u64::from_le_bytes(fields[16..24].try_into().expect("8 bytes")),
    }
}

pub fn journal_file_name(generation: u64) -> String {
    format!("journal-{generation:016x}.log")
}

pub fn checkpoint_file_name(generation: u64) -> String {
    format!("checkpoint-{generation:016x}.idx")
}

/// Name of a shard's space reserve, in its directory. Its content means nothing: zeros,
/// or the stale bytes of a segment that compaction emptied and renamed to it.
pub const RESERVE_FILE: &str = "space-reserve";

/// Prefix of a free segment's name: `free-` and the name it had as a segment. Its
/// content means nothing, as the reserve's.
pub const FREE_PREFIX: &str = "free-";

/// Parses `journal-G.log` or `checkpoint-G.idx`.
pub fn parse_generation(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Checks the attributes a client gave: bounded count and size, no empty names.
pub fn validate_attributes(attributes: &BTreeMap<String, String>) -> Result<(), String> {
    if attributes.len() > ATTRIBUTES_COUNT_MAX {
        return Err(format!(
            "{} attributes given; at most {ATTRIBUTES_COUNT_MAX} are allowed",
            attributes.len()
        ));
    }
    let total: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > ATTRIBUTES_BYTES_MAX {
        return Err(format!(
            "attributes take {total} bytes; at most {ATTRIBUTES_BYTES_MAX} are allowed"
        ));
    }
    if attributes
        .keys()
        .any(|k| k.is_empty() || k.len() > u16::MAX as usize)
    {
        return Err("attribute names must be non-empty".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(seed: u8) -> Record {
        let mut attributes = BTreeMap::new();
        attributes.insert("content-type".to_string(), "text/plain".to_string());
        attributes.insert("owner".to_string(), format!("user-{seed}"));
        Record::Put(PutRecord {
            key: BlobKey([seed; 32]),
            size: 70_000,
            created_unix_ns: 1_700_000_000_000_000_000,
            location: Location {
                extents: vec![Extent {
                    segment: SegmentId::new(1, 9),
                    offset: 8192,
                    len: 4096 * 18,
                }],
            },
            attributes,
            data_crc: None,
        })
    }

    /// A 4 KiB blob whose CRC is in its record: its stream is one block.
    fn put_crc(seed: u8) -> Record {
        Record::Put(PutRecord {
            key: BlobKey([seed; 32]),
            size: 4096,
            created_unix_ns: 1_700_000_000_000_000_001,
            location: Location {
                extents: vec![Extent {
                    segment: SegmentId::new(0, 3),
                    offset: 4096 * 7,
                    len: 4096,
                }],
            },
            attributes: BTreeMap::new(),
            data_crc: Some(0xdead_beef),
        })
    }

    #[test]
    fn records_round_trip() {
        let records = vec![
            put(1),
            put_crc(9),
            Record::Delete {
                key: BlobKey([2; 32]),
            },
            Record::Relocate {
                key: BlobKey([3; 32]),
                location: Location {
                    extents: vec![
                        Extent {
                            segment: SegmentId::new(0, 1),
                            offset: 0,
                            len: 1 << 20,
                        },
                        Extent {
                            segment: SegmentId::new(0, 2),
                            offset: 4096,
                            len: 4096,
                        },
                    ],
                },
            },
            Record::Seal,
            Record::End { count: 42 },
        ];
        let mut log = Vec::new();
        for record in &records {
            encode_record(record, &mut log);
        }
        log.extend_from_slice(&[0; 16]);
        let mut at = 0;
        for record in &records {
            match decode_record(&log[at..]) {
                Decoded::Record(decoded, used) => {
                    assert_eq!(&decoded, record);
                    at += used;
                }
                other => panic!("expected {record:?}, got {other:?}"),
            }
        }
        assert_eq!(decode_record(&log[at..]), Decoded::End);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        for record in [put(7), put_crc(8)] {
            let mut log = Vec::new();
            encode_record(&record, &mut log);
            for byte in 0..log.len() {
                for bit in 0..8 {
                    let mut damaged = log.clone();
                    damaged[byte] ^= 1 << bit;
                    match decode_record(&damaged) {
                        Decoded::Record(record, _) => {
                            panic!("bit {bit} of byte {byte} accepted: {record:?}")
                        }
                        Decoded::End | Decoded::Truncated | Decoded::Invalid => {}
                    }
                }
            }
        }
    }

    /// Re-frames a record body (valid checksum), to test what the parser itself refuses.
    fn framed(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn a_put_whose_stream_is_too_short_is_refused() {
        // Kind 6 with a size past one chunk: its one CRC could not cover the data.
        let Record::Put(mut big) = put_crc(1) else {
            unreachable!()
        };
        big.size = CHUNK_BYTES + 1;
        big.location.extents[0].len = (2 * CHUNK_BYTES) as u32;
        let mut log = Vec::new();
        big.data_crc = None;
        encode_record(&Record::Put(big), &mut log);
        let mut body = log[FRAME_BYTES..].to_vec();
        body[0] = KIND_PUT_CRC;
        let at = 1 + 32 + 16 + 2 + 20;
        body.splice(at..at, 7u32.to_le_bytes());
        assert_eq!(decode_record(&framed(&body)), Decoded::Invalid);
        // Kind 1 for a 4 KiB blob in one block: no room for its CRC table.
        let mut log = Vec::new();
        encode_record(&put_crc(2), &mut log);
        let mut body = log[FRAME_BYTES..].to_vec();
        body[0] = KIND_PUT;
        let at = 1 + 32 + 16 + 2 + 20;
        body.drain(at..at + 4);
        assert_eq!(decode_record(&framed(&body)), Decoded::Invalid);
        // The same bytes framed as kind 6 are accepted.
        let mut log = Vec::new();
        encode_record(&put_crc(2), &mut log);
        assert!(matches!(
            decode_record(&framed(&log[FRAME_BYTES..])),
            Decoded::Record(..)
        ));
    }

    #[test]
    fn truncated_records_are_not_accepted() {
        let mut log = Vec::new();
        encode_record(&put(5), &mut log);
        for cut in 1..log.len() {
            assert!(
                !matches!(decode_record(&log[..cut]), Decoded::Record(..)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn headers_round_trip_and_tell_blank_damaged_and_unsupported_apart() {
        let header = encode_header(JOURNAL_MAGIC, 3, 77);
        assert_eq!(header.len() as u64, HEADER_BYTES);
        let valid = Header::Valid {
            shard: 3,
            generation: 77,
        };
        assert_eq!(decode_header(JOURNAL_MAGIC, &header), valid);
        assert_eq!(decode_header(CHECKPOINT_MAGIC, &header), Header::Damaged);
        let mut damaged = header.clone();
        damaged[17] ^= 1;
        assert_eq!(decode_header(JOURNAL_MAGIC, &damaged), Header::Damaged);
        assert_eq!(decode_header(JOURNAL_MAGIC, &header[..27]), Header::Damaged);
        let blank = vec![0u8; HEADER_BYTES as usize];
        assert_eq!(decode_header(JOURNAL_MAGIC, &blank), Header::Blank);
        // A later version, well formed: its own checksum over its own fields.
        let mut later = header.clone();
        later[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let crc = crc32fast::hash(&later[0..24]);
        later[24..28].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_header(JOURNAL_MAGIC, &later),
            Header::Unsupported {
                version: VERSION + 1
            }
        );
    }

    #[test]
    fn names_round_trip() {
        let id = SegmentId::new(5, 0xabc);
        assert_eq!(SegmentId::parse_file_name(&id.file_name()), Some(id));
        assert_eq!(
            parse_generation(&journal_file_name(9), "journal-", ".log"),
            Some(9)
        );
        assert_eq!(parse_generation("journal-9.log", "journal-", ".log"), None);
    }

    #[test]
    fn locations_map_stream_ranges_across_extents() {
        let a = Extent {
            segment: SegmentId::new(0, 1),
            offset: 1 << 20,
            len: 1 << 20,
        };
        let b = Extent {
            segment: SegmentId::new(0, 2),
            offset: 0,
            len: 8192,
        };
        let location = Location {
            extents: vec![a, b],
        };
        assert_eq!(location.map(0, 4096), vec![(a, 1 << 20, 4096)]);
        assert_eq!(
            location.map((1 << 20) - 4096, 8192),
            vec![(a, (2 << 20) - 4096, 4096), (b, 0, 4096)]
        );
    }
}
