//! The owner side of durability: a shard's journal, with group commit, rotation and
//! checkpoints.
//!
//! Records are *staged* in memory and made durable by whichever caller finds no flush
//! running: it takes everything staged, writes it after the durable end of the log
//! (rewriting the partial last block with the same prefix) with one `O_DSYNC` write,
//! applies the records to the shard's index, and wakes every waiter whose records were
//! in the batch. Commits that arrive during a flush share the next one (group commit).
//! A journal file is zero-filled when it is created, so each append overwrites written
//! blocks and costs the device one flush, with no file-system journal commit. The next
//! journal's file is zero-filled in the background ahead of its rotation (the *spare*),
//! so a rotation costs a header write, not 16 MiB of zeros on the commit path.
//!
//! Guarantees:
//! - a record is applied to the index only after it is durable, so reads, stats and
//!   listings never see a blob whose commit could still be lost;
//! - a failed append poisons the shard: no more records are accepted, and nothing is
//!   retried (whether the bytes are durable is unknown);
//! - when the journal file is full it rotates: a new journal is created and made durable
//!   first, then the old one is sealed, then the index is snapshotted into a checkpoint
//!   for the new generation in the background (one at a time: a rotation during a
//!   checkpoint has its own written next); once that checkpoint is durable, older
//!   journals and checkpoints are removed. Reopening reads one checkpoint and the
//!   journals after it, so it grows with live blobs, not with history;
//! - a clean shutdown waits for the checkpoint being written (and one asked for
//!   meanwhile), so a store shut down and opened again and again does not pile up
//!   journals to replay.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use graviton_io::buf::round_down_u64;
use graviton_io::{AlignedBuf, Disk, DiskFile};

use super::error::{Error, Result};
use super::format::{self, Record, ALIGN, HEADER_BYTES, UNIT_BYTES};
use super::index::{Index, Snapshot};
use super::signal::Signal;
use super::types::BlobKey;

/// Room kept at the end of every journal for its Seal record.
const SEAL_RESERVE: u64 = 64;

/// Most record bytes in one write to a journal file of `journal_bytes`: an eighth of it,
/// at most 256 KiB, at least a block. A flush with more writes them with several appends,
/// one after the other. Bounding the write bounds what a crash can tear: past the block
/// where the durable log ends, only the one write in flight can have left bytes, so
/// recovery tells a torn tail from a damaged record followed by good ones (see
/// `recovery.rs`). A function of the file's size, so that recovery, which knows only
/// the file, uses the bound its writer used.
pub(super) fn append_bytes_max(journal_bytes: u64) -> u64 {
    round_down_u64((journal_bytes / 8).min(256 * 1024), ALIGN).max(ALIGN)
}

pub struct Journal<D: Disk> {
    disk: D,
    shard: usize,
    dir: PathBuf,
    capacity_bytes: u64,
    state: RefCell<State<D::File>>,
    /// The buffer appends are built in, kept between appends (at most the largest
    /// append plus one block): a fresh 4 KiB-aligned allocation per append left the
    /// allocator's heaps fragmented (BENCHMARKS.md §2, "Found on 2026-12-04").
    append_buf: Cell<Option<AlignedBuf>>,
    /// Count of records durable and applied (tickets are record counts).
    durable: Signal,
    poisoned: Rc<Cell<bool>>,
    /// The checkpoint being written, if any, and the newest one asked for meanwhile.
    checkpoints: Rc<Checkpoints>,
    /// The next journal file, zero-filled ahead of the rotation that will use it.
    spare: Rc<Spare<D::File>>,
}

/// The next journal's file, prepared in the background: created under the next
/// generation's name, zero-filled and made durable, but without a header, so until a
/// rotation writes one it is an *unfinished* journal, which holds no records and which
/// recovery removes.
struct Spare<F> {
    slot: RefCell<SpareSlot<F>>,
    /// Notified when a preparation ends.
    done: Signal,
}

enum SpareSlot<F> {
    Empty,
    Preparing,
    Ready { generation: u64, file: F },
}

