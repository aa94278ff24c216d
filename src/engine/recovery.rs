//! Opening a shard: rebuilding its index from its newest valid checkpoint and the
//! journals after it, then starting a fresh journal.
//!
//! Guarantees:
//! - every record that was durable before the crash is applied, in order; a torn tail of
//!   the newest journal is ignored (those records were never acknowledged), and a
//!   damaged record with records written after it fails the open with
//!   [`Error::Corrupt`] (told apart by the bounded size of journal writes; see
//!   [`check_torn_tail`]);
//! - a damaged record anywhere else (a journal that is not the newest but has no Seal,
//!   while a newer one has records) fails the open with [`Error::Corrupt`] rather than
//!   silently losing acknowledged blobs;
//! - an invalid or incomplete checkpoint is skipped in favour of an older one and the
//!   journals it still needs (they are removed only after a newer checkpoint is durable);
//! - a journal whose header and first record block are zeros holds no records (its
//!   header is written and made durable before any record) and is removed; a damaged
//!   header on a journal with records fails the open, and so does a gap in the
//!   generations between the newest valid checkpoint and the newest journal (blobs
//!   would be lost silently); nothing is removed then;
//! - a file written by another format version fails the open with
//!   [`Error::Config`] and is left as it is;
//! - the work is proportional to the live blobs (one checkpoint) plus the journals
//!   written since that checkpoint, not to the store's history.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use graviton_io::buf::round_down_u64;
use graviton_io::{AlignedBuf, BufPool, Disk, DiskFile};
use tokio::sync::mpsc;

use super::error::{Error, Result};
use super::format::{self, Decoded, Header, Record, SegmentId, ALIGN, HEADER_BYTES, UNIT_BYTES};
use super::index::{CheckpointIndex, Index};
use super::journal::{append_bytes_max, Journal};
use super::segments::{shard_dir_name, Segments};
use super::shard::{Request, Shard};
use super::{EngineConfig, ShardStatus};

/// How a scan of a log ended.
struct ScanEnd {
    /// File offset just past the last valid record.
    end: u64,
    /// Bytes of the block holding `end`, from the block's start up to `end`.
    tail: Vec<u8>,
    sealed: bool,
    records: u64,
    /// The count of a checkpoint's End record, if one was found.
    end_count: Option<u64>,
    /// The file's length.
    file_len: u64,
}

/// What reading a journal or checkpoint found.
enum Scan {
    /// The header was valid; the records were read.
    Read(ScanEnd),
    /// The file holds nothing: its header and the block after it are zeros, or it is
    /// shorter than a header. A file being created, or a journal's spare, at a crash;
    /// also a header write torn by a crash, since nothing is appended before the header
    /// is durable.
    Unfinished,
    /// The header is damaged but the file holds more than zeros.
    Damaged,
}

