//! Helpers shared by the integration tests that run a real engine on disk. Each test
//! file is its own crate and includes this module with `mod common;`, so a helper one
//! file does not use is not dead code.
#![allow(dead_code)]

pub mod told;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use graviton::engine::{BlobKey, BlobMeta, Engine, EngineConfig, Error, ListQuery};
use rand::{RngCore, SeedableRng};

/// A fresh, empty directory for one test, on the target directory's file system (not
/// /tmp, which may be tmpfs and has no O_DIRECT).
pub fn test_dir(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

/// Where tests that cannot run here say so; `scripts/test` prints the file after
/// `cargo test`, which hides a passing test's output, so a skip shows in CI's log.
pub const SKIPPED_FILE: &str = "skipped-tests.txt";

/// Records that `test` passed without testing, and why: on stderr, and as a line of
/// [`SKIPPED_FILE`] in the target directory's temporary directory.
pub fn report_skip(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("{test}: SKIPPED: {why}");
    eprintln!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(SKIPPED_FILE);
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{line}"));
    if let Err(error) = appended {
        eprintln!("could not record the skip in {}: {error}", path.display());
    }
}

/// Opens an engine from a tokio task (opening blocks until every shard is ready).
pub async fn open_engine(config: EngineConfig) -> Engine {
    tokio::task::spawn_blocking(move || Engine::open(config))
        .await
        .expect("Engine::open panicked")
        .expect("open the engine")
}

/// `len` random bytes, the same for the same `seed`.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// Stores `content` (its size declared, no attributes), sent in 1 MiB chunks; its key.
pub async fn put(engine: &Engine, content: &[u8]) -> BlobKey {
    let mut upload = engine
        .upload(Some(content.len() as u64), BTreeMap::new())
        .await
        .expect("upload");
    for piece in content.chunks(1 << 20) {
        upload
            .write(Bytes::copy_from_slice(piece))
            .await
            .expect("write");
    }
    upload.complete(None).await.expect("complete").key
}

/// The whole blob, read through the engine.
pub async fn read_all(engine: &Engine, key: &BlobKey) -> Result<Vec<u8>, Error> {
    let mut read = engine.get(key, None).await?;
    let mut bytes = Vec::new();
    while let Some(piece) = read.next_chunk().await {
        bytes.extend_from_slice(&piece?);
    }
    Ok(bytes)
}

/// The first `limit` blobs' metadata, in key order.
pub async fn list_first(engine: &Engine, limit: usize) -> Vec<BlobMeta> {
    engine
        .list(ListQuery {
            limit,
            ..Default::default()
        })
        .await
        .expect("list")
}

/// Every stored key, through listing in pages of `page` (small pages cross the shards'
/// merge many times); panics if the listing is ever out of key order or repeats a key.
pub async fn list_keys(engine: &Engine, page: usize) -> Vec<BlobKey> {
    let mut keys: Vec<BlobKey> = Vec::new();
    loop {
        let listed = engine
            .list(ListQuery {
                start_after: keys.last().copied(),
                prefix: Vec::new(),
                limit: page,
            })
            .await
            .expect("list");
        if listed.is_empty() {
            return keys;
        }
        for meta in &listed {
            assert!(
                keys.last().is_none_or(|last| *last < meta.key),
                "listing out of order"
            );
            keys.push(meta.key);
        }
    }
}
