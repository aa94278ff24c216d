//! `BlobService`: reads, metadata, deletion and listing over the engine.
//!
//! Each handler validates its request (see `convert`), runs the engine call under the
//! client's deadline, and answers. `GetBlob` streams the engine's pieces as they come,
//! each a `Bytes` moved into a `BlobChunk` (a piece is never larger than
//! [`RESPONSE_CHUNK_BYTES_MAX`], so clients with gRPC's default 4 MiB message limit can
//! read it), with `offset` the absolute position in the blob; the stream is polled
//! by the HTTP/2 response, so a slow reader slows the engine's reads rather than growing
//! a buffer. A read stream that ends before its range is complete, because of an engine
//! error, a passed deadline or the end of the drain period, ends with an error status,
//! never silently short.
//!
//! **Where a read's bytes are.** The pieces of a read are the shard's pooled read
//! buffers, filled by `O_DIRECT` reads and moved without copying into `BlobChunk`s.
//! tonic's encoder then copies each message into its own buffer (its `Encoder` writes
//! into a `BytesMut`; it cannot take a `Bytes` by reference), which frees the pooled
//! buffer; the transport holds the encoded copies until the client's flow-control window
//! takes them (hyper 1.12 keeps one frame waiting for window while h2 queues the one
//! before it). Measured, one connection with 64 KiB stream windows: 200 stalled
//! `GetBlob` streams grew the server by 675 MiB, 3.4 MiB each (more than those two
//! 1 MiB messages; the rest was not broken down), and nothing bounded their number
//! before `reads_max`.
//!
//! **Stalled readers.** A client that stops taking its stream holds pooled buffers (those
//! queued for it and those read ahead), and a handful of such clients would exhaust a
//! shard's pool and stall every large read on that shard. [`StallWatch`] ends a read
//! whose client has taken nothing for `read_stall_timeout`: it drops the engine side of
//! the stream, which returns the queued and read-ahead buffers and stops the shard, and
//! the client, if it reads again, gets `RESOURCE_EXHAUSTED` after what HTTP/2 already
//! held.
//!
//! **Open response streams are bounded.** The copies HTTP/2 holds stay until the client
//! reads or goes away, and a stalled `ListBlobs` holds its page, so `GetBlob` and
//! `ListBlobs` streams open at once are limited to `reads_max` (a permit per stream,
//! released when the response is dropped); beyond it a call is refused with
//! `UNAVAILABLE`, as uploads beyond theirs are. Server memory for responses is then at
//! most about `reads_max × 3.4 MiB` plus the shards' pools, whatever clients do.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Response, Status};

use super::convert;
use super::deadline::Deadline;
use super::drain::Drain;
use super::failure::{status, Failure};
use super::limits::Slots;
use crate::engine::{format, BlobKey, BlobRead, Engine};
use crate::proto::blob_service_server::BlobService;
use crate::proto::{
    BatchStatBlobsRequest, BatchStatBlobsResponse, BatchStatResult, BlobChunk, BlobMetadata,
    DeleteBlobRequest, DeleteBlobResponse, GetBlobRequest, ListBlobsRequest, StatBlobRequest,
};

/// The largest `BlobChunk.data` sent: well under gRPC's default 4 MiB message limit, and
/// no smaller than the engine's largest piece (one read-pool buffer), so that a piece
/// goes out whole in one message and tonic's copy of it frees its pooled buffer at once.
/// With smaller messages, the unsent rest of a piece would stay with a stalled stream,
/// pinning one pooled buffer each (measured: with 256 KiB messages, 72 stalled readers
/// of one shard left its other reads waiting past the test's 60 s limit).
pub(crate) const RESPONSE_CHUNK_BYTES_MAX: usize = format::UNIT_BYTES as usize;
const _: () = assert!(RESPONSE_CHUNK_BYTES_MAX <= 2 * 1024 * 1024);

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `BlobService` implementation.
#[derive(Clone)]
pub(crate) struct BlobApi {
    engine: Engine,
    drain: Drain,
    stalls: StallWatch,
    /// Slots for open response streams (`GetBlob`, `ListBlobs`); see the module docs.
    reads: Slots,
}

impl BlobApi {
    /// Must be called within a tokio runtime (it starts the [`StallWatch`] task).
    pub(crate) fn new(
        engine: Engine,
        drain: Drain,
        read_stall_timeout: Duration,
        reads_max: usize,
    ) -> BlobApi {
        BlobApi {
            engine,
            drain,
            stalls: StallWatch::start(read_stall_timeout),
            reads: Slots::new("reads", reads_max),
        }
    }

