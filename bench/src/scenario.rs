//! The scenarios: what each one uploads beforehand (untimed), what one timed operation
//! is, and the result record it produces (one JSON object per scenario run).
//!
//! | scenario    | setup (untimed)                  | one timed op                        |
//! |-------------|----------------------------------|-------------------------------------|
//! | `upload`    | –                                | one whole `Upload` stream of a blob |
//! | `download`  | upload the blobs                 | one whole `GetBlob` of a blob       |
//! | `put-small` | –                                | `Upload` of a small blob, until the final (durable) ack |
//! | `get-small` | upload `--blobs` small blobs     | `GetBlob` of a random one           |
//! | `ranged`    | upload one large blob            | `GetBlob` of a random range of it   |
//! | `mixed`     | upload `--blobs` small blobs     | a get (`--read-percent`) or a put   |
//!
//! Every blob written in a run is distinct (see `payload`), and content is generated
//! before timing. Results are named so that the same shape run against two servers
//! (the null server, Graviton) can be matched by the report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{Client, Read};
use crate::error::{Error, Result};
use crate::host::{drop_caches, load_average_1m, MemorySampler, ServerMemory};
use crate::payload::{mix, Pool};
use crate::runner::{closed_loop, Done, Limit};
use crate::size::{format_bytes, parse_bytes};
use crate::stats::Figures;

/// Flags every scenario takes.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Common options")]
pub struct Common {
    /// Server address (`host:port` or `http://host:port`).
    #[arg(long, default_value = "127.0.0.1:50051", global = true)]
    pub addr: String,
    /// Label for the server under test in results (`null`, `graviton`, …).
    #[arg(long, default_value = "server", global = true)]
    pub target: String,
    /// Append the result as one JSON line to this file.
    #[arg(long, global = true)]
    pub json: Option<std::path::PathBuf>,
    /// HTTP/2 connections to spread streams over (default: min(concurrency, 4)).
    #[arg(long, global = true)]
    pub connections: Option<usize>,
    /// Seed of the content generator (default: random, so runs never repeat content).
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Check returned keys (BLAKE3) and downloaded bytes; costs client CPU while timed.
    #[arg(long, global = true)]
    pub verify: bool,
    /// Sample this server process's memory (/proc/PID/status) during the timed phase.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// `sync` and drop the page cache after setup, before timing (needs root).
    #[arg(long, global = true)]
    pub drop_caches: bool,
    /// Bytes of random content to generate up front; blobs are windows of it.
    #[arg(long, value_parser = parse_bytes, default_value = "64MiB", global = true)]
    pub pool_bytes: u64,
    /// Bearer token for a server that requires one (default: $GRAVITON_AUTH_TOKEN).
    #[arg(long, global = true)]
    pub auth_token: Option<String>,
    /// Result name (default: derived from the scenario and its shape).
    #[arg(long, global = true)]
    pub name: Option<String>,
}

#[derive(Subcommand, Clone, Debug)]
pub enum Scenario {
    /// Upload `--streams` blobs of `--size` bytes at once, each as one stream.
    Upload(Streams),
    /// Download `--streams` blobs of `--size` bytes at once (uploaded first, untimed).
    Download(Streams),
    /// Durable puts of small blobs: each a whole Upload stream, done at the final ack.
    PutSmall(Small),
    /// GetBlob of small blobs uploaded beforehand, picked at random.
    GetSmall(SmallReads),
    /// Random ranged GetBlob reads of one large blob.
    Ranged(Ranged),
    /// Gets and durable puts of small blobs in a given ratio.
    Mixed(Mixed),
}

#[derive(Args, Clone, Debug)]
pub struct Streams {
    /// Bytes per blob.
    #[arg(long, value_parser = parse_bytes, default_value = "1GiB")]
    pub size: u64,
    /// Streams (blobs) in flight at once.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Bytes per upload chunk message.
    #[arg(long, value_parser = parse_bytes, default_value = "1MiB")]
    pub chunk: u64,
}

/// How long a many-op scenario runs, and with how many ops in flight.
#[derive(Args, Clone, Debug)]
pub struct Load {
    /// Operations in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Stop after this many timed operations.
    #[arg(long, conflicts_with = "duration")]
    pub ops: Option<u64>,
    /// Run for this many seconds (default 10 unless --ops).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds of the same load before timing starts (not recorded).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
}

