//! The file interface the storage engine is written against, and its real
//! implementation over `O_DIRECT` files and the shard's monoio ring.
//!
//! The interface is deliberately small: positional aligned reads and writes of owned
//! buffers, `fdatasync`, and a few namespace operations. Namespace operations (open,
//! create with preallocation, remove, list, directory sync) are plain blocking system
//! calls: they are rare (a segment every few hundred MiB) and cheap, and keeping them
//! synchronous lets the engine open a file in the same step as it looks it up. The one
//! that is not cheap, giving a removed file's blocks back (145–270 ms for a 256 MiB
//! segment on this VM), happens on the [`reaper`]'s thread, never the caller's.
//!
//! Guarantees of [`DirectDisk`]:
//! - data files are opened `O_DIRECT` (unless [`IoMode::Buffered`] was chosen
//!   explicitly), so reads come from the device, not the page cache;
//! - `create` preallocates with `fallocate`, so a full disk is reported when a segment is
//!   created (ENOSPC), not in the middle of a write;
//! - `sync_data` is `fdatasync` and `sync_dir` is `fsync` on the directory: together
//!   they make written data and created or removed names durable.
//!
//! Offsets, lengths and buffer addresses must be multiples of the alignment reported by
//! [`DirectDisk::alignment`]; the engine asserts this before submitting.

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use monoio::buf::IoBufMut;

use crate::buf::{AlignedBuf, BUF_ALIGN};
use crate::reaper;

/// A namespace of files: a real directory tree, or the simulator's.
pub trait Disk: Clone + 'static {
    type File: DiskFile;

    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates a new file (it must not exist) with `len_bytes` preallocated.
    fn create(&self, path: &Path, len_bytes: u64) -> io::Result<Self::File>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Gives the file at `from` the name `to`, which must not exist (`AlreadyExists`
    /// otherwise; never replaces a file). Durable, like creation and removal, only after
    /// [`Disk::sync_dir`] of both directories.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes the creation and removal of names in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Alignment every offset, length and buffer address must have.
    fn alignment(&self) -> usize;
    /// Waits until files removed before this call, with no handle open, have their
    /// space back with the file system. [`DirectDisk`] frees removed files in the
    /// background ([`reaper`]); a caller that needs the space waits here.
    fn released(&self) -> impl Future<Output = ()>;
}

/// An open file. Operations take and return owned buffers.
pub trait DiskFile: Clone + 'static {
    /// Reads exactly `len` bytes at `offset`, appending them to `buf` (after
    /// `buf.len()`, which must be aligned). Reading past the end of the file is an error
    /// (`UnexpectedEof`); on error `buf.len()` is unchanged.
    fn read_at(
        &self,
        buf: AlignedBuf,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = (io::Result<()>, AlignedBuf)>;
    /// Writes all of `buf.as_slice()` at `offset`.
    fn write_at(
        &self,
        buf: AlignedBuf,
        offset: u64,
    ) -> impl Future<Output = (io::Result<()>, AlignedBuf)>;
    /// Writes all of `buf.as_slice()` at `offset` and returns once those bytes are
    /// durable, as `write_at` then `sync_data` would, but as one operation (an
    /// `O_DSYNC` write). It promises nothing about other writes to the file. On error
    /// the bytes may or may not have reached the disk, and may or may not be durable.
    fn write_at_durable(
        &self,
        buf: AlignedBuf,
        offset: u64,
    ) -> impl Future<Output = (io::Result<()>, AlignedBuf)>;
    /// Makes every completed write to this file durable (`fdatasync`).
    fn sync_data(&self) -> impl Future<Output = io::Result<()>>;
    /// The file's size in bytes.
    fn len_bytes(&self) -> io::Result<u64>;
}

/// How a [`DirectDisk`] opens files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: the default, and the only mode for benchmarks.
    Direct,
    /// Buffered I/O through the page cache, for file systems without `O_DIRECT`
    /// (tmpfs). Chosen explicitly and logged; durability still comes from fdatasync.
    Buffered,
}

/// Files under a real directory, opened for direct I/O and driven by monoio.
#[derive(Clone, Debug)]
pub struct DirectDisk {
    mode: IoMode,
    alignment: usize,
}

