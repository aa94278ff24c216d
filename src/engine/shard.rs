//! One shard: the task loop that owns a shard's index, journal, segments and buffers,
//! and everything it does on requests from the front-end and from other shards.
//!
//! A shard runs on one thread (its own monoio runtime) and shares nothing mutable with
//! other shards: it talks to them only through [`Request`] messages on bounded channels.
//! Each request runs as a task of the shard's runtime.
//!
//! The paths of a blob:
//! - **Upload** ([`Shard::ingest`]): the ingest shard copies each chunk once into an
//!   aligned buffer and writes full buffers to extents it allocates, a few writes in
//!   flight. It hashes the stream (BLAKE3 and the chunk CRCs) in 256 KiB units, some of
//!   which it sends, as shared `Bytes`, to peers that have no upload of their own
//!   ([`digest`], [`Request::Digest`]). At complete it checks size and hash, appends
//!   the CRC table, pads, fdatasyncs the segments, and sends a Put to the key's owner.
//! - **Small put** ([`Shard::put`], [`Shard::store_small`]): a whole small blob comes in
//!   one message; the shard hashes it and hands it to the key's owner (itself, or a peer
//!   that then answers the client), which writes it to its own segment with the other
//!   small blobs of a group write (`small.rs`) and commits it: no stream, no commit hop.
//! - **Commit** ([`Shard::commit`]): the owner journals the Put (group commit) and only
//!   then indexes it and answers; identical content already stored is answered from the
//!   index (deduplication). The ingest shard answers the client after the owner did.
//! - **Read** ([`Shard::stream_read`]): the owner reads aligned units of the blob's
//!   stream, checks every chunk's CRC, and sends slices of its buffers as `Bytes`. A
//!   small blob is read in one piece before the answer, which carries its bytes.
//! - **Compaction** ([`Shard::compact`]): a shard copies the live blobs out of its sealed,
//!   mostly dead segments at a paced rate, has their owners journal the moves (in
//!   batches: one fdatasync and one group commit for up to [`EVACUATE_BATCH_BLOBS`]
//!   blobs), and retires the segment: kept for reuse if no read of it is open, else
//!   removed ([`Segments::remove`]).
//!
//! Faults: a failed write fails the upload (nothing is visible); a failed fdatasync
//! poisons the shard (no more writes, reads go on); a full disk fails uploads with
//! [`Error::NoSpace`] and reads go on; a checksum mismatch fails the read.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use graviton_io::buf::{round_down_u64, round_up_u64};
use graviton_io::{AlignedBuf, BufPool, Disk, DiskFile};
use tokio::sync::{mpsc, oneshot};

use super::digest::{self, AwayPermit, Offload, StreamDigest, UnitDigest, UnitHasher};
use super::error::{Error, Result};
use super::format::{
    self, Extent, Location, PutRecord, Record, SegmentId, ALIGN, CHUNK_BYTES, UNIT_BYTES,
};
use super::index::{Entry, Index};
use super::journal::Journal;
use super::segments::{Lease, Purpose, Retire, Segments};
use super::small::SmallWrites;
use super::types::{BlobKey, BlobMeta, ByteRange, ListQuery};
use super::{EngineConfig, ShardStatus};

/// Writes of one upload in flight at once.
const WRITES_IN_FLIGHT: usize = 8;
/// Reads (of up to 1 MiB) of one stream in flight that wait for a read buffer when the
/// shard's pool has none free: the depth every stream gets, however busy the shard.
const READS_IN_FLIGHT: usize = 4;
/// Reads of one stream in flight at most: those beyond [`READS_IN_FLIGHT`] start only
/// with a buffer free at once while more than half the shard's read pool is free
/// ([`read_ahead`]), so a lone stream reads deeper and many streams share the pool as
/// before. Measured (BENCHMARKS.md §1, 2026-12-06): the engine read one 4 GiB blob at
/// 1,761–2,172 MiB/s with 4 in flight, 2,288–2,404 with 8, 2,372–2,445 with 16; through
/// gRPC, where the transport is the limit, 1 GiB downloads showed no difference.
const READS_IN_FLIGHT_MAX: usize = 8;
/// Streams up to this size are read with one small buffer.
const SMALL_READ_BYTES: u64 = 64 * 1024;
/// Compaction asks owners to journal its moves once this many blobs were copied…
const EVACUATE_BATCH_BLOBS: usize = 256;
/// …or this many bytes: what a crash or error at most makes it copy again.
const EVACUATE_BATCH_BYTES: u64 = 32 * UNIT_BYTES;
/// Largest piece allocated at once for an upload of undeclared size.
const UNDECLARED_PIECE_BYTES_MAX: u64 = 64 * UNIT_BYTES;

