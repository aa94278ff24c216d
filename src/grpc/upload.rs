//! `UploadService`: one task per upload stream, between the HTTP/2 stream and the
//! engine's [`Upload`].
//!
//! **Order.** [`Sequence`] checks the client's messages: one `start` first, then
//! `chunk`s whose `offset` is the count of bytes sent before them, never more than a
//! declared `total_size`, then one `complete`, after which nothing more is read (the
//! Go seed never half-closes, so the server ends the stream itself). Anything else, an
//! `ack` from the client included, is `INVALID_ARGUMENT` with a message that says which
//! rule was broken. A message over the size limit (`ServeOptions::chunk_bytes_max` plus
//! framing) is `RESOURCE_EXHAUSTED`.
//!
//! **Back-pressure.** Each chunk's `Bytes` is moved (not copied) into
//! [`Upload::write`], which waits while the engine's bounded channel is full; while it
//! waits the task does not poll the inbound stream, so HTTP/2 flow control stops the
//! client. Server memory per upload is one decoded message plus the engine's channel.
//!
//! **Acks.** The first ack is sent right after `start` (`received_bytes` 0). Progress
//! acks follow at most one per chunk and only after [`ACK_EVERY_BYTES`] more bytes were
//! accepted; they go into a bounded queue with `try_send` and are skipped when the
//! client is not reading (the seed's Go client reads only after `complete`), so acks
//! never stall an upload, and one slot is always kept free for the last message. The
//! final ack, with `complete` set, is sent only after [`Upload::complete`] returned,
//! that is once the blob is durable. All acks carry the same `upload_id`;
//! `received_bytes` never decreases and on the final ack is the blob's size.
//!
//! **Abort.** The `Upload` lives inside the task's receive future. Every way an upload
//! can end without `complete` succeeding drops that future and with it the `Upload`,
//! which aborts it (nothing visible, space reclaimed): a broken rule or engine error
//! (`?`), the client cancelling or disconnecting (the ack queue closes), the client's
//! deadline passing, the client sending nothing for `upload_stall_timeout` while the
//! task waits for it (`RESOURCE_EXHAUSTED`: without it, a live client that stops
//! sending would hold its upload slot and engine buffers for as long as its connection
//! lives), the server's drain period running out, a panic. If the deadline
//! passes while the commit is already in flight, the blob may still be stored; keys are
//! content digests, so a retry returns the same key.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::deadline::Deadline;
use super::drain::Drain;
use super::failure::{status, Failure};
use super::limits::Slots;
use crate::engine::{BlobKey, BlobMeta, Engine, Upload};
use crate::proto::upload_message::Message;
use crate::proto::upload_service_server::UploadService;
use crate::proto::{UploadAck, UploadComplete, UploadMessage};

/// A progress ack is sent once at least this many more bytes were accepted.
pub(crate) const ACK_EVERY_BYTES: u64 = 1024 * 1024;
/// Acks queued for the client; one slot is kept for the stream's last message.
const ACK_QUEUE_DEPTH: usize = 8;

/// The `UploadService` implementation.
#[derive(Clone)]
pub(crate) struct UploadApi {
    engine: Engine,
    drain: Drain,
    /// Random per server process, so `upload_id`s of two servers do not repeat.
    instance: u64,
    /// Slots for uploads in progress (load shedding beyond them).
    uploads: Slots,
    /// How long an upload may wait for its client's next message.
    stall_timeout: Duration,
}

impl UploadApi {
    pub(crate) fn new(
        engine: Engine,
        drain: Drain,
        uploads_max: usize,
        stall_timeout: Duration,
    ) -> UploadApi {
        use std::hash::{BuildHasher, RandomState};
        UploadApi {
            engine,
            drain,
            instance: RandomState::new().hash_one(std::process::id()),
            uploads: Slots::new("uploads", uploads_max),
            stall_timeout,
        }
    }
}

#[tonic::async_trait]
impl UploadService for UploadApi {
    type UploadStream = ReceiverStream<Result<UploadAck, Status>>;

