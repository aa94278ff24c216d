//! Why a request failed, and the one function that turns that into a `tonic::Status`.
//!
//! Every failure of the front-end, whether found by the engine ([`engine::Error`]) or
//! by the front-end itself (a malformed stream, a passed deadline, a missing token, a
//! server that is draining), is a [`Failure`]; [`status`] is the only place in the crate
//! that builds a [`Status`]. The mapping follows `shared/CONTRACT.md`:
//!
//! | failure                                            | code                 |
//! |----------------------------------------------------|----------------------|
//! | `NotFound`                                         | `NOT_FOUND`          |
//! | `InvalidArgument`, `HashMismatch`, `SizeMismatch`, front-end `InvalidArgument` | `INVALID_ARGUMENT` |
//! | `NoSpace`, a message over the size limit, a read the client stopped taking, an upload it stopped sending | `RESOURCE_EXHAUSTED` |
//! | `ShuttingDown`, `Poisoned`, front-end `ShuttingDown` | `UNAVAILABLE`      |
//! | `Io`, `Corrupt`, `Config`, front-end `Internal`    | `INTERNAL`           |
//! | deadline passed                                    | `DEADLINE_EXCEEDED`  |
//! | missing or wrong bearer token                      | `UNAUTHENTICATED`    |
//!
//! `Poisoned` is `UNAVAILABLE`, not `INTERNAL`: one shard stopped taking writes after a
//! failed flush, the others still do, and a retried upload is placed on the least-loaded
//! healthy shard, so a retry can succeed (the seed's retry table retries `UNAVAILABLE`).
//! Messages are the engine's `Display` text, which says what happened and what to do.
//! Server faults are also logged here, with the same text, at `error` level.

use std::task::{Context, Poll};

use futures::future::{FutureExt, Map};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::engine;

