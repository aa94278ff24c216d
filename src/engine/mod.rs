//! The storage engine: thread-per-core shards storing content-addressed blobs durably.
//!
//! [`Engine`] is the handle the gRPC layer and tests use. It owns nothing on the data
//! path: each request becomes a message to one shard (or to all, for listing) on a
//! bounded channel, and the answer comes back on a oneshot or a bounded stream. All of
//! its methods are `async` over tokio's channels only, so they can be called from any
//! runtime: tonic's tokio tasks in the server, or the simulator's single thread.
//!
//! Routing (DESIGN.md): a key's owner is [`BlobKey::owner`]; reads, stats, deletes and
//! listings go to owners; an upload streams into the least-loaded *ingest* shard, which
//! hands the blob's location to the owner at commit. A small upload (at most
//! `small_blob_bytes`, 64 KiB by default) is held by its [`Upload`] and sent whole at
//! complete: the ingest shard hashes it and hands the bytes themselves to the owner,
//! which writes them with other small blobs in one group write and commits them.
//!
//! Guarantees, for every blob: `Upload::complete` returns only after the blob's data and
//! its commit record are durable; a blob is visible to reads, stats and listings only
//! once it is; a crash at any instant loses no completed blob and exposes no partial one;
//! a read returns the stored bytes or an error, never other bytes. The on-disk format is
//! in [`format`](mod@format); what each part guarantees is in its module's documentation.

mod digest;
pub mod error;
pub mod format;
mod index;
mod journal;
mod recovery;
mod segments;
mod shard;
mod signal;
mod small;
pub mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use graviton_io::disk::DirLock;
use graviton_io::shard::{allowed_cores, spawn_shard_thread, DriverInfo, ShardThreadConfig};
use graviton_io::{DirectDisk, Disk, IoMode};
use tokio::sync::{mpsc, oneshot};

pub use error::{Error, Result};
pub use shard::CompactionReport;
pub use types::{BlobKey, BlobMeta, ByteRange, ListQuery, CONTENT_TYPE, KEY_BYTES};

use recovery::{open_shard, ShardWiring};
use shard::{Request, UploadMsg};

/// Largest `small_blob_bytes`: half a group write (see `small.rs`).
pub const SMALL_BLOB_BYTES_MAX: u64 = small::BATCH_BYTES_MAX / 2;

/// Default of [`EngineConfig::compaction_bytes_per_sec`], per shard.
pub const COMPACTION_BYTES_PER_SEC: u64 = 16 * 1024 * 1024;

/// Default of [`EngineConfig::free_segments_max`]: 1 GiB of disk per shard with 256 MiB
/// segments.
pub const FREE_SEGMENTS_MAX: usize = 4;

