//! The null server: Graviton's gRPC API with no storage behind it, to measure what the
//! transport (tonic, HTTP/2, loopback TCP, the client) costs on its own. Graviton's
//! figures are reported as a fraction of this ceiling.
//!
//! - `Upload` checks the message order like a real server (start, chunks at the next
//!   offset, complete; `total_size` honoured), drops every chunk, and answers with
//!   Graviton's ack shape: one ack right after `start`, a progress ack after a chunk
//!   once at least 1 MiB more arrived since the last ack (so small puts get only the
//!   first and the final ack), and a final one with `complete` set.
//! - It stores nothing, so the key it returns *encodes the blob's size*:
//!   bytes 0..4 are `NUL0`, bytes 4..12 the size (u64, little-endian), bytes 12..20 a
//!   per-process upload number (little-endian), the rest zero. The `hash` is the key.
//! - `GetBlob` of such a key streams that many zero bytes (honouring `range`, with
//!   absolute chunk offsets) in 1 MiB chunks, all slices of one static zeroed buffer.
//!   Any other 32-byte key is `NOT_FOUND`; a key of another length, or a range past the
//!   end, is `INVALID_ARGUMENT`.
//! - `StatBlob`, `BatchStatBlobs` and `DeleteBlob` answer from the key the same way;
//!   `ListBlobs` lists nothing.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::client::MESSAGE_BYTES_MAX;
use crate::proto::{
    blob_service_server::{BlobService, BlobServiceServer},
    upload_message,
    upload_service_server::{UploadService, UploadServiceServer},
    BatchStatBlobsRequest, BatchStatBlobsResponse, BatchStatResult, BlobChunk, BlobMetadata,
    DeleteBlobRequest, DeleteBlobResponse, GetBlobRequest, ListBlobsRequest, StatBlobRequest,
    UploadAck, UploadComplete, UploadMessage,
};

const CHUNK_BYTES: usize = 1 << 20;
static ZEROS: [u8; CHUNK_BYTES] = [0; CHUNK_BYTES];
const KEY_MAGIC: &[u8; 4] = b"NUL0";
const KEY_BYTES: usize = 32;
/// Progress acks come at most once per chunk and once per this many bytes, as
/// Graviton's front-end sends them.
const ACK_EVERY_BYTES: u64 = 1 << 20;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The null implementation of both services. Cheap to clone.
#[derive(Clone, Default)]
pub struct NullServer {
    uploads: Arc<AtomicU64>,
}