struct State<F> {
    file: F,
    generation: u64,
    /// File offset where the durable record stream ends.
    end: u64,
    /// Bytes of the block holding `end`, from its start up to `end`.
    tail: Vec<u8>,
    staged: Vec<u8>,
    staged_records: Vec<Record>,
    /// Tickets handed out (records staged so far).
    next_ticket: u64,
    flushing: bool,
    /// Keys with a staged record not yet applied, and how many.
    pending: HashMap<BlobKey, u32>,
}

impl<D: Disk> Journal<D> {
    /// Starts a new journal of generation `generation` in `dir` (the previous one, if
    /// any, must already be sealed).
    pub fn create(
        disk: D,
        shard: usize,
        dir: &Path,
        generation: u64,
        capacity_bytes: u64,
        poisoned: Rc<Cell<bool>>,
    ) -> Result<Journal<D>> {
        let file = create_journal_file(&disk, dir, generation, capacity_bytes)?;
        // A new journal is an existing one whose records end right after the header.
        Ok(Journal::resume(
            disk,
            shard,
            dir,
            generation,
            file,
            HEADER_BYTES,
            Vec::new(),
            capacity_bytes,
            poisoned,
        ))
    }

    /// Continues an existing journal whose valid records end at `end`.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        disk: D,
        shard: usize,
        dir: &Path,
        generation: u64,
        file: D::File,
        end: u64,
        tail: Vec<u8>,
        capacity_bytes: u64,
        poisoned: Rc<Cell<bool>>,
    ) -> Journal<D> {
        Journal {
            disk,
            shard,
            dir: dir.to_path_buf(),
            capacity_bytes,
            state: RefCell::new(State {
                file,
                generation,
                end,
                tail,
                staged: Vec::new(),
                staged_records: Vec::new(),
                next_ticket: 0,
                flushing: false,
                pending: HashMap::new(),
            }),
            append_buf: Cell::new(None),
            durable: Signal::default(),
            poisoned,
            checkpoints: Rc::default(),
            spare: Rc::new(Spare {
                slot: RefCell::new(SpareSlot::Empty),
                done: Signal::default(),
            }),
        }
    }

    /// Starts writing a checkpoint of `index` for the current generation.
    pub fn checkpoint_now(&self, index: &RefCell<Index>) {
        let snapshot = index.borrow().snapshot();
        self.start_checkpoint(self.generation(), snapshot);
    }

    /// Writes the header of a fresh journal file; made durable with the directory.
    pub async fn init(&self) -> Result<()> {
        let (file, generation) = {
            let state = self.state.borrow();
            (state.file_clone(), state.generation)
        };
        zero_fill(&file, &self.path_of(generation), self.capacity_bytes).await?;
        self.write_header(&file, generation).await?;
        self.disk
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("fsync dir", &self.dir, 0, e))?;
        self.prepare_spare(generation + 1);
        Ok(())
    }

    /// Starts preparing the file of journal `generation` in the background.
    fn prepare_spare(&self, generation: u64) {
        let spare = self.spare.clone();
        if !matches!(*spare.slot.borrow(), SpareSlot::Empty) {
            return;
        }
        *spare.slot.borrow_mut() = SpareSlot::Preparing;
        let (disk, shard, dir, capacity) = (
            self.disk.clone(),
            self.shard,
            self.dir.clone(),
            self.capacity_bytes,
        );
        monoio::spawn(async move {
            *spare.slot.borrow_mut() =
                match zero_filled_journal(&disk, &dir, generation, capacity).await {
                    Ok(file) => SpareSlot::Ready { generation, file },
                    Err(error) => {
                        tracing::debug!(shard, %error, "no spare journal prepared");
                        SpareSlot::Empty
                    }
                };
            spare.done.notify();
        });
    }

    /// The prepared file of journal `generation`, waiting for a preparation under way;
    /// `None` if there is none (the caller creates the file itself).
    async fn take_spare(&self, generation: u64) -> Option<D::File> {
        loop {
            let seen = self.spare.done.generation();
            if !matches!(*self.spare.slot.borrow(), SpareSlot::Preparing) {
                break;
            }
            self.spare.done.changed(seen).await;
        }
        match std::mem::replace(&mut *self.spare.slot.borrow_mut(), SpareSlot::Empty) {
            SpareSlot::Ready {
                generation: ready,
                file,
            } => {
                assert_eq!(ready, generation, "a spare is for the next generation");
                Some(file)
            }
            SpareSlot::Empty | SpareSlot::Preparing => None,
        }
    }

    /// Writes the header of journal `generation` into its file and fdatasyncs: from then
    /// on it is a valid (empty) journal.
    async fn write_header(&self, file: &D::File, generation: u64) -> Result<()> {
        let header = format::encode_header(format::JOURNAL_MAGIC, self.shard, generation);
        let path = self.path_of(generation);
        write_bytes(file, &path, 0, &header).await?;
        file.sync_data()
            .await
            .map_err(|e| Error::io("fdatasync", &path, 0, e))
    }

    pub fn generation(&self) -> u64 {
        self.state.borrow().generation
    }

    fn path_of(&self, generation: u64) -> PathBuf {
        self.dir.join(format::journal_file_name(generation))
    }

    /// True if a record for `key` is staged but not yet durable.
    pub fn is_pending(&self, key: &BlobKey) -> bool {
        self.state.borrow().pending.contains_key(key)
    }

    /// Stages `record`; returns its ticket for [`Journal::wait`].
    pub fn stage(&self, record: Record) -> Result<u64> {
        if self.poisoned.get() {
            return Err(Error::Poisoned { shard: self.shard });
        }
        let mut state = self.state.borrow_mut();
        if let Some(key) = record_key(&record) {
            *state.pending.entry(key).or_default() += 1;
        }
        format::encode_record(&record, &mut state.staged);
        state.staged_records.push(record);
        state.next_ticket += 1;
        Ok(state.next_ticket)
    }

    /// The ticket of the newest staged record (0 if none).
    pub fn last_ticket(&self) -> u64 {
        self.state.borrow().next_ticket
    }

    /// Waits until the record with `ticket` is durable and applied to `index`, flushing
    /// if no flush is running.
    pub async fn wait(&self, ticket: u64, index: &RefCell<Index>) -> Result<()> {
        loop {
            let seen = self.durable.generation();
            if self.durable.value() >= ticket {
                return Ok(());
            }
            if self.poisoned.get() {
                return Err(Error::Poisoned { shard: self.shard });
            }
            let start = {
                let mut state = self.state.borrow_mut();
                !std::mem::replace(&mut state.flushing, true)
            };
            if start {
                // Let every task that is ready now run first (a spawned task goes to the
                // back of the run queue), so that commits woken together, such as a group
                // write's blobs, stage their records before this flush takes the batch.
                monoio::spawn(async {}).await;
                let result = self.flush(index).await;
                self.state.borrow_mut().flushing = false;
                self.durable.notify(); // waiters re-check: durable, poisoned, or flush again
                result?;
            } else {
                self.durable.changed(seen).await;
            }
        }
    }

    async fn flush(&self, index: &RefCell<Index>) -> Result<()> {
        let (bytes, records, ticket) = {
            let mut state = self.state.borrow_mut();
            (
                std::mem::take(&mut state.staged),
                std::mem::take(&mut state.staged_records),
                state.next_ticket,
            )
        };
        if records.is_empty() {
            return Ok(());
        }
        let fits = {
            let state = self.state.borrow();
            state.end + bytes.len() as u64 + SEAL_RESERVE <= self.capacity_bytes
        };
        if !fits {
            if let Err(error) = self.rotate(index).await {
                self.unstage(&records);
                return Err(error);
            }
        }
        // A record may straddle two appends: if a crash falls between them it is a torn
        // tail, and none of this flush's records was acknowledged.
        for piece in bytes.chunks(append_bytes_max(self.capacity_bytes) as usize) {
            if let Err(error) = self.append_durably(piece).await {
                self.poisoned.set(true);
                return Err(error);
            }
        }
        let mut state = self.state.borrow_mut();
        let mut index = index.borrow_mut();
        for record in records {
            if let Some(key) = record_key(&record) {
                if let Some(count) = state.pending.get_mut(&key) {
                    *count -= 1;
                    if *count == 0 {
                        state.pending.remove(&key);
                    }
                }
            }
            index.apply(record);
        }
        drop(index);
        drop(state);
        self.durable.raise(ticket);
        Ok(())
    }

    /// Forgets records of a batch that could not be written (nothing reached the disk).
    fn unstage(&self, records: &[Record]) {
        let mut state = self.state.borrow_mut();
        for record in records {
            if let Some(key) = record_key(record) {
                if let Some(count) = state.pending.get_mut(&key) {
                    *count -= 1;
                    if *count == 0 {
                        state.pending.remove(&key);
                    }
                }
            }
        }
    }

    /// Writes `bytes` at the durable end (with the partial last block rewritten in
    /// front of them) with one `O_DSYNC` write.
    ///
    /// The image is built in the journal's one append buffer, reused from append to
    /// append (appends never overlap: the flusher is the only writer).
    async fn append_durably(&self, bytes: &[u8]) -> Result<()> {
        let (file, path, block_start, mut image) = {
            let state = self.state.borrow();
            let block_start = round_down_u64(state.end, ALIGN);
            let needed = state.tail.len() + bytes.len();
            let mut image = match self.append_buf.take() {
                Some(buf) if buf.capacity() >= needed => buf,
                _ => AlignedBuf::zeroed(needed.max(self.append_buf_bytes())),
            };
            image.set_len(0);
            image.extend_from_slice(&state.tail);
            image.extend_from_slice(bytes);
            (
                state.file_clone(),
                self.path_of(state.generation),
                block_start,
                image,
            )
        };
        let new_end = block_start + image.len() as u64;
        let tail_start = (round_down_u64(new_end, ALIGN) - block_start) as usize;
        image.pad_zeroed_to(image.len().next_multiple_of(ALIGN as usize));
        let (result, image) = file.write_at_durable(image, block_start).await;
        let new_tail = &image.as_slice()[tail_start..(new_end - block_start) as usize];
        {
            let mut state = self.state.borrow_mut();
            if result.is_ok() {
                state.end = new_end;
                state.tail.clear();
                state.tail.extend_from_slice(new_tail);
            }
        }
        self.append_buf.set(Some(image));
        result.map_err(|e| Error::io("O_DSYNC write", &path, block_start, e))
    }

    /// Capacity of the append buffer: the largest append plus the partial block
    /// rewritten in front of it.
    fn append_buf_bytes(&self) -> usize {
        (append_bytes_max(self.capacity_bytes) + ALIGN) as usize
    }

    /// Rotates now (see [`Journal::rotate`]) as the flusher: waits until no flush runs,
    /// so that the Seal record never races an append. Staged records go to the new
    /// journal with the next flush.
    pub async fn rotate_now(&self, index: &RefCell<Index>) -> Result<()> {
        loop {
            let seen = self.durable.generation();
            let start = {
                let mut state = self.state.borrow_mut();
                !std::mem::replace(&mut state.flushing, true)
            };
            if start {
                let result = self.rotate(index).await;
                self.state.borrow_mut().flushing = false;
                self.durable.notify(); // waiters re-check and flush what is staged
                return result;
            }
            self.durable.changed(seen).await;
        }
    }

    /// Seals the current journal and switches to a new one (created and made durable
    /// first, so a full disk leaves the current journal as it was). Then snapshots the
    /// index into a checkpoint for the new generation, in the background.
    pub async fn rotate(&self, index: &RefCell<Index>) -> Result<()> {
        let new_generation = self.generation() + 1;
        // Zero-filled, durable and named already: only the header is missing.
        let file = match self.take_spare(new_generation).await {
            Some(file) => file,
            None => {
                zero_filled_journal(&self.disk, &self.dir, new_generation, self.capacity_bytes)
                    .await?
            }
        };
        if let Err(error) = self.write_header(&file, new_generation).await {
            // A failed write or fdatasync leaves the file's state unknown: stop, as for
            // any failed flush, rather than retry.
            self.poisoned.set(true);
            return Err(error);
        }
        let mut seal = Vec::new();
        format::encode_record(&Record::Seal, &mut seal);
        if let Err(error) = self.append_durably(&seal).await {
            self.poisoned.set(true);
            return Err(error);
        }
        {
            let mut state = self.state.borrow_mut();
            state.file = file;
            state.generation = new_generation;
            state.end = HEADER_BYTES;
            state.tail.clear();
        }
        self.prepare_spare(new_generation + 1);
        let snapshot = index.borrow().snapshot();
        self.start_checkpoint(new_generation, snapshot);
        Ok(())
    }

    /// Writes a checkpoint of `snapshot` (the index as of the start of `generation`) in
    /// the background. One is written at a time: one asked for while another is being
    /// written waits, and is written next, unless a newer one is asked for meanwhile (a
    /// snapshot taken at a later rotation covers everything an older one does).
    fn start_checkpoint(&self, generation: u64, snapshot: Snapshot) {
        let checkpoints = self.checkpoints.clone();
        *checkpoints.next.borrow_mut() = Some((generation, snapshot));
        if checkpoints.writing.replace(true) {
            return; // the running writer takes it when it is done
        }
        let writer = CheckpointWriter {
            disk: self.disk.clone(),
            shard: self.shard,
            dir: self.dir.clone(),
        };
        monoio::spawn(async move {
            loop {
                let next = checkpoints.next.borrow_mut().take();
                let Some((generation, snapshot)) = next else {
                    break;
                };
                match writer.write(generation, snapshot).await {
                    Ok(()) => writer.remove_older_than(generation),
                    Err(error) => tracing::warn!(
                        shard = writer.shard,
                        %error,
                        "checkpoint failed; the journals it would replace are kept"
                    ),
                }
            }
            // The snapshot and the encoded records were freed below the index's
            // entries; give their pages back (see `graviton_io::memory`).
            graviton_io::memory::release_free_heap();
            checkpoints.writing.set(false);
            checkpoints.idle.notify();
        });
    }

    /// Resolves once no checkpoint is being written or waits to be. A shutdown waits
    /// for this: a checkpoint dropped half-written leaves reopening to replay every
    /// journal since the last complete one, and each open followed by a quick shutdown
    /// would add one (the history would grow with restarts).
    pub async fn checkpoints_written(&self) {
        loop {
            let seen = self.checkpoints.idle.generation();
            if !self.checkpoints.writing.get() {
                return;
            }
            self.checkpoints.idle.changed(seen).await;
        }
    }
}