/// A message to a shard.
pub enum Request {
    /// A whole small blob, from the front-end to an ingest shard.
    Put {
        pieces: Vec<Bytes>,
        declared: Option<u64>,
        expected: Option<BlobKey>,
        attributes: BTreeMap<String, String>,
        reply: oneshot::Sender<Result<BlobMeta>>,
    },
    /// A whole small blob, hashed and checked, from an ingest shard to the key's owner,
    /// which stores it and answers the front-end.
    PutOwned {
        key: BlobKey,
        size: u64,
        pieces: Vec<Bytes>,
        attributes: BTreeMap<String, String>,
        reply: oneshot::Sender<Result<BlobMeta>>,
    },
    Upload {
        total: Option<u64>,
        attributes: BTreeMap<String, String>,
        chunks: mpsc::Receiver<UploadMsg>,
        failed: oneshot::Sender<Error>,
    },
    Get {
        key: BlobKey,
        range: Option<ByteRange>,
        reply: oneshot::Sender<Result<super::BlobRead>>,
    },
    Stat {
        keys: Vec<BlobKey>,
        reply: oneshot::Sender<Vec<Option<BlobMeta>>>,
    },
    Delete {
        key: BlobKey,
        reply: oneshot::Sender<Result<()>>,
    },
    List {
        query: ListQuery,
        reply: oneshot::Sender<Vec<BlobMeta>>,
    },
    /// From an ingest shard to the key's owner.
    Commit {
        put: PutRecord,
        reply: oneshot::Sender<Result<BlobMeta>>,
    },
    /// From a compacting shard to the key's owner: move the blob if it is still at `from`.
    Relocate {
        key: BlobKey,
        from: Location,
        to: Location,
        reply: oneshot::Sender<Result<bool>>,
    },
    /// Entries of this owner stored in segments written by `writer`.
    LiveIn {
        writer: usize,
        reply: oneshot::Sender<Vec<(BlobKey, Location)>>,
    },
    /// A segment is being removed: drop its cached handle, then answer whether a read
    /// of it is still open here.
    Forget {
        segment: SegmentId,
        reply: oneshot::Sender<bool>,
    },
    /// From an ingest shard to an idle peer: hash this unit of an upload's stream
    /// ([`digest`]).
    Digest {
        offset: u64,
        pieces: Vec<Bytes>,
        reply: oneshot::Sender<UnitDigest>,
    },
    /// Runs one compaction pass now.
    Compact {
        reply: oneshot::Sender<Result<CompactionReport>>,
    },
    /// Seals the journal and the active segment now (tests use it to exercise rotation).
    Rotate { reply: oneshot::Sender<Result<()>> },
    /// Makes everything durable and stops the shard's loop.
    Shutdown { reply: oneshot::Sender<()> },
}

/// A message of an upload's stream, from the front-end to the ingest shard.
pub enum UploadMsg {
    Data(Bytes),
    Complete {
        expected: Option<BlobKey>,
        reply: oneshot::Sender<Result<BlobMeta>>,
    },
}

/// What one compaction pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionReport {
    pub segments_removed: usize,
    pub blobs_moved: usize,
    pub bytes_moved: u64,
}

pub struct Shard<D: Disk> {
    pub(super) id: usize,
    pub(super) count: usize,
    pub(super) config: Rc<EngineConfig>,
    pub(super) index: RefCell<Index>,
    pub(super) journal: Journal<D>,
    pub(super) segments: Segments<D>,
    pub(super) peers: Vec<mpsc::Sender<Request>>,
    pub(super) status: Arc<ShardStatus>,
    /// Every shard's status: which peers have no upload, to hash units of ours.
    pub(super) statuses: Vec<Arc<ShardStatus>>,
    /// Units of this shard's uploads being hashed by peers ([`digest::OFFLOAD_UNITS_MAX`]).
    pub(super) offload_units: Rc<Cell<usize>>,
    pub(super) poisoned: Rc<Cell<bool>>,
    pub(super) write_pool: BufPool,
    pub(super) read_pool: BufPool,
    pub(super) small_read_pool: BufPool,
    pub(super) small: SmallWrites,
    pub(super) closing: Cell<bool>,
    /// Held by the running compaction pass: passes (the timer's, [`Request::Compact`])
    /// run one at a time, since a pass's list of live blobs goes stale when another
    /// pass moves them and removes their segments.
    pub(super) compaction: tokio::sync::Mutex<()>,
    /// Paces compaction's copying ([`EngineConfig::compaction_bytes_per_sec`]).
    pub(super) compaction_pace: Pacer,
}

/// Admits bytes at most at a given rate: each `admit` waits until the bytes admitted
/// before it are due at that rate. No credit builds up while idle, so a pass that
/// starts after a quiet spell starts at the rate, not in a burst.
pub(super) struct Pacer {
    bytes_per_sec: Option<u64>,
    next: Cell<Option<Instant>>,
}

impl Pacer {
    pub(super) fn new(bytes_per_sec: Option<u64>) -> Pacer {
        Pacer {
            bytes_per_sec: bytes_per_sec.filter(|&rate| rate > 0),
            next: Cell::new(None),
        }
    }

    async fn admit(&self, bytes: u64) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let now = Instant::now();
        let start = self.next.get().map_or(now, |next| next.max(now));
        self.next.set(Some(
            start + Duration::from_secs_f64(bytes as f64 / rate as f64),
        ));
        if start > now {
            monoio::time::sleep(start - now).await;
        }
    }
}

impl<D: Disk> Shard<D> {
    /// The shard's loop: runs each request as a task until told to shut down.
    pub async fn run(self: Rc<Self>, mut inbox: mpsc::Receiver<Request>) {
        if let Some(interval) = self.config.compaction_interval {
            let shard = self.clone();
            monoio::spawn(async move {
                while !shard.closing.get() {
                    monoio::time::sleep(interval).await;
                    if shard.closing.get() {
                        break;
                    }
                    if let Err(error) = shard.clone().compact().await {
                        tracing::warn!(shard = shard.id, %error, "compaction pass failed");
                    }
                }
            });
        }
        while let Some(request) = inbox.recv().await {
            if let Request::Shutdown { reply } = request {
                self.closing.set(true);
                let last = self.journal.last_ticket();
                if let Err(error) = self.journal.wait(last, &self.index).await {
                    tracing::error!(shard = self.id, %error, "final journal flush failed");
                }
                self.journal.checkpoints_written().await;
                let _ = reply.send(());
                return;
            }
            let shard = self.clone();
            monoio::spawn(async move { shard.handle(request).await });
        }
    }