/// A request's failure, in terms of what the caller can do about it.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The storage engine refused or failed the operation.
    Engine(engine::Error),
    /// The request or the upload stream is malformed; the text says how.
    InvalidArgument(String),
    /// The client's deadline (`grpc-timeout`) passed while `what` was in progress.
    DeadlineExceeded { what: &'static str },
    /// The server requires a bearer token and the request's is missing or wrong.
    Unauthenticated(&'static str),
    /// The server is shutting down and its drain period has run out.
    ShuttingDown,
    /// The server sheds load: `limit` calls of this kind are already in progress.
    Busy { what: &'static str, limit: usize },
    /// A client message was over the server's size limit; the text is the transport's,
    /// `what` names what to send smaller ("chunks", "requests"). gRPC's other
    /// implementations answer `RESOURCE_EXHAUSTED` for this (tonic's decoder says
    /// `OUT_OF_RANGE`, which the contract does not know).
    MessageTooLarge { text: String, what: &'static str },
    /// The client took nothing from a read stream for `seconds`, so the server ended it
    /// to free the read buffers it held, which every read of a shard shares.
    ReadStalled { seconds: u64 },
    /// The client sent nothing on an upload for `seconds` while the server waited for
    /// it, so the server aborted the upload to free its slot and buffers.
    UploadStalled { seconds: u64 },
    /// A fault of the server itself, found by the front-end (e.g. the engine ended a
    /// read short of its range); the text says what.
    Internal(String),
    /// The transport already produced a status (e.g. a message over the size limit, or
    /// a decoding error); it is passed on unchanged.
    Transport(Status),
}

impl Failure {
    /// A status from tonic's decoder, which reports a message over the size limit as
    /// `OUT_OF_RANGE`: that becomes [`Failure::MessageTooLarge`] (`what` names what to
    /// send smaller), anything else is passed on.
    pub(crate) fn from_decoding(transport: Status, what: &'static str) -> Failure {
        match transport.code() {
            Code::OutOfRange => Failure::MessageTooLarge {
                text: transport.message().to_string(),
                what,
            },
            _ => Failure::Transport(transport),
        }
    }

    pub(crate) fn invalid(text: impl Into<String>) -> Failure {
        Failure::InvalidArgument(text.into())
    }
}

impl From<engine::Error> for Failure {
    fn from(error: engine::Error) -> Failure {
        Failure::Engine(error)
    }
}

impl From<Failure> for Status {
    fn from(failure: Failure) -> Status {
        status(failure)
    }
}

/// The status a client receives for `failure`. The only function that builds a `Status`.
pub(crate) fn status(failure: Failure) -> Status {
    let (code, message) = match failure {
        Failure::Engine(error) => (engine_code(&error), error.to_string()),
        Failure::InvalidArgument(text) => (Code::InvalidArgument, text),
        Failure::DeadlineExceeded { what } => (
            Code::DeadlineExceeded,
            format!("the client's deadline passed during {what}; retry with a longer deadline"),
        ),
        Failure::Unauthenticated(text) => (Code::Unauthenticated, text.to_string()),
        Failure::ShuttingDown => (
            Code::Unavailable,
            "the server is shutting down and stopped this request; retry, on another server or once it is back".to_string(),
        ),
        Failure::Busy { what, limit } => (
            Code::Unavailable,
            format!("{limit} {what} are in progress, the most this server takes at once; retry after a delay"),
        ),
        Failure::MessageTooLarge { text, what } => (
            Code::ResourceExhausted,
            format!("{text}; send smaller {what}"),
        ),
        Failure::ReadStalled { seconds } => (
            Code::ResourceExhausted,
            format!(
                "the client took nothing from this read for {seconds} s, so the server ended it to free \
                 its read buffers; read the stream as it comes, or ask for the rest with a range"
            ),
        ),
        Failure::UploadStalled { seconds } => (
            Code::ResourceExhausted,
            format!(
                "the client sent nothing on this upload for {seconds} s, so the server aborted it to \
                 free its slot; nothing was stored; send the next message sooner, or upload again"
            ),
        ),
        Failure::Internal(text) => (Code::Internal, text),
        Failure::Transport(status) => return status,
    };
    if code == Code::Internal {
        tracing::error!(%message, "request failed with a server fault");
    }
    Status::new(code, message)
}

fn engine_code(error: &engine::Error) -> Code {
    use engine::Error;
    match error {
        Error::NotFound(_) => Code::NotFound,
        Error::InvalidArgument(_) | Error::HashMismatch { .. } | Error::SizeMismatch { .. } => {
            Code::InvalidArgument
        }
        Error::NoSpace { .. } => Code::ResourceExhausted,
        Error::ShuttingDown | Error::Poisoned { .. } => Code::Unavailable,
        Error::Io { .. } | Error::Corrupt { .. } | Error::Config(_) => Code::Internal,
    }
}

/// A service whose oversized unary requests are answered as the contract says.
///
/// tonic decodes a unary request before the handler runs, and answers one over the size
/// limit itself, with `OUT_OF_RANGE`: the handler never sees it, so [`status`] cannot
/// map it. This wrapper rewrites such an answer (a trailers-only response, its status in
/// the headers) into [`Failure::MessageTooLarge`]. The services it wraps never answer
/// `OUT_OF_RANGE` themselves: [`status`] maps nothing to it but a transport status
/// passed through, and a passed-through transport status of a stream comes in trailers.
#[derive(Clone)]
pub(crate) struct TooLargeIsExhausted<S>(pub(crate) S);

impl<S: NamedService> NamedService for TooLargeIsExhausted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, Request> Service<Request> for TooLargeIsExhausted<S>
where
    S: Service<Request, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Map<
        S::Future,
        fn(Result<http::Response<Body>, S::Error>) -> Result<http::Response<Body>, S::Error>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.0
            .call(request)
            .map(|answer| answer.map(relabel_too_large))
    }
}

fn relabel_too_large(response: http::Response<Body>) -> http::Response<Body> {
    match Status::from_header_map(response.headers()) {
        Some(transport) if transport.code() == Code::OutOfRange => {
            status(Failure::from_decoding(transport, "requests")).into_http()
        }
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{BlobKey, Error};
    use std::path::PathBuf;

    #[test]
    fn engine_errors_map_to_the_contract_codes() {
        let key = BlobKey([1; 32]);
        let cases = [
            (Error::NotFound(key), Code::NotFound),
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (
                Error::HashMismatch {
                    expected: key,
                    actual: key,
                },
                Code::InvalidArgument,
            ),
            (
                Error::SizeMismatch {
                    declared: 1,
                    received: 2,
                },
                Code::InvalidArgument,
            ),
            (
                Error::NoSpace {
                    path: PathBuf::from("/d"),
                },
                Code::ResourceExhausted,
            ),
            (Error::ShuttingDown, Code::Unavailable),
            (Error::Poisoned { shard: 3 }, Code::Unavailable),
            (
                Error::Corrupt {
                    path: PathBuf::from("/d/s"),
                    offset: 4096,
                    what: "block",
                },
                Code::Internal,
            ),
            (
                Error::Io {
                    op: "pwrite",
                    path: PathBuf::from("/d/s"),
                    offset: 0,
                    source: std::io::Error::other("boom"),
                },
                Code::Internal,
            ),
            (Error::Config("no O_DIRECT".into()), Code::Internal),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let status = status(Failure::Engine(error));
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }

    #[test]
    fn front_end_failures_map_to_their_codes() {
        assert_eq!(
            status(Failure::invalid("bad")).code(),
            Code::InvalidArgument
        );
        assert_eq!(status(Failure::invalid("bad")).message(), "bad");
        let deadline = status(Failure::DeadlineExceeded { what: "the upload" });
        assert_eq!(deadline.code(), Code::DeadlineExceeded);
        assert!(deadline.message().contains("the upload"));
        assert_eq!(
            status(Failure::Unauthenticated("no")).code(),
            Code::Unauthenticated
        );
        assert_eq!(status(Failure::ShuttingDown).code(), Code::Unavailable);
        assert_eq!(
            status(Failure::Internal("bug".into())).code(),
            Code::Internal
        );
        let passed = status(Failure::Transport(Status::out_of_range("too big")));
        assert_eq!(passed.code(), Code::OutOfRange);
        assert_eq!(passed.message(), "too big");
    }
}
