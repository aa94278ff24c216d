//! `graviton`: the server (`graviton serve`) and a small client (`put`, `get`, `stat`,
//! `delete`, `list`). Flag parsing and one call each; the work is in the library.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use graviton::client::{self, Client, ClientError};
use graviton::engine::{BlobKey, Engine, EngineConfig};
use graviton::grpc::{self, ServeOptions};
use graviton::proto::ByteRange;

const TOKEN_ENV: &str = "GRAVITON_AUTH_TOKEN";
const SERVER_ENV: &str = "GRAVITON_SERVER";

#[derive(Parser)]
#[command(name = "graviton", version, about = "Blob storage server and client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (every flag has a default: `graviton serve` just works).
    Serve(ServeArgs),
    /// Upload a file (`-` for stdin); prints its key.
    Put {
        file: PathBuf,
        /// The blob's content type.
        #[arg(long)]
        content_type: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Download a blob (or a range of it) to stdout or a file.
    Get {
        key: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long)]
        length: Option<u64>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print a blob's metadata.
    Stat {
        key: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a blob.
    Delete {
        key: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// List blobs in key order: key and size, one per line.
    List {
        /// Only keys starting with these hex digits (an even number of them).
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many (0: the server's default, 1000).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory of the store (created if missing).
    #[arg(long, default_value = "./graviton-data")]
    data_dir: PathBuf,
    /// Storage shards, one thread each [default: the cores this process may use].
    #[arg(long)]
    shards: Option<usize>,
    /// Threads of the gRPC front-end's runtime [default: half the cores, at least 1].
    /// The shards hash and copy every byte once; the front-end parses HTTP/2 and encodes
    /// responses: half the cores each is a starting point, measure with the bench.
    #[arg(long)]
    frontend_threads: Option<usize>,
    /// Do not pin shard threads to cores.
    #[arg(long)]
    no_pin: bool,
    /// MiB per second each shard's compaction may copy (0: unpaced). Paced, moving live
    /// blobs out of mostly dead segments leaves the disk to foreground reads and writes
    #[arg(long, default_value_t = graviton::engine::COMPACTION_BYTES_PER_SEC >> 20)]
    compaction_mib_per_sec: u64,
    /// Emptied segments each shard keeps to reuse, at most (0: remove them at once).
    /// Reusing one spares freeing its blocks, which stalled writes on ext4 mounted
    /// `discard`; the store keeps up to this many segments of disk per shard
    #[arg(long, default_value_t = graviton::engine::FREE_SEGMENTS_MAX)]
    free_segments_max: usize,
    /// Serve a data directory without O_DIRECT support (tmpfs) with buffered I/O.
    #[arg(long)]
    allow_buffered_io: bool,
    /// Require `authorization: Bearer <token>` on blob and upload calls
    /// [default: $GRAVITON_AUTH_TOKEN, else no authentication].
    #[arg(long)]
    auth_token: Option<String>,
    /// Seconds calls in flight may run after SIGINT/SIGTERM before they are stopped.
    #[arg(long, default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Uploads in progress at once; more are refused with UNAVAILABLE (bounds memory).
    #[arg(long, default_value_t = 256)]
    uploads_max: usize,
    /// Seconds a read stream may go without its client taking anything before it is
    /// ended with RESOURCE_EXHAUSTED (frees the shard read buffers it holds).
    #[arg(long, default_value_t = 60)]
    read_stall_secs: u64,
    /// GetBlob and ListBlobs streams open at once; more are refused with UNAVAILABLE
    /// (bounds what stalled readers can make the server hold).
    #[arg(long, default_value_t = 128)]
    reads_max: usize,
    /// Client connections open at once; more wait in the listen backlog (bounds what
    /// connections can make the server hold).
    #[arg(long, default_value_t = 1024)]
    connections_max: usize,
    /// Calls whose request is being read or handled at once; more wait (bounds what
    /// requests can make the server hold).
    #[arg(long, default_value_t = 256)]
    calls_max: usize,
    /// Of those, how many one client connection may have at once; its further calls
    /// wait (so one connection cannot take them all).
    #[arg(long, default_value_t = 32)]
    calls_per_connection_max: usize,
    /// Seconds an upload may go without its client sending anything (while the server
    /// waits for it) before it is aborted with RESOURCE_EXHAUSTED (frees its slot).
    #[arg(long, default_value_t = 60)]
    upload_stall_secs: u64,
    /// HTTP/2 flow-control window of each stream, in MiB: how much of an upload a client
    /// may send ahead of the server (with 1 MiB chunks, 1 MiB makes it wait for each).
    #[arg(long, default_value_t = 4)]
    stream_window_mib: u32,
    /// HTTP/2 flow-control window of each connection, in MiB: the most unconsumed
    /// request data one connection can make the server hold.
    #[arg(long, default_value_t = 4)]
    connection_window_mib: u32,
}

#[derive(clap::Args)]
struct Connection {
    /// Server URL [default: $GRAVITON_SERVER, else http://127.0.0.1:50051].
    #[arg(long)]
    server: Option<String>,
    /// Bearer token [default: $GRAVITON_AUTH_TOKEN].
    #[arg(long)]
    token: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = match Cli::parse().command {
        Command::Serve(args) => serve(args),
        command => run_client(command),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("graviton: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A window of `mib` MiB, between HTTP/2's default (64 KiB) and its largest (2^31 - 1).
fn window_bytes(mib: u32) -> u32 {
    (u64::from(mib) << 20).clamp(65_535, (1 << 31) - 1) as u32
}

fn serve(args: ServeArgs) -> Result<(), ClientError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut config = EngineConfig::new(&args.data_dir);
    if let Some(shards) = args.shards {
        config.shards = shards.max(1);
    }
    config.pin_cores = !args.no_pin;
    config.compaction_bytes_per_sec = Some(args.compaction_mib_per_sec << 20);
    config.free_segments_max = args.free_segments_max;
    config.allow_buffered_io = args.allow_buffered_io;
    let frontend_threads = args.frontend_threads.unwrap_or(cores / 2).max(1);
    let options = ServeOptions {
        auth_token: args.auth_token.or_else(|| std::env::var(TOKEN_ENV).ok()),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        uploads_max: args.uploads_max.max(1),
        read_stall_timeout: Duration::from_secs(args.read_stall_secs.max(1)),
        reads_max: args.reads_max.max(1),
        connections_max: args.connections_max.max(1),
        calls_max: args.calls_max.max(1),
        calls_per_connection_max: args.calls_per_connection_max.max(1),
        upload_stall_timeout: Duration::from_secs(args.upload_stall_secs.max(1)),
        stream_window_bytes: window_bytes(args.stream_window_mib),
        connection_window_bytes: window_bytes(args.connection_window_mib),
        ..ServeOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(frontend_threads)
        .thread_name("graviton-grpc")
        .enable_all()
        .build()?;
    let engine = Engine::open(config.clone())
        .map_err(|error| format!("opening the store in {}: {error}", args.data_dir.display()))?;
    tracing::info!(
        data_dir = %args.data_dir.display(),
        shards = config.shards,
        frontend_threads,
        auth = options.auth_token.is_some(),
        "engine open"
    );
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                let _ = engine.shutdown().await;
                return Err(format!("listening on {}: {error}", args.listen).into());
            }
        };
        tracing::info!(address = %listener.local_addr()?, "serving gRPC");
        grpc::serve(listener, engine, options, shutdown_signal()).await?;
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
}

fn run_client(command: Command) -> Result<(), ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(client_command(command))
}

async fn client_command(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Serve(_) => unreachable!("handled by main"),
        Command::Put {
            file,
            content_type,
            connection,
        } => {
            let mut client = connection.connect().await?;
            let attributes: BTreeMap<_, _> = content_type
                .map(|content_type| ("content-type".to_string(), content_type))
                .into_iter()
                .collect();
            let meta = if file.as_os_str() == "-" {
                client.put(std::io::stdin(), None, attributes).await?
            } else {
                let opened = std::fs::File::open(&file)
                    .map_err(|error| format!("opening {}: {error}", file.display()))?;
                let size = opened.metadata()?.len();
                client.put(opened, Some(size), attributes).await?
            };
            println!("{}", parse_wire_key(&meta.key)?);
        }
        Command::Get {
            key,
            output,
            offset,
            length,
            connection,
        } => {
            let key = parse_key(&key)?;
            let range = (offset > 0 || length.is_some()).then(|| ByteRange {
                offset: offset as i64,
                length: length.map(|length| length as i64),
            });
            let mut client = connection.connect().await?;
            match output {
                Some(path) => {
                    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
                    client.get(&key, range, &mut file).await?;
                }
                None => {
                    client
                        .get(&key, range, &mut std::io::stdout().lock())
                        .await?;
                }
            }
        }
        Command::Stat { key, connection } => {
            let key = parse_key(&key)?;
            let meta = connection.connect().await?.stat(&key).await?;
            print!("{}", client::describe(&meta));
        }
        Command::Delete { key, connection } => {
            let key = parse_key(&key)?;
            connection.connect().await?.delete(&key).await?;
        }
        Command::List {
            prefix,
            limit,
            connection,
        } => {
            let prefix = parse_hex(&prefix)?;
            let page = connection
                .connect()
                .await?
                .list(None, &prefix, limit)
                .await?;
            let mut out = std::io::stdout().lock();
            for meta in page {
                writeln!(out, "{} {}", parse_wire_key(&meta.key)?, meta.size)?;
            }
        }
    }
    Ok(())
}

impl Connection {
    async fn connect(&self) -> Result<Client, ClientError> {
        let server = self
            .server
            .clone()
            .or_else(|| std::env::var(SERVER_ENV).ok())
            .unwrap_or_else(|| "http://127.0.0.1:50051".to_string());
        let token = self.token.clone().or_else(|| std::env::var(TOKEN_ENV).ok());
        Client::connect(&server, token.as_deref()).await
    }
}

fn parse_key(text: &str) -> Result<BlobKey, ClientError> {
    BlobKey::from_hex(text).ok_or_else(|| format!("a key is 64 hex digits, got {text:?}").into())
}

fn parse_wire_key(bytes: &[u8]) -> Result<BlobKey, ClientError> {
    BlobKey::from_slice(bytes)
        .ok_or_else(|| format!("the server sent a key of {} bytes", bytes.len()).into())
}

fn parse_hex(text: &str) -> Result<Vec<u8>, ClientError> {
    let invalid = || format!("expected an even number of hex digits, got {text:?}");
    if !text.len().is_multiple_of(2) {
        return Err(invalid().into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(text.get(i..i + 2).ok_or_else(invalid)?, 16).map_err(|_| invalid())
        })
        .map(|byte| byte.map_err(ClientError::from))
        .collect()
}
