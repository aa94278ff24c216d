//! `BlobService`: reads, metadata, deletion and listing over the engine.
//!
//! Each handler validates its request (see `convert`), runs the engine call under the
//! client's deadline, and answers. `GetBlob` streams the engine's pieces as they come,
//! each a zero-copy `Bytes` moved into a `BlobChunk` (sliced, not copied, to at most
//! [`RESPONSE_CHUNK_BYTES_MAX`] so that clients with gRPC's default 4 MiB message limit
//! can read them), with `offset` the absolute position in the blob; the stream is polled
//! by the HTTP/2 response, so a slow reader slows the engine's reads rather than growing
//! a buffer. A read stream that ends before its range is complete, because of an engine
//! error, a passed deadline or the end of the drain period, ends with an error status,
//! never silently short.

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use super::deadline::Deadline;
use super::drain::Drain;
use super::failure::{status, Failure};
use crate::engine::{BlobRead, Engine};
use crate::proto::blob_service_server::BlobService;
use crate::proto::{
    BatchStatBlobsRequest, BatchStatBlobsResponse, BatchStatResult, BlobChunk, BlobMetadata,
    DeleteBlobRequest, DeleteBlobResponse, GetBlobRequest, ListBlobsRequest, StatBlobRequest,
};

/// The largest `BlobChunk.data` sent: well under gRPC's default 4 MiB message limit.
pub(crate) const RESPONSE_CHUNK_BYTES_MAX: usize = 1024 * 1024;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `BlobService` implementation.
#[derive(Clone)]
pub(crate) struct BlobApi {
    engine: Engine,
    drain: Drain,
}

impl BlobApi {
    pub(crate) fn new(engine: Engine, drain: Drain) -> BlobApi {
        BlobApi { engine, drain }
    }

    async fn get(&self, request: Request<GetBlobRequest>) -> Result<ChunkReader, Failure> {
        let deadline = Deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let key = convert::key(&request.key, "key")?;
        let range = request.range.map(convert::range).transpose()?;
        let read = deadline
            .run("opening the blob", self.engine.get(&key, range))
            .await??;
        Ok(ChunkReader {
            position: read.start,
            read,
            pending: Bytes::new(),
            deadline,
            drain: self.drain.clone(),
            done: false,
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
        let metas = self.list(request).await.map_err(status)?;
        let stream = futures::stream::iter(metas.into_iter().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Turns a [`BlobRead`] into `BlobChunk`s, stopping at the deadline or the drain.
struct ChunkReader {
    read: BlobRead,
    /// Absolute position in the blob of the next byte to send.
    position: u64,
    /// The part of the engine's last piece not sent yet.
    pending: Bytes,
    deadline: Deadline,
    drain: Drain,
    done: bool,
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
            let next = tokio::select! {
                biased;
                () = self.drain.aborted() => Some(Err(Failure::ShuttingDown)),
                () = self.deadline.passed() => {
                    Some(Err(Failure::DeadlineExceeded { what: "the read" }))
                }
                next = self.read.next_chunk() => next.map(|piece| piece.map_err(Failure::from)),
            };
            match next {
                Some(Ok(piece)) => self.pending = piece,
                Some(Err(failure)) => {
                    self.done = true;
                    return Some(Err(failure));
                }
                None => {
                    self.done = true;
                    return (self.position != self.read.end).then(|| {
                        Err(Failure::Internal(format!(
                            "the engine ended the read of {} at byte {} of [{}, {})",
                            self.read.meta.key, self.position, self.read.start, self.read.end
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
        if self.position > self.read.end {
            self.done = true;
            return Some(Err(Failure::Internal(format!(
                "the engine read past the end of [{}, {}) of {}",
                self.read.start, self.read.end, self.read.meta.key
            ))));
        }
        Some(Ok(BlobChunk {
            data,
            offset: convert::wire_size(offset),
        }))
    }
}