    async fn get(&self, request: Request<GetBlobRequest>) -> Result<ChunkReader, Failure> {
        let permit = self.reads.take()?;
        let deadline = Deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let key = convert::key(&request.key, "key")?;
        let range = request.range.map(convert::range).transpose()?;
        let read = deadline
            .run("opening the blob", self.engine.get(&key, range))
            .await??;
        Ok(ChunkReader {
            position: read.start,
            start: read.start,
            end: read.end,
            key: read.meta.key,
            read: Arc::new(Mutex::new(Watched::new(read))),
            stalls: Some(self.stalls.clone()),
            pending: Bytes::new(),
            deadline,
            drain: self.drain.clone(),
            done: false,
            _permit: permit,
        })
    }

    async fn stat(&self, request: Request<StatBlobRequest>) -> Result<BlobMetadata, Failure> {
        let deadline = Deadline::from_metadata(request.metadata());
        let key = convert::key(&request.get_ref().key, "key")?;
        let meta = deadline.run("stat", self.engine.stat(&key)).await??;
        Ok(convert::metadata(meta))
    }

    async fn batch_stat(
        &self,
        request: Request<BatchStatBlobsRequest>,
    ) -> Result<BatchStatBlobsResponse, Failure> {
        let deadline = Deadline::from_metadata(request.metadata());
        let keys = convert::batch_keys(request.get_ref())?;
        let metas = deadline
            .run("batch stat", self.engine.stat_many(&keys))
            .await??;
        if metas.len() != keys.len() {
            return Err(Failure::Internal(format!(
                "the engine answered {} of {} stats",
                metas.len(),
                keys.len()
            )));
        }
        let results = keys
            .iter()
            .zip(metas)
            .map(|(key, meta)| BatchStatResult {
                key: convert::key_bytes(key),
                found: meta.is_some(),
                metadata: meta.map(convert::metadata),
            })
            .collect();
        Ok(BatchStatBlobsResponse { results })
    }

    async fn delete(&self, request: Request<DeleteBlobRequest>) -> Result<(), Failure> {
        let deadline = Deadline::from_metadata(request.metadata());
        let key = convert::key(&request.get_ref().key, "key")?;
        deadline.run("delete", self.engine.delete(&key)).await??;
        Ok(())
    }

    async fn list(&self, request: Request<ListBlobsRequest>) -> Result<Vec<BlobMetadata>, Failure> {
        let deadline = Deadline::from_metadata(request.metadata());
        let query = convert::list_query(request.into_inner())?;
        let metas = deadline.run("list", self.engine.list(query)).await??;
        Ok(metas.into_iter().map(convert::metadata).collect())
    }
}

#[tonic::async_trait]
impl BlobService for BlobApi {
    type GetBlobStream = ResponseStream<BlobChunk>;
    type ListBlobsStream = ResponseStream<BlobMetadata>;

    async fn get_blob(
        &self,
        request: Request<GetBlobRequest>,
    ) -> Result<Response<Self::GetBlobStream>, Status> {
        let reader = self.get(request).await.map_err(status)?;
        Ok(Response::new(Box::pin(reader.into_stream())))
    }

    async fn stat_blob(
        &self,
        request: Request<StatBlobRequest>,
    ) -> Result<Response<BlobMetadata>, Status> {
        self.stat(request).await.map(Response::new).map_err(status)
    }

