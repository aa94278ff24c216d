//! Real-process crash test of the storage engine.
//!
//! The test re-runs its own binary as a child process that opens the engine (real
//! files, O_DIRECT, io_uring where available) and runs concurrent uploads and deletes,
//! and compaction passes that move the survivors out of segments deletes thinned,
//! printing a line for every acknowledgement. The parent kills the child with SIGKILL
//! at a random moment, reopens the store and checks:
//! - every upload the child saw acknowledged is there, byte for byte;
//! - every delete the child saw acknowledged took effect;
//! - nothing else is visible but blobs whose upload was in flight at the kill, and
//!   those are exact.
//!
//! Several kill/reopen rounds run on the same store. Content is derived from
//! (round, worker, sequence) by a seeded generator, so the parent can regenerate what
//! the child sent.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use graviton::engine::{BlobKey, Engine, EngineConfig, ListQuery};
use graviton_io::sim::SimRng;

use common::read_all;

const WORKERS: u64 = 6;
const ROUNDS: u64 = 3;

fn content(round: u64, worker: u64, sequence: u64) -> Vec<u8> {
    let mut rng = SimRng::new(round << 40 ^ worker << 32 ^ sequence);
    let size = match rng.below(4) {
        0 => rng.below(5000) + 1, // never empty: distinct workers must not share a key
        1 | 2 => rng.below(300_000) + 1,
        _ => rng.below(3 << 20) + 1,
    };
    let mut bytes = vec![0u8; size as usize];
    rng.fill(&mut bytes);
    bytes
}

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.segment_bytes = 4 << 20;
    config.journal_bytes = 256 << 10;
    config.pin_cores = false;
    // Compaction passes are the child's own (below), often and taking any segment
    // that is not nearly full, so that kills land while blobs are being moved.
    config.compaction_interval = None;
    config.compaction_live_ratio = 0.9;
    config
}

/// The child: uploads and deletes until killed. Run only by the parent below.
#[test]
#[ignore = "child process of sigkill_loses_no_acknowledged_blob"]
fn sigkill_child() {
    let Ok(dir) = std::env::var("GRAVITON_CRASH_DIR") else {
        return;
    };
    let round: u64 = std::env::var("GRAVITON_CRASH_ROUND")
        .expect("round")
        .parse()
        .expect("number");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(async move {
        let engine = Engine::open(config(Path::new(&dir))).expect("open");
        println!("READY");
        let compactor = engine.clone();
        tokio::spawn(async move {
            let mut rng = SimRng::new(round);
            loop {
                tokio::time::sleep(Duration::from_millis(10 + rng.below(100))).await;
                let report = compactor.compact().await.expect("compaction");
                println!("COMPACTED {}", report.blobs_moved);
            }
        });
        let mut tasks = Vec::new();
        for worker in 0..WORKERS {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = SimRng::new(round * 1000 + worker);
                let mut mine: Vec<BlobKey> = Vec::new();
                for sequence in 0.. {
                    if !mine.is_empty() && rng.below(5) == 0 {
                        let key = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        println!("DELETING {key}");
                        engine.delete(&key).await.expect("delete");
                        println!("DELETED {key}");
                        continue;
                    }
                    let data = content(round, worker, sequence);
                    println!("UPLOADING {round} {worker} {sequence}");
                    let mut upload = engine
                        .upload(Some(data.len() as u64), BTreeMap::new())
                        .await
                        .expect("upload");
                    let mut at = 0;
                    while at < data.len() {
                        let take = (rng.below(200_000) as usize + 1).min(data.len() - at);
                        upload
                            .write(Bytes::copy_from_slice(&data[at..at + take]))
                            .await
                            .expect("write");
                        at += take;
                    }
                    let meta = upload.complete(None).await.expect("complete");
                    println!("ACK {round} {worker} {sequence} {}", meta.key);
                    mine.push(meta.key);
                }
            }));
        }
        for task in tasks {
            task.await.expect("worker");
        }
    });
}

/// What the children were told, across rounds.
#[derive(Default)]
struct Told {
    /// Acknowledged and not deleted since: key → (round, worker, sequence).
    present: BTreeMap<BlobKey, (u64, u64, u64)>,
    /// Acknowledged deleted.
    deleted: BTreeSet<BlobKey>,
    /// Deletes started but not acknowledged: either outcome is right.
    maybe_deleted: BTreeSet<BlobKey>,
    /// Uploads started but not acknowledged: (round, worker, sequence).
    in_flight: Vec<(u64, u64, u64)>,
    /// Blobs the children's completed compaction passes moved.
    moved: u64,
}

