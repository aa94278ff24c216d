//! A deterministic, fault-injecting, in-memory [`Disk`] for crash testing.
//!
//! Everything is driven by one seeded generator ([`SimRng`]), so a run is reproduced
//! exactly by its seed when the code that drives the disk is itself deterministic (one
//! thread, one executor).
//!
//! The model of durability, deliberately more hostile than a real disk:
//! - A write is visible to reads at once but *pending* until a successful `sync_data` of
//!   its file. At a [`SimDisk::crash`], every pending write is resolved sector by sector
//!   ([`SECTOR_BYTES`]): each sector of each pending write independently reaches the disk
//!   or not. That covers lost, torn and reordered writes. A sector is the unit of atomic
//!   persistence, as on real devices.
//! - Creating or removing a name is pending until `sync_dir` of its directory; at a crash
//!   each pending name change independently happens or not.
//! - Faults, each with a per-mille probability ([`Faults`]): `EIO` from reads, writes and
//!   syncs, `ENOSPC` from file creation, and bit rot (a flipped bit in durable data,
//!   planted at a crash) that checksums must catch.
//! - A failed `sync_data` leaves the file's pending writes pending: as after a real
//!   failed fsync, nobody knows what reached the disk.
//! - Operations yield to the executor a random number of times before completing, so
//!   concurrent tasks interleave differently on every seed.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::buf::{AlignedBuf, BUF_ALIGN};
use crate::disk::{Disk, DiskFile};

/// The unit of atomic persistence at a crash.
pub const SECTOR_BYTES: usize = 512;

/// A small, fast, seedable generator (SplitMix64). Not for cryptography.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.below(1000) < per_mille as u64
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Fault probabilities, per mille of operations.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub read_eio: u32,
    pub write_eio: u32,
    pub sync_eio: u32,
    pub create_enospc: u32,
    /// At each crash, chance to flip one bit somewhere in one durable file whose name
    /// ends with [`Faults::bit_rot_suffix`].
    pub bit_rot_at_crash: u32,
    pub bit_rot_suffix: &'static str,
    /// Most yields an operation makes before completing.
    pub max_yields: u32,
}

#[derive(Default)]
struct FileData {
    /// What reads see.
    visible: Vec<u8>,
    /// What survived the last sync, before pending writes.
    durable: Vec<u8>,
    /// Writes since the last successful sync, oldest first.
    pending: Vec<(u64, Vec<u8>)>,
}

type FileRef = Rc<RefCell<FileData>>;

struct SimFs {
    /// Names as the running program sees them.
    visible: BTreeMap<PathBuf, FileRef>,
    /// Names as they would be after a crash now (before pending name changes).
    durable: BTreeMap<PathBuf, FileRef>,
    dirs: std::collections::BTreeSet<PathBuf>,
    rng: SimRng,
    faults: Faults,
    /// Counts of injected faults, for reports.
    injected: u64,
    /// Bits flipped in durable files so far (a subset of `injected`).
    rotted: u64,
    /// While false, no faults are injected (for set-up and final checks).
    faults_enabled: bool,
}

/// The simulated disk. Cheap to clone; all clones share one state. Single-threaded.
#[derive(Clone)]
pub struct SimDisk {
    fs: Rc<RefCell<SimFs>>,
}

impl SimDisk {
    pub fn new(seed: u64, faults: Faults) -> SimDisk {
        SimDisk {
            fs: Rc::new(RefCell::new(SimFs {
                visible: BTreeMap::new(),
                durable: BTreeMap::new(),
                dirs: Default::default(),
                rng: SimRng::new(seed),
                faults,
                injected: 0,
                rotted: 0,
                faults_enabled: true,
            })),
        }
    }

    /// Turns fault injection on or off (crashes still lose unsynced data).
    pub fn set_faults_enabled(&self, enabled: bool) {
        self.fs.borrow_mut().faults_enabled = enabled;
    }

    /// How many faults were injected so far.
    pub fn injected_faults(&self) -> u64 {
        self.fs.borrow().injected
    }

    /// How many bits were flipped in durable files so far ([`Faults::bit_rot_at_crash`]).
    /// Until one is, no read may report corruption: every checksum failure is a bug.
    pub fn bit_rot_injected(&self) -> u64 {
        self.fs.borrow().rotted
    }

