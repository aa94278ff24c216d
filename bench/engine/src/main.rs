//! Benchmark of the storage engine alone (no gRPC), the figures of the engine issue:
//!
//! - `seq-write`: one blob of `--seq-bytes` uploaded in 1 MiB chunks, timed to its
//!   durable completion;
//! - `seq-read`: that blob read back (O_DIRECT: from the device, not the page cache);
//! - `put-4k`: `--small-count` distinct 4 KiB blobs put durably, `--concurrency` at once;
//! - `get-4k`: those blobs read back, `--concurrency` at once, in random order;
//! - `compaction`: `--compaction-bytes` of 1 MiB blobs written and two thirds of them
//!   deleted (untimed); then a foreground load of 4 KiB gets (of the `put-4k` blobs)
//!   and durable 4 KiB puts, half each, `--concurrency` at once, runs while every shard
//!   compacts, and again for as long without compaction: what compaction costs the
//!   foreground (the engine issue: space comes back "without stalling foreground reads
//!   and writes");
//! - `reopen`: a store of `--reopen-blobs` small blobs (those the earlier scenarios left,
//!   then a fill of 200-byte blobs with `--reopen-attributes` attributes each) shut down
//!   and opened again; then what the opened store's index costs in memory: the resident
//!   size of a fresh process that opens it, less that of one that opens an empty store,
//!   per blob.
//!
//! All content is random and distinct per blob, generated before timing. Each result is
//! printed as a line and written as one JSON object per line to `--json`.
//! `scripts/bench-engine` runs this beside fio on the same file system and prints ratios.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use graviton::engine::{BlobKey, Engine, EngineConfig};
use graviton_bench::host::status_field_kib;
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
    /// Bytes of 1 MiB blobs written for `compaction`, two thirds then deleted (0: skip).
    #[arg(long, default_value_t = 1 << 30)]
    compaction_bytes: u64,
    /// MiB per second each shard's compaction may copy (0: unpaced; default: the
    /// engine's).
    #[arg(long)]
    compaction_mib_per_sec: Option<u64>,
    /// Blobs in the store that `reopen` reopens (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    reopen_blobs: usize,
    /// Attributes each blob of the reopen fill carries (`content-type`, then `attr-1`, …).
    #[arg(long, default_value_t = 0)]
    reopen_attributes: usize,
    /// Only open the store in `--data-dir` (not emptied), print its resident size as a
    /// JSON line, and exit: what `reopen` runs in a child process.
    #[arg(long, hide = true)]
    measure_open: bool,
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
    config.compaction_interval = None; // compaction runs only in its own scenario
    if let Some(rate) = args.compaction_mib_per_sec {
        config.compaction_bytes_per_sec = Some(rate << 20);
    }
    config
}

fn random_pool(bytes: usize, seed: u64) -> Bytes {
    let mut pool = vec![0u8; bytes];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut pool);
    Bytes::from(pool)
}

async fn put(engine: &Engine, content: Bytes) -> BlobKey {
    put_with(engine, content, BTreeMap::new()).await
}

