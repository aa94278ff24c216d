//! Compaction keeps the segments it empties as *free segments* and the next segments
//! reuse them (src/engine/segments.rs), instead of freeing their blocks and allocating
//! new ones. These tests pin down on a real data directory that this never costs a
//! reader its bytes, that at most `free_segments_max` are kept, and that free segments
//! are found again after a reopen.

mod common;

use std::path::Path;

use graviton::engine::EngineConfig;

use common::{put, random, read_all, test_dir};

const MIB: usize = 1 << 20;

fn config(dir: &Path, segment_mib: u64, free_segments_max: usize) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = 1; // every upload is written by shard 0, into shard-000/
    config.pin_cores = false;
    config.segment_bytes = segment_mib << 20;
    config.compaction_interval = None;
    config.compaction_bytes_per_sec = None;
    config.free_segments_max = free_segments_max;
    config
}

/// Names in the shard's directory that start with `prefix`.
fn files(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("shard-000"))
        .expect("shard dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// A download open while compaction moves its blob keeps reading the blob's old
/// segment. That segment must not be recycled: new blobs written into it would replace
/// the bytes the download has yet to read. Then, with no read open, emptied segments
/// are recycled and reused. Here the shard that reads is the one that compacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_open_across_compaction_keeps_its_bytes_and_idle_segments_are_recycled() {
    read_open_across_compaction(1).await;
}

/// The same with two shards, where the blob's owner, which reads it, is not the shard
/// that wrote its segment and compacts it: the owner's open read must be asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_shards_open_read_keeps_its_bytes_too() {
    read_open_across_compaction(2).await;
}

async fn read_open_across_compaction(shards: usize) {
    let dir = test_dir("engine-recycle", &format!("open-read-{shards}"));
    let mut config = config(&dir, 16, 4);
    config.shards = shards; // idle, uploads go to the first shard: all land in shard-000/
    config.read_channel_depth = 1;
    config.compaction_live_ratio = 1.0; // compact every sealed segment
    let engine = common::open_engine(config).await;

    let mut seed = 0;
    let (big, big_key) = loop {
        // with two shards, a blob that shard 1 owns (the others are dead space)
        seed += 1;
        let big = random(12 * MIB, seed);
        let key = put(&engine, &big).await;
        if key.owner(shards) == shards - 1 {
            break (big, key);
        }
        engine.delete(&key).await.expect("delete");
    };
    engine.rotate().await.expect("seal");
    let mut read = engine.get(&big_key, None).await.expect("get");
    let mut received = read
        .next_chunk()
        .await
        .expect("a first piece")
        .expect("read")
        .to_vec();

    let report = engine.compact().await.expect("compact");
    assert!(
        report.blobs_moved >= 1 && report.segments_removed >= 1,
        "{report:?}"
    );
    // New blobs fill new segments: a recycled one would be the old segment's file.
    let mut others = Vec::new();
    for seed in 0..40 {
        let content = random(MIB, 100 + seed);
        others.push((put(&engine, &content).await, content));
    }
    while let Some(piece) = read.next_chunk().await {
        received.extend_from_slice(&piece.expect("the open read goes on"));
    }
    assert!(received == big, "the open read returned other bytes");
    drop(read);

    // No read is open now: the next emptied segments are kept, and reused.
    for (key, _) in others.drain(..30) {
        engine.delete(&key).await.expect("delete");
    }
    engine.rotate().await.expect("seal");
    let report = engine.compact().await.expect("compact");
    assert!(report.segments_removed >= 2, "{report:?}");
    let free = files(&dir, "free-");
    assert!(!free.is_empty(), "emptied segments were kept");
    let segments_before = files(&dir, "seg-").len();
    for seed in 0..20 {
        let content = random(MIB, 200 + seed);
        others.push((put(&engine, &content).await, content));
    }
    assert!(
        files(&dir, "free-").len() < free.len(),
        "new segments reused free ones: {:?} -> {:?}",
        free,
        files(&dir, "free-")
    );
    assert!(files(&dir, "seg-").len() > segments_before);
    assert_eq!(read_all(&engine, &big_key).await.expect("big"), big);
    for (key, content) in &others {
        assert!(
            read_all(&engine, key).await.expect("read") == *content,
            "{key}"
        );
    }
    engine.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

/// At most `free_segments_max` emptied segments are kept; a reopen finds them and
/// reuses them, and a reopen with a lower limit removes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_the_limit_is_kept_and_a_reopen_finds_them() {
    let dir = test_dir("engine-recycle", "limit");
    let engine = common::open_engine(config(&dir, 4, 2)).await;
    let mut keys = Vec::new();
    for seed in 0..20 {
        keys.push(put(&engine, &random(MIB, 300 + seed)).await);
    }
    engine.rotate().await.expect("seal");
    for key in &keys {
        engine.delete(key).await.expect("delete");
    }
    let report = engine.compact().await.expect("compact");
    assert!(report.segments_removed >= 4, "{report:?}");
    assert_eq!(files(&dir, "free-").len(), 2, "kept up to the limit");
    assert_eq!(files(&dir, "space-reserve").len(), 1);
    engine.shutdown().await.expect("shutdown");

    let engine = common::open_engine(config(&dir, 4, 2)).await;
    assert_eq!(files(&dir, "free-").len(), 2, "found again at open");
    let content = random(MIB, 400);
    let key = put(&engine, &content).await;
    assert_eq!(files(&dir, "free-").len(), 1, "the next segment reused one");
    engine.shutdown().await.expect("shutdown");

    let engine = common::open_engine(config(&dir, 4, 0)).await;
    assert!(
        files(&dir, "free-").is_empty(),
        "removed beyond the new limit"
    );
    assert_eq!(read_all(&engine, &key).await.expect("read"), content);
    engine.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}
