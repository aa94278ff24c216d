//! The engine's error type.
//!
//! One enum for the whole engine. Variants say what the caller can do about the
//! failure: fix the request (`InvalidArgument`, `HashMismatch`, `SizeMismatch`), look
//! elsewhere (`NotFound`), wait (`NoSpace`, `Busy`, `ShuttingDown`), or report a fault
//! (`Io`, `Corrupt`, `Poisoned`). The gRPC layer maps each to one status code.

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::types::BlobKey;

#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No blob with this key is stored.
    NotFound(BlobKey),
    /// The request is malformed; the text says how.
    InvalidArgument(String),
    /// The content's digest is not the one the client expected; nothing was stored.
    HashMismatch { expected: BlobKey, actual: BlobKey },
    /// The upload carried more or fewer bytes than it declared; nothing was stored.
    SizeMismatch { declared: u64, received: u64 },
    /// The disk is full (ENOSPC/EDQUOT); reads still work.
    NoSpace { path: PathBuf },
    /// A flush failed earlier on this shard; it takes no more writes (reads still work).
    Poisoned { shard: usize },
    /// A checksum did not match: the bytes on disk are not the bytes written.
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: &'static str,
    },
    /// An I/O operation failed.
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },
    /// The engine is shutting down or a shard has stopped.
    ShuttingDown,
    /// The data directory cannot be used as configured (e.g. no O_DIRECT there).
    Config(String),
}

impl Error {
    /// Wraps an I/O error with the operation, file and offset it happened at. ENOSPC and
    /// EDQUOT become [`Error::NoSpace`], so that a full disk is told apart from a fault.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, offset: u64, source: io::Error) -> Error {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::NoSpace { path },
            _ => Error::Io {
                op,
                path,
                offset,
                source,
            },
        }
    }
}

impl Error {
    /// Whether a commit (a Put or Relocate record sent to the key's owner) that failed
    /// with this error may still have reached the disk: the owner's journal write failed
    /// after starting (`Io`, and the owner is then `Poisoned`), so the record may be
    /// durable and, after a restart, name the extents it was sent with. Those extents
    /// must then never be reused or compacted away before a restart settles it.
    pub fn leaves_record_in_doubt(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::Poisoned { .. })
    }

    /// The same failure again, for each of several requests that shared one operation
    /// (a group write). An I/O error keeps its OS code and text.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::NotFound(key) => Error::NotFound(*key),
            Error::InvalidArgument(text) => Error::InvalidArgument(text.clone()),
            Error::HashMismatch { expected, actual } => Error::HashMismatch {
                expected: *expected,
                actual: *actual,
            },
            Error::SizeMismatch { declared, received } => Error::SizeMismatch {
                declared: *declared,
                received: *received,
            },
            Error::NoSpace { path } => Error::NoSpace { path: path.clone() },
            Error::Poisoned { shard } => Error::Poisoned { shard: *shard },
            Error::Corrupt { path, offset, what } => Error::Corrupt {
                path: path.clone(),
                offset: *offset,
                what,
            },
            Error::Io {
                op,
                path,
                offset,
                source,
            } => Error::Io {
                op,
                path: path.clone(),
                offset: *offset,
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::ShuttingDown => Error::ShuttingDown,
            Error::Config(text) => Error::Config(text.clone()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound(key) => write!(f, "no blob with key {key}"),
            Error::InvalidArgument(text) => write!(f, "{text}"),
            Error::HashMismatch { expected, actual } => write!(
                f,
                "content hash is {actual} but the client expected {expected}; nothing was stored"
            ),
            Error::SizeMismatch { declared, received } => write!(
                f,
                "upload declared {declared} bytes but sent {received}; nothing was stored"
            ),
            Error::NoSpace { path } => write!(
                f,
                "no space left on the device holding {}; free space or delete blobs, then retry",
                path.display()
            ),
            Error::Poisoned { shard } => write!(
                f,
                "shard {shard} stopped taking writes after a failed flush; restart the server after checking the disk"
            ),
            Error::Corrupt { path, offset, what } => write!(
                f,
                "checksum mismatch in {what} at {}:{offset}: the stored bytes are damaged",
                path.display()
            ),
            Error::Io { op, path, offset, source } => {
                write!(f, "{op} failed on {} at offset {offset}: {source}", path.display())
            }
            Error::ShuttingDown => write!(f, "the storage engine is shutting down"),
            Error::Config(text) => write!(f, "{text}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
