//! Limits on what calls can make the server hold: [`Slots`] for long-lived streams
//! (uploads, open reads), refused beyond their number, and [`CallLimit`] for calls being
//! decoded and handled, which wait beyond theirs.
//!
//! **Calls.** tonic reads a unary request (and the one request of a server-streaming
//! call) whole, into its own buffer, before the handler runs, so a client that sends
//! most of a large request and then nothing makes the server hold it; with many such
//! calls on many connections that has no bound but connections × streams × message
//! size. [`CallLimit`] wraps every service with one shared set of permits: a call
//! takes one before tonic starts reading its request and returns it when the handler
//! has answered (for a streaming response, once the stream is handed to HTTP/2: the
//! open streams have [`Slots`] of their own, `reads_max` and `uploads_max`). Calls
//! beyond the limit wait,
//! with nothing read of them but what their connection's HTTP/2 window let in; they are
//! short (a stat, a delete, opening a read), so waiting is queueing, not refusal.
//! Opening a read can wait for a shard's read buffers, so `reads_max` stays below this
//! limit by default (128 against 256), leaving permits for other calls.
//!
//! **Per connection.** Beside the shared permits, tonic's per-connection concurrency
//! limit (`calls_per_connection_max`, set in `server.rs`) makes a call wait for one of
//! its connection's permits first, so one connection holds at most that many of the
//! shared ones. That is fairness between connections, not between clients: a client
//! that opens `calls_max / calls_per_connection_max` connections can still take them
//! all (clients have no identity here to limit them by).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::Service;
use tonic::server::NamedService;

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

/// Permits shared by the services of one server.
#[derive(Clone)]
pub(crate) struct CallPermits(Arc<Semaphore>);

impl CallPermits {
    pub(crate) fn new(calls_max: usize) -> CallPermits {
        CallPermits(Arc::new(Semaphore::new(calls_max)))
    }

    /// `service`, its calls counted against these permits.
    pub(crate) fn limit<S>(&self, service: S) -> CallLimit<S> {
        CallLimit {
            inner: service,
            permits: self.0.clone(),
        }
    }
}

/// A service whose calls hold one of the shared permits while they run.
#[derive(Clone)]
pub(crate) struct CallLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S: NamedService> NamedService for CallLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, Request> Service<Request> for CallLimit<S>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Future: Send + 'static,
    Request: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The permit is taken in the call, and the inner service polled for readiness
        // there: readiness here would have to hold a permit between the two.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // This service goes into the call's future; a clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = self.permits.clone();
        Box::pin(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            inner.call(request).await
        })
    }
}
