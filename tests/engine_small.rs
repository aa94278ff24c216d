//! The small-blob path of the engine on a real data directory: uploads of at most
//! `small_blob_bytes` are held by the `Upload` and stored by their owner with a group
//! write (src/engine/small.rs). These tests pin down that this path keeps every promise
//! of the streamed one: exact bytes, size and hash checks that store nothing,
//! deduplication, durability across a reopen, and the switch to a stream when an
//! upload of undeclared size outgrows the limit.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use graviton::engine::{BlobKey, Engine, EngineConfig, Error, CONTENT_TYPE};

const SMALL: u64 = 64 * 1024;

use common::{random, read_all, test_dir};

fn open(dir: &Path) -> impl std::future::Future<Output = Engine> {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.pin_cores = false;
    config.small_blob_bytes = SMALL;
    common::open_engine(config)
}

/// Uploads `content` in chunks of `chunk` bytes.
async fn put(
    engine: &Engine,
    content: &[u8],
    declared: Option<u64>,
    chunk: usize,
    expected: Option<BlobKey>,
) -> Result<graviton::engine::BlobMeta, Error> {
    let mut attributes = BTreeMap::new();
    attributes.insert(CONTENT_TYPE.to_string(), "application/x-test".to_string());
    let mut upload = engine.upload(declared, attributes).await?;
    for piece in content.chunks(chunk.max(1)) {
        upload.write(Bytes::copy_from_slice(piece)).await?;
    }
    upload.complete(expected).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_blobs_round_trip_and_survive_a_reopen() {
    let dir = test_dir("engine-small", "round-trip");
    let engine = open(&dir).await;
    // Sizes around the CRC chunk and the alignment, the empty blob, and the limit itself.
    let sizes = [0usize, 1, 4095, 4096, 4097, 65_532, 65_535, SMALL as usize];
    let mut stored = Vec::new();
    for (seed, &size) in sizes.iter().enumerate() {
        let content = random(size, seed as u64);
        let declared = (seed % 2 == 0).then_some(size as u64);
        let meta = put(
            &engine,
            &content,
            declared,
            1000,
            Some(BlobKey::of(&content)),
        )
        .await
        .unwrap_or_else(|e| panic!("put of {size} bytes: {e}"));
        assert_eq!(meta.key, BlobKey::of(&content));
        assert_eq!(meta.size_bytes, size as u64);
        assert_eq!(
            meta.attributes.get(CONTENT_TYPE).map(String::as_str),
            Some("application/x-test")
        );
        assert_eq!(read_all(&engine, &meta.key).await.unwrap(), content);
        stored.push((meta.key, content));
    }
    engine.shutdown().await.unwrap();
    let engine = open(&dir).await;
    for (key, content) in &stored {
        assert_eq!(
            &read_all(&engine, key).await.unwrap(),
            content,
            "{key} after reopen"
        );
    }
    engine.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_hash_or_size_stores_nothing() {
    let dir = test_dir("engine-small", "refusals");
    let engine = open(&dir).await;
    let content = random(4096, 7);
    let key = BlobKey::of(&content);

    let wrong = BlobKey::of(b"something else");
    match put(&engine, &content, None, 4096, Some(wrong)).await {
        Err(Error::HashMismatch { expected, actual }) => {
            assert_eq!((expected, actual), (wrong, key));
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    match put(&engine, &content, Some(5000), 4096, None).await {
        Err(Error::SizeMismatch { declared, received }) => {
            assert_eq!((declared, received), (5000, 4096));
        }
        other => panic!("expected a size mismatch, got {other:?}"),
    }
    assert!(matches!(engine.stat(&key).await, Err(Error::NotFound(_))));
    assert!(matches!(
        put(&engine, &content, Some(100), 4096, None).await,
        Err(Error::SizeMismatch { .. })
    ));
    assert!(matches!(engine.stat(&key).await, Err(Error::NotFound(_))));
    engine.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_small_content_is_stored_once() {
    let dir = test_dir("engine-small", "dedup");
    let engine = open(&dir).await;
    let content = random(10_000, 3);
    let first = put(&engine, &content, None, 10_000, None).await.unwrap();
    // Concurrent uploads of the same content all succeed with the first one's metadata
    // or a simultaneous one's; afterwards there is one blob.
    let engine = Arc::new(engine);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (engine, content) = (engine.clone(), content.clone());
        tasks.push(tokio::spawn(async move {
            put(&engine, &content, Some(10_000), 3000, None).await
        }));
    }
    for task in tasks {
        let meta = task.await.unwrap().unwrap();
        assert_eq!(meta.key, first.key);
        assert_eq!(
            meta.created_unix_ns, first.created_unix_ns,
            "answered from the index"
        );
    }
    let listed = common::list_first(&engine, 100).await;
    assert_eq!(listed.len(), 1);
    engine.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_upload_that_outgrows_the_limit_becomes_a_stream() {
    let dir = test_dir("engine-small", "outgrow");
    let engine = open(&dir).await;
    // Held for the first 64 KiB, then streamed with what was held.
    for (seed, size) in [(1, SMALL as usize + 1), (2, 3 * 1024 * 1024 + 17)] {
        let content = random(size, seed);
        let meta = put(&engine, &content, None, 7000, None).await.unwrap();
        assert_eq!(meta.key, BlobKey::of(&content));
        assert_eq!(read_all(&engine, &meta.key).await.unwrap(), content);
    }
    // Many tiny chunks: held ones are joined, the content is still exact.
    let content = random(50_000, 9);
    let meta = put(&engine, &content, None, 7, None).await.unwrap();
    assert_eq!(read_all(&engine, &meta.key).await.unwrap(), content);
    engine.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_small_puts_share_group_writes_and_all_land() {
    let dir = test_dir("engine-small", "concurrent");
    let engine = Arc::new(open(&dir).await);
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for seed in 0..2000u64 {
        let (engine, permits) = (engine.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire().await.unwrap();
            let content = random(1 + (seed as usize * 997) % 20_000, 1000 + seed);
            let meta = put(&engine, &content, Some(content.len() as u64), 4096, None)
                .await
                .unwrap();
            (meta.key, content)
        }));
    }
    let mut stored = Vec::new();
    for task in tasks {
        stored.push(task.await.unwrap());
    }
    engine.shutdown().await.unwrap();
    let engine = open(&dir).await;
    for (key, content) in &stored {
        assert_eq!(&read_all(&engine, key).await.unwrap(), content);
    }
    engine.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A blob of at most one CRC chunk keeps its CRC in its record (format kind 6): its
/// stream is its data padded to 4 KiB, so 4 KiB blobs written one after another lie in
/// consecutive 4 KiB blocks. The CRC still guards them: a damaged block is an error on
/// read, never wrong bytes, and its neighbours read back exactly, also after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_kib_blob_takes_one_block_and_damage_to_it_is_caught() {
    let dir = test_dir("engine-small", "one-block");
    let mut config = EngineConfig::new(&dir);
    config.shards = 1;
    config.pin_cores = false;
    config.segment_bytes = 4 << 20;
    config.compaction_interval = None;
    let engine = common::open_engine(config.clone()).await;
    let contents: Vec<Vec<u8>> = (0..8).map(|seed| random(4096, 100 + seed)).collect();
    let mut keys = Vec::new();
    for content in &contents {
        keys.push(
            put(&engine, content, Some(4096), 4096, None)
                .await
                .expect("put")
                .key,
        );
    }
    engine.shutdown().await.expect("shutdown");
    drop(engine);

    let shard_dir = dir.join("shard-000");
    let segment = std::fs::read_dir(&shard_dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "dat"))
        .expect("a segment");
    let mut image = std::fs::read(&segment).expect("read the segment");
    let offsets: Vec<usize> = contents
        .iter()
        .map(|content| {
            (0..image.len() / 4096)
                .map(|block| block * 4096)
                .find(|&at| image[at..at + 4096] == content[..])
                .expect("each blob's bytes are in the segment, block-aligned")
        })
        .collect();
    for pair in offsets.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 4096,
            "one block per 4 KiB blob: {offsets:?}"
        );
    }

    image[offsets[3] + 1000] ^= 0x20;
    std::fs::write(&segment, &image).expect("damage one block");
    let engine = common::open_engine(config).await;
    for (i, (key, content)) in keys.iter().zip(&contents).enumerate() {
        let read = read_all(&engine, key).await;
        if i == 3 {
            assert!(
                matches!(read, Err(Error::Corrupt { .. })),
                "a damaged blob must fail its read, got {:?}",
                read.map(|b| b.len())
            );
        } else {
            assert_eq!(&read.expect("an undamaged neighbour reads"), content);
        }
    }
    engine.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Compaction moves blobs in batches (one segment sync and one group commit per batch):
/// a segment holding more blobs than a batch, small and large mixed, is compacted, and
/// every survivor reads back exactly, before and after a reopen; the deleted stay gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_moves_more_blobs_than_a_batch_and_they_survive_a_reopen() {
    let dir = test_dir("engine-small", "compact-batches");
    let mut config = EngineConfig::new(&dir);
    config.shards = 2;
    config.pin_cores = false;
    config.segment_bytes = 64 << 20;
    config.compaction_interval = None;
    config.compaction_bytes_per_sec = None;
    let engine = common::open_engine(config.clone()).await;
    let mut blobs = Vec::new();
    for seed in 0..1500u64 {
        let len = match seed % 100 {
            0 => 3 << 20,              // a few blobs of several 1 MiB units
            n if n % 7 == 0 => 70_000, // streamed, just over the small-blob limit
            _ => 1 + (seed as usize * 997) % 8192,
        };
        let content = random(len, 10_000 + seed);
        let meta = put(&engine, &content, Some(len as u64), 65_536, None)
            .await
            .expect("put");
        blobs.push((meta.key, content));
    }
    engine.rotate().await.expect("seal the segments");
    let (deleted, kept): (Vec<_>, Vec<_>) =
        blobs.into_iter().enumerate().partition(|(i, _)| i % 3 != 0);
    for (_, (key, _)) in &deleted {
        engine.delete(key).await.expect("delete");
    }
    let report = engine.compact().await.expect("compact");
    assert!(
        report.segments_removed > 0 && report.blobs_moved > 256,
        "more blobs than one batch were moved: {report:?}"
    );
    for reopened in [false, true] {
        let engine = if reopened {
            engine.shutdown().await.expect("shutdown");
            common::open_engine(config.clone()).await
        } else {
            engine.clone()
        };
        for (_, (key, content)) in &kept {
            let read = read_all(&engine, key).await.expect("a survivor reads");
            assert!(read == *content, "{key} changed (reopened: {reopened})");
        }
        let deleted_keys: Vec<BlobKey> = deleted.iter().map(|(_, (key, _))| *key).collect();
        let found = engine.stat_many(&deleted_keys).await.expect("stat");
        assert!(found.iter().all(Option::is_none), "a deleted blob is back");
        if reopened {
            engine.shutdown().await.expect("shutdown");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