/// How to run the engine. [`EngineConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Number of shards (threads). Default: the cores this process may run on.
    pub shards: usize,
    /// Pin shard `k` to the `k`-th core this process may run on.
    pub pin_cores: bool,
    /// Size of each preallocated segment file (a multiple of 1 MiB).
    pub segment_bytes: u64,
    /// Size of each preallocated journal file.
    pub journal_bytes: u64,
    /// Serve a directory without O_DIRECT (tmpfs) with buffered I/O instead of refusing.
    pub allow_buffered_io: bool,
    /// Use the epoll driver even where io_uring works.
    pub force_epoll: bool,
    pub ring_entries: u32,
    /// 1 MiB write buffers per shard: bounds upload memory in the shard.
    pub write_buffers: usize,
    /// 1 MiB read buffers per shard.
    pub read_buffers: usize,
    /// 64 KiB read buffers per shard, for small blobs.
    pub small_read_buffers: usize,
    /// Uploads of at most this many bytes are held by the caller until complete and
    /// then stored in one message to a shard: the small-blob path (see [`Upload`]).
    /// At most [`SMALL_BLOB_BYTES_MAX`]; 0 turns the path off.
    pub small_blob_bytes: u64,
    /// Chunks buffered between an upload's producer and its shard.
    pub upload_channel_depth: usize,
    /// Pieces buffered between a shard and a reader.
    pub read_channel_depth: usize,
    /// Requests buffered in each shard's inbox.
    pub inbox_depth: usize,
    /// How often each shard looks for segments to compact; `None`: only on request.
    pub compaction_interval: Option<Duration>,
    /// A sealed segment is compacted when at most this share of it is live.
    pub compaction_live_ratio: f64,
    /// The most bytes per second each shard's compaction copies; `None` or 0: as fast as it
    /// can. Unpaced, moving 1 MiB blobs at 135 MiB/s cut a foreground load of 4 KiB gets
    /// and puts to a quarter of its rate, put p99 13 → 171 ms (BENCHMARKS.md).
    pub compaction_bytes_per_sec: Option<u64>,
    /// Segments compaction emptied that each shard keeps to reuse, at most: their
    /// blocks stay allocated to the store (up to this many segments' worth per shard)
    /// instead of being freed and allocated again. 0: every emptied segment is removed.
    pub free_segments_max: usize,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            shards: allowed_cores().len().max(1),
            pin_cores: true,
            segment_bytes: 256 * format::UNIT_BYTES,
            journal_bytes: 16 * format::UNIT_BYTES,
            allow_buffered_io: false,
            force_epoll: false,
            ring_entries: 256,
            write_buffers: 48,
            read_buffers: 64,
            small_read_buffers: 512,
            small_blob_bytes: format::CHUNK_BYTES,
            upload_channel_depth: 2,
            read_channel_depth: 4,
            inbox_depth: 1024,
            compaction_interval: Some(Duration::from_secs(10)),
            compaction_live_ratio: 0.5,
            compaction_bytes_per_sec: Some(COMPACTION_BYTES_PER_SEC),
            free_segments_max: FREE_SEGMENTS_MAX,
        }
    }
}

/// What the engine reports about a shard.
#[derive(Default)]
pub struct ShardStatus {
    driver: Mutex<Option<DriverInfo>>,
    poisoned: AtomicBool,
    active_uploads: AtomicUsize,
}

/// A shard's health, for the health service and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardHealth {
    pub shard: usize,
    /// "io_uring", "epoll", or "simulated".
    pub driver: String,
    pub poisoned: bool,
}

struct Inner {
    upload_channel_depth: usize,
    small_blob_bytes: u64,
    /// Next upload id: distinct within this process.
    next_upload_id: AtomicU64,
    shards: Vec<(mpsc::Sender<Request>, Arc<ShardStatus>)>,
    threads: Mutex<Vec<JoinHandle<std::io::Result<()>>>>,
    lock: Mutex<Option<DirLock>>,
}