async fn put_with(
    engine: &Engine,
    content: Bytes,
    attributes: BTreeMap<String, String>,
) -> BlobKey {
    let mut upload = engine
        .upload(Some(content.len() as u64), attributes)
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

/// Latencies of the foreground load, by kind.
struct Foreground {
    elapsed: Duration,
    gets: Histogram<u64>,
    puts: Histogram<u64>,
}

impl Foreground {
    fn json(&self) -> serde_json::Value {
        let rate = |h: &Histogram<u64>| h.len() as f64 / self.elapsed.as_secs_f64();
        json!({
            "seconds": self.elapsed.as_secs_f64(),
            "get": {"ops_per_s": rate(&self.gets), "latency": latency_json(&self.gets)},
            "put": {"ops_per_s": rate(&self.puts), "latency": latency_json(&self.puts)},
        })
    }
}

/// A closed loop of `concurrency` workers, each doing a 4 KiB get of a random key of
/// `keys` or a durable 4 KiB put of new content (every other operation), until `stop`
/// is set. Put content is a window of `pool` at a fresh offset for every put: distinct
/// blobs, generated before timing.
async fn foreground(
    engine: &Engine,
    keys: &Arc<Vec<BlobKey>>,
    pool: &Bytes,
    next: &Arc<AtomicUsize>,
    concurrency: usize,
    stop: Arc<AtomicBool>,
) -> Foreground {
    let start = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let (engine, keys, pool, next, stop) = (
            engine.clone(),
            keys.clone(),
            pool.clone(),
            next.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(worker as u64);
            let mut gets = Histogram::<u64>::new(3).expect("histogram");
            let mut puts = Histogram::<u64>::new(3).expect("histogram");
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let began = Instant::now();
                if n % 2 == 0 {
                    let key = &keys[rng.random_range(0..keys.len())];
                    assert_eq!(read_len(&engine, key).await, 4096);
                    gets.record(began.elapsed().as_micros().max(1) as u64)
                } else {
                    let at = n * 7;
                    assert!(at + 4096 <= pool.len(), "put content pool exhausted");
                    put(&engine, pool.slice(at..at + 4096)).await;
                    puts.record(began.elapsed().as_micros().max(1) as u64)
                }
                .expect("record");
            }
            (gets, puts)
        }));
    }
    let mut all = Foreground {
        elapsed: Duration::ZERO,
        gets: Histogram::new(3).expect("histogram"),
        puts: Histogram::new(3).expect("histogram"),
    };
    for worker in workers {
        let (gets, puts) = worker.await.expect("worker");
        all.gets.add(gets).expect("merge");
        all.puts.add(puts).expect("merge");
    }
    all.elapsed = start.elapsed();
    all
}

