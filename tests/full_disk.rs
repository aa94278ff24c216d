//! A full disk, for real: the engine on a small ext4 file system (a loop-mounted image),
//! filled by uploads until the file system has no room.
//!
//! Checks what the engine issue and the contract promise of a full disk:
//! - the failing upload gets the distinct error ([`Error::NoSpace`]), and over gRPC
//!   `RESOURCE_EXHAUSTED`, not an internal error, and stores nothing;
//! - the shard is not poisoned: every blob stored before is still read back exactly,
//!   stats and listing answer;
//! - deletes still work on the full disk, compaction then gives the space back, and
//!   uploads succeed again;
//! - a restart on the full disk works, and after each restart the store is exactly
//!   what the clients were told.
//!
//! Mounting needs root and a loop device (`mount -o loop`, `mkfs.ext4`). Where they
//! are missing the test records why ([`common::report_skip`]; `scripts/test` prints it
//! after `cargo test`) and passes without testing. `scripts/test` runs as root on the
//! CI machines, where they are present.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use graviton::engine::{BlobKey, Engine, EngineConfig, Error};
use graviton::grpc::{serve, ServeOptions};
use graviton::proto::upload_message::Message;
use graviton::proto::upload_service_client::UploadServiceClient;
use graviton::proto::{CompleteUpload, StartUpload, UploadChunk, UploadMessage};
use graviton_io::sim::SimRng;
use tokio::sync::oneshot;
use tonic::Code;

use common::{list_first, read_all};

const MIB: usize = 1024 * 1024;

/// A small ext4 file system in an image file, mounted on a directory; unmounted and
/// removed when dropped.
struct LoopMount {
    image: PathBuf,
    dir: PathBuf,
}

impl LoopMount {
    /// `None` (with the reason printed) where mounting is not possible here.
    fn new(name: &str, size_mib: u64) -> Option<LoopMount> {
        let base = common::test_dir("full-disk", name);
        let image = base.join("fs.img");
        let dir = base.join("mnt");
        std::fs::create_dir_all(&dir).expect("mount point");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(size_mib << 20))
            .expect("image file");
        let run = |program: &str, args: &[&Path]| {
            Command::new(program)
                .args(args)
                .output()
                .map_err(|error| format!("{program}: {error}"))
                .and_then(|out| {
                    out.status.success().then_some(()).ok_or_else(|| {
                        format!("{program}: {}", String::from_utf8_lossy(&out.stderr).trim())
                    })
                })
        };
        let made = run("mkfs.ext4", &[Path::new("-q"), Path::new("-F"), &image])
            .and_then(|()| run("mount", &[Path::new("-o"), Path::new("loop"), &image, &dir]));
        match made {
            Ok(()) => Some(LoopMount { image, dir }),
            Err(why) => {
                common::report_skip(
                    &format!("full_disk::{name}"),
                    &format!("cannot mount a loop file system here: {why}"),
                );
                let _ = std::fs::remove_dir_all(base);
                None
            }
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        // Lazily: after a failed test the engine's threads may still hold files here.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        if let Some(base) = self.image.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.pin_cores = false;
    config.segment_bytes = 4 << 20;
    config.journal_bytes = 256 << 10;
    config.compaction_interval = None;
    config
}

fn random_bytes(rng: &mut SimRng, len: usize) -> Bytes {
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes);
    Bytes::from(bytes)
}

async fn upload(engine: &Engine, data: &Bytes) -> Result<BlobKey, Error> {
    let mut upload = engine
        .upload(Some(data.len() as u64), BTreeMap::new())
        .await?;
    for piece in data.chunks(256 * 1024) {
        upload.write(data.slice_ref(piece)).await?;
    }
    Ok(upload.complete(None).await?.key)
}

/// Checks that every blob in `stored` reads back exactly and is listed, and nothing else.
async fn check_store(engine: &Engine, stored: &BTreeMap<BlobKey, Bytes>) {
    for (key, data) in stored {
        let bytes = read_all(engine, key)
            .await
            .unwrap_or_else(|error| panic!("read {key} on the full disk: {error}"));
        assert!(bytes == data[..], "{key} reads back other bytes");
    }
    let listed: Vec<BlobKey> = list_first(engine, 10_000)
        .await
        .into_iter()
        .map(|meta| meta.key)
        .collect();
    assert_eq!(
        listed,
        stored.keys().copied().collect::<Vec<_>>(),
        "the listing is exactly the stored blobs"
    );
}

