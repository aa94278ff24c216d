//! The segments of one shard: bump allocation of extents in the shard's active segment,
//! per-segment group fdatasync, and the cache of open segment files (the shard's own,
//! and other shards' that it reads).
//!
//! Guarantees:
//! - extents handed out never overlap, are aligned, and all but a blob's last are
//!   multiples of [`UNIT_BYTES`] (the caller asks for that);
//! - a new segment is preallocated and its name made durable before any extent in it is
//!   handed out, so a full disk shows up here as [`Error::NoSpace`];
//! - an extent handed out counts as *in flight* until released; compaction never touches
//!   the active segment or a segment with extents in flight;
//! - concurrent syncs of one segment share fdatasync calls; a failed one poisons the
//!   shard;
//! - a full disk can still be compacted: each shard holds a *space reserve*, a
//!   preallocated file ([`RESERVE_FILE`]) as large as a segment. Writes never use it;
//!   when compaction cannot create the segment it moves blobs into because the disk is
//!   full, the reserve becomes that segment. Without one, deleting blobs on a full disk
//!   could never free space: compaction frees a segment only by first copying its live
//!   blobs into a new one. The first segment compaction then frees becomes the new
//!   reserve (renamed, so no other shard can take its space first); failing that, a
//!   reserve is allocated again once compaction has freed space;
//! - a segment compaction empties is *recycled* (kept as a free segment, up to
//!   `free_segments_max`, and renamed to the next new segment) only if no read of it is
//!   open on any shard ([`Segments::lease`]): a read that began before its blob moved
//!   keeps reading the old place, which a new segment would overwrite. Otherwise, or
//!   beyond the limit, it is removed, and open handles keep its bytes readable.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use graviton_io::buf::round_down_u64;
use graviton_io::Disk;
use graviton_io::DiskFile;

use super::error::{Error, Result};
use super::format::{Extent, SegmentId, ALIGN, FREE_PREFIX, RESERVE_FILE, UNIT_BYTES};
use super::signal::Signal;

/// What extents are allocated for: only compaction may draw on the space reserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A blob being written (uploads, small-blob group writes).
    Write,
    /// A live blob being moved by compaction.
    Compaction,
}

/// Name of shard `index`'s directory.
pub fn shard_dir_name(index: usize) -> String {
    format!("shard-{index:03}")
}

pub struct Segments<D: Disk> {
    disk: D,
    shard: usize,
    root: PathBuf,
    dir: PathBuf,
    capacity_bytes: u64,
    /// Compacted segments kept for reuse at most.
    free_max: usize,
    poisoned: Rc<Cell<bool>>,
    state: RefCell<State<D::File>>,
    /// Open reads of each segment ([`Segments::lease`]).
    readers: Rc<RefCell<HashMap<SegmentId, u32>>>,
}

/// What a compacted segment's file becomes ([`Segments::remove`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retire {
    /// Kept under a new name for a later segment, if fewer than the most are kept:
    /// only when no read can still need its bytes.
    Recycle,
    /// Removed: its bytes stay readable through handles still open.
    Remove,
}

struct State<F> {
    active: Option<Active>,
    next_sequence: u64,
    /// The shard's own segments other than the active one, with their sizes.
    sealed: BTreeMap<SegmentId, u64>,
    inflight: HashMap<SegmentId, u32>,
    compacting: HashSet<SegmentId>,
    files: HashMap<SegmentId, F>,
    syncs: HashMap<SegmentId, Rc<GroupSync>>,
    /// Whether this shard's space reserve file exists.
    reserve_held: bool,
    /// Compacted segments kept for reuse ([`FREE_PREFIX`]), at most `free_max`.
    free: Vec<PathBuf>,
}

struct Active {
    id: SegmentId,
    capacity_bytes: u64,
    tail: u64,
}