    async fn handle(self: Rc<Self>, request: Request) {
        match request {
            Request::Upload {
                total,
                attributes,
                chunks,
                failed,
            } => self.ingest(total, attributes, chunks, failed).await,
            Request::Put {
                pieces,
                declared,
                expected,
                attributes,
                reply,
            } => {
                self.put(pieces, declared, expected, attributes, reply)
                    .await
            }
            Request::PutOwned {
                key,
                size,
                pieces,
                attributes,
                reply,
            } => {
                let _ = reply.send(self.store_small(key, size, &pieces, attributes).await);
            }
            Request::Get { key, range, reply } => {
                let _ = reply.send(self.get(key, range).await);
            }
            Request::Stat { keys, reply } => {
                let index = self.index.borrow();
                let found = keys
                    .iter()
                    .map(|k| index.get(k).map(|e| e.meta(*k)))
                    .collect();
                let _ = reply.send(found);
            }
            Request::Delete { key, reply } => {
                let _ = reply.send(self.delete(key).await);
            }
            Request::List { query, reply } => {
                let _ = reply.send(self.index.borrow().list(&query));
            }
            Request::Commit { put, reply } => {
                let _ = reply.send(self.commit(put).await);
            }
            Request::Relocate {
                key,
                from,
                to,
                reply,
            } => {
                let _ = reply.send(self.relocate(key, from, to).await);
            }
            Request::LiveIn { writer, reply } => {
                let _ = reply.send(self.index.borrow().written_by(writer));
            }
            Request::Forget { segment, reply } => {
                self.segments.forget(segment);
                let _ = reply.send(self.segments.is_read(segment));
            }
            Request::Digest {
                offset,
                pieces,
                reply,
            } => {
                if !reply.is_closed() {
                    let _ = reply.send(UnitHasher::digest(offset, &pieces));
                }
            }
            Request::Compact { reply } => {
                let _ = reply.send(self.clone().compact().await);
            }
            Request::Rotate { reply } => {
                self.segments.seal_active();
                let _ = reply.send(self.journal.rotate_now(&self.index).await);
            }
            Request::Shutdown { .. } => unreachable!("handled by the loop"),
        }
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.poisoned.get() {
            self.status.poisoned.store(true, Ordering::Relaxed);
            return Err(Error::Poisoned { shard: self.id });
        }
        if self.closing.get() {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    // ----- upload -------------------------------------------------------------------

    async fn ingest(
        self: Rc<Self>,
        total: Option<u64>,
        attributes: BTreeMap<String, String>,
        mut chunks: mpsc::Receiver<UploadMsg>,
        failed: oneshot::Sender<Error>,
    ) {
        if let Err(error) = self.check_writable() {
            let _ = failed.send(error);
            return;
        }
        let planned = total.map(|size| round_up_u64(format::stream_payload_bytes(size), ALIGN));
        let mut stream = StreamWriter::new(self.clone(), planned, Purpose::Write);
        let mut digest = StreamDigest::new(PeerHashing(self.clone()));
        loop {
            match chunks.recv().await {
                None => {
                    stream.abandon().await; // the client went away: nothing becomes visible
                    return;
                }
                Some(UploadMsg::Data(data)) => {
                    digest.update(&data).await;
                    if let Err(error) = stream.push(&data).await {
                        stream.abandon().await;
                        let _ = failed.send(error);
                        return;
                    }
                }
                Some(UploadMsg::Complete { expected, reply }) => {
                    let received = digest.received();
                    let (key, crcs) = digest.finish().await;
                    let result = self
                        .finish(stream, key, crcs, received, total, expected, attributes)
                        .await;
                    let _ = reply.send(result);
                    return;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        mut stream: StreamWriter<D>,
        key: BlobKey,
        crcs: Vec<u8>,
        received: u64,
        declared: Option<u64>,
        expected: Option<BlobKey>,
        attributes: BTreeMap<String, String>,
    ) -> Result<BlobMeta> {
        if let Err(error) = check_complete(key, received, declared, expected) {
            stream.abandon().await;
            return Err(error);
        }
        let written = async {
            stream.push(&crcs).await?;
            stream.finish(format::stream_payload_bytes(received)).await
        };
        let location = match written.await {
            Ok(location) => location,
            Err(error) => {
                stream.abandon().await;
                return Err(error);
            }
        };
        let result = self
            .commit_elsewhere(key, received, location.clone(), attributes)
            .await;
        self.release_unless_in_doubt(&location, &result);
        result
    }

    /// Makes the blob's segments durable, then has its owner commit it.
    async fn commit_elsewhere(
        &self,
        key: BlobKey,
        size: u64,
        location: Location,
        attributes: BTreeMap<String, String>,
    ) -> Result<BlobMeta> {
        let mut synced: Vec<SegmentId> = Vec::new();
        for extent in &location.extents {
            if !synced.contains(&extent.segment) {
                self.segments.sync(extent.segment).await?;
                synced.push(extent.segment);
            }
        }
        let put = PutRecord {
            key,
            size,
            created_unix_ns: unix_now_ns(),
            location,
            attributes,
            data_crc: None, // a streamed blob's CRC table is in its stream
        };
        let owner = key.owner(self.count);
        let (reply, answer) = oneshot::channel();
        self.peers[owner]
            .send(Request::Commit { put, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    // ----- small blobs --------------------------------------------------------------

    /// A whole small blob: hashes and checks it, then has the key's owner store it. A
    /// peer owner answers `reply` itself.
    async fn put(
        self: &Rc<Self>,
        pieces: Vec<Bytes>,
        declared: Option<u64>,
        expected: Option<BlobKey>,
        attributes: BTreeMap<String, String>,
        reply: oneshot::Sender<Result<BlobMeta>>,
    ) {
        let mut hasher = blake3::Hasher::new();
        let mut size = 0;
        for piece in &pieces {
            hasher.update(piece);
            size += piece.len() as u64;
        }
        let key = BlobKey(*hasher.finalize().as_bytes());
        if let Err(error) = check_complete(key, size, declared, expected) {
            let _ = reply.send(Err(error));
            return;
        }
        let owner = key.owner(self.count);
        if owner == self.id {
            let _ = reply.send(self.store_small(key, size, &pieces, attributes).await);
            return;
        }
        let request = Request::PutOwned {
            key,
            size,
            pieces,
            attributes,
            reply,
        };
        if let Err(mpsc::error::SendError(Request::PutOwned { reply, .. })) =
            self.peers[owner].send(request).await
        {
            let _ = reply.send(Err(Error::ShuttingDown));
        }
    }

    /// Stores a small blob this shard owns: its stream goes out with the next group
    /// write ([`super::small`]), then it is committed. Identical content already stored
    /// is not written.
    async fn store_small(
        self: &Rc<Self>,
        key: BlobKey,
        size: u64,
        pieces: &[Bytes],
        attributes: BTreeMap<String, String>,
    ) -> Result<BlobMeta> {
        self.check_writable()?;
        self.settle(&key).await?;
        if let Some(entry) = self.index.borrow().get(&key) {
            return Ok(entry.meta(key)); // identical content is stored once
        }
        let (extents, data_crc) = if size > 0 {
            let (extent, data_crc) = self
                .write_small(pieces, size)
                .await
                .inspect_err(|_| self.note_poison())?;
            (vec![extent], data_crc)
        } else {
            (Vec::new(), None) // an empty blob has no stream
        };
        let location = Location { extents };
        let put = PutRecord {
            key,
            size,
            created_unix_ns: unix_now_ns(),
            location: location.clone(),
            attributes,
            data_crc,
        };
        let result = self.commit(put).await;
        self.release_unless_in_doubt(&location, &result);
        result
    }

    // ----- owner side ---------------------------------------------------------------

    /// Waits until no record for `key` is staged, so that the index is the truth for it.
    async fn settle(&self, key: &BlobKey) -> Result<()> {
        while self.journal.is_pending(key) {
            let last = self.journal.last_ticket();
            self.journal.wait(last, &self.index).await?;
        }
        Ok(())
    }

    async fn commit(&self, put: PutRecord) -> Result<BlobMeta> {
        self.check_writable()?;
        let key = put.key;
        self.settle(&key).await?;
        if let Some(entry) = self.index.borrow().get(&key) {
            return Ok(entry.meta(key)); // identical content is stored once
        }
        let ticket = self.journal.stage(Record::Put(put))?;
        self.journal
            .wait(ticket, &self.index)
            .await
            .inspect_err(|_| self.note_poison())?;
        self.index
            .borrow()
            .get(&key)
            .map(|entry| entry.meta(key))
            .ok_or(Error::NotFound(key)) // deleted between the flush and now
    }

    async fn delete(&self, key: BlobKey) -> Result<()> {
        self.check_writable()?;
        self.settle(&key).await?;
        if self.index.borrow().get(&key).is_none() {
            return Err(Error::NotFound(key));
        }
        let ticket = self.journal.stage(Record::Delete { key })?;
        self.journal
            .wait(ticket, &self.index)
            .await
            .inspect_err(|_| self.note_poison())
    }

    async fn relocate(&self, key: BlobKey, from: Location, to: Location) -> Result<bool> {
        self.check_writable()?;
        self.settle(&key).await?;
        let current = self.index.borrow().get(&key);
        if current.is_none_or(|entry| entry.location != from) {
            return Ok(false);
        }
        let ticket = self.journal.stage(Record::Relocate { key, location: to })?;
        self.journal
            .wait(ticket, &self.index)
            .await
            .inspect_err(|_| self.note_poison())?;
        Ok(true)
    }

    fn note_poison(&self) {
        if self.poisoned.get() {
            self.status.poisoned.store(true, Ordering::Relaxed);
        }
    }

    // ----- read ---------------------------------------------------------------------

    /// Opens a read of `[range]` of a blob. A small blob (its stream fits one small
    /// buffer) is read and verified here and answered with its bytes already in the
    /// stream, which spares the reader a wake-up; a larger one is streamed by a task.
    async fn get(
        self: &Rc<Self>,
        key: BlobKey,
        range: Option<ByteRange>,
    ) -> Result<super::BlobRead> {
        let entry = self.index.borrow().get(&key).ok_or(Error::NotFound(key))?;
        let range = range.unwrap_or_default();
        let (start, end) = range.resolve(entry.size).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "range offset {} length {} lies past the end of the {}-byte blob",
                range.offset,
                range
                    .length
                    .map_or("(to end)".to_string(), |l| l.to_string()),
                entry.size
            ))
        })?;
        // Open the blob's files now, in the same step as the lookup: compaction may move
        // the blob and remove its segments later, and open handles keep the data readable.
        let files = Rc::new(OpenFiles::open(&self.segments, &entry.location)?);
        let meta = entry.meta(key);
        if entry.location.stream_bytes() <= SMALL_READ_BYTES {
            let (sender, receiver) = mpsc::channel(1);
            if start < end {
                let bytes = self.read_small(&entry, &files, start, end).await?;
                sender
                    .try_send(Ok(bytes))
                    .expect("a new channel has room for one");
            }
            return Ok(super::BlobRead {
                meta,
                start,
                end,
                chunks: receiver,
            });
        }
        let (sender, receiver) = mpsc::channel(self.config.read_channel_depth);
        let shard = self.clone();
        monoio::spawn(async move {
            if let Err(error) = shard.stream_read(&entry, &files, start, end, &sender).await {
                let _ = sender.send(Err(error)).await;
            }
        });
        Ok(super::BlobRead {
            meta,
            start,
            end,
            chunks: receiver,
        })
    }

    /// `[start, end)` of a small blob, verified: one read holds its data and its CRC
    /// table, unless the CRC is in its record.
    async fn read_small(
        &self,
        entry: &Entry,
        files: &OpenFiles<D>,
        start: u64,
        end: u64,
    ) -> Result<Bytes> {
        let size = entry.size;
        let buf = self.small_read_pool.take().await;
        let buf = self
            .read_stream(
                &entry.location,
                files,
                0,
                entry.location.stream_bytes(),
                buf,
            )
            .await?;
        let crcs = match entry.data_crc {
            Some(crc) => vec![crc],
            None => crc_table(
                &buf.as_slice()[size as usize..format::stream_payload_bytes(size) as usize],
            ),
        };
        self.verify(
            entry,
            &buf.as_slice()[..size as usize],
            0,
            &crcs,
            0,
            start,
            end,
        )?;
        Ok(buf.into_bytes().slice(start as usize..end as usize))
    }

    /// Sends `[start, end)` of a large blob, in order, as verified slices of read buffers.
    async fn stream_read(
        self: &Rc<Self>,
        entry: &Rc<Entry>,
        files: &Rc<OpenFiles<D>>,
        start: u64,
        end: u64,
        sender: &mpsc::Sender<Result<Bytes>>,
    ) -> Result<()> {
        if start == end {
            return Ok(());
        }
        let size = entry.size;
        let crcs = self.read_crcs(entry, files, start, end).await?;
        let first_chunk = start / CHUNK_BYTES;
        // Read only the chunks that cover the range, in pieces that end on unit
        // boundaries (so that no read straddles two extents).
        let read_end = round_up_u64(end, CHUNK_BYTES).min(round_up_u64(size, ALIGN));
        let mut unit = round_down_u64(start, CHUNK_BYTES);
        let mut reads: VecDeque<monoio::task::JoinHandle<Result<(u64, AlignedBuf)>>> =
            VecDeque::new();
        loop {
            while unit < end {
                let buf = match read_ahead(
                    reads.len(),
                    self.read_pool.available(),
                    self.config.read_buffers,
                ) {
                    ReadAhead::Wait => None, // the task waits for its buffer
                    ReadAhead::IfFree => match self.read_pool.try_take() {
                        Some(buf) => Some(buf),
                        None => break,
                    },
                    ReadAhead::Deep => break,
                };
                let shard = self.clone();
                let (entry, files) = (entry.clone(), files.clone());
                let next = (round_down_u64(unit, UNIT_BYTES) + UNIT_BYTES).min(read_end);
                let len = next - unit;
                let at = unit;
                reads.push_back(monoio::spawn(async move {
                    let buf = match buf {
                        Some(buf) => buf,
                        None => shard.read_pool.take().await,
                    };
                    let buf = shard
                        .read_stream(&entry.location, &files, at, len, buf)
                        .await?;
                    Ok((at, buf))
                }));
                unit = next;
            }
            let Some(read) = reads.pop_front() else {
                return Ok(());
            };
            let (at, buf) = read.await?;
            let from = start.max(at);
            let to = end.min(at + buf.len() as u64);
            let data_len = (size.min(at + buf.len() as u64) - at) as usize;
            self.verify(
                entry,
                &buf.as_slice()[..data_len],
                at,
                &crcs,
                first_chunk,
                from,
                to,
            )?;
            let bytes = buf
                .into_bytes()
                .slice((from - at) as usize..(to - at) as usize);
            if sender.send(Ok(bytes)).await.is_err() {
                return Ok(()); // the reader went away
            }
        }
    }

    /// Reads stream bytes `[at, at+len)` (aligned) of a blob into `buf`.
    async fn read_stream(
        &self,
        location: &Location,
        files: &OpenFiles<D>,
        at: u64,
        len: u64,
        mut buf: AlignedBuf,
    ) -> Result<AlignedBuf> {
        for (extent, offset, piece) in location.map(at, len) {
            let file = files.file(extent.segment);
            let (result, back) = file.read_at(buf, offset, piece as usize).await;
            buf = back;
            result.map_err(|e| Error::io("read", self.segments.path(extent.segment), offset, e))?;
        }
        Ok(buf)
    }

    /// The CRCs of the chunks covering `[start, end)` of a large blob.
    async fn read_crcs(
        &self,
        entry: &Entry,
        files: &OpenFiles<D>,
        start: u64,
        end: u64,
    ) -> Result<Vec<u32>> {
        if let Some(crc) = entry.data_crc {
            return Ok(vec![crc]); // one chunk, whose CRC is in the record
        }
        let (first, last) = (start / CHUNK_BYTES, end.div_ceil(CHUNK_BYTES));
        let table_from = entry.size + 4 * first;
        let table_to = entry.size + 4 * last;
        let read_from = round_down_u64(table_from, ALIGN);
        let read_to = round_up_u64(table_to, ALIGN);
        // A ranged read's few CRCs fit a small read buffer (taken while no other buffer
        // is held, and given back on return); only a long range's table needs its own.
        let len = (read_to - read_from) as usize;
        let buf = if len <= self.small_read_pool.buf_bytes() {
            self.small_read_pool.take().await
        } else {
            AlignedBuf::zeroed(len)
        };
        let buf = self
            .read_stream(&entry.location, files, read_from, read_to - read_from, buf)
            .await?;
        Ok(crc_table(
            &buf.as_slice()[(table_from - read_from) as usize..(table_to - read_from) as usize],
        ))
    }

    /// Checks the CRC of every chunk overlapping `[from, to)`. `data` holds blob bytes
    /// from `data_at` (a chunk boundary); `crcs[i]` is the CRC of chunk `crcs_first + i`.
    #[allow(clippy::too_many_arguments)]
    fn verify(
        &self,
        entry: &Entry,
        data: &[u8],
        data_at: u64,
        crcs: &[u32],
        crcs_first: u64,
        from: u64,
        to: u64,
    ) -> Result<()> {
        debug_assert_eq!(data_at % CHUNK_BYTES, 0);
        for chunk in from / CHUNK_BYTES..to.div_ceil(CHUNK_BYTES) {
            let begin = (chunk * CHUNK_BYTES - data_at) as usize;
            let finish = (begin + CHUNK_BYTES as usize).min(data.len());
            if crc32fast::hash(&data[begin..finish]) != crcs[(chunk - crcs_first) as usize] {
                let (extent, offset, _) = entry.location.map(chunk * CHUNK_BYTES, 1)[0];
                return Err(Error::Corrupt {
                    path: self.segments.path(extent.segment),
                    offset,
                    what: "blob data chunk",
                });
            }
        }
        Ok(())
    }

    /// Releases a committed (or refused) blob's extents. If the commit failed in a way
    /// that leaves its record in doubt ([`Error::leaves_record_in_doubt`]), they stay in
    /// flight instead, so that compaction never removes their segment: the record may
    /// be durable and name them after a restart. Only a restart (which reads what the
    /// journal holds) releases them; a failure of that kind has stopped a shard anyway.
    fn release_unless_in_doubt<T>(&self, location: &Location, result: &Result<T>) {
        match result {
            Err(error) if error.leaves_record_in_doubt() => tracing::warn!(
                shard = self.id,
                %error,
                "a commit failed with its record in doubt; its space is kept until a restart"
            ),
            _ => self.segments.release(&location.extents),
        }
    }

    // ----- compaction ---------------------------------------------------------------

    /// One pass: for each of this shard's sealed segments whose live bytes are at most
    /// the configured share of its size, moves the live blobs out and removes it.
    pub async fn compact(self: Rc<Self>) -> Result<CompactionReport> {
        let _one_pass_at_a_time = self.compaction.lock().await;
        // A stopped shard removes nothing: a segment may hold data a record in doubt
        // names (see `release_unless_in_doubt`), even with no live blob in it.
        self.check_writable()?;
        let mut report = CompactionReport::default();
        let candidates = self.segments.compactable();
        if candidates.is_empty() {
            return Ok(report);
        }
        let mut live: HashMap<SegmentId, Vec<(BlobKey, Location)>> = HashMap::new();
        let mut live_bytes: HashMap<SegmentId, u64> = HashMap::new();
        for peer in &self.peers {
            let (reply, answer) = oneshot::channel();
            peer.send(Request::LiveIn {
                writer: self.id,
                reply,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
            for (key, location) in answer.await.map_err(|_| Error::ShuttingDown)? {
                for extent in &location.extents {
                    *live_bytes.entry(extent.segment).or_default() += extent.len as u64;
                    let blobs = live.entry(extent.segment).or_default();
                    if blobs.last().is_none_or(|(k, _)| *k != key) {
                        blobs.push((key, location.clone()));
                    }
                }
            }
        }
        let mut removed: Vec<SegmentId> = Vec::new();
        for (segment, size) in candidates {
            let used = live_bytes.get(&segment).copied().unwrap_or(0);
            if used as f64 > size as f64 * self.config.compaction_live_ratio {
                continue;
            }
            if !self.segments.begin_compaction(segment) {
                continue;
            }
            // A blob that also lay in a segment removed earlier in this pass was moved (or
            // deleted) then; its listed location is stale.
            let blobs: Vec<_> = live
                .remove(&segment)
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, from)| !from.extents.iter().any(|e| removed.contains(&e.segment)))
                .collect();
            let moved = self.evacuate(blobs, &mut report).await;
            if let Err(error) = moved {
                self.segments.end_compaction(segment);
                return Err(error);
            }
            // Every shard drops its handle first, and says whether a read of the segment
            // is still open. Reads that start from now on find the moved locations, so
            // without open reads no one needs the file's bytes any more: it is recycled.
            // With them it is removed, and its last handle frees it (on the reaper's
            // thread, for a real disk).
            let mut read = self.segments.is_read(segment);
            for (index, peer) in self.peers.iter().enumerate() {
                if index != self.id {
                    let (reply, forgotten) = oneshot::channel();
                    if peer.send(Request::Forget { segment, reply }).await.is_ok() {
                        read |= forgotten.await.unwrap_or(true);
                    }
                }
            }
            let retire = if read {
                Retire::Remove
            } else {
                Retire::Recycle
            };
            self.segments.remove(segment, retire)?;
            removed.push(segment);
            report.segments_removed += 1;
        }
        if report.segments_removed > 0 {
            // The removed segments' blocks go back in the background; wait for them
            // before taking a reserve again (used if the disk was full).
            self.segments.released().await;
            self.segments.hold_reserve();
        }
        Ok(report)
    }

    /// Copies each blob to fresh extents and has its owner move it there, in batches:
    /// the batch's destination segments are synced once, then every owner is asked at
    /// once, so that its journal commits the moves together (one fdatasync and one group
    /// commit per batch instead of per blob).
    async fn evacuate(
        &self,
        blobs: Vec<(BlobKey, Location)>,
        report: &mut CompactionReport,
    ) -> Result<()> {
        let mut batch: Vec<Copied> = Vec::new();
        let mut batch_bytes = 0;
        for (key, from) in blobs {
            match self.copy_out(&from).await {
                Ok(to) => {
                    batch_bytes += to.stream_bytes();
                    batch.push(Copied { key, from, to });
                }
                Err(error) => {
                    // Copies no record names yet: dead space, reclaimed like any other.
                    for copied in &batch {
                        self.segments.release(&copied.to.extents);
                    }
                    return Err(error);
                }
            }
            if batch.len() >= EVACUATE_BATCH_BLOBS || batch_bytes >= EVACUATE_BATCH_BYTES {
                self.relocate_batch(std::mem::take(&mut batch), report)
                    .await?;
                batch_bytes = 0;
            }
        }
        self.relocate_batch(batch, report).await
    }

    /// Copies one blob's stream (data and CRCs, as stored) to fresh extents of this
    /// shard; on error nothing of the copy is left in flight.
    async fn copy_out(&self, from: &Location) -> Result<Location> {
        self.check_writable()?;
        let stream_bytes = from.stream_bytes();
        let source = OpenFiles::open(&self.segments, from)?;
        let mut stream = StreamWriterRef::new(self, Some(stream_bytes), Purpose::Compaction);
        let mut at = 0;
        let copied: Result<Location> = async {
            while at < stream_bytes {
                let len = UNIT_BYTES.min(stream_bytes - at);
                self.compaction_pace.admit(len).await;
                let buf = self.read_pool.take().await;
                let buf = self.read_stream(from, &source, at, len, buf).await?;
                stream.push(buf.as_slice()).await?;
                at += len;
            }
            stream.finish(stream_bytes).await
        }
        .await;
        if copied.is_err() {
            stream.abandon().await;
        }
        copied
    }

    /// Makes a batch of copies durable and has their owners journal the moves; every
    /// blob's extents are released as its own answer says (`release_unless_in_doubt`).
    /// The first error, after every answer was taken.
    async fn relocate_batch(
        &self,
        batch: Vec<Copied>,
        report: &mut CompactionReport,
    ) -> Result<()> {
        let mut segments: Vec<SegmentId> = Vec::new();
        for segment in batch
            .iter()
            .flat_map(|copied| distinct_segments(&copied.to))
        {
            if !segments.contains(&segment) {
                segments.push(segment);
            }
        }
        for segment in segments {
            if let Err(error) = self.segments.sync(segment).await {
                let failed = Err::<(), _>(error);
                for copied in &batch {
                    self.release_unless_in_doubt(&copied.to, &failed);
                }
                return failed;
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        for copied in &batch {
            let (reply, answer) = oneshot::channel();
            let request = Request::Relocate {
                key: copied.key,
                from: copied.from.clone(),
                to: copied.to.clone(),
                reply,
            };
            let sent = self.peers[copied.key.owner(self.count)].send(request).await;
            answers.push(sent.map(|()| answer));
        }
        let mut first_error = None;
        for (copied, answer) in batch.iter().zip(answers) {
            let moved = match answer {
                Ok(answer) => answer.await.unwrap_or(Err(Error::ShuttingDown)),
                Err(_) => Err(Error::ShuttingDown),
            };
            self.release_unless_in_doubt(&copied.to, &moved);
            match moved {
                Ok(true) => {
                    report.blobs_moved += 1;
                    report.bytes_moved += copied.to.stream_bytes();
                }
                Ok(false) => {} // deleted or moved meanwhile: the copy is dead space
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A blob compaction copied and whose owner has not yet journaled the move.
struct Copied {
    key: BlobKey,
    from: Location,
    to: Location,
}

/// The segment files of a blob's location, open, so that the blob stays readable for
/// as long as this lives, even if compaction moves it and removes the segments.
/// Its lease keeps compaction from recycling the segments (it removes them instead).
struct OpenFiles<D: Disk> {
    files: Vec<(SegmentId, D::File)>,
    _lease: Lease,
}

impl<D: Disk> OpenFiles<D> {
    fn open(segments: &Segments<D>, location: &Location) -> Result<OpenFiles<D>> {
        let mut files = Vec::new();
        for segment in distinct_segments(location) {
            files.push((segment, segments.file(segment)?));
        }
        let lease = segments.lease(files.iter().map(|(segment, _)| *segment).collect());
        Ok(OpenFiles {
            files,
            _lease: lease,
        })
    }

    fn file(&self, segment: SegmentId) -> &D::File {
        &self
            .files
            .iter()
            .find(|(id, _)| *id == segment)
            .expect("opened with the blob")
            .1
    }
}

/// Whether a stream's read loop starts another read, with `in_flight` reads of its own
/// running and `free` of the shard's `pool` read buffers free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadAhead {
    /// Start it; it waits for a buffer if none is free.
    Wait,
    /// Start it only with a buffer taken at once.
    IfFree,
    /// Deep enough: wait for the oldest read first.
    Deep,
}

fn read_ahead(in_flight: usize, free: usize, pool: usize) -> ReadAhead {
    if in_flight < READS_IN_FLIGHT {
        ReadAhead::Wait
    } else if in_flight < READS_IN_FLIGHT_MAX && free > pool / 2 {
        ReadAhead::IfFree
    } else {
        ReadAhead::Deep
    }
}

fn distinct_segments(location: &Location) -> Vec<SegmentId> {
    let mut segments: Vec<SegmentId> = location.extents.iter().map(|e| e.segment).collect();
    segments.dedup();
    segments
}

/// A stored CRC table: one little-endian u32 per chunk ([`digest::ChunkCrcs::finish`]).
fn crc_table(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// The checks at complete: the size declared at start and the hash the client expects.
fn check_complete(
    key: BlobKey,
    received: u64,
    declared: Option<u64>,
    expected: Option<BlobKey>,
) -> Result<()> {
    if let Some(declared) = declared.filter(|&d| d != received) {
        return Err(Error::SizeMismatch { declared, received });
    }
    if let Some(expected) = expected.filter(|&e| e != key) {
        return Err(Error::HashMismatch {
            expected,
            actual: key,
        });
    }
    Ok(())
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// An upload's hashing help from its shard's peers: the units go in turn to this shard
/// (one unit) and then to each peer that has no upload of its own (two units each),
/// while fewer than [`digest::OFFLOAD_UNITS_MAX`] of this shard's units are away. Two,
/// because this shard also copies every byte into the write buffers: with one idle peer
/// on the development VM, its thread was 48–70% busy against the peer's 17–27% at an
/// even split, and a third for this shard wrote 7% faster (BENCHMARKS.md §1). A peer's
/// full inbox is no wait: the unit is hashed here.
struct PeerHashing<D: Disk>(Rc<Shard<D>>);

impl<D: Disk> Offload for PeerHashing<D> {
    fn choose(&self, offset: u64) -> Option<(usize, AwayPermit)> {
        let shard = &*self.0;
        let idle: Vec<usize> = (0..shard.count)
            .filter(|&peer| {
                peer != shard.id && shard.statuses[peer].active_uploads.load(Ordering::Relaxed) == 0
            })
            .collect();
        let turn = (offset / digest::DIGEST_UNIT_BYTES) as usize % (2 * idle.len() + 1);
        let peer = *idle.get(turn.checked_sub(1)? / 2)?;
        Some((peer, AwayPermit::take(&shard.offload_units)?))
    }

    fn send(
        &self,
        peer: usize,
        offset: u64,
        pieces: Vec<Bytes>,
    ) -> Option<oneshot::Receiver<UnitDigest>> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Digest {
            offset,
            pieces,
            reply,
        };
        self.0.peers[peer].try_send(request).ok().map(|()| answer)
    }
}

type StreamWriterRef<'a, D> = StreamWriterOf<&'a Shard<D>, D>;
type StreamWriter<D> = StreamWriterOf<Rc<Shard<D>>, D>;

/// Writes a blob's stream: fills aligned buffers, allocates extents as the stream grows,
/// keeps a few writes in flight.
struct StreamWriterOf<S: std::ops::Deref<Target = Shard<D>>, D: Disk> {
    shard: S,
    /// The stream's final (aligned) size, if known in advance.
    planned: Option<u64>,
    /// Compaction's streams may draw on the space reserve; uploads' may not.
    purpose: Purpose,
    extents: Vec<Extent>,
    allocated: u64,
    position: u64,
    buf: Option<AlignedBuf>,
    writes: VecDeque<monoio::task::JoinHandle<Result<()>>>,
}

impl<S: std::ops::Deref<Target = Shard<D>>, D: Disk> StreamWriterOf<S, D> {
    fn new(shard: S, planned: Option<u64>, purpose: Purpose) -> Self {
        StreamWriterOf {
            shard,
            planned,
            purpose,
            extents: Vec::new(),
            allocated: 0,
            position: 0,
            buf: None,
            writes: VecDeque::new(),
        }
    }

    async fn push(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let buf = match self.buf.as_mut() {
                Some(buf) => buf,
                None => self.buf.insert(self.shard.write_pool.take().await),
            };
            let taken = buf.extend_from_slice(data);
            data = &data[taken..];
            if buf.remaining() == 0 {
                self.submit().await?;
            }
        }
        Ok(())
    }

    /// Writes the current buffer (its length aligned) at the stream position.
    async fn submit(&mut self) -> Result<()> {
        let buf = self.buf.take().expect("a buffer to submit");
        let len = buf.len() as u64;
        debug_assert_eq!(len % ALIGN, 0);
        self.allocate_to(self.position + len)?;
        let location = Location {
            extents: self.extents.clone(),
        };
        let pieces = location.map(self.position, len);
        assert_eq!(pieces.len(), 1, "a write unit never straddles extents");
        let (extent, offset, _) = pieces[0];
        let file = self.shard.segments.file(extent.segment)?;
        let path = self.shard.segments.path(extent.segment);
        while self.writes.len() >= WRITES_IN_FLIGHT {
            self.writes.pop_front().expect("non-empty").await?;
        }
        self.writes.push_back(monoio::spawn(async move {
            let (result, _buf) = file.write_at(buf, offset).await;
            result.map_err(|e| Error::io("write", &path, offset, e))
        }));
        self.position += len;
        Ok(())
    }

    fn allocate_to(&mut self, end: u64) -> Result<()> {
        while self.allocated < end {
            let need = match self.planned {
                Some(planned) => planned.max(end) - self.allocated,
                None => self.allocated.clamp(UNIT_BYTES, UNDECLARED_PIECE_BYTES_MAX),
            };
            let extent = self.shard.segments.allocate(need, self.purpose)?;
            self.allocated += extent.len as u64;
            match self.extents.last_mut() {
                Some(last)
                    if last.segment == extent.segment
                        && last.offset + last.len as u64 == extent.offset =>
                {
                    last.len += extent.len;
                    self.shard.segments.release(&[extent]); // counted once, as `last`
                }
                _ => self.extents.push(extent),
            }
        }
        Ok(())
    }

    /// Pads and writes what is buffered, waits for every write, gives back unused
    /// space, and returns where the stream lies. `payload` is the stream's unpadded size.
    async fn finish(&mut self, payload: u64) -> Result<Location> {
        if let Some(mut buf) = self.buf.take() {
            if !buf.is_empty() {
                buf.pad_zeroed_to(buf.len().next_multiple_of(ALIGN as usize));
                self.buf = Some(buf);
                self.submit().await?;
            }
        }
        while let Some(write) = self.writes.pop_front() {
            write.await?;
        }
        let used = round_up_u64(payload, ALIGN);
        debug_assert_eq!(used, self.position);
        if let Some(last) = self.extents.last_mut() {
            let before = self.allocated - last.len as u64;
            if used > before && used - before < last.len as u64 {
                *last = self.shard.segments.trim(*last, used - before);
                self.allocated = before + last.len as u64;
            }
        }
        Ok(Location {
            extents: self.extents.clone(),
        })
    }

    /// Waits for writes in flight and ends the extents' in-flight state: the space is
    /// dead and compaction reclaims it.
    async fn abandon(&mut self) {
        self.buf = None;
        while let Some(write) = self.writes.pop_front() {
            let _ = write.await;
        }
        self.shard.segments.release(&self.extents);
        self.extents.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stream keeps its guaranteed depth whatever the pool holds; it goes deeper
    /// only while more than half the pool is free, and never past the maximum.
    #[test]
    fn reads_go_deeper_only_while_the_pool_is_mostly_free() {
        for in_flight in 0..READS_IN_FLIGHT {
            for free in [0, 1, 32, 64] {
                assert_eq!(read_ahead(in_flight, free, 64), ReadAhead::Wait);
            }
        }
        for in_flight in READS_IN_FLIGHT..READS_IN_FLIGHT_MAX {
            assert_eq!(read_ahead(in_flight, 64, 64), ReadAhead::IfFree);
            assert_eq!(read_ahead(in_flight, 33, 64), ReadAhead::IfFree);
            assert_eq!(read_ahead(in_flight, 32, 64), ReadAhead::Deep);
            assert_eq!(read_ahead(in_flight, 0, 64), ReadAhead::Deep);
        }
        assert_eq!(read_ahead(READS_IN_FLIGHT_MAX, 64, 64), ReadAhead::Deep);
        assert_eq!(read_ahead(READS_IN_FLIGHT_MAX + 3, 64, 64), ReadAhead::Deep);
    }

    /// Bytes are admitted no faster than the rate (a lower bound on time, which a sleep
    /// guarantees; no upper bound is asserted), and without a rate at once.
    #[test]
    fn the_pacer_admits_bytes_at_its_rate() {
        let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let paced = Pacer::new(Some(10 * UNIT_BYTES));
            let start = Instant::now();
            for _ in 0..4 {
                paced.admit(UNIT_BYTES).await; // due at 0, 100, 200 and 300 ms
            }
            assert!(start.elapsed() >= Duration::from_millis(300));

            for unpaced in [Pacer::new(None), Pacer::new(Some(0))] {
                unpaced.admit(UNIT_BYTES).await;
                assert!(
                    unpaced.next.get().is_none(),
                    "no rate: nothing is ever due later"
                );
            }
        });
    }
}
