//! The harness's one error type: what went wrong, with the operation it happened in.
//! A benchmark stops at its first error; figures from a run with failures are not
//! reported.

use std::fmt;

#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be reached.
    Connect { addr: String, detail: String },
    /// An RPC failed with a gRPC status.
    Rpc {
        op: &'static str,
        status: Box<tonic::Status>,
    },
    /// The server answered, but not as the contract says.
    Protocol { op: &'static str, detail: String },
    /// A local file or process operation failed.
    Io { op: String, source: std::io::Error },
    /// Bad flags or inputs.
    Usage(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn rpc(op: &'static str, status: tonic::Status) -> Error {
        Error::Rpc {
            op,
            status: Box::new(status),
        }
    }

    pub fn protocol(op: &'static str, detail: impl Into<String>) -> Error {
        Error::Protocol {
            op,
            detail: detail.into(),
        }
    }

    pub fn io(op: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            op: op.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { addr, detail } => {
                write!(
                    f,
                    "cannot connect to {addr}: {detail} (is the server running?)"
                )
            }
            Error::Rpc { op, status } => {
                write!(f, "{op} failed: {:?}: {}", status.code(), status.message())
            }
            Error::Protocol { op, detail } => {
                write!(f, "{op}: server broke the wire contract: {detail}")
            }
            Error::Io { op, source } => write!(f, "{op}: {source}"),
            Error::Usage(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for Error {}
