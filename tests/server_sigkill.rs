//! Real-process crash test of the server.
//!
//! The `graviton` binary serves a data directory on 127.0.0.1 (real gRPC, real files,
//! O_DIRECT, io_uring where available). Clients in this test upload and delete over
//! gRPC, concurrently, and note what the server answered. The server is killed with
//! SIGKILL at a random moment, started again on the same directory, and checked over
//! gRPC:
//! - every upload whose final ack the client received is there, byte for byte;
//! - every delete the server answered took effect;
//! - nothing else is visible but blobs whose upload was in flight at the kill, and
//!   those are exact.
//!
//! The restarted server takes the next round's clients; after the last round it must
//! stop cleanly on SIGTERM. Content is derived from (round, worker, sequence) by a
//! seeded generator; the test prints its seed, and `GRAVITON_TEST_SEED` replays one
//! (the kill instants, not the scheduling).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graviton::client::Client;
use graviton::engine::BlobKey;
use graviton_io::sim::SimRng;

use common::told::{content, Told};

const WORKERS: u64 = 6;
const ROUNDS: u64 = 3;

/// A running `graviton serve`, and the address it took.
struct Server {
    child: Child,
    url: String,
    /// Drains the server's log so that it never blocks on a full pipe.
    log: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_graviton"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--shards",
                "2",
                "--no-pin",
            ])
            .arg("--data-dir")
            .arg(dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start graviton serve");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let address = loop {
            let line = lines
                .next()
                .expect("the server exited before it was serving")
                .expect("read the server's log");
            if line.contains("serving gRPC") {
                break address_in(&line).expect("an address in the 'serving gRPC' line");
            }
        };
        let log = std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Server {
            child,
            url: format!("http://{address}"),
            log: Some(log),
        }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
        let status = self.child.wait().expect("wait");
        assert!(!status.success(), "the server must have been killed");
        self.log.take().map(|log| log.join());
    }

    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.expect("run kill").success(), "SIGTERM sent");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "a clean exit on SIGTERM: {status}");
        self.log.take().map(|log| log.join());
    }
}

/// The `address=` field of a log line, without any terminal colour codes.
fn address_in(line: &str) -> Option<String> {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm'); // skip an escape sequence
        } else {
            plain.push(c);
        }
    }
    let at = plain.find("address=")? + "address=".len();
    let address: String = plain[at..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    Some(address)
}

/// One client: uploads, and deletes some of its own blobs, until the server is gone.
async fn worker(url: String, round: u64, worker: u64, told: Arc<Mutex<Told>>) {
    let Ok(mut client) = Client::connect(&url, None).await else {
        return;
    };
    let mut rng = SimRng::new(round * 1000 + worker);
    let mut mine: Vec<BlobKey> = Vec::new();
    for sequence in 0.. {
        if !mine.is_empty() && rng.below(5) == 0 {
            let key = mine.swap_remove(rng.below(mine.len() as u64) as usize);
            told.lock().unwrap().deleting(key);
            if client.delete(&key).await.is_err() {
                return; // the server was killed; the delete's fate is unknown
            }
            told.lock().unwrap().deleted(key);
            continue;
        }
        let id = (round, worker, sequence);
        let data = content(id);
        let size = data.len() as u64;
        told.lock().unwrap().uploading(id);
        let Ok(meta) = client
            .put(Cursor::new(data), Some(size), BTreeMap::new())
            .await
        else {
            return; // the server was killed; the upload stays in flight
        };
        let key = BlobKey::from_slice(&meta.key).expect("a 32-byte key");
        told.lock().unwrap().uploaded(id, key);
        mine.push(key);
    }
}

async fn list_all(client: &mut Client) -> BTreeSet<BlobKey> {
    let mut listed = BTreeSet::new();
    let mut after: Option<BlobKey> = None;
    loop {
        let page = client
            .list(after.as_ref(), &[], 500)
            .await
            .expect("list after the restart");
        let Some(last) = page.last() else {
            return listed;
        };
        after = Some(BlobKey::from_slice(&last.key).expect("key"));
        listed.extend(
            page.iter()
                .map(|m| BlobKey::from_slice(&m.key).expect("key")),
        );
    }
}

async fn read(client: &mut Client, key: &BlobKey) -> Vec<u8> {
    let mut bytes = Vec::new();
    client
        .get(key, None, &mut bytes)
        .await
        .unwrap_or_else(|error| panic!("read {key} after the restart: {error}"));
    bytes
}

/// Checks the restarted server against what the clients were told.
async fn verify(url: &str, told: &mut Told, round: u64) {
    let mut client = Client::connect(url, None).await.expect("connect");
    let listed = list_all(&mut client).await;
    told.check(round, &listed, async |key| read(&mut client, key).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_loses_no_acknowledged_blob() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("server-sigkill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let seed = std::env::var("GRAVITON_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64);
    println!("seed={seed}");
    let mut rng = SimRng::new(seed);
    let told = Arc::new(Mutex::new(Told::default()));
    let mut server = Server::start(&dir);
    for round in 0..ROUNDS {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| tokio::spawn(worker(server.url.clone(), round, w, told.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1500))).await;
        server.kill();
        for worker in workers {
            tokio::time::timeout(Duration::from_secs(60), worker)
                .await
                .expect("a client notices the server is gone within 60 s")
                .expect("client task");
        }
        server = Server::start(&dir);
        // Every client has stopped: the record can leave the lock while it is checked.
        let mut record = std::mem::take(&mut *told.lock().unwrap());
        verify(&server.url, &mut record, round).await;
        *told.lock().unwrap() = record;
    }
    server.terminate();
    println!(
        "{ROUNDS} SIGKILLs of the server: {}",
        told.lock().unwrap().summary()
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}