/// A journal's checkpoints in the background ([`Journal::start_checkpoint`]).
#[derive(Default)]
struct Checkpoints {
    /// Whether a writer task runs.
    writing: Cell<bool>,
    /// The newest checkpoint asked for and not yet started: its generation, and the
    /// index as of that generation's start.
    next: RefCell<Option<(u64, Snapshot)>>,
    /// Notified when the writer task ends (`writing` turned false).
    idle: Signal,
}

/// Writes a checkpoint file from an index snapshot.
struct CheckpointWriter<D: Disk> {
    disk: D,
    shard: usize,
    dir: PathBuf,
}

impl<D: Disk> CheckpointWriter<D> {
    async fn write(&self, generation: u64, snapshot: Snapshot) -> Result<()> {
        let path = self.dir.join(format::checkpoint_file_name(generation));
        let _ = self.disk.remove(&path); // a leftover from a crash during an earlier try
        let file = self
            .disk
            .create(&path, 0)
            .map_err(|e| Error::io("create", &path, 0, e))?;
        let mut out = format::encode_header(format::CHECKPOINT_MAGIC, self.shard, generation);
        let mut offset = 0u64;
        let count = snapshot.len() as u64;
        for (key, entry) in snapshot {
            format::encode_record(&Record::Put(entry.to_put(key)), &mut out);
            if out.len() as u64 >= UNIT_BYTES {
                let whole = round_down_u64(out.len() as u64, ALIGN) as usize;
                write_bytes(&file, &path, offset, &out[..whole]).await?;
                offset += whole as u64;
                out.drain(..whole);
            }
        }
        format::encode_record(&Record::End { count }, &mut out);
        out.resize(out.len().next_multiple_of(ALIGN as usize), 0);
        write_bytes(&file, &path, offset, &out).await?;
        file.sync_data()
            .await
            .map_err(|e| Error::io("fdatasync", &path, 0, e))?;
        self.disk
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("fsync dir", &self.dir, 0, e))
    }

    /// Removes journals and checkpoints older than `generation`, whose content the
    /// durable checkpoint of `generation` now holds.
    fn remove_older_than(&self, generation: u64) {
        let Ok(names) = self.disk.list(&self.dir) else {
            return;
        };
        for name in names {
            let old = format::parse_generation(&name, "journal-", ".log")
                .or_else(|| format::parse_generation(&name, "checkpoint-", ".idx"));
            if old.is_some_and(|g| g < generation) {
                let _ = self.disk.remove(&self.dir.join(&name));
            }
        }
        let _ = self.disk.sync_dir(&self.dir);
    }
}