/// The `compaction` scenario (see the module's docs); its result, and how many blobs it
/// left stored.
async fn compaction(
    engine: &Engine,
    args: &Args,
    keys: &Arc<Vec<BlobKey>>,
) -> (serde_json::Value, usize) {
    // Untimed: 1 MiB blobs, sealed in their segments, two of every three deleted (each
    // segment is then about a third live, under the default threshold of a half).
    let mib = 1usize << 20;
    let count = (args.compaction_bytes as usize).div_ceil(mib);
    let pool = random_pool(64 << 20, 5);
    let stored = Arc::new(std::sync::Mutex::new(Vec::with_capacity(count)));
    concurrent(count, 8, |i| {
        let at = (i * mib + i) % (pool.len() - mib); // shifted: no two blobs equal
        let (engine, content, stored) = (engine.clone(), pool.slice(at..at + mib), stored.clone());
        async move {
            let key = put(&engine, content).await;
            stored.lock().expect("stored").push(key);
        }
    })
    .await;
    engine.rotate().await.expect("seal the segments");
    let stored = stored.lock().expect("stored").clone();
    for key in stored
        .iter()
        .skip(1)
        .step_by(3)
        .chain(stored.iter().skip(2).step_by(3))
    {
        engine.delete(key).await.expect("delete");
    }
    // Put content for both foreground phases: 7 bytes apart, so 64 MiB covers over nine
    // million distinct puts.
    let puts_pool = random_pool(64 << 20, 6);
    let next = Arc::new(AtomicUsize::new(0));

    let stop = Arc::new(AtomicBool::new(false));
    let compactor = {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let report = engine.compact().await.expect("compaction");
            let elapsed = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            (report, elapsed)
        })
    };
    let during = foreground(engine, keys, &puts_pool, &next, args.concurrency, stop).await;
    let (report, elapsed) = compactor.await.expect("compactor");
    assert!(report.segments_removed > 0, "nothing compacted: {report:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(elapsed).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let alone = foreground(engine, keys, &puts_pool, &next, args.concurrency, stop).await;
    timer.await.expect("timer");
    let left = count.div_ceil(3) + (during.puts.len() + alone.puts.len()) as usize;
    let result = json!({"scenario": "compaction", "concurrency": args.concurrency,
        "written_bytes": count * mib, "moved_bytes": report.bytes_moved,
        "blobs_moved": report.blobs_moved, "segments_removed": report.segments_removed,
        "seconds": elapsed.as_secs_f64(), "mib_per_s": mib_per_s(report.bytes_moved, elapsed),
        "during": during.json(), "alone": alone.json()});
    (result, left)
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

    let mut stored = args.small_count + 1;
    if args.compaction_bytes > 0 {
        let (result, left) = compaction(&engine, &args, &keys).await;
        report.add(result);
        stored += left;
    }

    // Reopen: fill to `reopen_blobs` small blobs (those above count), then time open.
    let more = args.reopen_blobs.saturating_sub(stored);
    if args.reopen_blobs > 0 {
        let tiny = random_pool(more + 256, 4);
        let attributes = reopen_attributes(args.reopen_attributes);
        let (fill, _) = concurrent(more, args.concurrency.max(256), |i| {
            let (engine, content) = (engine.clone(), tiny.slice(i..i + 200));
            let attributes = attributes.clone();
            async move {
                put_with(&engine, content, attributes).await;
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
        engine.shutdown().await.expect("shutdown");
        drop(engine);
        let blobs = stored + more;
        let empty_dir = args.data_dir.with_extension("empty");
        let _ = std::fs::remove_dir_all(&empty_dir);
        let rss_empty = open_rss_kib(&args, &empty_dir);
        let rss_full = open_rss_kib(&args, &args.data_dir);
        let _ = std::fs::remove_dir_all(&empty_dir);
        let index_bytes_per_blob =
            (rss_full.saturating_sub(rss_empty) * 1024) as f64 / blobs as f64;
        report.add(
            json!({"scenario": "reopen", "blobs": blobs, "seconds": elapsed.as_secs_f64(),
            "fill_seconds": fill.as_secs_f64(), "attributes": args.reopen_attributes,
            "blobs_with_attributes": if args.reopen_attributes > 0 { more } else { 0 },
            "rss_empty_kib": rss_empty, "rss_opened_kib": rss_full,
            "index_bytes_per_blob": index_bytes_per_blob}),
        );
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
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    if args.measure_open {
        measure_open(&args);
        return;
    }
    runtime().block_on(run(args));
}

/// The tokio runtime the engine's callers run on: two workers.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio")
}

/// `n` attributes: a content type, then numbered ones with values of a typical length.
fn reopen_attributes(n: usize) -> BTreeMap<String, String> {
    (0..n)
        .map(|i| match i {
            0 => (
                "content-type".to_string(),
                "application/octet-stream".to_string(),
            ),
            i => (format!("attr-{i}"), format!("value-of-attribute-{i}")),
        })
        .collect()
}

/// Opens the store in `--data-dir` as it is, waits until a stat has gone through every
/// shard, and prints this process's resident size (`VmRSS`, KiB) as one JSON line.
fn measure_open(args: &Args) {
    runtime().block_on(async {
        let engine = Engine::open(config(args)).expect("open");
        let probes: Vec<BlobKey> = (0..=255u8).map(|b| BlobKey([b; 32])).collect();
        engine.stat_many(&probes).await.expect("stat");
        let rss_kib = status_field_kib(std::process::id(), "VmRSS").expect("VmRSS");
        println!("{}", json!({ "rss_kib": rss_kib }));
        engine.shutdown().await.expect("shutdown");
    });
}

/// Runs `measure_open` on `dir` in a child process (same shards) and returns its
/// resident size in KiB: a fresh process, so nothing freed earlier is counted.
fn open_rss_kib(args: &Args, dir: &std::path::Path) -> u64 {
    let mut command = std::process::Command::new(std::env::current_exe().expect("own path"));
    command.arg("--measure-open").arg("--data-dir").arg(dir);
    if let Some(shards) = args.shards {
        command.arg("--shards").arg(shards.to_string());
    }
    let output = command.output().expect("run the open measurement");
    assert!(
        output.status.success(),
        "open measurement failed: {output:?}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.starts_with("{\"rss_kib\""))
        .expect("its JSON line");
    let value: serde_json::Value = serde_json::from_str(line).expect("its JSON line");
    value["rss_kib"].as_u64().expect("rss_kib")
}