impl DirectDisk {
    /// A disk for files under `dir` (which must exist). In [`IoMode::Direct`], checks
    /// that the file system supports `O_DIRECT` there and learns its alignment; fails
    /// with a message naming the problem if it does not.
    pub fn probe(dir: &Path, mode: IoMode) -> io::Result<DirectDisk> {
        if mode == IoMode::Buffered {
            return Ok(DirectDisk {
                mode,
                alignment: BUF_ALIGN,
            });
        }
        if is_tmpfs(dir)? {
            // tmpfs accepts O_DIRECT since Linux 6.6, but its "device" is the page cache:
            // nothing it holds survives a reboot, so it is no place for durable blobs.
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} is on tmpfs, which is memory, not a disk: data there does not survive \
                     a reboot; put the data directory on ext4 or xfs, or allow buffered I/O explicitly",
                    dir.display()
                ),
            ));
        }
        let probe_path = dir.join(".graviton-dio-probe");
        let _ = fs::remove_file(&probe_path);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe_path);
        let file = match opened {
            Ok(file) => file,
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                let _ = fs::remove_file(&probe_path);
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "the file system holding {} does not support O_DIRECT (tmpfs?); \
                         put the data directory on ext4 or xfs, or allow buffered I/O explicitly",
                        dir.display()
                    ),
                ));
            }
            Err(error) => return Err(error),
        };
        let reported = dio_alignment(&file);
        drop(file);
        let _ = fs::remove_file(&probe_path);
        let alignment = match reported {
            Some(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "statx reports no direct I/O support for files in {}; \
                         allow buffered I/O explicitly or use another file system",
                        dir.display()
                    ),
                ))
            }
            Some(align) => align.max(BUF_ALIGN),
            None => BUF_ALIGN,
        };
        if alignment > BUF_ALIGN {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "direct I/O in {} needs {alignment}-byte alignment; Graviton supports up to {BUF_ALIGN}",
                    dir.display()
                ),
            ));
        }
        Ok(DirectDisk { mode, alignment })
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    fn options(&self) -> OpenOptions {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if self.mode == IoMode::Direct {
            options.custom_flags(libc::O_DIRECT);
        }
        options
    }
}

/// The larger of `stx_dio_mem_align` and `stx_dio_offset_align` for an open file, from
/// `statx(STATX_DIOALIGN)` (Linux 6.1+); `Some(0)` if the file system says direct I/O
/// is unsupported; `None` if the kernel or file system does not report it.
pub fn dio_alignment(file: &fs::File) -> Option<usize> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    #[allow(unsafe_code)]
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: the fd is open for the duration of the call, the path is a valid C string,
    // and `stx` is a valid out-pointer.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align as usize).max(stx.stx_dio_offset_align as usize))
}

/// Whether `dir` is on tmpfs (statfs `f_type == TMPFS_MAGIC`).
fn is_tmpfs(dir: &Path) -> io::Result<bool> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let path = c_path(dir)?;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    #[allow(unsafe_code)]
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stats` a valid out-pointer for the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut stats) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    Ok(stats.f_type as i64 == TMPFS_MAGIC)
}

/// A path as the C string libc calls take.
fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `renameat2(RENAME_NOREPLACE)`: fails with `EEXIST` rather than replace `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are valid C strings that live for the duration of the call;
    // AT_FDCWD makes relative paths relative to the working directory, as std's are.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fallocate(file: &fs::File, len_bytes: u64) -> io::Result<()> {
    if len_bytes == 0 {
        return Ok(());
    }
    // SAFETY: the fd is open for writing for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_bytes as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Disk for DirectDisk {
    type File = DirectFile;

    fn open(&self, path: &Path) -> io::Result<DirectFile> {
        let std = self.options().open(path)?;
        DirectFile::new(std, path, self.mode == IoMode::Direct)
    }

    fn create(&self, path: &Path, len_bytes: u64) -> io::Result<DirectFile> {
        let std = self.options().create_new(true).open(path)?;
        if let Err(error) = fallocate(&std, len_bytes) {
            drop(std);
            let _ = fs::remove_file(path);
            return Err(error);
        }
        DirectFile::new(std, path, self.mode == IoMode::Direct)
    }

    /// Unlinks the name while holding a reference to the file, then hands the
    /// reference to the [`reaper`]: the blocks go back to the file system on its thread
    /// (or on whichever thread drops the file's last handle: a [`DirectFile`]'s go to
    /// the reaper too), not on the caller's.
    fn remove(&self, path: &Path) -> io::Result<()> {
        let held = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(path);
        fs::remove_file(path)?;
        if let Ok(held) = held {
            reaper::release(held.into());
        }
        Ok(())
    }

    async fn released(&self) {
        reaper::released().await
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        rename_noreplace(from, to)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        fs::File::open(dir)?.sync_all()
    }

    fn alignment(&self) -> usize {
        self.alignment
    }
}

/// A file of a [`DirectDisk`]: a monoio file (shared by the shard's tasks), and, once
/// a durable write asks for it, a second descriptor of the same file opened `O_DSYNC`.
/// Clones share the descriptors; when the last clone is dropped they go to the
/// [`reaper`], so that closing them never frees a removed file's blocks on this thread.
#[derive(Clone)]
pub struct DirectFile {
    handles: Rc<Handles>,
}

