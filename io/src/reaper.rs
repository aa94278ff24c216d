//! The reaper: one background thread that closes the last descriptors of Graviton's
//! files, so that giving a removed file's blocks back to the file system never runs on a
//! shard thread.
//!
//! Why: Linux frees a removed file's blocks when the last reference to it goes, in the
//! thread that lets it go (the `unlink`, or the last `close`, or, for a descriptor
//! io_uring closes, the thread that entered the ring). On this VM's ext4, mounted with
//! `discard`, that took 145–270 ms for a 256 MiB segment (kernel-notes.md §6), and a
//! shard thread that pays it stalls every request it serves: measured as a foreground
//! put p99.9 of 84–109 ms during a compaction pass, against 18–23 ms without one.
//!
//! What it owns and guarantees:
//! - [`DirectDisk::remove`](crate::DirectDisk) takes a reference to the file before it
//!   unlinks the name, and hands the reference here;
//! - a [`DirectFile`](crate::disk::DirectFile) whose last clone is dropped points its
//!   monoio descriptors at `/dev/null` (`detach`) and hands their open files here, so
//!   monoio's own close (asynchronous, through the ring) is never the last reference;
//! - [`released`] waits until everything handed here before it was closed, so that a
//!   caller that needs the space back (compaction, before it takes a space reserve)
//!   can wait for it.
//!
//! The queue is unbounded in entries but each entry is a descriptor, so it is bounded
//! by the descriptors the process may hold (`RLIMIT_NOFILE`). If the thread cannot be
//! started, descriptors are closed where they are dropped, as without a reaper.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

enum Job {
    Close(OwnedFd),
    Notify(tokio::sync::oneshot::Sender<()>),
}

/// Descriptors the reaper has closed, for tests.
static CLOSED: AtomicU64 = AtomicU64::new(0);

fn reaper() -> Option<&'static Mutex<Sender<Job>>> {
    static REAPER: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    REAPER
        .get_or_init(|| {
            let (sender, jobs) = mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name("graviton-reaper".into())
                .spawn(move || {
                    for job in jobs {
                        match job {
                            Job::Close(fd) => {
                                drop(fd);
                                CLOSED.fetch_add(1, Ordering::Relaxed);
                            }
                            Job::Notify(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                });
            match spawned {
                Ok(_) => Some(Mutex::new(sender)),
                Err(error) => {
                    tracing::warn!(%error, "no reaper thread: removed files are freed inline");
                    None
                }
            }
        })
        .as_ref()
}

fn send(job: Job) -> Result<(), Job> {
    let Some(reaper) = reaper() else {
        return Err(job);
    };
    let sender = reaper
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    sender.send(job).map_err(|mpsc::SendError(job)| job)
}

/// Closes `fd` on the reaper thread (or here, if there is none).
pub(crate) fn release(fd: OwnedFd) {
    let _ = send(Job::Close(fd)); // on error the job, and with it `fd`, is dropped here
}

/// Waits until every descriptor handed to the reaper before this call is closed, and
/// so every file removed before it, with no other handle open, has its space back.
pub async fn released() {
    let (done, wait) = tokio::sync::oneshot::channel();
    if send(Job::Notify(done)).is_ok() {
        let _ = wait.await;
    }
}

/// Descriptors the reaper has closed so far.
pub fn closed_count() -> u64 {
    CLOSED.load(Ordering::Relaxed)
}

/// Takes the open file behind `fd` away from whoever owns the number `fd`: returns a
/// new descriptor of that open file, and makes `fd` refer to `/dev/null` from now on.
/// The owner's later `close(fd)` then closes `/dev/null`, which costs nothing, and the
/// returned descriptor holds the file's last reference.
///
/// An operation on `fd` submitted to io_uring before this call keeps the file it took
/// at submission; one queued but not yet submitted meets `/dev/null` (only a cancelled
/// operation can be queued when a file's last handle is dropped).
pub(crate) fn detach(fd: RawFd) -> io::Result<OwnedFd> {
    static DEV_NULL: OnceLock<io::Result<OwnedFd>> = OnceLock::new();
    let null = DEV_NULL
        .get_or_init(|| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
        })
        .as_ref()
        .map_err(|error| io::Error::new(error.kind(), error.to_string()))?;
    #[allow(unsafe_code)]
    // SAFETY: `fcntl(F_DUPFD_CLOEXEC)` only reads `fd` (a descriptor the caller's file
    // owns and keeps open during this call) and returns a new descriptor or -1.
    let kept = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if kept < 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(unsafe_code)]
    // SAFETY: `kept` was just returned by fcntl, is open, and nothing else owns it.
    let kept = unsafe { OwnedFd::from_raw_fd(kept) };
    #[allow(unsafe_code)]
    // SAFETY: `dup3` atomically replaces what the number `fd` refers to; the number
    // stays open and owned by its owner, who closes it as before. The open file it
    // referred to stays alive through `kept`.
    let rc = unsafe { libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error()); // `kept` is closed; `fd` is unchanged
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_detached_descriptor_reads_as_dev_null_and_the_kept_one_as_the_file() {
        let dir = std::env::temp_dir().join(format!("graviton-reaper-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("f");
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(b"content"))
            .expect("write");
        let mut owner = std::fs::File::open(&path).expect("open");
        let kept = detach(owner.as_raw_fd()).expect("detach");

        let mut read = Vec::new();
        owner.read_to_end(&mut read).expect("read /dev/null");
        assert!(
            read.is_empty(),
            "the owner's number now refers to /dev/null"
        );
        let mut kept = std::fs::File::from(kept);
        kept.read_to_end(&mut read).expect("read the file");
        assert_eq!(read, b"content");

        let before = closed_count();
        release(kept.into());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(released());
        assert!(closed_count() > before, "closed on the reaper thread");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