fn run_child(dir: &Path, round: u64, told: &mut Told, kill_after: Duration) -> usize {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "sigkill_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GRAVITON_CRASH_DIR", dir)
        .env("GRAVITON_CRASH_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // Wait for the engine to be open, then let it work for `kill_after`.
    let mut lines = Vec::new();
    loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child did not start");
        if line.ends_with("READY") {
            break;
        }
    }
    let start = Instant::now();
    while start.elapsed() < kill_after {
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(5)) {
            lines.push(line);
        }
    }
    child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the child must have been killed");
    reader.join().expect("reader");
    lines.extend(lines_rx.try_iter());

    let mut acknowledged = 0;
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["UPLOADING", r, w, s] => {
                told.in_flight
                    .push((r.parse().unwrap(), w.parse().unwrap(), s.parse().unwrap()))
            }
            ["ACK", r, w, s, key] => {
                let id = (r.parse().unwrap(), w.parse().unwrap(), s.parse().unwrap());
                told.in_flight.retain(|x| *x != id);
                told.present
                    .insert(BlobKey::from_hex(key).expect("hex"), id);
                acknowledged += 1;
            }
            ["DELETING", key] => {
                told.maybe_deleted
                    .insert(BlobKey::from_hex(key).expect("hex"));
            }
            ["DELETED", key] => {
                let key = BlobKey::from_hex(key).expect("hex");
                told.maybe_deleted.remove(&key);
                told.present.remove(&key);
                told.deleted.insert(key);
            }
            ["COMPACTED", moved] => {
                told.moved += moved.parse::<u64>().unwrap();
            }
            _ => {}
        }
    }
    acknowledged
}

fn verify(dir: &Path, told: &mut Told, round: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(async {
        let engine = Engine::open(config(dir)).expect("reopen after SIGKILL");
        let mut listed = BTreeSet::new();
        let mut after = None;
        loop {
            let page = engine
                .list(ListQuery {
                    start_after: after,
                    prefix: Vec::new(),
                    limit: 500,
                })
                .await
                .expect("list");
            let Some(last) = page.last() else { break };
            after = Some(last.key);
            listed.extend(page.into_iter().map(|m| m.key));
        }
        for (key, &(r, w, s)) in &told.present {
            if told.maybe_deleted.contains(key) {
                continue;
            }
            assert!(
                listed.contains(key),
                "round {round}: acknowledged blob {key} ({r} {w} {s}) lost"
            );
            let bytes = read_all(&engine, key)
                .await
                .expect("read acknowledged blob");
            assert!(
                bytes == content(r, w, s),
                "round {round}: blob {key} has other bytes"
            );
        }
        let possible: BTreeMap<BlobKey, (u64, u64, u64)> = told
            .in_flight
            .iter()
            .map(|&(r, w, s)| (BlobKey::of(&content(r, w, s)), (r, w, s)))
            .collect();
        for key in &listed {
            if told.present.contains_key(key) || told.maybe_deleted.contains(key) {
                continue;
            }
            assert!(
                !told.deleted.contains(key),
                "round {round}: deleted blob {key} came back"
            );
            let Some(&(r, w, s)) = possible.get(key) else {
                panic!("round {round}: blob {key} is visible but no upload of it was in flight");
            };
            let bytes = read_all(&engine, key).await.expect("read in-flight blob");
            assert!(
                bytes == content(r, w, s),
                "round {round}: in-flight blob {key} has other bytes"
            );
            // It survived: from now on it must stay.
            told.present.insert(*key, (r, w, s));
        }
        // Resolve what was in doubt, as the store now says.
        for key in std::mem::take(&mut told.maybe_deleted) {
            if listed.contains(&key) {
                told.deleted.remove(&key);
            } else {
                told.present.remove(&key);
                told.deleted.insert(key);
            }
        }
        told.in_flight.clear();
        engine.shutdown().await.expect("shutdown");
    });
}

#[test]
fn sigkill_loses_no_acknowledged_blob() {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sigkill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut told = Told::default();
    let mut rng = SimRng::new(std::process::id() as u64);
    let mut acknowledged = 0;
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(300 + rng.below(1500));
        acknowledged += run_child(&dir, round, &mut told, kill_after);
        verify(&dir, &mut told, round);
    }
    println!(
        "{acknowledged} uploads acknowledged over {ROUNDS} SIGKILLs; {} blobs stored, {} deleted, {} moved by compaction",
        told.present.len(),
        told.deleted.len(),
        told.moved
    );
    assert!(
        acknowledged > 0,
        "the children acknowledged nothing: the test tested nothing"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}