struct Handles {
    file: monoio::fs::File,
    dsync: std::cell::OnceCell<monoio::fs::File>,
    direct: bool,
    path: PathBuf,
}

impl Drop for Handles {
    fn drop(&mut self) {
        let descriptors = std::iter::once(&self.file).chain(self.dsync.get());
        for fd in descriptors.map(AsRawFd::as_raw_fd) {
            match reaper::detach(fd) {
                Ok(kept) => reaper::release(kept),
                // monoio's close will be the last reference, as without a reaper
                Err(error) => tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    "could not hand a descriptor to the reaper; it is closed here"
                ),
            }
        }
    }
}

impl DirectFile {
    fn new(std: fs::File, path: &Path, direct: bool) -> io::Result<DirectFile> {
        Ok(DirectFile {
            handles: Rc::new(Handles {
                file: monoio::fs::File::from_std(std)?,
                dsync: std::cell::OnceCell::new(),
                direct,
                path: path.to_path_buf(),
            }),
        })
    }

    /// The `O_DSYNC` descriptor, opened on first use. The engine writes only to files
    /// that are still under their names (it removes a file only once nothing writes to
    /// it), so opening by path reaches this file.
    fn dsync(&self) -> io::Result<&monoio::fs::File> {
        let handles = &*self.handles;
        if let Some(file) = handles.dsync.get() {
            return Ok(file);
        }
        let direct = if handles.direct { libc::O_DIRECT } else { 0 };
        let std = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DSYNC | direct)
            .open(&handles.path)?;
        let file = monoio::fs::File::from_std(std)?;
        Ok(handles.dsync.get_or_init(|| file))
    }

    pub fn path(&self) -> &Path {
        &self.handles.path
    }
}

impl DiskFile for DirectFile {
    async fn read_at(
        &self,
        buf: AlignedBuf,
        offset: u64,
        len: usize,
    ) -> (io::Result<()>, AlignedBuf) {
        let start = buf.len();
        assert!(
            start + len <= buf.capacity(),
            "read of {len} bytes overflows the buffer"
        );
        let slice = buf.slice_mut(start..start + len);
        let (result, slice) = self.handles.file.read_exact_at(slice, offset).await;
        let mut buf = slice.into_inner();
        buf.set_len(if result.is_ok() { start + len } else { start });
        (result, buf)
    }

    async fn write_at(&self, buf: AlignedBuf, offset: u64) -> (io::Result<()>, AlignedBuf) {
        self.handles.file.write_all_at(buf, offset).await
    }

    async fn write_at_durable(&self, buf: AlignedBuf, offset: u64) -> (io::Result<()>, AlignedBuf) {
        match self.dsync() {
            Ok(file) => file.write_all_at(buf, offset).await,
            Err(error) => (Err(error), buf),
        }
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.handles.file.sync_data().await
    }

    fn len_bytes(&self) -> io::Result<u64> {
        let fd = self.handles.file.as_raw_fd();
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        #[allow(unsafe_code)]
        // SAFETY: `fd` is open for as long as `self.handles` lives, and `fstat` writes
        // one `struct stat` into `stat`, which is read only after it succeeded.
        let stat = unsafe {
            if libc::fstat(fd, stat.as_mut_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            stat.assume_init()
        };
        Ok(stat.st_size as u64)
    }
}

/// An exclusive advisory lock on a directory, held until dropped, so that two processes
/// never open one data directory.
pub struct DirLock {
    _file: fs::File,
}

impl DirLock {
    /// Locks `dir/LOCK`, failing at once (`WouldBlock`) if another process holds it.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("LOCK"))?;
        // SAFETY: the fd is open for the duration of the call; flock has no memory effects.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_is_refused_for_direct_io_and_allowed_buffered() {
        let dir = Path::new("/dev/shm");
        if !is_tmpfs(dir).unwrap_or(false) {
            return; // no tmpfs here to try
        }
        let error = DirectDisk::probe(dir, IoMode::Direct).expect_err("tmpfs must be refused");
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
        assert!(error.to_string().contains("tmpfs"), "{error}");
        assert_eq!(
            DirectDisk::probe(dir, IoMode::Buffered)
                .expect("buffered")
                .mode(),
            IoMode::Buffered
        );
    }

    /// A fresh directory for one test, under the workspace's target directory: /tmp may
    /// be tmpfs, which has no O_DIRECT.
    fn test_dir(name: &str) -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/io-tests")
            .join(format!("{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        dir
    }

    /// A monoio runtime for the test's file operations.
    fn runtime() -> monoio::Runtime<monoio::LegacyDriver> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime")
    }