impl<D: Disk> Segments<D> {
    /// The segment manager of shard `shard`, whose existing segments are `existing`
    /// (id, size): all sealed; new extents go to a new segment. `free` are the files kept
    /// for reuse found in the shard's directory; those beyond `free_max` are removed.
    pub fn new(
        disk: D,
        shard: usize,
        root: &Path,
        (capacity_bytes, free_max): (u64, usize),
        existing: Vec<(SegmentId, u64)>,
        mut free: Vec<PathBuf>,
        poisoned: Rc<Cell<bool>>,
    ) -> Segments<D> {
        assert!(capacity_bytes >= UNIT_BYTES && capacity_bytes.is_multiple_of(UNIT_BYTES));
        let next_sequence = existing
            .iter()
            .map(|(id, _)| id.sequence() + 1)
            .max()
            .unwrap_or(1);
        for extra in free.drain(free.len().min(free_max)..) {
            let _ = disk.remove(&extra);
        }
        Segments {
            disk,
            shard,
            root: root.to_path_buf(),
            dir: root.join(shard_dir_name(shard)),
            capacity_bytes,
            free_max,
            poisoned,
            readers: Rc::default(),
            state: RefCell::new(State {
                active: None,
                next_sequence,
                sealed: existing.into_iter().collect(),
                inflight: HashMap::new(),
                compacting: HashSet::new(),
                files: HashMap::new(),
                syncs: HashMap::new(),
                reserve_held: false,
                free,
            }),
        }
    }

    pub fn path(&self, segment: SegmentId) -> PathBuf {
        self.root
            .join(shard_dir_name(segment.writer()))
            .join(segment.file_name())
    }

    /// Hands out an extent of `need` bytes (aligned), or, if the active segment has
    /// less room, of the largest multiple of [`UNIT_BYTES`] that fits. The extent is in
    /// flight until [`Segments::release`].
    pub fn allocate(&self, need: u64, purpose: Purpose) -> Result<Extent> {
        assert!(need > 0 && need.is_multiple_of(ALIGN));
        let mut state = self.state.borrow_mut();
        let room = state
            .active
            .as_ref()
            .map_or(0, |a| a.capacity_bytes - a.tail);
        if room < need.min(UNIT_BYTES) {
            self.start_segment(&mut state, purpose)?;
        }
        let active = state.active.as_mut().expect("an active segment");
        let room = active.capacity_bytes - active.tail;
        let len = if need <= room {
            need
        } else {
            round_down_u64(room, UNIT_BYTES)
        };
        let extent = Extent {
            segment: active.id,
            offset: active.tail,
            len: len as u32,
        };
        active.tail += len;
        *state.inflight.entry(extent.segment).or_default() += 1;
        Ok(extent)
    }

    fn start_segment(&self, state: &mut State<D::File>, purpose: Purpose) -> Result<()> {
        let id = SegmentId::new(self.shard, state.next_sequence);
        let path = self.path(id);
        let create = || {
            self.disk
                .create(&path, self.capacity_bytes)
                .map_err(|e| Error::io("create segment", &path, 0, e))
        };
        let file = match self.reuse_free(state, &path) {
            Some(file) => Ok(file),
            None => create(),
        };
        let file = match file {
            Err(full @ Error::NoSpace { .. })
                if purpose == Purpose::Compaction && state.reserve_held =>
            {
                self.reserve_as_segment(state, &path, full)
            }
            created => created,
        }?;
        if let Err(error) = self.disk.sync_dir(&self.dir) {
            let _ = self.disk.remove(&path);
            return Err(Error::io("fsync dir", &self.dir, 0, error));
        }
        state.next_sequence += 1;
        if let Some(old) = state.active.take() {
            state.sealed.insert(old.id, old.capacity_bytes);
        }
        state.files.insert(id, file);
        state.active = Some(Active {
            id,
            capacity_bytes: self.capacity_bytes,
            tail: 0,
        });
        Ok(())
    }

    /// Gives back the unused end `[keep, len)` of an extent if nothing was allocated
    /// after it; returns the extent as kept.
    pub fn trim(&self, extent: Extent, keep: u64) -> Extent {
        let mut state = self.state.borrow_mut();
        if let Some(active) = state.active.as_mut() {
            if active.id == extent.segment && active.tail == extent.offset + extent.len as u64 {
                active.tail = extent.offset + keep;
                return Extent {
                    len: keep as u32,
                    ..extent
                };
            }
        }
        extent
    }

    /// Ends the in-flight state of extents (committed, deduplicated or abandoned).
    pub fn release(&self, extents: &[Extent]) {
        let mut state = self.state.borrow_mut();
        for extent in extents {
            if let Some(count) = state.inflight.get_mut(&extent.segment) {
                *count -= 1;
                if *count == 0 {
                    state.inflight.remove(&extent.segment);
                }
            }
        }
    }

    /// The open file of a segment (any shard's), opening it if needed.
    pub fn file(&self, segment: SegmentId) -> Result<D::File> {
        if let Some(file) = self.state.borrow().files.get(&segment) {
            return Ok(file.clone());
        }
        let path = self.path(segment);
        let file = self
            .disk
            .open(&path)
            .map_err(|e| Error::io("open segment", &path, 0, e))?;
        self.state.borrow_mut().files.insert(segment, file.clone());
        Ok(file)
    }