/// Reads the records of a journal or checkpoint file in order, calling `apply` for
/// each, until the end of the log, a torn or invalid record, or a Seal/End record.
/// A header of a format version this build does not read is an error: the file is
/// left as it is.
async fn scan_log<F: DiskFile>(
    file: &F,
    path: &Path,
    magic: [u8; 8],
    mut apply: impl FnMut(Record),
) -> Result<Scan> {
    let file_len = file
        .len_bytes()
        .map_err(|e| Error::io("stat", path, 0, e))?;
    if file_len < HEADER_BYTES {
        return Ok(Scan::Unfinished);
    }
    let header = read_aligned(file, path, 0, HEADER_BYTES).await?;
    match format::decode_header(magic, header.as_slice()) {
        Header::Valid { .. } => {}
        Header::Unsupported { version } => {
            return Err(Error::Config(format!(
                "{} was written by format version {version}; this build reads version {}. \
                 Nothing was changed: open the store with a build that reads it",
                path.display(),
                format::VERSION
            )))
        }
        Header::Blank | Header::Damaged => {
            // Records start right after the header, so if the next block is zeros no
            // record was ever appended.
            let next = if file_len > HEADER_BYTES {
                read_aligned(file, path, HEADER_BYTES, ALIGN.min(file_len - HEADER_BYTES))
                    .await?
                    .as_slice()
                    .iter()
                    .any(|&byte| byte != 0)
            } else {
                false
            };
            return Ok(if next {
                Scan::Damaged
            } else {
                Scan::Unfinished
            });
        }
    }
    let mut window: Vec<u8> = Vec::new();
    // One read buffer for every unit: a fresh aligned buffer per unit would be carved
    // out of the heap between the index entries being built, and the holes it leaves
    // when freed would stay in the process for as long as it runs.
    let mut unit = AlignedBuf::zeroed(UNIT_BYTES.min(file_len - HEADER_BYTES).max(ALIGN) as usize);
    let mut window_at = HEADER_BYTES; // file offset of window[0]
    let mut cursor = 0usize; // position in window
    let mut next_read = HEADER_BYTES;
    let mut scan = ScanEnd {
        end: HEADER_BYTES,
        tail: Vec::new(),
        sealed: false,
        records: 0,
        end_count: None,
        file_len,
    };
    loop {
        let decoded = format::decode_record(&window[cursor..]);
        let need_more = match decoded {
            Decoded::Truncated => true,
            Decoded::End => window.len() - cursor < format::FRAME_BYTES,
            Decoded::Record(..) | Decoded::Invalid => false,
        };
        if need_more && next_read < file_len {
            // Drop what was consumed, then read the next unit.
            let keep_from = round_down_u64(cursor as u64, ALIGN) as usize;
            window.drain(..keep_from);
            window_at += keep_from as u64;
            cursor -= keep_from;
            let len = UNIT_BYTES.min(file_len - next_read);
            unit.set_len(0);
            let (result, back) = file.read_at(unit, next_read, len as usize).await;
            unit = back;
            result.map_err(|e| Error::io("read", path, next_read, e))?;
            window.extend_from_slice(unit.as_slice());
            next_read += len;
            continue;
        }
        let Decoded::Record(record, used) = decoded else {
            break;
        };
        cursor += used;
        scan.records += 1;
        match record {
            Record::Seal => {
                scan.sealed = true;
                break;
            }
            Record::End { count } => {
                scan.end_count = Some(count);
                break;
            }
            other => apply(other),
        }
    }
    scan.end = window_at + cursor as u64;
    let block = round_down_u64(scan.end, ALIGN);
    if block >= window_at {
        scan.tail = window[(block - window_at) as usize..cursor].to_vec();
    } else {
        let head = read_aligned(file, path, block, ALIGN).await?;
        scan.tail = head.as_slice()[..(scan.end - block) as usize].to_vec();
    }
    Ok(Scan::Read(scan))
}

/// Checks that an unsealed journal's log, which ends at `scan.end`, ends in a torn tail
/// and not at a damaged record with good records after it. Journal files are zero-filled
/// and appends are written one at a time, each at most [`append_bytes_max`] bytes from
/// the block holding the durable end: so the write a crash tore lies within that reach
/// of `end`, and anything but zeros beyond it was written by an earlier, complete
/// append. Damage within that reach of the end cannot be told from a torn write; it is
/// taken for one.
async fn check_torn_tail<F: DiskFile>(file: &F, path: &Path, scan: &ScanEnd) -> Result<()> {
    let (end, file_len) = (scan.end, scan.file_len);
    let reach = round_down_u64(end, ALIGN) + append_bytes_max(file_len) + 2 * ALIGN;
    let units: Vec<u64> = (reach..file_len).step_by(UNIT_BYTES as usize).collect();
    // A few reads in flight: one at a time, this scan alone took a quarter of a second
    // per shard when reopening a store on the disk measured here.
    for window in units.chunks(TAIL_READS_IN_FLIGHT) {
        let reads = window.iter().map(|&at| async move {
            let unit = read_aligned(file, path, at, UNIT_BYTES.min(file_len - at)).await?;
            Ok::<bool, Error>(unit.as_slice().iter().all(|&byte| byte == 0))
        });
        for zeros in futures::future::join_all(reads).await {
            if !zeros? {
                return Err(Error::Corrupt {
                    path: path.to_path_buf(),
                    offset: end,
                    what: "journal record (records follow it, so it is damage, not a torn write)",
                });
            }
        }
    }
    Ok(())
}

/// Reads in flight while [`check_torn_tail`] scans a journal's unused space.
const TAIL_READS_IN_FLIGHT: usize = 4;