    /// A durable write goes through the second (`O_DSYNC`) descriptor and reads back
    /// through the first, beside an ordinary write to the same file.
    #[test]
    fn durable_and_plain_writes_read_back() {
        let dir = test_dir("dsync");
        runtime().block_on(async {
            let disk = DirectDisk::probe(&dir, IoMode::Direct).expect("direct I/O");
            let file = disk.create(&dir.join("f"), 3 * 4096).expect("create");
            let filled = |byte: u8| {
                let mut buf = AlignedBuf::zeroed(4096);
                buf.extend_from_slice(&[byte; 4096]);
                buf
            };
            let (result, _) = file.write_at(filled(1), 0).await;
            result.expect("plain write");
            for round in 0..3u8 {
                let (result, _) = file.write_at_durable(filled(10 + round), 4096).await;
                result.expect("durable write");
            }
            let (result, buf) = file
                .read_at(AlignedBuf::zeroed(3 * 4096), 0, 3 * 4096)
                .await;
            result.expect("read");
            let bytes = buf.as_slice();
            assert!(bytes[..4096].iter().all(|&b| b == 1));
            assert!(
                bytes[4096..8192].iter().all(|&b| b == 12),
                "the last durable write wins"
            );
            assert!(bytes[8192..].iter().all(|&b| b == 0));
        });
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn rename_moves_a_name_and_never_replaces_one() {
        let dir = test_dir("rename");
        let disk = DirectDisk::probe(&dir, IoMode::Direct).expect("direct I/O");
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        runtime().block_on(async {
            disk.create(&a, 4096).expect("create a");
            disk.create(&b, 8192).expect("create b");
        });
        let refused = disk.rename(&a, &b).expect_err("b exists");
        assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::metadata(&b).expect("b").len(), 8192, "b untouched");
        disk.rename(&a, &c).expect("rename a to c");
        assert!(!a.exists());
        assert_eq!(fs::metadata(&c).expect("c").len(), 4096);
        let missing = disk.rename(&a, &dir.join("d")).expect_err("a is gone");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    /// Bytes free on the file system of `dir`.
    fn free_bytes(dir: &Path) -> u64 {
        let path = c_path(dir).expect("path");
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        #[allow(unsafe_code)]
        // SAFETY: `path` is a NUL-terminated string that outlives the call; `statvfs`
        // fills `stat`, which is read only after it succeeded.
        let stat = unsafe {
            assert_eq!(libc::statvfs(path.as_ptr(), stat.as_mut_ptr()), 0);
            stat.assume_init()
        };
        stat.f_bavail as u64 * stat.f_frsize as u64
    }

    /// A removed file keeps its space while a handle is open; when the last handle is
    /// dropped, its descriptors go to the reaper, and once `released` returns the space
    /// is back. (Run on the workspace's file system: other writers there can only make
    /// the free space drift by far less than the 256 MiB looked for.)
    #[test]
    fn a_removed_file_is_freed_by_the_reaper_after_its_last_handle() {
        const LEN: u64 = 256 << 20;
        let dir = test_dir("reaper");
        let disk = DirectDisk::probe(&dir, IoMode::Direct).expect("direct I/O");
        let path = dir.join("segment");
        runtime().block_on(async {
            let start = free_bytes(&dir);
            let file = disk.create(&path, LEN).expect("create");
            let mut buf = AlignedBuf::zeroed(4096);
            buf.extend_from_slice(&[7; 4096]);
            let (result, _) = file.write_at_durable(buf, 0).await; // opens the O_DSYNC one
            result.expect("write");
            let clone = file.clone();
            assert!(
                start.saturating_sub(free_bytes(&dir)) > LEN / 2,
                "preallocated"
            );

            disk.remove(&path).expect("remove");
            disk.released().await;
            assert!(!path.exists(), "the name is gone");
            assert!(
                start.saturating_sub(free_bytes(&dir)) > LEN / 2,
                "still open: not freed"
            );
            let (result, buf) = clone.read_at(AlignedBuf::zeroed(4096), 0, 4096).await;
            result.expect("a removed file reads through an open handle");
            assert_eq!(buf.as_slice(), &[7; 4096]);

            let closed = reaper::closed_count();
            drop(file);
            drop(clone);
            disk.released().await;
            assert!(
                reaper::closed_count() >= closed + 2,
                "both descriptors (plain and O_DSYNC) were closed by the reaper"
            );
            assert!(
                start.abs_diff(free_bytes(&dir)) < LEN / 2,
                "the space is back once released"
            );
        });
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_real_directory_probes_as_direct() {
        let dir = std::env::temp_dir().join(format!("graviton-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        if !is_tmpfs(&dir).expect("statfs") {
            let disk = DirectDisk::probe(&dir, IoMode::Direct).expect("direct I/O");
            assert_eq!(disk.alignment() % 512, 0);
        }
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