    /// Counts an open read of each of `segments` until the lease is dropped: a segment
    /// with open reads is removed, not recycled, when compaction retires it.
    pub fn lease(&self, segments: Vec<SegmentId>) -> Lease {
        let mut readers = self.readers.borrow_mut();
        for segment in &segments {
            *readers.entry(*segment).or_default() += 1;
        }
        Lease {
            readers: self.readers.clone(),
            segments,
        }
    }

    /// Whether a read of `segment` is open on this shard.
    pub fn is_read(&self, segment: SegmentId) -> bool {
        self.readers.borrow().contains_key(&segment)
    }

    /// Forgets the cached handle of a segment that is being removed.
    pub fn forget(&self, segment: SegmentId) {
        let mut state = self.state.borrow_mut();
        state.files.remove(&segment);
        state.syncs.remove(&segment);
    }

    /// Makes every write completed so far to `segment` durable, sharing the fdatasync
    /// with concurrent callers. A failure poisons the shard.
    pub async fn sync(&self, segment: SegmentId) -> Result<()> {
        let file = self.file(segment)?;
        let group = self
            .state
            .borrow_mut()
            .syncs
            .entry(segment)
            .or_insert_with(|| Rc::new(GroupSync::new()))
            .clone();
        group
            .sync(&file, &self.path(segment), self.shard, &self.poisoned)
            .await
    }

    /// Own sealed segments that compaction may take: not active, nothing in flight, not
    /// already being compacted. With their sizes.
    pub fn compactable(&self) -> Vec<(SegmentId, u64)> {
        let state = self.state.borrow();
        state
            .sealed
            .iter()
            .filter(|(id, _)| !state.inflight.contains_key(id) && !state.compacting.contains(id))
            .map(|(id, size)| (*id, *size))
            .collect()
    }

    /// Marks a segment as being compacted (false if it no longer may be).
    pub fn begin_compaction(&self, segment: SegmentId) -> bool {
        let mut state = self.state.borrow_mut();
        let allowed = state.sealed.contains_key(&segment) && !state.inflight.contains_key(&segment);
        allowed && state.compacting.insert(segment)
    }

    pub fn end_compaction(&self, segment: SegmentId) {
        self.state.borrow_mut().compacting.remove(&segment);
    }