fn create_journal_file<D: Disk>(
    disk: &D,
    dir: &Path,
    generation: u64,
    capacity_bytes: u64,
) -> Result<D::File> {
    let path = dir.join(format::journal_file_name(generation));
    disk.create(&path, capacity_bytes)
        .map_err(|e| Error::io("create", &path, 0, e))
}

/// Creates the file of journal `generation`, zero-filled and durable, its name durable,
/// without a header (an unfinished journal until [`Journal::write_header`]). On failure
/// the file is removed: it holds nothing, and a retry recreates it.
async fn zero_filled_journal<D: Disk>(
    disk: &D,
    dir: &Path,
    generation: u64,
    capacity_bytes: u64,
) -> Result<D::File> {
    let file = create_journal_file(disk, dir, generation, capacity_bytes)?;
    let path = dir.join(format::journal_file_name(generation));
    let filled = async {
        zero_fill(&file, &path, capacity_bytes).await?;
        file.sync_data()
            .await
            .map_err(|e| Error::io("fdatasync", &path, 0, e))?;
        disk.sync_dir(dir)
            .map_err(|e| Error::io("fsync dir", dir, 0, e))
    }
    .await;
    match filled {
        Ok(()) => Ok(file),
        Err(error) => {
            let _ = disk.remove(&path);
            Err(error)
        }
    }
}

