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
//!   full, the reserve is given up for it. Without one, deleting blobs on a full disk
//!   could never free space: compaction frees a segment only by first copying its live
//!   blobs into a new one. The first segment compaction then frees becomes the new
//!   reserve (renamed, so no other shard can take its space first); failing that, a
//!   reserve is allocated again once compaction has freed space.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use graviton_io::buf::round_down_u64;
use graviton_io::Disk;
use graviton_io::DiskFile;

use super::error::{Error, Result};
use super::format::{Extent, SegmentId, ALIGN, RESERVE_FILE, UNIT_BYTES};
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
    poisoned: Rc<Cell<bool>>,
    state: RefCell<State<D::File>>,
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
}

struct Active {
    id: SegmentId,
    capacity_bytes: u64,
    tail: u64,
}

impl<D: Disk> Segments<D> {
    /// The segment manager of shard `shard`, whose existing segments are `existing`
    /// (id, size): all sealed; new extents go to a new segment.
    pub fn new(
        disk: D,
        shard: usize,
        root: &Path,
        capacity_bytes: u64,
        existing: Vec<(SegmentId, u64)>,
        poisoned: Rc<Cell<bool>>,
    ) -> Segments<D> {
        assert!(capacity_bytes >= UNIT_BYTES && capacity_bytes.is_multiple_of(UNIT_BYTES));
        let next_sequence = existing
            .iter()
            .map(|(id, _)| id.sequence() + 1)
            .max()
            .unwrap_or(1);
        Segments {
            disk,
            shard,
            root: root.to_path_buf(),
            dir: root.join(shard_dir_name(shard)),
            capacity_bytes,
            poisoned,
            state: RefCell::new(State {
                active: None,
                next_sequence,
                sealed: existing.into_iter().collect(),
                inflight: HashMap::new(),
                compacting: HashSet::new(),
                files: HashMap::new(),
                syncs: HashMap::new(),
                reserve_held: false,
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
        let file = match create() {
            Err(Error::NoSpace { .. })
                if purpose == Purpose::Compaction && self.give_up_reserve(state) =>
            {
                create()
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

    /// Removes a compacted segment's file and makes the removal durable.
    ///
    /// If the shard holds no space reserve (compaction gave it up on a full disk) and
    /// the segment is a reserve's size, its file becomes the reserve instead: renamed,
    /// so its blocks never go back to the file system, where another shard's uploads
    /// could take them before this shard allocated a new reserve.
    pub fn remove(&self, segment: SegmentId) -> Result<()> {
        let path = self.path(segment);
        let (size, reserve_held) = {
            let mut state = self.state.borrow_mut();
            state.compacting.remove(&segment);
            (state.sealed.remove(&segment), state.reserve_held)
        };
        self.forget(segment);
        let becomes_reserve =
            !reserve_held && size == Some(self.capacity_bytes) && self.take_as_reserve(&path);
        if !becomes_reserve {
            self.disk
                .remove(&path)
                .map_err(|e| Error::io("remove segment", &path, 0, e))?;
        }
        self.disk
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("fsync dir", &self.dir, 0, e))
    }

    /// Renames the file at `path` (a compacted segment) to the space reserve; false,
    /// logged, if that failed. Its content is stale and never read.
    fn take_as_reserve(&self, path: &Path) -> bool {
        let reserve = self.dir.join(RESERVE_FILE);
        match self.disk.rename(path, &reserve) {
            Ok(()) => {
                self.state.borrow_mut().reserve_held = true;
                tracing::info!(
                    shard = self.shard,
                    segment = %path.display(),
                    "space reserve taken back: a compacted segment became the reserve"
                );
                true
            }
            Err(error) => {
                tracing::warn!(
                    shard = self.shard,
                    segment = %path.display(),
                    %error,
                    "could not make a compacted segment the space reserve; removing it"
                );
                false
            }
        }
    }

    /// Takes the space reserve if this shard holds none: at open, and after compaction
    /// freed space. On a disk too full for it, the shard goes on without one (logged).
    pub fn hold_reserve(&self) {
        if self.state.borrow().reserve_held {
            return;
        }
        let path = self.dir.join(RESERVE_FILE);
        let held = match self.disk.create(&path, self.capacity_bytes) {
            Ok(_) => self.disk.sync_dir(&self.dir).is_ok(),
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

    /// Removes the space reserve so that compaction can create a segment on a full
    /// disk; false if there was none to give up.
    fn give_up_reserve(&self, state: &mut State<D::File>) -> bool {
        if !state.reserve_held {
            return false;
        }
        let path = self.dir.join(RESERVE_FILE);
        if self.disk.remove(&path).is_err() {
            return false;
        }
        // The new segment's creation syncs this directory, and with it this removal.
        state.reserve_held = false;
        tracing::warn!(
            shard = self.shard,
            "disk full: compaction is using the shard's space reserve"
        );
        true
    }

    /// Seals the active segment so that it can be compacted (tests, shutdown).
    pub fn seal_active(&self) {
        let mut state = self.state.borrow_mut();
        if let Some(old) = state.active.take() {
            state.sealed.insert(old.id, old.capacity_bytes);
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
            UNIT_BYTES,
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
        let refused = segments.allocate(ALIGN, Purpose::Compaction);
        assert!(matches!(refused, Err(Error::NoSpace { .. })), "{refused:?}");
        assert!(
            disk.open(&reserve).is_err(),
            "compaction gave the reserve up"
        );

        assert!(segments.begin_compaction(written.segment));
        segments.remove(written.segment).expect("remove");
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