impl NullServer {
    pub fn blob_service(&self) -> BlobServiceServer<NullServer> {
        BlobServiceServer::new(self.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    pub fn upload_service(&self) -> UploadServiceServer<NullServer> {
        UploadServiceServer::new(self.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }
}

/// The key the null server returns for upload number `upload` of `size_bytes`.
pub fn null_key(size_bytes: u64, upload: u64) -> Bytes {
    let mut key = [0u8; KEY_BYTES];
    key[..4].copy_from_slice(KEY_MAGIC);
    key[4..12].copy_from_slice(&size_bytes.to_le_bytes());
    key[12..20].copy_from_slice(&upload.to_le_bytes());
    Bytes::copy_from_slice(&key)
}

/// The size encoded in a null key; `NOT_FOUND` or `INVALID_ARGUMENT` otherwise.
pub fn size_of_key(key: &[u8]) -> Result<u64, Status> {
    if key.len() != KEY_BYTES {
        return Err(Status::invalid_argument(format!(
            "a key is {KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    if &key[..4] != KEY_MAGIC {
        return Err(Status::not_found(
            "no such blob (the null server only knows keys it returned)",
        ));
    }
    Ok(u64::from_le_bytes(key[4..12].try_into().expect("8 bytes")))
}

fn metadata(key: Bytes, size_bytes: u64) -> BlobMetadata {
    BlobMetadata {
        key,
        size: size_bytes as i64,
        ..Default::default()
    }
}

/// Where an upload stream is in the start → chunks → complete sequence.
struct UploadState {
    inbound: Streaming<UploadMessage>,
    id: Option<String>,
    declared_bytes: u64,
    received_bytes: u64,
    acked_bytes: u64,
    done: bool,
    uploads: Arc<AtomicU64>,
}

impl UploadState {
    /// Reads messages until one earns an ack (or fails), and returns it; `None` at
    /// the end of the stream.
    async fn next_ack(&mut self) -> Option<Result<UploadAck, Status>> {
        while !self.done {
            let message = match self.inbound.message().await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    self.done = true;
                    let early = "stream ended before `complete`";
                    return self
                        .id
                        .as_ref()
                        .map(|_| Err(Status::invalid_argument(early)));
                }
                Err(status) => {
                    self.done = true;
                    return Some(Err(status));
                }
            };
            match self.apply(message) {
                Ok(None) => continue,
                Ok(Some(ack)) => {
                    self.done = ack.complete.is_some();
                    self.acked_bytes = ack.received_bytes;
                    return Some(Ok(ack));
                }
                Err(status) => {
                    self.done = true;
                    return Some(Err(status));
                }
            }
        }
        None
    }

    /// Checks one message against the sequence; returns the ack it earns, if any.
    fn apply(&mut self, message: UploadMessage) -> Result<Option<UploadAck>, Status> {
        use upload_message::Message;
        match (message.message, &self.id) {
            (Some(Message::Start(start)), None) => {
                self.declared_bytes = u64::try_from(start.total_size)
                    .map_err(|_| Status::invalid_argument("total_size is negative"))?;
                let number = self.uploads.fetch_add(1, Ordering::Relaxed);
                self.id = Some(format!("null-{number}"));
                Ok(Some(self.ack(None)))
            }
            (Some(Message::Chunk(chunk)), Some(_)) => {
                if chunk.offset != self.received_bytes as i64 {
                    return Err(Status::invalid_argument(format!(
                        "chunk offset {} is not the next byte ({})",
                        chunk.offset, self.received_bytes
                    )));
                }
                self.received_bytes += chunk.data.len() as u64;
                let due = self.received_bytes - self.acked_bytes >= ACK_EVERY_BYTES;
                Ok(due.then(|| self.ack(None)))
            }
            (Some(Message::Complete(_)), Some(_)) => {
                if self.declared_bytes != 0 && self.declared_bytes != self.received_bytes {
                    return Err(Status::invalid_argument(format!(
                        "total_size was {} but {} bytes arrived",
                        self.declared_bytes, self.received_bytes
                    )));
                }
                let key = null_key(
                    self.received_bytes,
                    self.uploads.fetch_add(1, Ordering::Relaxed),
                );
                let complete = UploadComplete {
                    key: key.clone(),
                    size: self.received_bytes as i64,
                    hash: key.clone(),
                    metadata: Some(metadata(key, self.received_bytes)),
                };
                Ok(Some(self.ack(Some(complete))))
            }
            (Some(Message::Ack(_)), _) => {
                Err(Status::invalid_argument("`ack` is server-to-client only"))
            }
            (Some(Message::Start(_)), Some(_)) => Err(Status::invalid_argument("a second `start`")),
            (Some(_), None) => Err(Status::invalid_argument(
                "the first message must be `start`",
            )),
            (None, _) => Err(Status::invalid_argument("empty UploadMessage")),
        }
    }

    fn ack(&self, complete: Option<UploadComplete>) -> UploadAck {
        UploadAck {
            upload_id: self.id.clone().unwrap_or_default(),
            received_bytes: self.received_bytes,
            complete,
        }
    }
}

#[tonic::async_trait]
impl UploadService for NullServer {
    type UploadStream = BoxStream<UploadAck>;

    async fn upload(
        &self,
        request: Request<Streaming<UploadMessage>>,
    ) -> Result<Response<Self::UploadStream>, Status> {
        let state = UploadState {
            inbound: request.into_inner(),
            id: None,
            declared_bytes: 0,
            received_bytes: 0,
            acked_bytes: 0,
            done: false,
            uploads: Arc::clone(&self.uploads),
        };
        let acks = futures::stream::unfold(state, |mut state| async move {
            let ack = state.next_ack().await?;
            Some((ack, state))
        });
        Ok(Response::new(acks.boxed()))
    }
}

/// Zero chunks covering `[start, end)`, at absolute offsets.
fn zero_chunks(start: u64, end: u64) -> BoxStream<BlobChunk> {
    let zeros = Bytes::from_static(&ZEROS);
    let offsets = (start..end).step_by(CHUNK_BYTES);
    futures::stream::iter(offsets.map(move |offset| {
        let len = (end - offset).min(CHUNK_BYTES as u64) as usize;
        Ok(BlobChunk {
            data: zeros.slice(..len),
            offset: offset as i64,
        })
    }))
    .boxed()
}

#[tonic::async_trait]
impl BlobService for NullServer {
    type GetBlobStream = BoxStream<BlobChunk>;
    type ListBlobsStream = BoxStream<BlobMetadata>;

    async fn get_blob(
        &self,
        request: Request<GetBlobRequest>,
    ) -> Result<Response<Self::GetBlobStream>, Status> {
        let request = request.into_inner();
        let size_bytes = size_of_key(&request.key)?;
        let (start, end) = match request.range {
            None => (0, size_bytes),
            Some(range) => {
                let start = u64::try_from(range.offset)
                    .map_err(|_| Status::invalid_argument("negative range offset"))?;
                let length = match range.length {
                    None => size_bytes.saturating_sub(start),
                    Some(length) => u64::try_from(length)
                        .map_err(|_| Status::invalid_argument("negative range length"))?,
                };
                match start.checked_add(length) {
                    Some(end) if start <= size_bytes && end <= size_bytes => (start, end),
                    _ => {
                        return Err(Status::invalid_argument(format!(
                            "range {start}+{length} lies past the end of a {size_bytes}-byte blob"
                        )))
                    }
                }
            }
        };
        Ok(Response::new(zero_chunks(start, end)))
    }

    async fn stat_blob(
        &self,
        request: Request<StatBlobRequest>,
    ) -> Result<Response<BlobMetadata>, Status> {
        let key = request.into_inner().key;
        let size_bytes = size_of_key(&key)?;
        Ok(Response::new(metadata(key, size_bytes)))
    }

    async fn batch_stat_blobs(
        &self,
        request: Request<BatchStatBlobsRequest>,
    ) -> Result<Response<BatchStatBlobsResponse>, Status> {
        let mut results = Vec::new();
        for key in request.into_inner().keys {
            let found = match size_of_key(&key) {
                Ok(size_bytes) => Some(metadata(key.clone(), size_bytes)),
                Err(status) if status.code() == tonic::Code::NotFound => None,
                Err(status) => return Err(status),
            };
            results.push(BatchStatResult {
                key,
                found: found.is_some(),
                metadata: found,
            });
        }
        Ok(Response::new(BatchStatBlobsResponse { results }))
    }

    async fn delete_blob(
        &self,
        request: Request<DeleteBlobRequest>,
    ) -> Result<Response<DeleteBlobResponse>, Status> {
        size_of_key(&request.into_inner().key)?;
        Ok(Response::new(DeleteBlobResponse { deleted: true }))
    }

    async fn list_blobs(
        &self,
        _request: Request<ListBlobsRequest>,
    ) -> Result<Response<Self::ListBlobsStream>, Status> {
        Ok(Response::new(futures::stream::empty().boxed()))
    }
}

/// HTTP/2 settings of the null server; match them to Graviton's front-end for a fair
/// ceiling.
#[derive(Clone, Debug, Default)]
pub struct Http2 {
    pub initial_stream_window_bytes: Option<u32>,
    pub initial_connection_window_bytes: Option<u32>,
    pub adaptive_window: bool,
}

/// Serves both services on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    http2: Http2,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let server = NullServer::default();
    // The listener is ours, so TCP_NODELAY is set here: the builder's `tcp_nodelay`
    // only reaches listeners tonic binds itself, and Nagle's algorithm would hold back
    // small acks and frames for tens of milliseconds.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .initial_stream_window_size(http2.initial_stream_window_bytes)
        .initial_connection_window_size(http2.initial_connection_window_bytes)
        .http2_adaptive_window(Some(http2.adaptive_window))
        .add_service(server.blob_service())
        .add_service(server.upload_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_size() {
        let key = null_key(123_456_789, 7);
        assert_eq!(key.len(), 32);
        assert_eq!(size_of_key(&key).unwrap(), 123_456_789);
        assert_eq!(
            size_of_key(&[1u8; 32]).unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            size_of_key(&[1u8; 5]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn zero_chunks_cover_the_range() {
        let chunks: Vec<_> = zero_chunks(100, 100 + 2 * CHUNK_BYTES as u64 + 5)
            .collect()
            .await;
        let chunks: Vec<BlobChunk> = chunks.into_iter().map(Result::unwrap).collect();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[1].offset, 100 + CHUNK_BYTES as i64);
        assert_eq!(chunks[2].data.len(), 5);
        assert!(chunks.iter().all(|c| c.data.iter().all(|&b| b == 0)));
    }
}
