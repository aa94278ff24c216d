//! The journal's spare file on a real data directory: the next journal is created and
//! zero-filled in the background before its rotation, under the next generation's name
//! but without a header. These tests pin down that a rotation takes it, that a new spare
//! follows, and that a store left with an unfinished spare (a shutdown or crash before
//! the rotation that would have used it) reopens with every blob.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use graviton::engine::{BlobKey, Engine, EngineConfig};

use common::{read_all, test_dir};

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = 1;
    config.pin_cores = false;
    config.journal_bytes = 1 << 20;
    config.compaction_interval = None;
    config
}

async fn put(engine: &Engine, content: &[u8]) -> BlobKey {
    let mut upload = engine
        .upload(Some(content.len() as u64), BTreeMap::new())
        .await
        .expect("upload");
    upload
        .write(Bytes::copy_from_slice(content))
        .await
        .expect("write");
    upload.complete(None).await.expect("complete").key
}

/// Generations of the journal files in the shard's directory, in order.
fn journals(dir: &Path) -> Vec<u64> {
    let mut found: Vec<u64> = std::fs::read_dir(dir.join("shard-000"))
        .expect("list")
        .filter_map(|entry| {
            let name = entry.expect("entry").file_name().into_string().ok()?;
            let hex = name.strip_prefix("journal-")?.strip_suffix(".log")?;
            u64::from_str_radix(hex, 16).ok()
        })
        .collect();
    found.sort_unstable();
    found
}

/// Waits until a journal file newer than `than` exists (the spare); returns it.
async fn spare_after(dir: &Path, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(&newest) = journals(dir).last() {
            if newest > than {
                return newest;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no spare journal after {than}: {:?}",
            journals(dir)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_takes_the_spare_and_an_unfinished_spare_reopens_cleanly() {
    let dir = test_dir("engine-journal", "spare");
    let engine = common::open_engine(config(&dir)).await;
    let first = put(&engine, b"before the rotation").await;
    let active = *journals(&dir).first().expect("a journal");
    let spare = spare_after(&dir, active).await;
    assert_eq!(spare, active + 1, "the spare is the next generation");

    engine.rotate().await.expect("rotate");
    let second = put(&engine, b"after the rotation").await;
    // The spare became the active journal and a new spare follows it.
    let next_spare = spare_after(&dir, spare).await;
    assert_eq!(next_spare, spare + 1);
    engine.shutdown().await.expect("shutdown");
    drop(engine);
    assert!(
        journals(&dir).contains(&next_spare),
        "an unfinished spare is left behind: {:?}",
        journals(&dir)
    );

    // Reopening removes the unfinished spare (it holds no records) and rotates into its
    // generation; without that, creating the new journal would find the name taken.
    let engine = common::open_engine(config(&dir)).await;
    assert_eq!(
        read_all(&engine, &first).await.expect("first"),
        b"before the rotation"
    );
    assert_eq!(
        read_all(&engine, &second).await.expect("second"),
        b"after the rotation"
    );
    let third = put(&engine, b"after the reopen").await;
    engine.shutdown().await.expect("shutdown");
    drop(engine);
    let engine = common::open_engine(config(&dir)).await;
    for (key, content) in [
        (first, &b"before the rotation"[..]),
        (second, b"after the rotation"),
        (third, b"after the reopen"),
    ] {
        assert_eq!(read_all(&engine, &key).await.expect("read"), content);
    }
    engine.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}