    /// A draw from the disk's generator, for drivers that want one stream of randomness.
    pub fn random(&self, bound: u64) -> u64 {
        self.fs.borrow_mut().rng.below(bound)
    }

    /// Simulates power loss: returns a fresh disk holding only what is durable, with
    /// every pending write and name change resolved at random. Handles to the old disk
    /// must no longer be used.
    pub fn crash(&self) -> SimDisk {
        let mut fs = self.fs.borrow_mut();
        let fs = &mut *fs;
        let names: Vec<PathBuf> = fs
            .visible
            .keys()
            .chain(fs.durable.keys())
            .cloned()
            .collect();
        let mut survivors: BTreeMap<PathBuf, FileRef> = BTreeMap::new();
        let mut resolved: BTreeMap<*const RefCell<FileData>, FileRef> = BTreeMap::new();
        for name in names {
            if survivors.contains_key(&name) {
                continue;
            }
            let visible = fs.visible.get(&name);
            let durable = fs.durable.get(&name);
            let same = match (visible, durable) {
                (Some(a), Some(b)) => Rc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            let chosen = if same || fs.rng.chance(500) {
                visible
            } else {
                durable
            };
            let Some(file) = chosen else { continue };
            let key = Rc::as_ptr(file);
            let after = resolved
                .entry(key)
                .or_insert_with(|| Rc::new(RefCell::new(resolve(&file.borrow(), &mut fs.rng))))
                .clone();
            survivors.insert(name, after);
        }
        let rot_targets: Vec<&FileRef> = survivors
            .iter()
            .filter(|(name, _)| name.to_string_lossy().ends_with(fs.faults.bit_rot_suffix))
            .map(|(_, file)| file)
            .collect();
        if fs.faults_enabled && fs.rng.chance(fs.faults.bit_rot_at_crash) && !rot_targets.is_empty()
        {
            let pick = fs.rng.below(rot_targets.len() as u64) as usize;
            let file = rot_targets[pick];
            let mut data = file.borrow_mut();
            if !data.durable.is_empty() {
                let at = fs.rng.below(data.durable.len() as u64) as usize;
                let bit = 1u8 << fs.rng.below(8);
                data.durable[at] ^= bit;
                data.visible[at] ^= bit;
                fs.injected += 1;
                fs.rotted += 1;
            }
        }
        SimDisk {
            fs: Rc::new(RefCell::new(SimFs {
                visible: survivors.clone(),
                durable: survivors,
                dirs: fs.dirs.clone(),
                rng: SimRng::new(fs.rng.next_u64()),
                faults: fs.faults,
                injected: fs.injected,
                rotted: fs.rotted,
                faults_enabled: fs.faults_enabled,
            })),
        }
    }

    fn fault(&self, pick: impl Fn(&Faults) -> u32) -> bool {
        let mut fs = self.fs.borrow_mut();
        let per_mille = pick(&fs.faults);
        if fs.faults_enabled && fs.rng.chance(per_mille) {
            fs.injected += 1;
            true
        } else {
            false
        }
    }

    fn yields(&self) -> YieldTimes {
        let mut fs = self.fs.borrow_mut();
        let max = fs.faults.max_yields;
        YieldTimes(if max == 0 {
            0
        } else {
            fs.rng.below(max as u64 + 1) as u32
        })
    }
}

/// The durable image of a file after a crash: durable bytes plus a random subset of the
/// sectors of its pending writes, applied oldest first.
fn resolve(data: &FileData, rng: &mut SimRng) -> FileData {
    let mut image = data.durable.clone();
    for (offset, bytes) in &data.pending {
        let offset = *offset as usize;
        if image.len() < offset + bytes.len() && rng.chance(500) {
            image.resize(offset + bytes.len(), 0);
        }
        for (i, sector) in bytes.chunks(SECTOR_BYTES).enumerate() {
            let at = offset + i * SECTOR_BYTES;
            if at + sector.len() <= image.len() && rng.chance(500) {
                image[at..at + sector.len()].copy_from_slice(sector);
            }
        }
    }
    FileData {
        visible: image.clone(),
        durable: image,
        pending: Vec::new(),
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated EIO on {what}"))
}

impl Disk for SimDisk {
    type File = SimFile;

    /// Removal frees at once here: nothing to wait for.
    async fn released(&self) {}

    fn open(&self, path: &Path) -> io::Result<SimFile> {
        let fs = self.fs.borrow();
        let data = fs.visible.get(path).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display()))
        })?;
        Ok(SimFile {
            disk: self.clone(),
            data: data.clone(),
        })
    }

    fn create(&self, path: &Path, len_bytes: u64) -> io::Result<SimFile> {
        if self.fault(|f| f.create_enospc) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut fs = self.fs.borrow_mut();
        if fs.visible.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}", path.display()),
            ));
        }
        let data = Rc::new(RefCell::new(FileData {
            visible: vec![0; len_bytes as usize],
            durable: vec![0; len_bytes as usize],
            pending: Vec::new(),
        }));
        fs.visible.insert(path.to_path_buf(), data.clone());
        Ok(SimFile {
            disk: self.clone(),
            data,
        })
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        fs.visible
            .remove(path)
            .map(drop)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display())))
    }

    /// Not atomic at a crash: until both directories are synced, each name survives
    /// or not on its own (see [`SimDisk::crash`]), so the file may end up under both
    /// names or neither. Real file systems promise more; the engine must cope with this.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        if fs.visible.contains_key(to) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}", to.display()),
            ));
        }
        let data = fs.visible.remove(from).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{}", from.display()))
        })?;
        fs.visible.insert(to.to_path_buf(), data);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let fs = self.fs.borrow();
        Ok(fs
            .visible
            .keys()
            .filter(|name| name.parent() == Some(dir))
            .filter_map(|name| name.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.fs.borrow_mut().dirs.insert(dir.to_path_buf());
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        let fs = &mut *fs;
        fs.durable.retain(|name, _| name.parent() != Some(dir));
        for (name, data) in &fs.visible {
            if name.parent() == Some(dir) {
                fs.durable.insert(name.clone(), data.clone());
            }
        }
        Ok(())
    }

    fn alignment(&self) -> usize {
        BUF_ALIGN
    }
}