/// One upload of `len` random bytes through a real gRPC server over `engine`; the
/// status it ended with.
async fn grpc_upload_status(engine: Engine, rng: &mut SimRng, len: usize) -> Code {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, engine, ServeOptions::default(), async {
        let _ = stopped.await;
    }));
    let mut client = UploadServiceClient::connect(url).await.expect("connect");
    let data = random_bytes(rng, len);
    let messages = vec![
        UploadMessage {
            message: Some(Message::Start(StartUpload {
                total_size: len as i64,
                attributes: Default::default(),
            })),
        },
        UploadMessage {
            message: Some(Message::Chunk(UploadChunk { data, offset: 0 })),
        },
        UploadMessage {
            message: Some(Message::Complete(CompleteUpload::default())),
        },
    ];
    let code = match client.upload(tokio_stream::iter(messages)).await {
        Err(status) => status.code(),
        Ok(response) => {
            let mut acks = response.into_inner();
            loop {
                match acks.message().await {
                    Ok(Some(ack)) if ack.complete.is_some() => break Code::Ok,
                    Ok(Some(_)) => {}
                    Ok(None) => break Code::Unknown,
                    Err(status) => break status.code(),
                }
            }
        }
    };
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the server stops")
        .expect("serve did not panic")
        .expect("serve returned Ok");
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_uploads_and_keeps_serving() {
    let Some(mount) = LoopMount::new("fill", 48) else {
        return;
    };
    let data_dir = mount.dir.join("data");
    let mut rng = SimRng::new(std::process::id() as u64);
    let engine = common::open_engine(config(&data_dir)).await;

    // Fill it until the file system says no.
    let mut stored: BTreeMap<BlobKey, Bytes> = BTreeMap::new();
    let full = fill(&engine, &mut rng, &mut stored).await;
    assert!(stored.len() >= 10, "only {} blobs fit", stored.len());
    println!("full after {} blobs: {full}", stored.len());

    // Reads, stats and listing go on; the failed upload left nothing visible.
    check_store(&engine, &stored).await;
    let keys: Vec<BlobKey> = stored.keys().copied().collect();
    let stats = engine.stat_many(&keys).await.expect("stat on a full disk");
    assert!(stats.iter().all(Option::is_some));

    // Over gRPC the same refusal is RESOURCE_EXHAUSTED. The server shuts the engine
    // down when it stops, so it is then reopened: a restart on a full disk.
    let code = grpc_upload_status(engine, &mut rng, MIB).await;
    assert_eq!(code, Code::ResourceExhausted, "a full disk over gRPC");
    let engine = common::open_engine(config(&data_dir)).await;
    check_store(&engine, &stored).await;

    // Deletes work on the full disk; compaction gives the space back, and each shard
    // its reserve. Twice: the second time the disk fills, compaction needs the reserves
    // the first pass gave back.
    for round in 0..2 {
        if round > 0 {
            let full = fill(&engine, &mut rng, &mut stored).await;
            println!("full again with {} blobs: {full}", stored.len());
        }
        let keys: Vec<BlobKey> = stored.keys().copied().collect();
        for key in keys.iter().step_by(2) {
            engine
                .delete(key)
                .await
                .unwrap_or_else(|error| panic!("delete {key} on a full disk: {error}"));
            stored.remove(key);
        }
        let report = engine.compact().await.expect("compaction on a full disk");
        assert!(
            report.segments_removed > 0,
            "round {round}: compaction freed nothing: {report:?}"
        );
        assert_reserves(&data_dir);
        check_store(&engine, &stored).await;
        for _ in 0..3 {
            let data = random_bytes(&mut rng, MIB);
            let key = upload(&engine, &data)
                .await
                .unwrap_or_else(|error| panic!("upload after space was freed: {error}"));
            stored.insert(key, data);
        }
        check_store(&engine, &stored).await;
    }
    engine.shutdown().await.expect("shutdown");

    // A restart finds exactly what the clients were told, and with space free again,
    // every shard holds its space reserve for the next time the disk fills.
    let engine = common::open_engine(config(&data_dir)).await;
    check_store(&engine, &stored).await;
    assert_reserves(&data_dir);
    engine.shutdown().await.expect("shutdown");
    drop(mount);
}

/// Uploads 1 MiB blobs (and a few small ones) into `stored` until the file system says
/// no four times in a row (uploads go to either shard, and one may still have room);
/// returns the last refusal, which must be [`Error::NoSpace`].
async fn fill(engine: &Engine, rng: &mut SimRng, stored: &mut BTreeMap<BlobKey, Bytes>) -> Error {
    let mut refusals = 0;
    let mut full = None;
    let mut added = 0;
    while refusals < 4 {
        assert!(added < 200, "48 MiB cannot hold 200 MiB of blobs");
        let len = if added % 5 == 4 { 3000 } else { MIB };
        let data = random_bytes(rng, len);
        match upload(engine, &data).await {
            Ok(key) => {
                stored.insert(key, data);
                added += 1;
                refusals = 0;
            }
            Err(error) => {
                assert!(
                    matches!(error, Error::NoSpace { .. }),
                    "a full disk is told apart from a fault: {error}"
                );
                refusals += 1;
                full = Some(error);
            }
        }
    }
    full.expect("refused")
}

/// Every shard holds its space reserve, for the next time the disk fills.
fn assert_reserves(data_dir: &Path) {
    for shard in ["shard-000", "shard-001"] {
        let reserve = data_dir
            .join(shard)
            .join(graviton::engine::format::RESERVE_FILE);
        assert!(reserve.exists(), "{} is missing", reserve.display());
    }
}
