//! Benchmark of the storage engine alone (no gRPC), the figures of the engine issue:
//!
//! - `seq-write`: one blob of `--seq-bytes` uploaded in 1 MiB chunks, timed to its
//!   durable completion;
//! - `seq-read`: that blob read back (O_DIRECT: from the device, not the page cache);
//! - `put-4k`: `--small-count` distinct 4 KiB blobs put durably, `--concurrency` at once;
//! - `get-4k`: those blobs read back, `--concurrency` at once, in random order;
//! - `reopen`: a store of `--reopen-blobs` small blobs shut down and opened again.
//!
//! All content is random and distinct per blob, generated before timing. Each result is
//! printed as a line and written as one JSON object per line to `--json`.
//! `scripts/bench-engine` runs this beside fio on the same file system and prints ratios.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use graviton::engine::{BlobKey, Engine, EngineConfig};
use hdrhistogram::Histogram;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(about = "Benchmark Graviton's storage engine without gRPC")]
struct Args {
    /// Data directory (created; must not be tmpfs). Emptied before the run.
    #[arg(long)]
    data_dir: PathBuf,
    /// Shards (default: the cores this process may run on).
    #[arg(long)]
    shards: Option<usize>,
    /// Size of the sequential blob.
    #[arg(long, default_value_t = 1 << 30)]
    seq_bytes: u64,
    /// Number of 4 KiB blobs for put-4k and get-4k.
    #[arg(long, default_value_t = 50_000)]
    small_count: usize,
    /// Operations in flight for put-4k, get-4k and the reopen fill.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Blobs in the store that `reopen` reopens (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    reopen_blobs: usize,
    /// JSON lines output.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Report {
    lines: Vec<serde_json::Value>,
}

impl Report {
    fn add(&mut self, value: serde_json::Value) {
        println!("{value}");
        self.lines.push(value);
    }
}

fn config(args: &Args) -> EngineConfig {
    let mut config = EngineConfig::new(&args.data_dir);
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    config.compaction_interval = None; // nothing to compact; keep the figures clean
    config
}

fn random_pool(bytes: usize, seed: u64) -> Bytes {
    let mut pool = vec![0u8; bytes];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut pool);
    Bytes::from(pool)
}

async fn put(engine: &Engine, content: Bytes) -> BlobKey {
    let mut upload = engine
        .upload(Some(content.len() as u64), BTreeMap::new())
        .await
        .expect("upload");
    upload.write(content).await.expect("write");
    upload.complete(None).await.expect("complete").key
}

async fn read_len(engine: &Engine, key: &BlobKey) -> u64 {
    let mut read = engine.get(key, None).await.expect("get");
    let mut total = 0;
    while let Some(piece) = read.next_chunk().await {
        total += piece.expect("read").len() as u64;
    }
    total
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// Runs `count` operations, `concurrency` at a time; returns elapsed time and latencies.
async fn concurrent<F, Fut>(count: usize, concurrency: usize, op: F) -> (Duration, Histogram<u64>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let work = op(i);
        tasks.push(tokio::spawn(async move {
            let began = Instant::now();
            work.await;
            drop(permit);
            began.elapsed().as_micros() as u64
        }));
    }
    let mut latencies = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        latencies
            .record(task.await.expect("task").max(1))
            .expect("record");
    }
    (start.elapsed(), latencies)
}

fn latency_json(latencies: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50_us": latencies.value_at_quantile(0.50),
        "p99_us": latencies.value_at_quantile(0.99),
        "p999_us": latencies.value_at_quantile(0.999),
    })
}