/// Writes zeros over all of a new journal file (not yet durable: the caller
/// fdatasyncs). Afterwards every block of the file is *written* space, so an append (an
/// `O_DSYNC` write) is a pure overwrite: the file system has no extent to convert and no
/// journal transaction to commit, and the write costs one device flush. Appends into
/// `fallocate`d space would each need an ext4 journal commit too.
async fn zero_fill<F: DiskFile>(file: &F, path: &Path, capacity_bytes: u64) -> Result<()> {
    let mut zeros = AlignedBuf::zeroed(UNIT_BYTES.min(capacity_bytes) as usize);
    zeros.pad_zeroed_to(zeros.capacity());
    let mut at = 0;
    while at < capacity_bytes {
        let len = UNIT_BYTES.min(capacity_bytes - at) as usize;
        zeros.set_len(len);
        let (result, back) = file.write_at(zeros, at).await;
        zeros = back;
        result.map_err(|e| Error::io("write", path, at, e))?;
        at += len as u64;
    }
    Ok(())
}

/// Writes `bytes` (aligned length) at `offset` through an aligned buffer.
pub async fn write_bytes<F: DiskFile>(
    file: &F,
    path: &Path,
    offset: u64,
    bytes: &[u8],
) -> Result<()> {
    debug_assert_eq!(offset % ALIGN, 0);
    let (result, _) = file.write_at(aligned(bytes), offset).await;
    result.map_err(|e| Error::io("write", path, offset, e))
}

/// A copy of `bytes` (an aligned length) in an aligned buffer, for direct I/O.
fn aligned(bytes: &[u8]) -> AlignedBuf {
    debug_assert_eq!(bytes.len() as u64 % ALIGN, 0);
    let mut buf = AlignedBuf::zeroed(bytes.len());
    buf.extend_from_slice(bytes);
    buf
}

fn record_key(record: &Record) -> Option<BlobKey> {
    match record {
        Record::Put(put) => Some(put.key),
        Record::Delete { key } | Record::Relocate { key, .. } => Some(*key),
        Record::Seal | Record::End { .. } => None,
    }
}

impl<F: DiskFile> State<F> {
    fn file_clone(&self) -> F {
        self.file.clone()
    }
}