async fn read_aligned<F: DiskFile>(
    file: &F,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<AlignedBuf> {
    let buf = AlignedBuf::zeroed(len as usize);
    let (result, buf) = file.read_at(buf, offset, len as usize).await;
    result.map_err(|e| Error::io("read", path, offset, e))?;
    Ok(buf)
}

fn generations(names: &[String], prefix: &str, suffix: &str) -> Vec<u64> {
    let mut found: Vec<u64> = names
        .iter()
        .filter_map(|n| format::parse_generation(n, prefix, suffix))
        .collect();
    found.sort_unstable();
    found
}

/// Loads the checkpoint of `generation`; `None` if it is incomplete or damaged.
async fn load_checkpoint<D: Disk>(disk: &D, dir: &Path, generation: u64) -> Result<Option<Index>> {
    let path = dir.join(format::checkpoint_file_name(generation));
    let file = disk
        .open(&path)
        .map_err(|e| Error::io("open", &path, 0, e))?;
    let mut puts = CheckpointIndex::default();
    let mut others = 0u64;
    let scan = scan_log(
        &file,
        &path,
        format::CHECKPOINT_MAGIC,
        |record| match record {
            Record::Put(put) => puts.push(put),
            _ => others += 1,
        },
    )
    .await?;
    match scan {
        Scan::Read(ScanEnd {
            end_count: Some(count),
            ..
        }) if count == puts.len() as u64 && others == 0 => Ok(Some(puts.finish())),
        _ => {
            tracing::warn!(path = %path.display(), "ignoring an incomplete checkpoint");
            Ok(None)
        }
    }
}

/// The generation of a new store's first journal (and of its first checkpoint).
const FIRST_GENERATION: u64 = 1;

/// Checks that the newest valid checkpoint (`base`) and the journals from its
/// generation on can rebuild the index: every generation from the base (or from the
/// first, without one) to the newest journal is present. Journals are removed only once
/// a newer checkpoint is durable, so a gap means that checkpoint was lost or damaged
/// after the journals it replaced were removed: opening would silently lose blobs.
fn check_chain(dir: &Path, base: Option<u64>, journals: &[u64]) -> Result<()> {
    let first = base.unwrap_or(FIRST_GENERATION);
    let Some(&newest) = journals.last() else {
        return match base {
            None => Ok(()), // a new store
            Some(generation) => Err(missing(dir, generation)),
        };
    };
    match (first..=newest).find(|generation| journals.binary_search(generation).is_err()) {
        None => Ok(()),
        Some(generation) => Err(missing(dir, generation)),
    }
}

fn missing(dir: &Path, generation: u64) -> Error {
    Error::Corrupt {
        path: dir.join(format::journal_file_name(generation)),
        offset: 0,
        what: "the shard's journals and checkpoints (this journal is missing and no valid \
               checkpoint replaces it: a newer checkpoint is damaged, unreadable or gone)",
    }
}

/// Everything a shard needs besides its recovered state.
pub struct ShardWiring {
    pub id: usize,
    pub count: usize,
    pub config: Rc<EngineConfig>,
    pub root: PathBuf,
    pub peers: Vec<mpsc::Sender<Request>>,
    /// Every shard's status, this one's at `id`.
    pub statuses: Vec<Arc<ShardStatus>>,
}

/// Opens shard `wiring.id` over `disk`: recovers its index and starts a new journal.
pub async fn open_shard<D: Disk>(disk: D, wiring: ShardWiring) -> Result<Rc<Shard<D>>> {
    let config = wiring.config.clone();
    let dir = wiring.root.join(shard_dir_name(wiring.id));
    disk.create_dir_all(&dir)
        .map_err(|e| Error::io("mkdir", &dir, 0, e))?;
    disk.sync_dir(&wiring.root)
        .map_err(|e| Error::io("fsync dir", &wiring.root, 0, e))?;
    let names = disk.list(&dir).map_err(|e| Error::io("list", &dir, 0, e))?;

    let mut index = Index::default();
    let mut base = None;
    for generation in generations(&names, "checkpoint-", ".idx").into_iter().rev() {
        if let Some(loaded) = load_checkpoint(&disk, &dir, generation).await? {
            index = loaded;
            base = Some(generation);
            break;
        }
    }
    let journals: Vec<u64> = generations(&names, "journal-", ".log")
        .into_iter()
        .filter(|g| base.is_none_or(|b| *g >= b))
        .collect();
    let index = RefCell::new(index);
    let mut scans = Vec::new();
    for &generation in &journals {
        let path = dir.join(format::journal_file_name(generation));
        let file = disk
            .open(&path)
            .map_err(|e| Error::io("open", &path, 0, e))?;
        let scan = match scan_log(&file, &path, format::JOURNAL_MAGIC, |record| {
            index.borrow_mut().apply(record)
        })
        .await?
        {
            Scan::Read(scan) => {
                if !scan.sealed {
                    check_torn_tail(&file, &path, &scan).await?;
                }
                Some(scan)
            }
            Scan::Unfinished => None,
            Scan::Damaged => {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    what: "journal header (the journal holds records; it was left as is)",
                })
            }
        };
        scans.push((generation, file, scan));
    }
    check_chain(&dir, base, &journals)?;
    // A journal that is not the newest must be sealed, unless no newer one has records
    // (a crash between creating the newer journal and sealing this one).
    for (i, (generation, _, scan)) in scans.iter().enumerate() {
        let unsealed = scan.as_ref().is_some_and(|s| !s.sealed);
        let newer_has_records = scans[i + 1..]
            .iter()
            .any(|(_, _, s)| s.as_ref().is_some_and(|s| s.records > 0));
        if unsealed && newer_has_records {
            let path = dir.join(format::journal_file_name(*generation));
            let end = scan.as_ref().map_or(0, |s| s.end);
            return Err(Error::Corrupt {
                path,
                offset: end,
                what: "journal record (log ends early)",
            });
        }
    }

    // An unfinished journal (no valid header: a crash while it was being created, or a
    // spare prepared ahead of a rotation) holds no records. Remove it, so that its
    // generation is free for the rotation below.
    let unfinished: Vec<u64> = scans
        .iter()
        .filter(|(_, _, scan)| scan.is_none())
        .map(|(generation, _, _)| *generation)
        .collect();
    for generation in &unfinished {
        let path = dir.join(format::journal_file_name(*generation));
        disk.remove(&path)
            .map_err(|e| Error::io("remove", &path, 0, e))?;
    }
    if !unfinished.is_empty() {
        disk.sync_dir(&dir)
            .map_err(|e| Error::io("fsync dir", &dir, 0, e))?;
    }

    let poisoned = Rc::new(Cell::new(false));
    let newest_valid = scans.iter().rev().find(|(_, _, s)| s.is_some());
    let journal = match newest_valid {
        Some((generation, file, Some(scan))) if !scan.sealed => {
            let journal = Journal::resume(
                disk.clone(),
                wiring.id,
                &dir,
                *generation,
                file.clone(),
                scan.end,
                scan.tail.clone(),
                config.journal_bytes,
                poisoned.clone(),
            );
            journal.rotate(&index).await?;
            journal
        }
        _ => {
            let newest = journals.iter().copied().chain(base).max().unwrap_or(0);
            let journal = Journal::create(
                disk.clone(),
                wiring.id,
                &dir,
                newest + 1,
                config.journal_bytes,
                poisoned.clone(),
            )?;
            journal.init().await?;
            journal.checkpoint_now(&index);
            journal
        }
    };

    let mut existing = Vec::new();
    let mut free = Vec::new();
    for name in &names {
        if name.starts_with(format::FREE_PREFIX) {
            free.push(dir.join(name));
        } else if let Some(id) = SegmentId::parse_file_name(name) {
            if id.writer() == wiring.id {
                let path = dir.join(name);
                let size = disk
                    .open(&path)
                    .and_then(|f| f.len_bytes())
                    .map_err(|e| Error::io("stat", &path, 0, e))?;
                existing.push((id, size));
            }
        }
    }
    let segments = Segments::new(
        disk.clone(),
        wiring.id,
        &wiring.root,
        (config.segment_bytes, config.free_segments_max),
        existing,
        free,
        poisoned.clone(),
    );
    segments.hold_reserve();
    // Rebuilding the index freed its records' temporaries among its entries.
    graviton_io::memory::release_free_heap();
    tracing::debug!(
        shard = wiring.id,
        blobs = index.borrow().len(),
        "shard recovered"
    );
    Ok(Rc::new(Shard {
        id: wiring.id,
        count: wiring.count,
        index,
        journal,
        segments,
        peers: wiring.peers,
        status: wiring.statuses[wiring.id].clone(),
        statuses: wiring.statuses,
        offload_units: Default::default(),
        poisoned,
        write_pool: BufPool::new(UNIT_BYTES as usize, config.write_buffers),
        read_pool: BufPool::new(UNIT_BYTES as usize, config.read_buffers),
        small_read_pool: BufPool::new(64 * 1024, config.small_read_buffers),
        small: Default::default(),
        closing: Cell::new(false),
        compaction: Default::default(),
        compaction_pace: super::shard::Pacer::new(config.compaction_bytes_per_sec),
        config,
    }))
}