/// A file of a [`SimDisk`].
#[derive(Clone)]
pub struct SimFile {
    disk: SimDisk,
    data: FileRef,
}

impl DiskFile for SimFile {
    async fn read_at(
        &self,
        mut buf: AlignedBuf,
        offset: u64,
        len: usize,
    ) -> (io::Result<()>, AlignedBuf) {
        let at = buf.len();
        assert!(at + len <= buf.capacity());
        assert_eq!(at % BUF_ALIGN, 0, "unaligned buffer position {at}");
        assert_eq!(
            offset as usize % BUF_ALIGN,
            0,
            "unaligned read offset {offset}"
        );
        assert_eq!(len % BUF_ALIGN, 0, "unaligned read length {len}");
        self.disk.yields().await;
        if self.disk.fault(|f| f.read_eio) {
            return (Err(eio("read")), buf);
        }
        let data = self.data.borrow();
        let start = offset as usize;
        if start + len > data.visible.len() {
            return (
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past end",
                )),
                buf,
            );
        }
        buf.full_mut()[at..at + len].copy_from_slice(&data.visible[start..start + len]);
        buf.set_len(at + len);
        (Ok(()), buf)
    }

    async fn write_at(&self, buf: AlignedBuf, offset: u64) -> (io::Result<()>, AlignedBuf) {
        assert_eq!(
            offset as usize % BUF_ALIGN,
            0,
            "unaligned write offset {offset}"
        );
        assert_eq!(
            buf.len() % BUF_ALIGN,
            0,
            "unaligned write length {}",
            buf.len()
        );
        self.disk.yields().await;
        if self.disk.fault(|f| f.write_eio) {
            return (Err(eio("write")), buf);
        }
        let mut data = self.data.borrow_mut();
        let start = offset as usize;
        let end = start + buf.len();
        if data.visible.len() < end {
            data.visible.resize(end, 0);
        }
        data.visible[start..end].copy_from_slice(buf.as_slice());
        data.pending.push((offset, buf.as_slice().to_vec()));
        drop(data);
        (Ok(()), buf)
    }

    async fn write_at_durable(&self, buf: AlignedBuf, offset: u64) -> (io::Result<()>, AlignedBuf) {
        let (written, buf) = self.write_at(buf, offset).await;
        if written.is_err() {
            return (written, buf); // nothing reached the file
        }
        self.disk.yields().await;
        if self.disk.fault(|f| f.sync_eio) {
            return (Err(eio("O_DSYNC write")), buf); // written, not known durable
        }
        let mut data = self.data.borrow_mut();
        let (start, end) = (offset as usize, offset as usize + buf.len());
        if data.durable.len() < end {
            data.durable.resize(end, 0);
        }
        data.durable[start..end].copy_from_slice(buf.as_slice());
        // Older pending writes over this range must not land on it at a crash: they
        // are older than these bytes. Keep only their parts outside the range.
        let pending = std::mem::take(&mut data.pending);
        for (at, bytes) in pending {
            let (at, stop) = (at as usize, at as usize + bytes.len());
            if stop <= start || at >= end {
                data.pending.push((at as u64, bytes));
                continue;
            }
            if at < start {
                data.pending.push((at as u64, bytes[..start - at].to_vec()));
            }
            if stop > end {
                data.pending.push((end as u64, bytes[end - at..].to_vec()));
            }
        }
        drop(data);
        (Ok(()), buf)
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.disk.yields().await;
        if self.disk.fault(|f| f.sync_eio) {
            return Err(eio("fdatasync"));
        }
        let mut data = self.data.borrow_mut();
        data.durable = data.visible.clone();
        data.pending.clear();
        Ok(())
    }

    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.data.borrow().visible.len() as u64)
    }
}

