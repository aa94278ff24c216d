//! Helpers shared by the integration tests that run a real engine on disk. Each test
//! file is its own crate and includes this module with `mod common;`, so a helper one
//! file does not use is not dead code.
#![allow(dead_code)]

pub mod told;

use std::path::{Path, PathBuf};

use graviton::engine::{BlobKey, BlobMeta, Engine, EngineConfig, Error, ListQuery};

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

/// Opens an engine from a tokio task (opening blocks until every shard is ready).
pub async fn open_engine(config: EngineConfig) -> Engine {
    tokio::task::spawn_blocking(move || Engine::open(config))
        .await
        .expect("Engine::open panicked")
        .expect("open the engine")
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