    async fn upload(
        &self,
        request: Request<Streaming<UploadMessage>>,
    ) -> Result<Response<Self::UploadStream>, Status> {
        let permit = self.uploads.take().map_err(status)?;
        let deadline = Deadline::from_metadata(request.metadata());
        let inbound = request.into_inner();
        let (acks, queue) = mpsc::channel(ACK_QUEUE_DEPTH);
        let task = UploadTask {
            engine: self.engine.clone(),
            instance: self.instance,
            acks,
            stall_timeout: self.stall_timeout,
        };
        let drain = self.drain.clone();
        tokio::spawn(async move {
            task.run(inbound, deadline, drain).await;
            drop(permit);
        });
        Ok(Response::new(ReceiverStream::new(queue)))
    }
}

struct UploadTask {
    engine: Engine,
    instance: u64,
    acks: mpsc::Sender<Result<UploadAck, Status>>,
    stall_timeout: Duration,
}

impl UploadTask {
    async fn run(self, inbound: Streaming<UploadMessage>, deadline: Deadline, drain: Drain) {
        let outcome = tokio::select! {
            biased;
            () = self.acks.closed() => {
                tracing::debug!("upload client went away; upload aborted");
                return;
            }
            () = drain.aborted() => Err(Failure::ShuttingDown),
            () = deadline.passed() => Err(Failure::DeadlineExceeded {
                what: "the upload, which was aborted: nothing was stored",
            }),
            outcome = self.receive(inbound) => outcome,
        };
        // The receive future, and the `Upload` in it, is dropped by now: aborted.
        if let Err(failure) = outcome {
            tracing::debug!(?failure, "upload failed");
            // The queue always has a free slot for this last message.
            let _ = self.acks.send(Err(status(failure))).await;
        }
    }

    async fn receive(&self, mut inbound: Streaming<UploadMessage>) -> Result<(), Failure> {
        let Started {
            mut sequence,
            declared_bytes,
            attributes,
        } = Sequence::start(self.next(&mut inbound).await?)?;
        let mut upload = self.engine.upload(declared_bytes, attributes).await?;
        let upload_id = format!("{:016x}-{}", self.instance, upload.id());
        // A closed queue is seen by `run`'s `closed()` branch at the next await.
        let _ = self.acks.send(Ok(ack(&upload_id, 0, None))).await;
        let expected = self
            .receive_chunks(&mut sequence, &mut inbound, &mut upload, &upload_id)
            .await?;
        let meta = upload.complete(expected).await?;
        tracing::debug!(key = %meta.key, size = meta.size_bytes, "upload stored");
        let final_ack = ack(&upload_id, meta.size_bytes, Some(completion(meta)));
        let _ = self.acks.send(Ok(final_ack)).await;
        Ok(())
    }

    /// Moves chunks into `upload` until `complete`; returns its expected hash.
    async fn receive_chunks(
        &self,
        sequence: &mut Sequence,
        inbound: &mut Streaming<UploadMessage>,
        upload: &mut Upload,
        upload_id: &str,
    ) -> Result<Option<BlobKey>, Failure> {
        let mut acked_bytes = 0;
        loop {
            match sequence.next(self.next(inbound).await?)? {
                Step::Complete { expected } => return Ok(expected),
                Step::Chunk(data) => {
                    let accepted_bytes = upload.write(data).await?;
                    debug_assert_eq!(accepted_bytes, sequence.received_bytes);
                    let due = accepted_bytes - acked_bytes >= ACK_EVERY_BYTES;
                    if due && self.acks.capacity() > 1 {
                        let progress = ack(upload_id, accepted_bytes, None);
                        if self.acks.try_send(Ok(progress)).is_ok() {
                            acked_bytes = accepted_bytes;
                        }
                    }
                }
            }
        }
    }

    /// The client's next message, if it sends one within the stall timeout.
    async fn next(
        &self,
        inbound: &mut Streaming<UploadMessage>,
    ) -> Result<Option<UploadMessage>, Failure> {
        let Ok(received) = tokio::time::timeout(self.stall_timeout, inbound.message()).await else {
            return Err(Failure::UploadStalled {
                seconds: self.stall_timeout.as_secs(),
            });
        };
        received.map_err(|transport| Failure::from_decoding(transport, "chunks"))
    }
}

fn ack(upload_id: &str, received_bytes: u64, complete: Option<UploadComplete>) -> UploadAck {
    UploadAck {
        upload_id: upload_id.to_string(),
        received_bytes,
        complete,
    }
}

fn completion(meta: BlobMeta) -> UploadComplete {
    UploadComplete {
        key: convert::key_bytes(&meta.key),
        size: convert::wire_size(meta.size_bytes),
        hash: convert::key_bytes(&meta.key),
        metadata: Some(convert::metadata(meta)),
    }
}