/// Yields to the executor once. Under a running [`yield_pump`] the task goes to the
/// back of the run queue; without one it wakes itself (monoio then polls it again at
/// once, so nothing else interleaves).
pub fn yield_now() -> impl Future<Output = ()> {
    YieldTimes(1)
}

/// Yields to the executor `n` times.
struct YieldTimes(u32);

impl Future for YieldTimes {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        let pump = PUMP.with(|slot| {
            let mut slot = slot.borrow_mut();
            let state = slot.as_mut()?;
            state.yielded.push(cx.waker().clone());
            Some(state.pump.take())
        });
        match pump {
            Some(Some(pump)) => pump.wake(),
            Some(None) => {} // the pump is already queued
            None => cx.waker().wake_by_ref(),
        }
        Poll::Pending
    }
}

#[derive(Default)]
struct PumpState {
    yielded: Vec<Waker>,
    pump: Option<Waker>,
}

thread_local! {
    static PUMP: RefCell<Option<PumpState>> = const { RefCell::new(None) };
}

/// A task that makes [`yield_now`] fair on monoio: monoio re-polls a task that woke
/// itself before any other, so a yielding task instead parks its waker here and wakes
/// this pump, which wakes the parked tasks from its own poll: they go to the back of the
/// run queue, in the order they yielded. Spawn it once per runtime; it never ends.
/// Call [`stop_yield_pump`] after the runtime is dropped.
pub fn yield_pump() -> impl Future<Output = ()> {
    PUMP.with(|slot| *slot.borrow_mut() = Some(PumpState::default()));
    YieldPump
}

/// Forgets the pump's state (its wakers belong to a dropped runtime).
pub fn stop_yield_pump() {
    PUMP.with(|slot| slot.borrow_mut().take());
}

struct YieldPump;

