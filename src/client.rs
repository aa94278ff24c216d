//! A small client for the command line (`graviton put|get|stat|delete|list`).
//!
//! It speaks the same wire contract as any other client, through the generated tonic
//! stubs: uploads stream a file in [`CHUNK_BYTES`] chunks read by a separate thread
//! (so a slow disk or a slow server back-pressures the other through a bounded
//! channel) and wait for the final ack; reads write each chunk where its `offset` says.
//! Keys are shown and taken as 64 hex digits.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::engine::BlobKey;
use crate::proto::blob_service_client::BlobServiceClient;
use crate::proto::upload_message::Message;
use crate::proto::upload_service_client::UploadServiceClient;
use crate::proto::{
    BlobMetadata, ByteRange, CompleteUpload, DeleteBlobRequest, GetBlobRequest, ListBlobsRequest,
    StartUpload, StatBlobRequest, UploadChunk, UploadMessage,
};

/// Size of the chunks `put` sends (the seed clients send 1 MiB too).
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks read ahead of the network.
const READ_AHEAD_CHUNKS: usize = 4;

/// Errors of the command-line client, as text for a person.
pub type ClientError = Box<dyn std::error::Error + Send + Sync>;

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Token>;

/// A connection to one server.
pub struct Client {
    blobs: BlobServiceClient<Authed>,
    uploads: UploadServiceClient<Authed>,
}

impl Client {
    /// Connects to `server` (e.g. `http://127.0.0.1:50051`), sending `token` if given.
    pub async fn connect(server: &str, token: Option<&str>) -> Result<Client, ClientError> {
        let channel = Endpoint::from_shared(server.to_string())?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|error| format!("connecting to {server}: {error}"))?;
        let token = match token {
            Some(token) => Some(format!("Bearer {token}").parse()?),
            None => None,
        };
        let token = Token(token);
        Ok(Client {
            blobs: BlobServiceClient::with_interceptor(channel.clone(), token.clone()),
            uploads: UploadServiceClient::with_interceptor(channel, token),
        })
    }

    /// Uploads everything `source` yields; returns the blob's metadata once durable.
    pub async fn put(
        &mut self,
        source: impl Read + Send + 'static,
        total_size: Option<u64>,
        attributes: std::collections::BTreeMap<String, String>,
    ) -> Result<BlobMetadata, ClientError> {
        let (messages, outbound) = mpsc::channel(READ_AHEAD_CHUNKS);
        let start = UploadMessage {
            message: Some(Message::Start(StartUpload {
                total_size: i64::try_from(total_size.unwrap_or(0))?,
                attributes,
            })),
        };
        messages.try_send(start).expect("an empty channel has room");
        let reader = std::thread::spawn(move || read_chunks(source, messages));
        let mut acks = self
            .uploads
            .upload(ReceiverStream::new(outbound))
            .await
            .map_err(rpc_error)?
            .into_inner();
        let mut complete = None;
        while let Some(ack) = acks.next().await {
            if let Some(done) = ack.map_err(rpc_error)?.complete {
                complete = done.metadata;
            }
        }
        reader.join().map_err(|_| "the file reader panicked")??;
        complete.ok_or_else(|| "the server ended the upload without a final ack".into())
    }

    /// Writes the blob `key` (or `range` of it) to `sink`; returns the bytes written.
    pub async fn get(
        &mut self,
        key: &BlobKey,
        range: Option<ByteRange>,
        sink: &mut impl Write,
    ) -> Result<u64, ClientError> {
        let request = GetBlobRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            range,
        };
        let mut chunks = self
            .blobs
            .get_blob(request)
            .await
            .map_err(rpc_error)?
            .into_inner();
        let mut written = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(rpc_error)?;
            sink.write_all(&chunk.data)?;
            written += chunk.data.len() as u64;
        }
        sink.flush()?;
        Ok(written)
    }

    pub async fn stat(&mut self, key: &BlobKey) -> Result<BlobMetadata, ClientError> {
        let request = StatBlobRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
        };
        Ok(self
            .blobs
            .stat_blob(request)
            .await
            .map_err(rpc_error)?
            .into_inner())
    }

    pub async fn delete(&mut self, key: &BlobKey) -> Result<(), ClientError> {
        let request = DeleteBlobRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
        };
        self.blobs.delete_blob(request).await.map_err(rpc_error)?;
        Ok(())
    }

    /// One page of the listing, after `start_after`, under `prefix`.
    pub async fn list(
        &mut self,
        start_after: Option<&BlobKey>,
        prefix: &[u8],
        limit: u32,
    ) -> Result<Vec<BlobMetadata>, ClientError> {
        let request = ListBlobsRequest {
            start_after: start_after
                .map(|key| Bytes::copy_from_slice(key.as_bytes()))
                .unwrap_or_default(),
            prefix: Bytes::copy_from_slice(prefix),
            limit,
        };
        let mut stream = self
            .blobs
            .list_blobs(request)
            .await
            .map_err(rpc_error)?
            .into_inner();
        let mut page = Vec::new();
        while let Some(meta) = stream.next().await {
            page.push(meta.map_err(rpc_error)?);
        }
        Ok(page)
    }
}

/// A failed call as `CODE: message`, the way gRPC names codes.
fn rpc_error(status: Status) -> ClientError {
    format!("{:?}: {}", status.code(), status.message()).into()
}

/// Sends `source` as chunks, then `complete`; stops early if the upload ended.
fn read_chunks(
    mut source: impl Read,
    messages: mpsc::Sender<UploadMessage>,
) -> Result<(), ClientError> {
    let mut offset = 0u64;
    loop {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < CHUNK_BYTES {
            match source.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
        let message = if filled == 0 {
            Message::Complete(CompleteUpload::default())
        } else {
            buffer.truncate(filled);
            Message::Chunk(UploadChunk {
                data: Bytes::from(buffer),
                offset: i64::try_from(offset)?,
            })
        };
        let last = matches!(message, Message::Complete(_));
        let message = UploadMessage {
            message: Some(message),
        };
        if messages.blocking_send(message).is_err() {
            return Ok(()); // The upload ended; its status says why.
        }
        if last {
            return Ok(());
        }
        offset += filled as u64;
    }
}

/// `metadata` as lines for a person.
pub fn describe(metadata: &BlobMetadata) -> String {
    let key = BlobKey::from_slice(&metadata.key)
        .map(|key| key.to_string())
        .unwrap_or_else(|| format!("(malformed key of {} bytes)", metadata.key.len()));
    let created = metadata
        .created_at
        .map(|at| format!("{}.{:09} (Unix time)", at.seconds, at.nanos))
        .unwrap_or_default();
    let mut text = format!(
        "key:          {key}\nsize:         {} bytes\ncontent-type: {}\ncreated:      {created}\n",
        metadata.size, metadata.content_type
    );
    for (name, value) in &metadata.attributes {
        text.push_str(&format!("attribute:    {name}={value}\n"));
    }
    text
}