#[derive(Args, Clone, Debug)]
pub struct Small {
    #[arg(long, value_parser = parse_bytes, default_value = "4KiB")]
    pub size: u64,
    #[command(flatten)]
    pub load: Load,
}

#[derive(Args, Clone, Debug)]
pub struct SmallReads {
    #[arg(long, value_parser = parse_bytes, default_value = "4KiB")]
    pub size: u64,
    /// Blobs to upload beforehand and read at random.
    #[arg(long, default_value_t = 10_000)]
    pub blobs: u64,
    #[command(flatten)]
    pub load: Load,
}

#[derive(Args, Clone, Debug)]
pub struct Ranged {
    /// Size of the blob read from.
    #[arg(long, value_parser = parse_bytes, default_value = "1GiB")]
    pub blob_size: u64,
    /// Bytes per read.
    #[arg(long, value_parser = parse_bytes, default_value = "4KiB")]
    pub range: u64,
    /// Read offsets are multiples of this (1: any byte).
    #[arg(long, value_parser = parse_bytes, default_value = "4KiB")]
    pub align: u64,
    /// Bytes per upload chunk message (setup).
    #[arg(long, value_parser = parse_bytes, default_value = "1MiB")]
    pub chunk: u64,
    #[command(flatten)]
    pub load: Load,
}

#[derive(Args, Clone, Debug)]
pub struct Mixed {
    #[arg(long, value_parser = parse_bytes, default_value = "4KiB")]
    pub size: u64,
    /// Blobs to upload beforehand for the reads.
    #[arg(long, default_value_t = 1000)]
    pub blobs: u64,
    /// Percentage of operations that are reads (the rest are durable puts).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub read_percent: u8,
    #[command(flatten)]
    pub load: Load,
}

/// One scenario's outcome: a line of the JSON results file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// Shape-derived name, the same against every server (e.g. `upload-8x128MiB`).
    pub name: String,
    pub scenario: String,
    pub target: String,
    pub addr: String,
    pub params: BTreeMap<String, Value>,
    #[serde(flatten)]
    pub figures: Figures,
    /// Per kind of op, for scenarios with more than one (mixed: `get`, `put`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_kind: BTreeMap<String, Figures>,
    pub server_memory: Option<ServerMemory>,
    /// `not requested`, `ok`, or why dropping the page cache failed.
    pub drop_caches: String,
    pub verified: bool,
    pub seed: u64,
    pub connections: usize,
    pub setup_s: f64,
    /// The machine's 1-minute load average as timing started (other work skews figures).
    #[serde(default)]
    pub loadavg_1m_start: Option<f64>,
    pub unix_time_s: u64,
}

type Op = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<Done>> + Send + Sync>;

/// A scenario ready to time: setup done, the op and its load decided.
struct Workload {
    op: Op,
    concurrency: usize,
    limit: Limit,
    warmup: Duration,
}