async fn run(args: Args) {
    let _ = std::fs::remove_dir_all(&args.data_dir);
    let mut report = Report { lines: Vec::new() };
    let engine = Engine::open(config(&args)).expect("open");
    report.add(json!({"scenario": "setup", "shards": engine.shard_count(),
        "drivers": engine.health().iter().map(|h| h.driver.clone()).collect::<Vec<_>>()}));

    // Sequential: one large blob in 1 MiB chunks, from a pre-generated random pool.
    let chunk = 1usize << 20;
    let pool = random_pool(64 << 20, 1);
    let mut upload = engine
        .upload(Some(args.seq_bytes), BTreeMap::new())
        .await
        .expect("upload");
    let start = Instant::now();
    let mut sent = 0u64;
    let mut index = 0usize;
    while sent < args.seq_bytes {
        let take = chunk.min((args.seq_bytes - sent) as usize);
        let at = (index * chunk + index) % (pool.len() - chunk); // shifted: no two chunks equal
        upload
            .write(pool.slice(at..at + take))
            .await
            .expect("write");
        sent += take as u64;
        index += 1;
    }
    let big = upload.complete(None).await.expect("complete").key;
    let elapsed = start.elapsed();
    report.add(
        json!({"scenario": "seq-write", "bytes": sent, "seconds": elapsed.as_secs_f64(),
        "mib_per_s": mib_per_s(sent, elapsed)}),
    );
    let start = Instant::now();
    let read = read_len(&engine, &big).await;
    let elapsed = start.elapsed();
    assert_eq!(read, args.seq_bytes);
    report.add(
        json!({"scenario": "seq-read", "bytes": read, "seconds": elapsed.as_secs_f64(),
        "mib_per_s": mib_per_s(read, elapsed)}),
    );

    // Small durable puts, then gets of them in random order.
    let small = random_pool(args.small_count * 4096 + 4096, 2);
    let keys = Arc::new(std::sync::Mutex::new(vec![
        BlobKey([0; 32]);
        args.small_count
    ]));
    let (elapsed, latencies) = concurrent(args.small_count, args.concurrency, |i| {
        let (engine, content, keys) = (
            engine.clone(),
            small.slice(i * 4096 + i % 4096..i * 4096 + i % 4096 + 4096),
            keys.clone(),
        );
        async move {
            let key = put(&engine, content).await;
            keys.lock().expect("keys")[i] = key;
        }
    })
    .await;
    report.add(json!({"scenario": "put-4k", "count": args.small_count, "concurrency": args.concurrency,
        "ops_per_s": args.small_count as f64 / elapsed.as_secs_f64(), "latency": latency_json(&latencies)}));
    let keys = Arc::new(keys.lock().expect("keys").clone());
    let mut order: Vec<usize> = (0..args.small_count).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let (elapsed, latencies) = concurrent(args.small_count, args.concurrency, |i| {
        let (engine, keys, at) = (engine.clone(), keys.clone(), order[i]);
        async move {
            assert_eq!(read_len(&engine, &keys[at]).await, 4096);
        }
    })
    .await;
    report.add(json!({"scenario": "get-4k", "count": args.small_count, "concurrency": args.concurrency,
        "ops_per_s": args.small_count as f64 / elapsed.as_secs_f64(), "latency": latency_json(&latencies)}));

    // Reopen: fill to `reopen_blobs` small blobs (those above count), then time open.
    let stored = args.small_count + 1;
    let more = args.reopen_blobs.saturating_sub(stored);
    if args.reopen_blobs > 0 {
        let tiny = random_pool(more + 256, 4);
        let (fill, _) = concurrent(more, args.concurrency.max(256), |i| {
            let (engine, content) = (engine.clone(), tiny.slice(i..i + 200));
            async move {
                put(&engine, content).await;
            }
        })
        .await;
        engine.shutdown().await.expect("shutdown");
        drop(engine);
        let start = Instant::now();
        let engine = Engine::open(config(&args)).expect("reopen");
        let elapsed = start.elapsed();
        let listed = engine
            .stat_many(&keys[..keys.len().min(1000)])
            .await
            .expect("stat")
            .iter()
            .filter(|m| m.is_some())
            .count();
        assert_eq!(listed, keys.len().min(1000), "blobs missing after reopen");
        report.add(
            json!({"scenario": "reopen", "blobs": stored + more, "seconds": elapsed.as_secs_f64(),
            "fill_seconds": fill.as_secs_f64()}),
        );
        engine.shutdown().await.expect("shutdown");
    } else {
        engine.shutdown().await.expect("shutdown");
    }
    if let Some(path) = &args.json {
        let text: String = report.lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).expect("write json");
    }
    let _ = std::fs::remove_dir_all(&args.data_dir);
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(run(args));
}
