//! Group writes of small blobs on their owner shard.
//!
//! A small blob reaches its owner whole (see [`super::Upload`]). The owner does not write
//! each one on its own: blobs that arrive while a group write is running wait in the
//! *open batch* and go out together in the next one. The batch gets consecutive extents
//! of the shard's active segment, is copied into one aligned buffer per run of
//! contiguous extents and written with one `O_DSYNC` write per run
//! ([`DiskFile::write_at_durable`]: the write and its flush as one operation, which on
//! the disk measured here beat a write followed by an fdatasync; kernel-notes.md §7).
//! Only then does each blob go on to its commit (the journal's own
//! group commit), so "a blob's data is durable before its record" holds exactly as for
//! streamed uploads, and recovery is the same.
//!
//! A blob of at most one CRC chunk (64 KiB) is written without a CRC table: its CRC goes
//! into its Put record (kind 6 in `format.rs`), so a 4 KiB blob is one 4 KiB block on
//! disk instead of two, and a batch writes and flushes half the bytes.
//!
//! Why: on a disk whose flushes are slow under concurrency, one 8 KiB write and one
//! fdatasync per blob leaves the device busy with small requests; a batch of 32 blobs is
//! one write and one flush.
//!
//! Guarantees:
//! - at most one group write per shard at a time;
//! - a batch holds at most [`BATCH_BYTES_MAX`] of streams, so each run fits one buffer
//!   of the shard's write pool (which bounds the memory); a blob that does not fit waits
//!   for the next batch;
//! - every blob's extent stays in flight (never compacted) from its allocation until its
//!   owner releases it after the commit;
//! - a failed write fails every blob of its batch (nothing of them becomes visible) and
//!   poisons the shard: whether its bytes are durable is unknown, as after a failed
//!   fdatasync.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use bytes::Bytes;
use graviton_io::buf::round_up_u64;
use graviton_io::{Disk, DiskFile};
use tokio::sync::oneshot;

use super::digest::ChunkCrcs;
use super::error::{Error, Result};
use super::format::{self, Extent, ALIGN, UNIT_BYTES};
use super::segments::Purpose;
use super::shard::Shard;
use super::signal::Signal;

/// Most stream bytes in one batch: one write-pool buffer.
pub const BATCH_BYTES_MAX: u64 = UNIT_BYTES;

/// The open batch of one shard and whether a group write is running.
#[derive(Default)]
pub struct SmallWrites {
    open: RefCell<Vec<Member>>,
    open_bytes: Cell<u64>,
    running: Cell<bool>,
    /// Notified whenever a batch leaves `open`, so that blobs waiting for room re-check.
    taken: Signal,
}

/// One blob of a batch.
struct Member {
    pieces: Vec<Bytes>,
    /// The CRC table, empty when the CRC goes into the record.
    crcs: Vec<u8>,
    /// Stream bytes: data, CRC table, padding to [`ALIGN`].
    len: u64,
    reply: oneshot::Sender<Result<Extent>>,
}

impl<D: Disk> Shard<D> {
    /// Writes a small blob's stream with the next group write and returns its extent
    /// once durable, with the data's CRC if the record is to hold it (the stream is then
    /// data and padding; otherwise data, CRC table and padding). The extent is in
    /// flight: the caller releases it after the commit.
    pub(super) async fn write_small(
        self: &Rc<Self>,
        pieces: &[Bytes],
        size: u64,
    ) -> Result<(Extent, Option<u32>)> {
        let (crcs, data_crc) = if format::crc_fits_record(size) {
            let mut crc = crc32fast::Hasher::new();
            pieces.iter().for_each(|piece| crc.update(piece));
            (Vec::new(), Some(crc.finalize()))
        } else {
            let mut crcs = ChunkCrcs::default();
            pieces.iter().for_each(|piece| crcs.update(piece));
            (crcs.finish(), None)
        };
        let len = round_up_u64(size + crcs.len() as u64, ALIGN);
        assert!(
            len > 0 && len <= BATCH_BYTES_MAX,
            "a small blob fits one batch"
        );
        let small = &self.small;
        loop {
            let seen = small.taken.generation();
            if small.open_bytes.get() + len <= BATCH_BYTES_MAX {
                break;
            }
            small.taken.changed(seen).await;
        }
        let (reply, answer) = oneshot::channel();
        small.open.borrow_mut().push(Member {
            pieces: pieces.to_vec(),
            crcs,
            len,
            reply,
        });
        small.open_bytes.set(small.open_bytes.get() + len);
        if !small.running.replace(true) {
            let shard = self.clone();
            monoio::spawn(async move { shard.run_small_writes().await });
        }
        let extent = answer.await.map_err(|_| Error::ShuttingDown)??;
        Ok((extent, data_crc))
    }

    /// Writes batches until no blob waits.
    async fn run_small_writes(self: Rc<Self>) {
        loop {
            let batch = std::mem::take(&mut *self.small.open.borrow_mut());
            self.small.open_bytes.set(0);
            self.small.taken.notify();
            if batch.is_empty() {
                self.small.running.set(false);
                return;
            }
            match self.write_batch(&batch).await {
                Ok(extents) => {
                    for (member, extent) in batch.into_iter().zip(extents) {
                        if member.reply.send(Ok(extent)).is_err() {
                            self.segments.release(&[extent]); // its task is gone
                        }
                    }
                }
                Err(error) => {
                    for member in batch {
                        let _ = member.reply.send(Err(error.duplicate()));
                    }
                }
            }
        }
    }

    /// One group write: allocates, writes each run of contiguous extents with one write,
    /// and fdatasyncs each segment written. On error, the extents are released.
    async fn write_batch(&self, batch: &[Member]) -> Result<Vec<Extent>> {
        self.check_writable()?;
        // No await between allocations: the extents are consecutive unless the active
        // segment fills up and a new one starts.
        let mut extents: Vec<Extent> = Vec::with_capacity(batch.len());
        for member in batch {
            match self.segments.allocate(member.len, Purpose::Write) {
                Ok(extent) => extents.push(extent),
                Err(error) => {
                    self.segments.release(&extents);
                    return Err(error);
                }
            }
        }
        let written = self.write_runs(batch, &extents).await;
        if written.is_err() {
            self.segments.release(&extents);
        }
        written.map(|()| extents)
    }

    async fn write_runs(&self, batch: &[Member], extents: &[Extent]) -> Result<()> {
        let mut first = 0;
        while first < batch.len() {
            let mut end = first + 1;
            while end < batch.len() && follows(&extents[end - 1], &extents[end]) {
                end += 1;
            }
            let mut buf = self.write_pool.take().await;
            for member in &batch[first..end] {
                let start = buf.len();
                for piece in &member.pieces {
                    assert_eq!(buf.extend_from_slice(piece), piece.len(), "fits the buffer");
                }
                buf.extend_from_slice(&member.crcs);
                buf.pad_zeroed_to(start + member.len as usize);
            }
            let (segment, offset) = (extents[first].segment, extents[first].offset);
            let file = self.segments.file(segment)?;
            let (result, _buf) = file.write_at_durable(buf, offset).await;
            if let Err(error) = result {
                // Whether the bytes are durable is unknown, as after a failed fdatasync.
                self.poisoned.set(true);
                return Err(Error::io(
                    "O_DSYNC write",
                    self.segments.path(segment),
                    offset,
                    error,
                ));
            }
            first = end;
        }
        Ok(())
    }
}

/// True if `next` starts where `previous` ends, in the same segment.
fn follows(previous: &Extent, next: &Extent) -> bool {
    previous.segment == next.segment && previous.offset + previous.len as u64 == next.offset
}