/// The handle to a running engine. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Opens (creating if needed) the store in `config.data_dir`, starts one thread per
    /// shard and rebuilds the indexes. Blocks until every shard is ready.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        assert!(config.shards >= 1, "at least one shard");
        let root = config.data_dir.clone();
        std::fs::create_dir_all(&root).map_err(|e| Error::io("mkdir", &root, 0, e))?;
        let lock = DirLock::acquire(&root).map_err(|e| {
            Error::Config(format!(
                "cannot lock {}: {e} (is another Graviton using this data directory?)",
                root.display()
            ))
        })?;
        let disk = match DirectDisk::probe(&root, IoMode::Direct) {
            Ok(disk) => disk,
            Err(error)
                if error.kind() == std::io::ErrorKind::Unsupported && config.allow_buffered_io =>
            {
                tracing::warn!(%error, "serving with BUFFERED I/O through the page cache, as allowed by configuration");
                DirectDisk::probe(&root, IoMode::Buffered)
                    .map_err(|e| Error::io("probe", &root, 0, e))?
            }
            Err(error) if error.kind() == std::io::ErrorKind::Unsupported => {
                return Err(Error::Config(error.to_string()))
            }
            Err(error) => return Err(Error::io("probe direct I/O", &root, 0, error)),
        };
        let cores = allowed_cores();
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..config.shards)
            .map(|_| mpsc::channel(config.inbox_depth))
            .unzip();
        let statuses: Vec<Arc<ShardStatus>> = (0..config.shards).map(|_| Arc::default()).collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, Result<()>)>();
        let mut threads = Vec::new();
        for (id, inbox) in inboxes.into_iter().enumerate() {
            let thread_config = ShardThreadConfig {
                index: id,
                core: (config.pin_cores && !cores.is_empty()).then(|| cores[id % cores.len()]),
                ring_entries: config.ring_entries,
                force_epoll: config.force_epoll,
            };
            let wiring = ShardWiring {
                id,
                count: config.shards,
                config: Rc::new(config.clone()),
                root: root.clone(),
                peers: senders.clone(),
                statuses: statuses.clone(),
            };
            let (disk, status, ready) = (disk.clone(), statuses[id].clone(), ready_tx.clone());
            let config = (*wiring.config).clone();
            let spawned = spawn_shard_thread(thread_config, move |driver| async move {
                *status.driver.lock().expect("status lock") = Some(driver);
                let wiring = ShardWiring {
                    config: Rc::new(config),
                    ..wiring
                };
                match open_shard(disk, wiring).await {
                    Ok(shard) => {
                        let _ = ready.send((id, Ok(())));
                        shard.run(inbox).await;
                    }
                    Err(error) => {
                        let _ = ready.send((id, Err(error)));
                    }
                }
            });
            threads.push(spawned.map_err(|e| Error::io("spawn shard thread", &root, 0, e))?);
        }
        drop(ready_tx);
        let engine = Engine {
            inner: Arc::new(Inner {
                upload_channel_depth: config.upload_channel_depth.max(1),
                small_blob_bytes: config.small_blob_bytes.min(SMALL_BLOB_BYTES_MAX),
                next_upload_id: AtomicU64::new(1),
                shards: senders.into_iter().zip(statuses).collect(),
                threads: Mutex::new(threads),
                lock: Mutex::new(Some(lock)),
            }),
        };
        let mut failure = None;
        for _ in 0..config.shards {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((id, Err(error))) => {
                    tracing::error!(shard = id, %error, "shard failed to open");
                    failure.get_or_insert(error);
                }
                Err(_) => {
                    failure.get_or_insert(Error::Config("a shard thread failed to start".into()));
                }
            }
        }
        if let Some(error) = failure {
            engine.stop_blocking();
            return Err(error);
        }
        for health in engine.health() {
            tracing::info!(shard = health.shard, driver = %health.driver, "shard ready");
        }
        engine.log_drivers();
        Ok(engine)
    }

    /// Opens the store over `disk` with every shard running as a task on the current
    /// single-threaded monoio runtime: the deterministic simulator's way to run the same
    /// shard code. The engine lives as long as that runtime.
    pub async fn open_local<D: Disk>(config: EngineConfig, disk: D) -> Result<Engine> {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..config.shards)
            .map(|_| mpsc::channel(config.inbox_depth))
            .unzip();
        let statuses: Vec<Arc<ShardStatus>> = (0..config.shards).map(|_| Arc::default()).collect();
        let shared = Rc::new(config.clone());
        let mut shards = Vec::new();
        for (id, status) in statuses.iter().enumerate() {
            let wiring = ShardWiring {
                id,
                count: config.shards,
                config: shared.clone(),
                root: config.data_dir.clone(),
                peers: senders.clone(),
                statuses: statuses.clone(),
            };
            *status.driver.lock().expect("status lock") = Some(DriverInfo {
                name: "simulated",
                reason: "deterministic simulation".into(),
                core: None,
            });
            shards.push(open_shard(disk.clone(), wiring).await?);
        }
        for (shard, inbox) in shards.into_iter().zip(inboxes) {
            monoio::spawn(shard.run(inbox));
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                upload_channel_depth: config.upload_channel_depth.max(1),
                small_blob_bytes: config.small_blob_bytes.min(SMALL_BLOB_BYTES_MAX),
                next_upload_id: AtomicU64::new(1),
                shards: senders.into_iter().zip(statuses).collect(),
                threads: Mutex::new(Vec::new()),
                lock: Mutex::new(None),
            }),
        })
    }

    fn log_drivers(&self) {
        for (id, (_, status)) in self.inner.shards.iter().enumerate() {
            if let Some(driver) = status.driver.lock().expect("status lock").as_ref() {
                if driver.name == "io_uring" {
                    tracing::info!(shard = id, core = ?driver.core, "I/O driver: {}", driver.reason);
                } else {
                    tracing::warn!(shard = id, core = ?driver.core, "I/O driver is {}: {}", driver.name, driver.reason);
                }
            }
        }
    }

    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    pub fn health(&self) -> Vec<ShardHealth> {
        self.inner
            .shards
            .iter()
            .enumerate()
            .map(|(shard, (_, status))| ShardHealth {
                shard,
                driver: status
                    .driver
                    .lock()
                    .expect("status lock")
                    .as_ref()
                    .map_or("starting".into(), |d| d.name.to_string()),
                poisoned: status.poisoned.load(Ordering::Relaxed),
            })
            .collect()
    }

    async fn ask<T>(
        &self,
        shard: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.inner.shards[shard]
            .0
            .send(make(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)
    }

    /// Starts an upload. `total_size`, if given, is checked at complete (and lets the
    /// shard allocate the space at once). An upload declared larger than
    /// `small_blob_bytes` starts streaming into the least-loaded shard that takes writes
    /// now; a smaller or undeclared one is held by the [`Upload`] until it completes or
    /// outgrows that size.
    pub async fn upload(
        &self,
        total_size: Option<u64>,
        attributes: BTreeMap<String, String>,
    ) -> Result<Upload> {
        format::validate_attributes(&attributes).map_err(Error::InvalidArgument)?;
        self.inner.least_loaded()?; // fail early when no shard takes writes
        let mut upload = Upload {
            id: self.inner.next_upload_id.fetch_add(1, Ordering::Relaxed),
            inner: self.inner.clone(),
            declared: total_size,
            accepted: 0,
            state: UploadState::Held {
                pieces: Vec::new(),
                attributes,
            },
        };
        if total_size.is_some_and(|size| size > self.inner.small_blob_bytes) {
            upload.start_stream().await?;
        }
        Ok(upload)
    }

    /// Streams a blob or a range of it.
    pub async fn get(&self, key: &BlobKey, range: Option<ByteRange>) -> Result<BlobRead> {
        let key = *key;
        self.ask(key.owner(self.shard_count()), |reply| Request::Get {
            key,
            range,
            reply,
        })
        .await?
    }

    pub async fn stat(&self, key: &BlobKey) -> Result<BlobMeta> {
        let found = self.stat_many(std::slice::from_ref(key)).await?;
        found
            .into_iter()
            .next()
            .flatten()
            .ok_or(Error::NotFound(*key))
    }

    /// One answer per key, in the order given.
    pub async fn stat_many(&self, keys: &[BlobKey]) -> Result<Vec<Option<BlobMeta>>> {
        let count = self.shard_count();
        let mut by_owner: Vec<Vec<usize>> = vec![Vec::new(); count];
        for (i, key) in keys.iter().enumerate() {
            by_owner[key.owner(count)].push(i);
        }
        let mut answers = vec![None; keys.len()];
        for (owner, positions) in by_owner.into_iter().enumerate() {
            if positions.is_empty() {
                continue;
            }
            let asked: Vec<BlobKey> = positions.iter().map(|&i| keys[i]).collect();
            let found = self
                .ask(owner, |reply| Request::Stat { keys: asked, reply })
                .await?;
            for (position, meta) in positions.into_iter().zip(found) {
                answers[position] = meta;
            }
        }
        Ok(answers)
    }

    /// Deletes a blob; durable when this returns.
    pub async fn delete(&self, key: &BlobKey) -> Result<()> {
        let key = *key;
        self.ask(key.owner(self.shard_count()), |reply| Request::Delete {
            key,
            reply,
        })
        .await?
    }

    /// Up to `query.limit` blobs in ascending key order, merged from every shard.
    pub async fn list(&self, query: ListQuery) -> Result<Vec<BlobMeta>> {
        if query.prefix.len() > KEY_BYTES {
            return Err(Error::InvalidArgument(format!(
                "prefix of {} bytes is longer than a key ({KEY_BYTES} bytes)",
                query.prefix.len()
            )));
        }
        let mut merged = Vec::new();
        for shard in 0..self.shard_count() {
            let query = query.clone();
            merged.extend(
                self.ask(shard, |reply| Request::List { query, reply })
                    .await?,
            );
        }
        merged.sort_by_key(|meta| meta.key);
        merged.truncate(query.limit);
        Ok(merged)
    }

    /// Runs one compaction pass on every shard now, all at once (as the background
    /// timer's passes run); the reports summed, or the first error.
    pub async fn compact(&self) -> Result<CompactionReport> {
        let passes = (0..self.shard_count())
            .map(|shard| self.ask(shard, |reply| Request::Compact { reply }));
        let mut total = CompactionReport::default();
        for report in futures::future::join_all(passes).await {
            let report = report??;
            total.segments_removed += report.segments_removed;
            total.blobs_moved += report.blobs_moved;
            total.bytes_moved += report.bytes_moved;
        }
        Ok(total)
    }

    /// Seals every shard's journal and active segment now (to test rotation and
    /// compaction of recent data).
    pub async fn rotate(&self) -> Result<()> {
        for shard in 0..self.shard_count() {
            self.ask(shard, |reply| Request::Rotate { reply }).await??;
        }
        Ok(())
    }

    /// Stops every shard after making everything durable, and waits for the threads.
    /// Uploads not completed by then are abandoned (nothing of them becomes visible).
    pub async fn shutdown(&self) -> Result<()> {
        for shard in 0..self.shard_count() {
            let _ = self.ask(shard, |reply| Request::Shutdown { reply }).await;
        }
        self.join_threads();
        Ok(())
    }

    fn stop_blocking(&self) {
        for (sender, _) in &self.inner.shards {
            let (reply, _answer) = oneshot::channel();
            let _ = sender.try_send(Request::Shutdown { reply });
        }
        self.join_threads();
    }

    fn join_threads(&self) {
        let threads = std::mem::take(&mut *self.inner.threads.lock().expect("threads lock"));
        for thread in threads {
            if let Ok(Err(error)) = thread.join() {
                tracing::error!(%error, "shard thread failed");
            }
        }
        self.inner.lock.lock().expect("lock lock").take();
    }
}