impl Future for YieldPump {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let yielded = PUMP.with(|slot| {
            let mut slot = slot.borrow_mut();
            let Some(state) = slot.as_mut() else {
                return Vec::new();
            };
            state.pump = Some(cx.waker().clone());
            std::mem::take(&mut state.yielded)
        });
        for waker in yielded {
            waker.wake();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(future: F) -> F::Output {
        let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime");
        runtime.block_on(future)
    }

    fn buf_of(byte: u8, len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(len);
        buf.extend_from_slice(&vec![byte; len]);
        buf
    }

    /// `/d/a`, a new file of `len` bytes whose name is durable.
    fn named_file(disk: &SimDisk, len: u64) -> SimFile {
        let dir = Path::new("/d");
        let file = disk.create(&dir.join("a"), len).expect("create");
        disk.sync_dir(dir).expect("sync dir");
        file
    }

    /// The first `len` bytes of `/d/a` after `disk` loses power.
    async fn after_crash(disk: &SimDisk, len: usize) -> Vec<u8> {
        let file = disk.crash().open(Path::new("/d/a")).expect("durable name");
        let (result, buf) = file.read_at(AlignedBuf::zeroed(len), 0, len).await;
        result.expect("read");
        buf.as_slice().to_vec()
    }

    #[test]
    fn synced_data_survives_a_crash_and_unsynced_names_may_not() {
        block_on(async {
            let disk = SimDisk::new(1, Faults::default());
            let file = named_file(&disk, 8192);
            let (result, _) = file.write_at(buf_of(7, 4096), 0).await;
            result.expect("write");
            file.sync_data().await.expect("sync");
            assert!(after_crash(&disk, 4096).await.iter().all(|&b| b == 7));
        });
    }

    /// A rename never replaces a name; once the directory is synced it survives every
    /// crash; before that, each of the two names survives or not on its own.
    #[test]
    fn a_rename_is_durable_after_sync_dir_and_refuses_to_replace() {
        let dir = Path::new("/d");
        let (a, b) = (dir.join("a"), dir.join("b"));
        let mut outcomes = std::collections::BTreeSet::new();
        let renamed = |seed| {
            let disk = SimDisk::new(seed, Faults::default());
            named_file(&disk, 4096);
            disk.create(&b, 4096).expect("create b");
            let refused = disk.rename(&a, &b).expect_err("b exists");
            assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
            disk.remove(&b).expect("remove b");
            disk.sync_dir(dir).expect("sync dir");
            disk.rename(&a, &b).expect("rename");
            assert!(disk.open(&a).is_err() && disk.open(&b).is_ok());
            disk
        };
        for seed in 0..64 {
            let crashed = renamed(seed).crash();
            outcomes.insert((crashed.open(&a).is_ok(), crashed.open(&b).is_ok()));
            let disk = renamed(seed);
            disk.sync_dir(dir).expect("sync dir");
            let synced = disk.crash();
            assert!(synced.open(&a).is_err() && synced.open(&b).is_ok());
        }
        assert_eq!(
            outcomes.len(),
            4,
            "every mix of the two names: {outcomes:?}"
        );
    }

    #[test]
    fn unsynced_writes_resolve_per_sector() {
        block_on(async {
            // Over many seeds, an unsynced 4 KiB write must come back torn at least once:
            // some sectors new, some old.
            let mut torn = false;
            for seed in 0..64 {
                let disk = SimDisk::new(seed, Faults::default());
                let file = named_file(&disk, 4096);
                let (result, _) = file.write_at(buf_of(9, 4096), 0).await;
                result.expect("write");
                let new = after_crash(&disk, 4096)
                    .await
                    .chunks(SECTOR_BYTES)
                    .filter(|s| s[0] == 9)
                    .count();
                torn |= new > 0 && new < 8;
            }
            assert!(torn, "no torn write in 64 seeds");
        });
    }

    /// A durable write survives every crash, and an older unsynced write over the same
    /// blocks never lands on top of it, while that write's part outside them may.
    #[test]
    fn a_durable_write_survives_crashes_and_older_pending_writes_do_not_cover_it() {
        block_on(async {
            let mut outside_kept = false;
            for seed in 0..64 {
                let disk = SimDisk::new(seed, Faults::default());
                let file = named_file(&disk, 3 * 4096);
                let (result, _) = file.write_at(buf_of(1, 3 * 4096), 0).await;
                result.expect("older, unsynced write");
                let (result, _) = file.write_at_durable(buf_of(2, 4096), 4096).await;
                result.expect("durable write");
                let bytes = after_crash(&disk, 3 * 4096).await;
                assert!(
                    bytes[4096..8192].iter().all(|&b| b == 2),
                    "seed {seed}: the durable block was lost or covered"
                );
                outside_kept |= bytes[..4096].contains(&1);
            }
            assert!(outside_kept, "the older write's other blocks never landed");
        });
    }

    /// A durable write whose sync part fails is left as an ordinary unsynced write.
    #[test]
    fn a_failed_durable_write_is_only_pending() {
        block_on(async {
            let mut lost = false;
            for seed in 0..64 {
                let faults = Faults {
                    sync_eio: 1000,
                    ..Faults::default()
                };
                let disk = SimDisk::new(seed, faults);
                let file = named_file(&disk, 4096);
                let (result, _) = file.write_at_durable(buf_of(3, 4096), 0).await;
                assert!(result.is_err(), "the injected sync failure is reported");
                lost |= !after_crash(&disk, 4096).await.iter().all(|&b| b == 3);
            }
            assert!(lost, "a write whose sync failed was always durable");
        });
    }
}
