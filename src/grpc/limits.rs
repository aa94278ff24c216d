//! Limits on what calls can make the server hold: [`Slots`] for long-lived streams
//! (uploads, open reads), refused beyond their number; and, set up in `server.rs` with
//! tower's limits, permits for calls being decoded and handled, which wait beyond theirs.
//!
//! **Calls.** tonic reads a unary request (and the one request of a server-streaming
//! call) whole, into its own buffer, before the handler runs, so a client that sends
//! most of a large request and then nothing makes the server hold it; with many such
//! calls on many connections that has no bound but connections × streams × message
//! size. So every call, of every service, holds one of `calls_max` permits shared by
//! all connections (tower's `GlobalConcurrencyLimitLayer` around the routes) from
//! before tonic starts reading its request until the handler has answered (for a
//! streaming response, once the stream is handed to HTTP/2: the open streams have
//! [`Slots`] of their own, `reads_max` and `uploads_max`). Calls beyond the limit wait,
//! with nothing read of them but what their connection's HTTP/2 window let in; they are
//! short (a stat, a delete, opening a read), so waiting is queueing, not refusal.
//! Opening a read can wait for a shard's read buffers, so `reads_max` stays below this
//! limit by default (128 against 256), leaving permits for other calls.
//!
//! **Per connection.** Outside the shared permits, tonic's per-connection concurrency
//! limit (`calls_per_connection_max`) makes a call wait for one of its connection's
//! permits first, so one connection holds at most that many of the shared ones. That is
//! fairness between connections, not between clients: a client that opens
//! `calls_max / calls_per_connection_max` connections can still take them all (clients
//! have no identity here to limit them by).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::failure::Failure;

/// Slots for streams of one kind (`what`: "uploads", "reads"); a stream holds one for
/// its life, and one more is refused with [`Failure::Busy`] (`UNAVAILABLE`).
#[derive(Clone)]
pub(crate) struct Slots {
    permits: Arc<Semaphore>,
    max: usize,
    what: &'static str,
}

impl Slots {
    pub(crate) fn new(what: &'static str, max: usize) -> Slots {
        Slots {
            permits: Arc::new(Semaphore::new(max)),
            max,
            what,
        }
    }

    /// A slot, or `Busy` when all `max` are taken.
    pub(crate) fn take(&self) -> Result<OwnedSemaphorePermit, Failure> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Failure::Busy {
                what: self.what,
                limit: self.max,
            })
    }
}
