//! The gRPC client side of the harness: a few HTTP/2 connections to one server and the
//! two operations every scenario is made of, a whole `Upload` stream and a `GetBlob`.
//!
//! Both check the server's answers against the wire contract as they go (ack order and
//! sizes, chunk offsets, byte counts) because a fast wrong answer is not a result.
//! Content checks (key = BLAKE3, bytes equal to what was sent) are optional, as they
//! cost client CPU inside the timed section. Nothing received is kept: chunks are
//! dropped as they arrive, so client memory does not grow with blob size.

use std::time::Duration;

use bytes::Bytes;
use futures::stream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::error::{Error, Result};
use crate::payload::Blob;
use crate::proto::{
    blob_service_client::BlobServiceClient, upload_message,
    upload_service_client::UploadServiceClient, ByteRange, CompleteUpload, GetBlobRequest,
    StartUpload, UploadChunk, UploadMessage,
};

/// Largest message the client (and the null server) sends or accepts: above any chunk
/// size a scenario uses, with room to spare.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Connections to one server; operations are spread over them round-robin by the
/// caller's connection index.
#[derive(Clone)]
pub struct Client {
    channels: Vec<Channel>,
    /// Check keys and content (costs client CPU during timing).
    pub verify: bool,
    /// `authorization` header value sent with every call, if the server wants one.
    authorization: Option<MetadataValue<Ascii>>,
}

/// What a finished upload returned.
#[derive(Clone, Debug)]
pub struct Uploaded {
    pub key: Bytes,
    pub size_bytes: u64,
}

impl Client {
    /// Opens `connections` HTTP/2 connections to `addr` (`http://host:port` or
    /// `host:port`).
    pub async fn connect(addr: &str, connections: usize, verify: bool) -> Result<Client> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| Error::Usage(format!("bad address `{addr}`: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10));
        let mut channels = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            let channel = endpoint.connect().await.map_err(|e| Error::Connect {
                addr: uri.clone(),
                detail: format!("{e}: {}", source_chain(&e)),
            })?;
            channels.push(channel);
        }
        Ok(Client {
            channels,
            verify,
            authorization: None,
        })
    }

    /// Sends `authorization: Bearer <token>` with every call.
    pub fn with_auth_token(mut self, token: &str) -> Result<Client> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Usage("the auth token must be printable ASCII".into()))?;
        self.authorization = Some(value);
        Ok(self)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    fn channel(&self, index: u64) -> Channel {
        self.channels[(index % self.channels.len() as u64) as usize].clone()
    }

    /// Uploads `blob` as one stream (start, chunks, complete) on connection `index`, and
    /// returns once the final ack with `complete` arrives, that is, once it is durable.
    pub async fn upload(&self, index: u64, blob: &Blob) -> Result<Uploaded> {
        const OP: &str = "Upload";
        let size_bytes = blob.size_bytes();
        let start = message(upload_message::Message::Start(StartUpload {
            total_size: size_bytes as i64,
            attributes: Default::default(),
        }));
        let chunks = blob.chunks().map(|(offset, data)| {
            message(upload_message::Message::Chunk(UploadChunk {
                data,
                offset: offset as i64,
            }))
        });
        let complete = message(upload_message::Message::Complete(CompleteUpload {
            expected_hash: Bytes::new(),
        }));
        let requests = stream::iter(std::iter::once(start).chain(chunks).chain([complete]));
        let mut client = UploadServiceClient::new(self.channel(index))
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let mut acks = client
            .upload(self.request(requests))
            .await
            .map_err(|s| Error::rpc(OP, s))?
            .into_inner();
        let mut upload_id: Option<String> = None;
        let mut received_bytes = 0u64;
        while let Some(ack) = acks.message().await.map_err(|s| Error::rpc(OP, s))? {
            match &upload_id {
                None => upload_id = Some(ack.upload_id.clone()),
                Some(id) if *id != ack.upload_id => {
                    return Err(Error::protocol(
                        OP,
                        format!("upload_id changed from {id:?} to {:?}", ack.upload_id),
                    ));
                }
                Some(_) => {}
            }
            if ack.received_bytes < received_bytes || ack.received_bytes > size_bytes {
                return Err(Error::protocol(
                    OP,
                    format!(
                        "received_bytes went {received_bytes} -> {} (blob is {size_bytes})",
                        ack.received_bytes
                    ),
                ));
            }
            received_bytes = ack.received_bytes;
            if let Some(complete) = ack.complete {
                return self.check_complete(blob, complete, received_bytes);
            }
        }
        Err(Error::protocol(
            OP,
            "ack stream ended without a `complete` ack",
        ))
    }

    fn check_complete(
        &self,
        blob: &Blob,
        complete: crate::proto::UploadComplete,
        received_bytes: u64,
    ) -> Result<Uploaded> {
        const OP: &str = "Upload";
        let size_bytes = blob.size_bytes();
        if complete.size != size_bytes as i64 || received_bytes != size_bytes {
            return Err(Error::protocol(
                OP,
                format!(
                    "final ack says size {} and received_bytes {received_bytes}; sent {size_bytes}",
                    complete.size
                ),
            ));
        }
        if self.verify && complete.key.as_ref() != blob.blake3() {
            return Err(Error::protocol(
                OP,
                "key is not the BLAKE3 digest of the content",
            ));
        }
        Ok(Uploaded {
            key: complete.key,
            size_bytes,
        })
    }

    /// Reads `length_bytes` of blob `key` from `offset` (the whole blob when `range` is
    /// false) on connection `index`, checking chunk offsets and, with `verify` and an
    /// `expected` blob, the bytes. Returns the bytes received.
    pub async fn download(
        &self,
        index: u64,
        key: Bytes,
        read: Read,
        expected: Option<&Blob>,
    ) -> Result<u64> {
        const OP: &str = "GetBlob";
        let range = read.ranged.then_some(ByteRange {
            offset: read.offset as i64,
            length: Some(read.length_bytes as i64),
        });
        let mut client = BlobServiceClient::new(self.channel(index))
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let mut chunks = client
            .get_blob(self.request(GetBlobRequest { key, range }))
            .await
            .map_err(|s| Error::rpc(OP, s))?
            .into_inner();
        let mut position = read.offset;
        while let Some(chunk) = chunks.message().await.map_err(|s| Error::rpc(OP, s))? {
            if chunk.offset != position as i64 {
                return Err(Error::protocol(
                    OP,
                    format!("chunk at offset {} where {position} was next", chunk.offset),
                ));
            }
            if let (true, Some(blob)) = (self.verify, expected) {
                if !blob.matches(position, &chunk.data) {
                    return Err(Error::protocol(
                        OP,
                        format!("bytes at offset {position} differ from what was uploaded"),
                    ));
                }
            }
            position += chunk.data.len() as u64;
        }
        let received = position - read.offset;
        if received != read.length_bytes {
            return Err(Error::protocol(
                OP,
                format!("got {received} bytes, asked for {}", read.length_bytes),
            ));
        }
        Ok(received)
    }
}

/// What a `GetBlob` asks for.
#[derive(Clone, Copy, Debug)]
pub struct Read {
    /// Send a `range` (else the whole blob, and `offset` must be 0).
    pub ranged: bool,
    pub offset: u64,
    pub length_bytes: u64,
}

impl Read {
    pub fn whole(size_bytes: u64) -> Read {
        Read {
            ranged: false,
            offset: 0,
            length_bytes: size_bytes,
        }
    }
}

fn message(message: upload_message::Message) -> UploadMessage {
    UploadMessage {
        message: Some(message),
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}