    async fn batch_stat_blobs(
        &self,
        request: Request<BatchStatBlobsRequest>,
    ) -> Result<Response<BatchStatBlobsResponse>, Status> {
        self.batch_stat(request)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete_blob(
        &self,
        request: Request<DeleteBlobRequest>,
    ) -> Result<Response<DeleteBlobResponse>, Status> {
        self.delete(request).await.map_err(status)?;
        Ok(Response::new(DeleteBlobResponse { deleted: true }))
    }

    async fn list_blobs(
        &self,
        request: Request<ListBlobsRequest>,
    ) -> Result<Response<Self::ListBlobsStream>, Status> {
        let permit = self.reads.take().map_err(status)?;
        let metas = self.list(request).await.map_err(status)?;
        // The permit goes with the stream: a stalled listing holds its page.
        let stream = futures::stream::iter(metas).map(move |meta| {
            let _held = &permit;
            Ok(meta)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Turns a [`BlobRead`] into `BlobChunk`s, stopping at the deadline or the drain.
struct ChunkReader {
    /// The engine's stream, shared with the [`StallWatch`] once registered there.
    read: Arc<Mutex<Watched>>,
    /// Taken when the read registers with the watch: once it has sent a piece and is
    /// not done. A read of one piece (every small blob) never does, so gets of small
    /// blobs pay no registration; the watch could free nothing of theirs anyway.
    stalls: Option<StallWatch>,
    start: u64,
    end: u64,
    key: BlobKey,
    /// Absolute position in the blob of the next byte to send.
    position: u64,
    /// The part of the engine's last piece not sent yet.
    pending: Bytes,
    deadline: Deadline,
    drain: Drain,
    done: bool,
    /// Held until the response is dropped: the stream counts against `reads_max`.
    _permit: OwnedSemaphorePermit,
}

impl ChunkReader {
    fn into_stream(self) -> impl Stream<Item = Result<BlobChunk, Status>> + Send {
        futures::stream::unfold(self, |mut reader| async move {
            let item = reader.next_chunk().await?;
            Some((item.map_err(status), reader))
        })
    }

    async fn next_chunk(&mut self) -> Option<Result<BlobChunk, Failure>> {
        if self.done {
            return None;
        }
        while self.pending.is_empty() {
            // Out of the slot while it is polled here: the client is asking, not stalled.
            let taken = lock(&self.read).read.take();
            let Some(mut read) = taken else {
                self.done = true;
                let seconds = lock(&self.read).stalled_after.as_secs();
                return Some(Err(Failure::ReadStalled { seconds }));
            };
            let next = tokio::select! {
                biased;
                () = self.drain.aborted() => Some(Err(Failure::ShuttingDown)),
                () = self.deadline.passed() => {
                    Some(Err(Failure::DeadlineExceeded { what: "the read" }))
                }
                next = read.next_chunk() => next.map(|piece| piece.map_err(Failure::from)),
            };
            lock(&self.read).put_back(read);
            match next {
                Some(Ok(piece)) => self.pending = piece,
                Some(Err(failure)) => {
                    self.done = true;
                    return Some(Err(failure));
                }
                None => {
                    self.done = true;
                    return (self.position != self.end).then(|| {
                        Err(Failure::Internal(format!(
                            "the engine ended the read of {} at byte {} of [{}, {})",
                            self.key, self.position, self.start, self.end
                        )))
                    });
                }
            }
        }
        let data = self
            .pending
            .split_to(self.pending.len().min(RESPONSE_CHUNK_BYTES_MAX));
        let offset = self.position;
        self.position += data.len() as u64;
        if self.position < self.end {
            if let Some(stalls) = self.stalls.take() {
                stalls.watch(&self.read);
            }
        }
        if self.position > self.end {
            self.done = true;
            return Some(Err(Failure::Internal(format!(
                "the engine read past the end of [{}, {}) of {}",
                self.start, self.end, self.key
            ))));
        }
        Some(Ok(BlobChunk {
            data,
            offset: convert::wire_size(offset),
        }))
    }
}

/// A read stream's engine side, as the [`StallWatch`] sees it.
struct Watched {
    /// `None` while the response polls it, and for good once the watch ended it.
    read: Option<BlobRead>,
    /// When the response last gave the stream back: its client took a piece then.
    since: Instant,
    /// Set when the watch ended the read: how long it had gone untaken.
    stalled_after: Duration,
}

impl Watched {
    fn new(read: BlobRead) -> Watched {
        Watched {
            read: Some(read),
            since: Instant::now(),
            stalled_after: Duration::ZERO,
        }
    }

    fn put_back(&mut self, read: BlobRead) {
        if self.stalled_after.is_zero() {
            self.read = Some(read);
            self.since = Instant::now();
        }
    }
}

/// Locks, ignoring poisoning: every critical section here leaves its data consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ends read streams whose client takes nothing for `timeout` (see the module docs).
/// One task per server scans the registered reads a few times per `timeout`; a read
/// registers (a lock and a push) once it has sent a piece and is not done, and a scan
/// is linear in the registered reads.
#[derive(Clone)]
struct StallWatch {
    inner: Arc<WatchInner>,
}

struct WatchInner {
    timeout: Duration,
    reads: Mutex<Vec<Weak<Mutex<Watched>>>>,
}

impl StallWatch {
    fn start(timeout: Duration) -> StallWatch {
        let inner = Arc::new(WatchInner {
            timeout,
            reads: Mutex::new(Vec::new()),
        });
        let watch = Arc::downgrade(&inner);
        let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = watch.upgrade() else {
                    return; // the service is gone
                };
                inner.scan();
            }
        });
        StallWatch { inner }
    }

    fn watch(&self, watched: &Arc<Mutex<Watched>>) {
        lock(&self.inner.reads).push(Arc::downgrade(watched));
    }
}

impl WatchInner {
    /// Ends the stalled reads and forgets the finished ones.
    fn scan(&self) {
        lock(&self.reads).retain(|weak| {
            let Some(watched) = weak.upgrade() else {
                return false; // the response is gone
            };
            let mut watched = lock(&watched);
            let idle = watched.since.elapsed();
            if watched.read.is_some() && idle >= self.timeout {
                // Dropping the engine's receiver frees what is queued in it and stops
                // the shard's read-ahead.
                watched.read = None;
                watched.stalled_after = idle;
                tracing::debug!(?idle, "read stream ended: its client took nothing");
                return false;
            }
            true
        });
    }
}
