//! Large reads on a real data directory, sharing one shard's read pool.
//!
//! A stream of a large blob keeps a guaranteed number of reads in flight, waiting for
//! pool buffers like every other stream, and reads deeper only with buffers free at once
//! while more than half the pool is free (`read_ahead` in src/engine/shard.rs). This
//! test pins down that deep streams, streams waiting for buffers and a reader that
//! stops taking its stream, all on one small pool, return each reader its exact bytes
//! in order.

mod common;

use std::path::Path;

use futures::future::join_all;
use graviton::engine::{BlobKey, ByteRange, Engine, EngineConfig};

use common::{put, random, read_all, test_dir};

const MIB: usize = 1 << 20;

/// A pool this small is mostly taken by one deep stream, so the others wait.
const READ_BUFFERS: usize = 16;

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = 1; // every read shares shard 0's pool
    config.pin_cores = false;
    config.segment_bytes = 16 << 20; // the larger blobs span two segments
    config.compaction_interval = None;
    config.read_buffers = READ_BUFFERS;
    config
}

/// `[offset, offset + length)` of a blob, read through the engine.
async fn read_range(engine: &Engine, key: &BlobKey, offset: u64, length: u64) -> Vec<u8> {
    let range = ByteRange {
        offset,
        length: Some(length),
    };
    let mut read = engine.get(key, Some(range)).await.expect("open the range");
    let mut bytes = Vec::new();
    while let Some(piece) = read.next_chunk().await {
        bytes.extend_from_slice(&piece.expect("piece"));
    }
    bytes
}

/// Four readers of whole blobs and four of long ranges at once, on a pool of
/// [`READ_BUFFERS`], while a fifth reader holds what it took after its first piece: that one
/// went deep, the others wait for buffers they give each other back. Then each blob
/// read alone, deep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_reads_on_a_small_pool_return_exact_bytes() {
    let dir = test_dir("engine-reads", "small-pool");
    let engine = common::open_engine(config(&dir)).await;
    let mut blobs = Vec::new();
    for seed in 0..5u64 {
        // Not a whole number of units or chunks, so the last piece is short.
        let content = random(20 * MIB + 4099 * seed as usize + 1, seed);
        let key = put(&engine, &content).await;
        blobs.push((content, key));
    }

    let mut stalled = engine.get(&blobs[4].1, None).await.expect("open");
    let first = stalled.next_chunk().await.expect("a piece").expect("read");
    assert_eq!(first[..], blobs[4].0[..first.len()]);

    let whole = blobs[..4].iter().map(|(content, key)| {
        let engine = engine.clone();
        async move {
            let read = read_all(&engine, key).await.expect("read");
            assert!(read == *content, "a whole read returned other bytes");
        }
    });
    let ranges = blobs[..4].iter().enumerate().map(|(n, (content, key))| {
        let engine = engine.clone();
        // From inside a chunk, across units and the segment boundary.
        let (offset, length) = (3 * MIB + 1000 * n + 7, 14 * MIB + 12_345);
        async move {
            let read = read_range(&engine, key, offset as u64, length as u64).await;
            assert!(
                read == content[offset..offset + length],
                "a ranged read returned other bytes"
            );
        }
    });
    futures::join!(join_all(whole), join_all(ranges));

    // The reader that stopped still gets the rest of its blob, exactly.
    let mut rest = first.to_vec();
    while let Some(piece) = stalled.next_chunk().await {
        rest.extend_from_slice(&piece.expect("piece"));
    }
    assert!(rest == blobs[4].0, "the stalled read returned other bytes");

    // Each alone, on an idle pool: every stream goes deep.
    for (content, key) in &blobs {
        let read = read_all(&engine, key).await.expect("read");
        assert!(read == *content, "a read alone returned other bytes");
    }

    engine.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}
