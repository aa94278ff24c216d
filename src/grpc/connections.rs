//! The limit on client connections open at once.
//!
//! Each HTTP/2 connection can make the server hold data its calls have not consumed yet
//! (up to its flow-control windows) and state for up to
//! `SETTINGS_MAX_CONCURRENT_STREAMS` streams, so their number must be bounded too: only
//! the file-descriptor limit bounded it before. [`limit`] wraps the listener's stream
//! of accepted connections. It takes a permit *before* accepting, so beyond the limit
//! new connections wait in the kernel's listen backlog (their calls start once another
//! connection closes, or time out at the client) rather than being accepted and held.
//! Each accepted connection carries its permit ([`Counted`]) and returns it when hyper
//! drops it, whichever way the connection ended. Waiting connections are silent for
//! their clients, so the server logs a warning when the limit is reached (at most once
//! per [`WARN_PERIOD`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// The shortest time between two warnings that the limit was reached.
const WARN_PERIOD: Duration = Duration::from_secs(10);

/// Accepted connections of `incoming`, at most `max` of them open at once.
pub(crate) fn limit<S, IO, E>(incoming: S, max: usize) -> impl Stream<Item = Result<Counted<IO>, E>>
where
    S: Stream<Item = Result<IO, E>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max));
    let warned: Option<Instant> = None;
    futures::stream::unfold(
        (incoming.boxed(), permits, warned),
        move |(mut incoming, permits, mut warned)| async move {
            let permit = match permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if warned.is_none_or(|at| at.elapsed() >= WARN_PERIOD) {
                        tracing::warn!(
                            limit = max,
                            "client connections at the limit (--connections-max): new ones \
                             wait in the listen backlog until one closes"
                        );
                        warned = Some(Instant::now());
                    }
                    permits
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed")
                }
            };
            let accepted = incoming.next().await?;
            let counted = accepted.map(|io| Counted {
                io,
                _permit: permit,
            });
            Some((counted, (incoming, permits, warned)))
        },
    )
}

/// A connection holding one of the limit's permits until it is dropped.
pub(crate) struct Counted<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