/// Connects, sets up, times and summarises one scenario.
pub async fn run(common: &Common, scenario: &Scenario) -> Result<ScenarioResult> {
    let (kind, name, params) = scenario.describe();
    let connections = common
        .connections
        .unwrap_or_else(|| scenario.concurrency().min(4))
        .max(1);
    let seed = common.seed.unwrap_or_else(rand::random);
    let chunk_max = scenario.chunk_bytes_max() as usize;
    let pool = Pool::generate((common.pool_bytes as usize).max(2 * chunk_max), seed);
    let client = common.client(connections).await?;

    let setup_started = Instant::now();
    let workload = scenario.prepare(&client, &pool).await?;
    let drop_caches = if common.drop_caches {
        drop_caches()
    } else {
        "not requested".to_string()
    };
    let setup_s = setup_started.elapsed().as_secs_f64();

    let op = Arc::clone(&workload.op);
    let run_op = move |index| op(index);
    let mut first_index = 0;
    if !workload.warmup.is_zero() {
        let warm = closed_loop(
            workload.concurrency,
            Limit::Duration(workload.warmup),
            0,
            run_op.clone(),
        );
        first_index = warm.await?.next_index;
    }
    let loadavg_1m_start = load_average_1m();
    let sampler = common.server_pid.and_then(MemorySampler::start);
    let phase = closed_loop(workload.concurrency, workload.limit, first_index, run_op).await?;
    let server_memory = match sampler {
        Some(sampler) => sampler.finish().await,
        None => None,
    };
    let (figures, by_kind) = phase.recorder.summarise(phase.elapsed);
    Ok(ScenarioResult {
        name: common.name.clone().unwrap_or(name),
        scenario: kind.to_string(),
        target: common.target.clone(),
        addr: common.addr.clone(),
        params,
        figures,
        by_kind,
        server_memory,
        drop_caches,
        verified: common.verify,
        seed,
        connections,
        setup_s,
        loadavg_1m_start,
        unix_time_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

impl Common {
    /// Connects as the flags say.
    pub async fn client(&self, connections: usize) -> Result<Client> {
        let client = Client::connect(&self.addr, connections, self.verify).await?;
        let token = self
            .auth_token
            .clone()
            .or_else(|| std::env::var("GRAVITON_AUTH_TOKEN").ok());
        match token.filter(|t| !t.is_empty()) {
            Some(token) => client.with_auth_token(&token),
            None => Ok(client),
        }
    }
}

impl Scenario {
    /// The scenario's kind, its result name and its parameters.
    fn describe(&self) -> (&'static str, String, BTreeMap<String, Value>) {
        let (kind, name, params) = match self {
            Scenario::Upload(s) | Scenario::Download(s) => {
                let kind = if matches!(self, Scenario::Upload(_)) {
                    "upload"
                } else {
                    "download"
                };
                let name = format!("{kind}-{}x{}", s.streams, format_bytes(s.size));
                (
                    kind,
                    name,
                    json!({"size_bytes": s.size, "streams": s.streams, "chunk_bytes": s.chunk}),
                )
            }
            Scenario::PutSmall(s) => (
                "put-small",
                format!("put-small-{}-c{}", format_bytes(s.size), s.load.concurrency),
                with_load(json!({"size_bytes": s.size}), &s.load),
            ),
            Scenario::GetSmall(s) => (
                "get-small",
                format!("get-small-{}-c{}", format_bytes(s.size), s.load.concurrency),
                with_load(json!({"size_bytes": s.size, "blobs": s.blobs}), &s.load),
            ),
            Scenario::Ranged(s) => (
                "ranged",
                format!(
                    "ranged-{}-of-{}-c{}",
                    format_bytes(s.range),
                    format_bytes(s.blob_size),
                    s.load.concurrency
                ),
                with_load(
                    json!({"blob_size_bytes": s.blob_size, "range_bytes": s.range, "align_bytes": s.align, "chunk_bytes": s.chunk}),
                    &s.load,
                ),
            ),
            Scenario::Mixed(s) => (
                "mixed",
                format!(
                    "mixed-r{}-{}-c{}",
                    s.read_percent,
                    format_bytes(s.size),
                    s.load.concurrency
                ),
                with_load(
                    json!({"size_bytes": s.size, "blobs": s.blobs, "read_percent": s.read_percent}),
                    &s.load,
                ),
            ),
        };
        let params = match params {
            Value::Object(map) => map.into_iter().collect(),
            _ => unreachable!("params are built as objects"),
        };
        (kind, name, params)
    }

    fn concurrency(&self) -> usize {
        match self {
            Scenario::Upload(s) | Scenario::Download(s) => s.streams,
            Scenario::PutSmall(Small { load, .. })
            | Scenario::GetSmall(SmallReads { load, .. })
            | Scenario::Ranged(Ranged { load, .. })
            | Scenario::Mixed(Mixed { load, .. }) => load.concurrency,
        }
    }

    /// The largest chunk the scenario sends: the pool must hold at least one.
    fn chunk_bytes_max(&self) -> u64 {
        match self {
            Scenario::Upload(s) | Scenario::Download(s) => s.chunk.min(s.size),
            Scenario::PutSmall(Small { size, .. })
            | Scenario::GetSmall(SmallReads { size, .. })
            | Scenario::Mixed(Mixed { size, .. }) => *size,
            Scenario::Ranged(s) => s.chunk.min(s.blob_size),
        }
        .max(1)
    }

    /// Does the untimed setup and returns the timed workload.
    async fn prepare(&self, client: &Client, pool: &Pool) -> Result<Workload> {
        match self {
            Scenario::Upload(s) => prepare_upload(client, pool, s),
            Scenario::Download(s) => prepare_download(client, pool, s).await,
            Scenario::PutSmall(s) => prepare_put_small(client, pool, s),
            Scenario::GetSmall(s) => prepare_get_small(client, pool, s).await,
            Scenario::Ranged(s) => prepare_ranged(client, pool, s).await,
            Scenario::Mixed(s) => prepare_mixed(client, pool, s).await,
        }
    }
}

fn with_load(mut params: Value, load: &Load) -> Value {
    params["concurrency"] = json!(load.concurrency);
    params["ops"] = json!(load.ops);
    params["duration_s"] = json!(load.duration());
    params["warmup_s"] = json!(load.warmup);
    params
}

impl Load {
    fn duration(&self) -> Option<f64> {
        match (self.ops, self.duration) {
            (Some(_), _) => None,
            (None, duration) => Some(duration.unwrap_or(10.0)),
        }
    }

    fn limit(&self) -> Result<Limit> {
        match (self.ops, self.duration()) {
            (Some(ops), _) => Ok(Limit::Ops(ops)),
            (None, Some(seconds)) if seconds > 0.0 && seconds.is_finite() => {
                Ok(Limit::Duration(Duration::from_secs_f64(seconds)))
            }
            _ => Err(Error::Usage(
                "--duration must be a positive number of seconds".into(),
            )),
        }
    }

    fn workload(&self, op: Op) -> Result<Workload> {
        if !(self.warmup >= 0.0 && self.warmup.is_finite()) {
            return Err(Error::Usage("--warmup must be zero or more seconds".into()));
        }
        Ok(Workload {
            op,
            concurrency: self.concurrency.max(1),
            limit: self.limit()?,
            warmup: Duration::from_secs_f64(self.warmup),
        })
    }
}

fn require(condition: bool, message: &str) -> Result<()> {
    if condition {
        Ok(())
    } else {
        Err(Error::Usage(message.to_string()))
    }
}

/// Uploads blobs `ids` (untimed setup), `concurrency` at a time; returns their keys in
/// order.
async fn upload_many(
    client: &Client,
    pool: &Pool,
    ids: std::ops::Range<u64>,
    size_bytes: u64,
    chunk_bytes: u64,
    concurrency: usize,
) -> Result<Vec<Bytes>> {
    futures::stream::iter(ids)
        .map(|id| {
            let blob = pool.blob(id, size_bytes, chunk_bytes as usize);
            async move { client.upload(id, &blob).await.map(|uploaded| uploaded.key) }
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

fn prepare_upload(client: &Client, pool: &Pool, s: &Streams) -> Result<Workload> {
    require(
        s.streams > 0 && s.chunk > 0,
        "--streams and --chunk must be positive",
    )?;
    let (client, pool, size, chunk) = (client.clone(), pool.clone(), s.size, s.chunk as usize);
    let op: Op = Arc::new(move |index| {
        let (client, blob) = (client.clone(), pool.blob(index, size, chunk));
        async move {
            client.upload(index, &blob).await?;
            Ok(Done {
                kind: "upload",
                bytes: size,
            })
        }
        .boxed()
    });
    Ok(Workload {
        op,
        concurrency: s.streams,
        limit: Limit::Ops(s.streams as u64),
        warmup: Duration::ZERO,
    })
}

async fn prepare_download(client: &Client, pool: &Pool, s: &Streams) -> Result<Workload> {
    require(
        s.streams > 0 && s.chunk > 0,
        "--streams and --chunk must be positive",
    )?;
    let count = s.streams as u64;
    let keys = Arc::new(upload_many(client, pool, 0..count, s.size, s.chunk, s.streams).await?);
    let (client, pool, size, chunk) = (client.clone(), pool.clone(), s.size, s.chunk as usize);
    let op: Op = Arc::new(move |index| {
        let (client, blob) = (client.clone(), pool.blob(index, size, chunk));
        let key = keys[index as usize].clone();
        async move {
            let bytes = client
                .download(index, key, Read::whole(size), Some(&blob))
                .await?;
            Ok(Done {
                kind: "download",
                bytes,
            })
        }
        .boxed()
    });
    Ok(Workload {
        op,
        concurrency: s.streams,
        limit: Limit::Ops(count),
        warmup: Duration::ZERO,
    })
}

fn prepare_put_small(client: &Client, pool: &Pool, s: &Small) -> Result<Workload> {
    require(s.size > 0, "--size must be positive")?;
    let (client, pool, size) = (client.clone(), pool.clone(), s.size);
    let op: Op = Arc::new(move |index| small_put(&client, &pool, index, size, index));
    s.load.workload(op)
}

/// Uploads blob `id` of `size` bytes, in one chunk, as operation `index`.
fn small_put(
    client: &Client,
    pool: &Pool,
    id: u64,
    size: u64,
    index: u64,
) -> BoxFuture<'static, Result<Done>> {
    let (client, blob) = (client.clone(), pool.blob(id, size, size as usize));
    async move {
        client.upload(index, &blob).await?;
        Ok(Done {
            kind: "put",
            bytes: size,
        })
    }
    .boxed()
}

/// Reads a random blob of `keys` (blob `id` was uploaded as `pool.blob(id, size, size)`).
fn small_get(
    client: &Client,
    pool: &Pool,
    keys: &[Bytes],
    size: u64,
    index: u64,
) -> BoxFuture<'static, Result<Done>> {
    let id = mix(pool.seed() ^ index) % keys.len() as u64;
    let (client, blob, key) = (
        client.clone(),
        pool.blob(id, size, size as usize),
        keys[id as usize].clone(),
    );
    async move {
        let bytes = client
            .download(index, key, Read::whole(size), Some(&blob))
            .await?;
        Ok(Done { kind: "get", bytes })
    }
    .boxed()
}

async fn prepare_get_small(client: &Client, pool: &Pool, s: &SmallReads) -> Result<Workload> {
    require(
        s.size > 0 && s.blobs > 0,
        "--size and --blobs must be positive",
    )?;
    let keys: Arc<[Bytes]> =
        upload_many(client, pool, 0..s.blobs, s.size, s.size, s.load.concurrency)
            .await?
            .into();
    let (client, pool, size) = (client.clone(), pool.clone(), s.size);
    let op: Op = Arc::new(move |index| small_get(&client, &pool, &keys, size, index));
    s.load.workload(op)
}

async fn prepare_ranged(client: &Client, pool: &Pool, s: &Ranged) -> Result<Workload> {
    require(
        s.range > 0 && s.align > 0 && s.chunk > 0,
        "--range, --align and --chunk must be positive",
    )?;
    require(
        s.range <= s.blob_size,
        "--range must not exceed --blob-size",
    )?;
    let key = upload_many(client, pool, 0..1, s.blob_size, s.chunk, 1)
        .await?
        .remove(0);
    let blob = pool.blob(0, s.blob_size, s.chunk as usize);
    let positions = (s.blob_size - s.range) / s.align + 1;
    let (client, seed, range, align) = (client.clone(), pool.seed(), s.range, s.align);
    let op: Op = Arc::new(move |index| {
        let offset = mix(seed ^ index) % positions * align;
        let read = Read {
            ranged: true,
            offset,
            length_bytes: range,
        };
        let (client, key, blob) = (client.clone(), key.clone(), blob.clone());
        async move {
            let bytes = client.download(index, key, read, Some(&blob)).await?;
            Ok(Done {
                kind: "read",
                bytes,
            })
        }
        .boxed()
    });
    s.load.workload(op)
}

async fn prepare_mixed(client: &Client, pool: &Pool, s: &Mixed) -> Result<Workload> {
    require(
        s.size > 0 && s.blobs > 0,
        "--size and --blobs must be positive",
    )?;
    let keys: Arc<[Bytes]> =
        upload_many(client, pool, 0..s.blobs, s.size, s.size, s.load.concurrency)
            .await?
            .into();
    let (client, pool, size, blobs, read_percent) = (
        client.clone(),
        pool.clone(),
        s.size,
        s.blobs,
        s.read_percent,
    );
    let op: Op = Arc::new(move |index| {
        if mix(pool.seed().rotate_left(17) ^ index) % 100 < u64::from(read_percent) {
            return small_get(&client, &pool, &keys, size, index);
        }
        // Puts take ids above the setup's, so they never repeat a stored blob.
        small_put(&client, &pool, blobs + index, size, index)
    });
    s.load.workload(op)
}