    /// Retires a compacted segment's file and makes that durable. With
    /// [`Retire::Recycle`] (no read can still need its bytes) and a segment's full size,
    /// the file is renamed, so its blocks never go back to the file system:
    /// - to the space reserve, if the shard holds none (compaction used it on a full
    ///   disk), so that no other shard's uploads can take the space first;
    /// - else to a free segment, if fewer than the most are kept: the next segment
    ///   reuses it instead of allocating. Freeing blocks is what costs: on this VM's
    ///   ext4 (mounted `discard`) a 256 MiB segment's took 145–270 ms and stalled the
    ///   file system's commits, so that every durable put waited (kernel-notes.md §6).
    ///
    /// Otherwise it is removed; its bytes stay readable through handles still open.
    pub fn remove(&self, segment: SegmentId, retire: Retire) -> Result<()> {
        let path = self.path(segment);
        let (size, reserve_held) = {
            let mut state = self.state.borrow_mut();
            state.compacting.remove(&segment);
            (state.sealed.remove(&segment), state.reserve_held)
        };
        self.forget(segment);
        let reusable = retire == Retire::Recycle && size == Some(self.capacity_bytes);
        let kept = reusable
            && if reserve_held {
                self.keep_free(&path)
            } else {
                self.take_as_reserve(&path)
            };
        if !kept {
            self.disk
                .remove(&path)
                .map_err(|e| Error::io("remove segment", &path, 0, e))?;
        }
        self.disk
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("fsync dir", &self.dir, 0, e))
    }

    /// Renames the file at `path` (a compacted segment) to a free segment if fewer than
    /// the most are kept; false (logged if the rename failed) otherwise.
    fn keep_free(&self, path: &Path) -> bool {
        if self.state.borrow().free.len() >= self.free_max {
            return false;
        }
        let name = path
            .file_name()
            .expect("a segment's name")
            .to_string_lossy();
        let free = self.dir.join(format!("{FREE_PREFIX}{name}"));
        let kept = self.rename_compacted(path, &free, "a free segment");
        if kept {
            self.state.borrow_mut().free.push(free);
        }
        kept
    }

    /// A free segment renamed to `path` and opened, if one is kept and can hold a
    /// segment. Its stale content is never read (see [`super::format`]). The caller
    /// syncs the directory before the segment is used. A free segment that cannot be
    /// used is removed.
    fn reuse_free(&self, state: &mut State<D::File>, path: &Path) -> Option<D::File> {
        while let Some(free) = state.free.pop() {
            if let Err(error) = self.disk.rename(&free, path) {
                tracing::warn!(shard = self.shard, free = %free.display(), %error,
                    "could not reuse a free segment; removing it");
                let _ = self.disk.remove(&free);
                continue;
            }
            match self.disk.open(path) {
                Ok(file) if file.len_bytes().is_ok_and(|len| len >= self.capacity_bytes) => {
                    return Some(file);
                }
                // unreadable, or kept when segments were smaller
                _ => {
                    let _ = self.disk.remove(path);
                }
            }
        }
        None
    }

    /// Renames the file at `path` (a compacted segment) to the space reserve; false,
    /// logged, if that failed.
    fn take_as_reserve(&self, path: &Path) -> bool {
        let kept = self.rename_compacted(path, &self.dir.join(RESERVE_FILE), "the space reserve");
        if kept {
            self.state.borrow_mut().reserve_held = true;
            tracing::info!(
                shard = self.shard,
                segment = %path.display(),
                "space reserve taken back: a compacted segment became the reserve"
            );
        }
        kept
    }

    /// Renames a compacted segment's file at `path` to `to`, `what` it is kept as; false,
    /// logged, if that failed (the caller then removes it). Its content is stale and
    /// never read.
    fn rename_compacted(&self, path: &Path, to: &Path, what: &str) -> bool {
        match self.disk.rename(path, to) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    shard = self.shard,
                    segment = %path.display(),
                    %error,
                    "could not keep a compacted segment as {what}; removing it"
                );
                false
            }
        }
    }

    /// Waits until removed segments with no handle open have their space back with the
    /// file system ([`Disk::released`]).
    pub async fn released(&self) {
        self.disk.released().await
    }

    /// Takes the space reserve if this shard holds none: at open, and after compaction
    /// freed space. On a disk too full for it, the shard goes on without one (logged).
    pub fn hold_reserve(&self) {
        if self.state.borrow().reserve_held {
            return;
        }
        let path = self.dir.join(RESERVE_FILE);
        let free = self.state.borrow_mut().free.pop();
        let taken = match free {
            Some(free) => self.disk.rename(&free, &path).inspect_err(|_| {
                self.state.borrow_mut().free.push(free.clone());
            }),
            None => self.disk.create(&path, self.capacity_bytes).map(|_| ()),
        };
        let held = match taken {
            Ok(()) => self.disk.sync_dir(&self.dir).is_ok(),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => true,
            Err(error) => {
                tracing::warn!(
                    shard = self.shard,
                    %error,
                    "no space reserve: compaction may not be able to run on a full disk"
                );
                false
            }
        };
        self.state.borrow_mut().reserve_held = held;
    }

    /// Makes the space reserve the segment at `path` (renamed: its blocks never go back
    /// to the file system, where another shard could take them first), so that
    /// compaction can move blobs on a full disk. Its content is stale and never read:
    /// only records written after this name a place in it. The caller syncs the
    /// directory before the segment is used. `full` is returned if the reserve is too
    /// small for a segment (taken when segments were smaller).
    fn reserve_as_segment(
        &self,
        state: &mut State<D::File>,
        path: &Path,
        full: Error,
    ) -> Result<D::File> {
        let reserve = self.dir.join(RESERVE_FILE);
        let len = self.disk.open(&reserve).and_then(|file| file.len_bytes());
        if !matches!(len, Ok(len) if len >= self.capacity_bytes) {
            return Err(full);
        }
        self.disk
            .rename(&reserve, path)
            .map_err(|e| Error::io("rename the space reserve", &reserve, 0, e))?;
        state.reserve_held = false;
        tracing::warn!(
            shard = self.shard,
            segment = %path.display(),
            "disk full: compaction is using the shard's space reserve"
        );
        self.disk
            .open(path)
            .map_err(|e| Error::io("open segment", path, 0, e))
    }

    /// Seals the active segment so that it can be compacted (tests, shutdown).
    pub fn seal_active(&self) {
        let mut state = self.state.borrow_mut();
        if let Some(old) = state.active.take() {
            state.sealed.insert(old.id, old.capacity_bytes);
        }
    }
}