/// What the upload task does with an accepted message after `start`.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    Chunk(Bytes),
    Complete { expected: Option<BlobKey> },
}

/// An upload stream whose `start` was accepted.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) sequence: Sequence,
    /// `None` when `total_size` was 0 (not declared).
    pub(crate) declared_bytes: Option<u64>,
    pub(crate) attributes: BTreeMap<String, String>,
}

/// The order rules of an upload stream, without I/O. Messages arrive as `Option`s:
/// `None` is the client ending its side of the stream.
#[derive(Debug)]
pub(crate) struct Sequence {
    declared_bytes: Option<u64>,
    received_bytes: u64,
    completed: bool,
}

impl Sequence {
    /// Checks the first message, which must be `start`.
    pub(crate) fn start(first: Option<UploadMessage>) -> Result<Started, Failure> {
        let start = match first.and_then(|message| message.message) {
            Some(Message::Start(start)) => start,
            other => {
                return Err(Failure::invalid(format!(
                    "the first message of an upload must be `start`, got {}",
                    describe(other.as_ref())
                )))
            }
        };
        let declared = convert::non_negative(start.total_size, "start.total_size")?;
        let declared_bytes = (declared > 0).then_some(declared);
        let sequence = Sequence {
            declared_bytes,
            received_bytes: 0,
            completed: false,
        };
        Ok(Started {
            sequence,
            declared_bytes,
            attributes: start.attributes,
        })
    }

    /// Checks a message after `start`.
    pub(crate) fn next(&mut self, message: Option<UploadMessage>) -> Result<Step, Failure> {
        assert!(!self.completed, "no message is read after `complete`");
        let Some(message) = message else {
            return Err(Failure::invalid(format!(
                "the stream ended after {} bytes without `complete`; nothing was stored",
                self.received_bytes
            )));
        };
        match message.message {
            Some(Message::Chunk(chunk)) => self.chunk(chunk.offset, chunk.data),
            Some(Message::Complete(complete)) => {
                let expected = convert::expected_hash(&complete.expected_hash)?;
                if let Some(declared) = self.declared_bytes {
                    if declared != self.received_bytes {
                        return Err(Failure::invalid(format!(
                            "`start.total_size` declared {declared} bytes but {} were sent before `complete`; nothing was stored",
                            self.received_bytes
                        )));
                    }
                }
                self.completed = true;
                Ok(Step::Complete { expected })
            }
            Some(Message::Start(_)) => Err(Failure::invalid(
                "a second `start`: an upload stream carries exactly one, as its first message",
            )),
            other => Err(Failure::invalid(format!(
                "{} in an upload stream: only `chunk` or `complete` may follow `start`",
                describe(other.as_ref())
            ))),
        }
    }

    fn chunk(&mut self, offset: i64, data: Bytes) -> Result<Step, Failure> {
        if u64::try_from(offset) != Ok(self.received_bytes) {
            return Err(Failure::invalid(format!(
                "chunk at offset {offset}, but {} bytes were sent before it: offsets must be consecutive",
                self.received_bytes
            )));
        }
        let after = self.received_bytes + data.len() as u64;
        if let Some(declared) = self.declared_bytes {
            if after > declared {
                return Err(Failure::invalid(format!(
                    "chunk at offset {offset} of {} bytes goes past `start.total_size` ({declared} bytes); nothing was stored",
                    data.len()
                )));
            }
        }
        self.received_bytes = after;
        Ok(Step::Chunk(data))
    }
}