impl Inner {
    /// The shard that takes writes with the fewest uploads in progress.
    fn least_loaded(&self) -> Result<&(mpsc::Sender<Request>, Arc<ShardStatus>)> {
        self.shards
            .iter()
            .filter(|(_, status)| !status.poisoned.load(Ordering::Relaxed))
            .min_by_key(|(_, status)| status.active_uploads.load(Ordering::Relaxed))
            .ok_or(Error::Poisoned { shard: 0 })
    }

    /// The least-loaded shard that takes writes, counted as loaded by one more upload
    /// while the guard lives.
    fn ingest_shard(&self) -> Result<(mpsc::Sender<Request>, LoadGuard)> {
        let (sender, status) = self.least_loaded()?;
        status.active_uploads.fetch_add(1, Ordering::Relaxed);
        Ok((sender.clone(), LoadGuard(status.clone())))
    }
}

/// Counts an upload against its ingest shard while it lives.
struct LoadGuard(Arc<ShardStatus>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.active_uploads.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upload in progress. Dropping it without [`Upload::complete`] abandons it: nothing
/// becomes visible and its space is reclaimed.
///
/// Small blobs take a shorter path. Until more than `small_blob_bytes` have arrived, the
/// upload only holds the chunks (shared `Bytes`, at most `HELD_PIECES_MAX` of them); at
/// complete it sends the whole blob to a shard in one message, and that shard hashes it
/// and has the key's owner write data and commit record itself: no stream, no commit
/// hop. An upload that outgrows the limit starts its stream then, with what it held.
pub struct Upload {
    id: u64,
    inner: Arc<Inner>,
    declared: Option<u64>,
    accepted: u64,
    state: UploadState,
}

/// Held chunks beyond this many are copied into one, so that a client sending tiny
/// chunks cannot pin many receive buffers.
const HELD_PIECES_MAX: usize = 16;

enum UploadState {
    Held {
        pieces: Vec<Bytes>,
        attributes: BTreeMap<String, String>,
    },
    Streaming {
        tx: mpsc::Sender<UploadMsg>,
        failed: oneshot::Receiver<Error>,
        _load: LoadGuard,
    },
    /// The stream could not be started; the upload fails.
    Failed,
}

impl Upload {
    /// An id for this upload, distinct among this process's uploads.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Starts the stream into an ingest shard and moves the held chunks into it.
    async fn start_stream(&mut self) -> Result<()> {
        let UploadState::Held { pieces, attributes } =
            std::mem::replace(&mut self.state, UploadState::Failed)
        else {
            unreachable!("a stream starts once, from the held state")
        };
        let (sender, load) = self.inner.ingest_shard()?;
        let (tx, chunks) = mpsc::channel(self.inner.upload_channel_depth);
        let (failed_tx, failed) = oneshot::channel();
        sender
            .send(Request::Upload {
                total: self.declared,
                attributes,
                chunks,
                failed: failed_tx,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        self.state = UploadState::Streaming {
            tx,
            failed,
            _load: load,
        };
        for piece in pieces {
            self.send(UploadMsg::Data(piece)).await?;
        }
        Ok(())
    }

    async fn send(&mut self, message: UploadMsg) -> Result<()> {
        let UploadState::Streaming { tx, .. } = &self.state else {
            unreachable!("sent only while streaming")
        };
        match tx.send(message).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.failure()),
        }
    }

    /// Why the shard ended the stream (it says so before dropping its end).
    fn failure(&mut self) -> Error {
        match &mut self.state {
            UploadState::Streaming { failed, .. } => {
                failed.try_recv().unwrap_or(Error::ShuttingDown)
            }
            _ => Error::ShuttingDown,
        }
    }

    /// Moves one chunk into the upload (held, or into its bounded channel, waiting while
    /// it is full). Returns the bytes accepted so far.
    pub async fn write(&mut self, chunk: Bytes) -> Result<u64> {
        let received = self.accepted + chunk.len() as u64;
        if let Some(declared) = self.declared.filter(|&d| received > d) {
            return Err(Error::SizeMismatch { declared, received });
        }
        if chunk.is_empty() {
            return Ok(self.accepted);
        }
        match &mut self.state {
            UploadState::Held { pieces, .. } if received <= self.inner.small_blob_bytes => {
                pieces.push(chunk);
                if pieces.len() > HELD_PIECES_MAX {
                    let mut joined = Vec::with_capacity(received as usize);
                    for piece in pieces.iter() {
                        joined.extend_from_slice(piece);
                    }
                    *pieces = vec![Bytes::from(joined)];
                }
            }
            UploadState::Held { .. } => {
                self.start_stream().await?;
                self.send(UploadMsg::Data(chunk)).await?;
            }
            UploadState::Streaming { .. } => self.send(UploadMsg::Data(chunk)).await?,
            UploadState::Failed => return Err(Error::ShuttingDown),
        }
        self.accepted = received;
        Ok(received)
    }

    pub fn accepted_bytes(&self) -> u64 {
        self.accepted
    }

    /// Ends the upload. Returns once data and commit record are durable.
    pub async fn complete(mut self, expected: Option<BlobKey>) -> Result<BlobMeta> {
        let (reply, answer) = oneshot::channel();
        match std::mem::replace(&mut self.state, UploadState::Failed) {
            UploadState::Held { pieces, attributes } => {
                let (sender, _load) = self.inner.ingest_shard()?;
                sender
                    .send(Request::Put {
                        pieces,
                        declared: self.declared,
                        expected,
                        attributes,
                        reply,
                    })
                    .await
                    .map_err(|_| Error::ShuttingDown)?;
                answer.await.map_err(|_| Error::ShuttingDown)?
            }
            state @ UploadState::Streaming { .. } => {
                self.state = state;
                self.send(UploadMsg::Complete { expected, reply }).await?;
                answer.await.unwrap_or_else(|_| Err(self.failure()))
            }
            UploadState::Failed => Err(Error::ShuttingDown),
        }
    }
}

/// A blob (or range) being read. `start..end` is the absolute range streamed.
pub struct BlobRead {
    pub meta: BlobMeta,
    pub start: u64,
    pub end: u64,
    chunks: mpsc::Receiver<Result<Bytes>>,
}

impl BlobRead {
    /// The next piece, in order; `None` at the end. An `Err` ends the stream.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        self.chunks.recv().await
    }
}