/// Open reads of some segments ([`Segments::lease`]), counted until dropped.
pub struct Lease {
    readers: Rc<RefCell<HashMap<SegmentId, u32>>>,
    segments: Vec<SegmentId>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut readers = self.readers.borrow_mut();
        for segment in &self.segments {
            if let Some(count) = readers.get_mut(segment) {
                *count -= 1;
                if *count == 0 {
                    readers.remove(segment);
                }
            }
        }
    }
}

/// Shares fdatasync calls among concurrent callers on one file.
struct GroupSync {
    /// Tickets handed out: a sync that starts after ticket `t` was taken covers it.
    requested: Cell<u64>,
    running: Cell<bool>,
    /// The highest ticket known durable.
    done: Signal,
}

impl GroupSync {
    fn new() -> GroupSync {
        GroupSync {
            requested: Cell::new(0),
            running: Cell::new(false),
            done: Signal::default(),
        }
    }

    async fn sync<F: DiskFile>(
        &self,
        file: &F,
        path: &Path,
        shard: usize,
        poisoned: &Cell<bool>,
    ) -> Result<()> {
        let ticket = self.requested.get() + 1;
        self.requested.set(ticket);
        loop {
            let seen = self.done.generation();
            if self.done.value() >= ticket {
                return Ok(());
            }
            if poisoned.get() {
                return Err(Error::Poisoned { shard });
            }
            if !self.running.replace(true) {
                let covers = self.requested.get();
                let result = file.sync_data().await;
                self.running.set(false);
                match result {
                    Ok(()) => {
                        self.done.raise(covers);
                    }
                    Err(error) => {
                        poisoned.set(true);
                        self.done.notify();
                        return Err(Error::io("fdatasync", path, 0, error));
                    }
                }
            } else {
                self.done.changed(seen).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graviton_io::sim::{Faults, SimDisk};

    /// On a disk where every allocation fails, as when other shards' uploads take each
    /// block as soon as it is freed, compaction still gets its reserve back: the first
    /// segment it removes becomes the reserve.
    #[test]
    fn a_compacted_segment_becomes_the_reserve_on_a_full_disk() {
        let full = Faults {
            create_enospc: 1000,
            ..Faults::default()
        };
        let disk = SimDisk::new(7, full);
        disk.set_faults_enabled(false);
        let root = Path::new("/store");
        let segments = Segments::new(
            disk.clone(),
            0,
            root,
            (UNIT_BYTES, 4),
            Vec::new(),
            Vec::new(),
            Rc::new(Cell::new(false)),
        );
        let dir = root.join(shard_dir_name(0));
        disk.create_dir_all(&dir).expect("shard dir");
        let reserve = dir.join(RESERVE_FILE);
        segments.hold_reserve();
        assert!(disk.open(&reserve).is_ok(), "reserve held at open");

        let written = segments.allocate(ALIGN, Purpose::Write).expect("allocate");
        segments.release(&[written]);
        segments.seal_active();

        disk.set_faults_enabled(true); // the disk is full from here on
        let refused = segments.allocate(ALIGN, Purpose::Write);
        assert!(matches!(refused, Err(Error::NoSpace { .. })), "{refused:?}");
        assert!(
            disk.open(&reserve).is_ok(),
            "a write never takes the reserve"
        );
        let moved = segments
            .allocate(ALIGN, Purpose::Compaction)
            .expect("compaction writes into the reserve");
        assert!(disk.open(&reserve).is_err(), "the reserve became a segment");
        assert_eq!(
            disk.open(&segments.path(moved.segment))
                .and_then(|file| file.len_bytes())
                .expect("the new segment"),
            UNIT_BYTES
        );
        segments.release(&[moved]);

        assert!(segments.begin_compaction(written.segment));
        segments
            .remove(written.segment, Retire::Recycle)
            .expect("remove");
        segments.hold_reserve(); // what a compaction pass does after removing segments
        assert!(disk.open(&segments.path(written.segment)).is_err());
        let held = disk.open(&reserve).expect("the segment became the reserve");
        assert_eq!(held.len_bytes().expect("len"), UNIT_BYTES);
        let after_crash = disk.crash();
        assert!(
            after_crash.open(&reserve).is_ok(),
            "durable: its directory was synced"
        );
    }
}