fn describe(message: Option<&Message>) -> &'static str {
    match message {
        None => "an empty message (none of start, chunk, complete set) or the end of the stream",
        Some(Message::Start(_)) => "`start`",
        Some(Message::Chunk(_)) => "`chunk`",
        Some(Message::Complete(_)) => "`complete`",
        Some(Message::Ack(_)) => "`ack` (a server-to-client message)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CompleteUpload, StartUpload, UploadChunk};

    fn start(total_size: i64) -> Option<UploadMessage> {
        Some(UploadMessage {
            message: Some(Message::Start(StartUpload {
                total_size,
                attributes: BTreeMap::from([("content-type".into(), "a/b".into())]),
            })),
        })
    }

    fn chunk(offset: i64, data: &'static [u8]) -> Option<UploadMessage> {
        Some(UploadMessage {
            message: Some(Message::Chunk(UploadChunk {
                data: Bytes::from_static(data),
                offset,
            })),
        })
    }

    fn complete(expected_hash: &'static [u8]) -> Option<UploadMessage> {
        Some(UploadMessage {
            message: Some(Message::Complete(CompleteUpload {
                expected_hash: Bytes::from_static(expected_hash),
            })),
        })
    }

    fn ack() -> Option<UploadMessage> {
        Some(UploadMessage {
            message: Some(Message::Ack(UploadAck::default())),
        })
    }

    fn invalid_text<T: std::fmt::Debug>(result: Result<T, Failure>) -> String {
        match result {
            Err(Failure::InvalidArgument(text)) => text,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_stream_passes() {
        let Started {
            mut sequence,
            declared_bytes,
            attributes,
        } = Sequence::start(start(5)).unwrap();
        assert_eq!(declared_bytes, Some(5));
        assert_eq!(attributes["content-type"], "a/b");
        assert_eq!(
            sequence.next(chunk(0, b"ab")).unwrap(),
            Step::Chunk(Bytes::from_static(b"ab"))
        );
        assert_eq!(
            sequence.next(chunk(2, b"")).unwrap(),
            Step::Chunk(Bytes::new())
        );
        assert_eq!(
            sequence.next(chunk(2, b"cde")).unwrap(),
            Step::Chunk(Bytes::from_static(b"cde"))
        );
        assert_eq!(
            sequence.next(complete(&[7; 32])).unwrap(),
            Step::Complete {
                expected: Some(BlobKey([7; 32]))
            }
        );
    }

    #[test]
    fn total_size_zero_is_undeclared() {
        let Started {
            mut sequence,
            declared_bytes,
            ..
        } = Sequence::start(start(0)).unwrap();
        assert_eq!(declared_bytes, None);
        sequence.next(chunk(0, b"anything")).unwrap();
        assert_eq!(
            sequence.next(complete(b"")).unwrap(),
            Step::Complete { expected: None }
        );
        let mut empty = Sequence::start(start(0)).unwrap().sequence;
        assert_eq!(
            empty.next(complete(b"")).unwrap(),
            Step::Complete { expected: None }
        );
    }

    #[test]
    fn the_first_message_must_be_start() {
        assert!(
            invalid_text(Sequence::start(chunk(0, b"x"))).contains("must be `start`, got `chunk`")
        );
        assert!(invalid_text(Sequence::start(complete(b""))).contains("got `complete`"));
        assert!(invalid_text(Sequence::start(ack())).contains("`ack`"));
        assert!(invalid_text(Sequence::start(None)).contains("end of the stream"));
        let empty = Some(UploadMessage { message: None });
        assert!(invalid_text(Sequence::start(empty)).contains("empty message"));
        assert!(invalid_text(Sequence::start(start(-1))).contains("total_size"));
    }

    #[test]
    fn order_violations_after_start_are_rejected() {
        let fresh = || Sequence::start(start(0)).unwrap().sequence;
        assert!(invalid_text(fresh().next(start(0))).contains("second `start`"));
        assert!(invalid_text(fresh().next(ack())).contains("`ack`"));
        assert!(invalid_text(fresh().next(chunk(1, b"x"))).contains("offset 1, but 0 bytes"));
        assert!(invalid_text(fresh().next(chunk(-1, b"x"))).contains("offset -1"));
        assert!(invalid_text(fresh().next(None)).contains("without `complete`"));
        assert!(invalid_text(fresh().next(complete(&[1; 31]))).contains("expected_hash"));
        let mut sequence = fresh();
        sequence.next(chunk(0, b"abc")).unwrap();
        assert!(invalid_text(sequence.next(chunk(2, b"x"))).contains("offset 2, but 3 bytes"));
    }

    #[test]
    fn the_declared_size_is_enforced_both_ways() {
        let mut more = Sequence::start(start(3)).unwrap().sequence;
        more.next(chunk(0, b"ab")).unwrap();
        assert!(invalid_text(more.next(chunk(2, b"cd"))).contains("past `start.total_size`"));
        let mut fewer = Sequence::start(start(3)).unwrap().sequence;
        fewer.next(chunk(0, b"ab")).unwrap();
        assert!(invalid_text(fewer.next(complete(b""))).contains("declared 3 bytes but 2"));
    }
}
