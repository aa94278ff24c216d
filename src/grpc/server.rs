//! The server: every service on one listener, and the orderly shutdown.
//!
//! [`serve`] takes its listener and its shutdown signal from the caller (tests bind
//! `127.0.0.1:0`; the binary binds `--listen` and passes SIGINT/SIGTERM). It serves
//! `graviton.proto.BlobService` and `graviton.proto.UploadService` (bearer-token
//! checked, gzip/zstd accepted and sent when the client asks), `grpc.health.v1.Health`
//! and server reflection v1 and v1alpha (so `grpcurl` needs no `.proto`).
//!
//! Shutdown, when the signal resolves:
//! 1. health turns `NOT_SERVING` (health watch streams end with it); the listener is
//!    closed; every connection gets an HTTP/2 GOAWAY, so new calls are refused
//!    (`UNAVAILABLE` at the client) while calls in flight go on;
//! 2. in-flight calls get [`ServeOptions::drain_timeout`] to finish; those still running
//!    then are stopped (uploads aborted, reads ended) with `UNAVAILABLE`;
//! 3. the engine is shut down, which makes everything acknowledged durable and joins the
//!    shard threads. `serve` returns only after that.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
use tower::limit::GlobalConcurrencyLimitLayer;

use super::auth::BearerAuth;
use super::blob::BlobApi;
use super::connections;
use super::drain::{self, Drain};
use super::failure::TooLargeIsExhausted;
use super::health::{self, HealthApi};
use super::upload::UploadApi;
use crate::engine::{self, Engine};
use crate::proto;
use crate::proto::blob_service_server::BlobServiceServer;
use crate::proto::upload_service_server::UploadServiceServer;

/// Room for a message's framing and fields around its data.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;
/// The largest `BlobService` request: its largest legitimate one, a `BatchStatBlobs` of
/// 10,000 keys, is about 340 KB. tonic buffers a unary request whole before the handler
/// runs, so this, not the upload chunk limit, is what each such call can make it hold.
const BLOB_REQUEST_BYTES_MAX: usize = 1024 * 1024;
/// The largest health or reflection request: a service or symbol name.
const SMALL_REQUEST_BYTES_MAX: usize = 64 * 1024;
/// How long stopped requests get to send their status before the engine shuts down.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// How long a keepalive ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2 streams one connection may have open at once (its SETTINGS_MAX_CONCURRENT_STREAMS).
/// tonic's default is no limit (it overrides hyper's 200), which lets one connection hold
/// any number of calls' state; clients queue their calls beyond this limit.
const STREAMS_PER_CONNECTION_MAX: u32 = 512;

/// How the server runs. `Default` is what `graviton serve` uses without flags.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// If set, calls to the blob and upload services must carry
    /// `authorization: Bearer <token>`; otherwise they are `UNAUTHENTICATED`.
    pub auth_token: Option<String>,
    /// How long in-flight calls may run after the shutdown signal (default 30 s).
    pub drain_timeout: Duration,
    /// The largest `UploadChunk.data` accepted (default 4 MiB, gRPC's usual message
    /// limit); a larger message is rejected by the transport.
    pub chunk_bytes_max: usize,
    /// Interval of HTTP/2 pings that find dead clients, so that their uploads are
    /// aborted rather than held (default 30 s; `None` turns them off).
    pub keepalive_interval: Option<Duration>,
    /// Uploads in progress at once; more are refused with `UNAVAILABLE` (load shedding).
    /// With the engine's per-upload channel, this bounds upload memory whatever clients
    /// do: about `uploads_max × (2 + 1) × chunk_bytes_max` at worst (default 256).
    pub uploads_max: usize,
    /// A `GetBlob` stream whose client takes nothing for this long is ended with
    /// `RESOURCE_EXHAUSTED` (default 60 s). Read buffers are a bounded pool per shard
    /// and a stream holds several until its client takes them, so without this a few
    /// clients that stop reading would stall every large read of a shard.
    pub read_stall_timeout: Duration,
    /// `GetBlob` and `ListBlobs` response streams open at once; more are refused with
    /// `UNAVAILABLE`. A stream's client may stop reading, and HTTP/2 then holds what
    /// was encoded for it (3.4 MiB for a `GetBlob`, measured), so this bounds response
    /// memory whatever clients do: about `reads_max × 3.4 MiB`, 435 MiB at the default
    /// of 128.
    pub reads_max: usize,
    /// Client connections open at once; more wait in the listen backlog until one
    /// closes (default 1024). Each can hold up to its HTTP/2 connection window
    /// ([`ServeOptions::connection_window_bytes`]) of unconsumed data and its streams'
    /// state, so this bounds that memory whatever
    /// clients do; a warning is logged when the limit is reached.
    pub connections_max: usize,
    /// Calls whose request is being read or handled at once; more wait (default 256).
    /// tonic reads a unary request whole before its handler runs, so this bounds what
    /// requests can make the server hold: `calls_max × 1 MiB` at most (the largest
    /// `BlobService` request; health and reflection take 64 KiB, and upload chunks are
    /// read by the upload, under `uploads_max`).
    pub calls_max: usize,
    /// Of those, how many one connection may have at once; its further calls wait for
    /// one of its own to finish (default 32). Without it one client connection could
    /// take every one of `calls_max` (by sending many requests halfway, say) and make
    /// every other client's calls, health checks included, wait behind it; with it one
    /// connection takes at most this many, and taking them all needs
    /// `calls_max / calls_per_connection_max` connections at once.
    pub calls_per_connection_max: usize,
    /// An upload whose client sends nothing for this long while the server waits for
    /// its next message is aborted with `RESOURCE_EXHAUSTED` (default 60 s), so that a
    /// client that stops sending does not hold an upload slot for as long as its
    /// connection lives.
    pub upload_stall_timeout: Duration,
    /// HTTP/2 flow-control window of each stream: how much of an upload a client may
    /// send before the server has taken it. Bigger than one chunk, so that a client's
    /// next chunk is on its way while this one is handled (default 4 MiB). With
    /// hyper's 1 MiB and the seed's 1 MiB chunks, one chunk traveled at a time: a
    /// single 1 GiB upload measured 451 MiB/s on average over 10 alternating runs,
    /// against 512 with 4 MiB (faster in 10 of 10) and 549 with 16 MiB.
    pub stream_window_bytes: u32,
    /// HTTP/2 flow-control window of each connection, shared by its streams: the most
    /// unconsumed request data a connection can make the server hold (default 4 MiB).
    pub connection_window_bytes: u32,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            auth_token: None,
            drain_timeout: Duration::from_secs(30),
            chunk_bytes_max: 4 * 1024 * 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            uploads_max: 256,
            read_stall_timeout: Duration::from_secs(60),
            reads_max: 128,
            connections_max: 1024,
            calls_max: 256,
            calls_per_connection_max: 32,
            upload_stall_timeout: Duration::from_secs(60),
            stream_window_bytes: 4 << 20,
            connection_window_bytes: 4 << 20,
        }
    }
}

/// Why [`serve`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// The reflection service could not be built from the descriptor set.
    Reflection(tonic_reflection::server::Error),
    /// The HTTP/2 server failed.
    Transport(tonic::transport::Error),
    /// The engine failed to shut down cleanly; acknowledged data may not be durable.
    Engine(engine::Error),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Reflection(error) => write!(f, "building the reflection service: {error}"),
            ServeError::Transport(error) => write!(f, "serving gRPC: {error}"),
            ServeError::Engine(error) => write!(f, "shutting the engine down: {error}"),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServeError::Reflection(error) => Some(error),
            ServeError::Transport(error) => Some(error),
            ServeError::Engine(error) => Some(error),
        }
    }
}

/// Serves `engine` on `listener` until `shutdown` resolves, then drains and shuts the
/// engine down (see the module docs). The engine is shut down on every return path.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let served = serve_until_drained(listener, engine.clone(), &options, shutdown).await;
    let engine_closed = engine.shutdown().await.map_err(ServeError::Engine);
    tracing::info!("engine shut down");
    served.and(engine_closed)
}

async fn serve_until_drained(
    listener: TcpListener,
    engine: Engine,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (trigger, drain) = drain::channel();
    let reporter = HealthReporter::new();
    health::start_serving(&reporter).await;
    tokio::spawn(health::report(
        engine.clone(),
        reporter.clone(),
        drain.clone(),
    ));
    let routes = routes(engine, drain, reporter, options)?;
    let signal = async {
        shutdown.await;
        tracing::info!("shutting down: refusing new calls, draining calls in flight");
        trigger.start_draining();
    };
    let incoming = connections::limit(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        options.connections_max,
    );
    let server = Server::builder()
        .http2_keepalive_interval(options.keepalive_interval)
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(STREAMS_PER_CONNECTION_MAX)
        .initial_stream_window_size(Some(options.stream_window_bytes))
        .initial_connection_window_size(Some(options.connection_window_bytes))
        // Calls being read or handled: a call waits for one of its connection's permits,
        // then for one of the server's, which every connection shares (see `limits.rs`).
        .concurrency_limit_per_connection(options.calls_per_connection_max)
        .layer(GlobalConcurrencyLimitLayer::new(options.calls_max))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);

    let drain_timeout = options.drain_timeout;
    let phases = trigger.subscribe();
    let drain_ran_out = async move {
        phases.draining().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        served = &mut server => return served.map_err(ServeError::Transport),
        () = drain_ran_out => {}
    }
    tracing::warn!(
        ?drain_timeout,
        "drain period ran out: stopping the calls still in flight"
    );
    trigger.abort_all();
    match tokio::time::timeout(ABORT_GRACE, &mut server).await {
        Ok(served) => served.map_err(ServeError::Transport),
        Err(_) => {
            tracing::warn!("connections still open after the calls were stopped; closing anyway");
            Ok(())
        }
    }
}

/// Every service the server offers, configured.
fn routes(
    engine: Engine,
    drain: Drain,
    reporter: HealthReporter,
    options: &ServeOptions,
) -> Result<Routes, ServeError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(ServeError::Reflection)?
        .max_decoding_message_size(SMALL_REQUEST_BYTES_MAX);
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServeError::Reflection)?
        .max_decoding_message_size(SMALL_REQUEST_BYTES_MAX);

    let message_bytes_max = options.chunk_bytes_max + MESSAGE_OVERHEAD_BYTES;
    let auth = BearerAuth::new(options.auth_token.as_deref());
    let blob = BlobServiceServer::new(BlobApi::new(
        engine.clone(),
        drain.clone(),
        options.read_stall_timeout,
        options.reads_max,
    ))
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Zstd)
    .send_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Zstd)
    .max_decoding_message_size(BLOB_REQUEST_BYTES_MAX);
    let upload = UploadServiceServer::new(UploadApi::new(
        engine,
        drain.clone(),
        options.uploads_max,
        options.upload_stall_timeout,
    ))
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Zstd)
    .send_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Zstd)
    .max_decoding_message_size(message_bytes_max);

    let health = HealthServer::new(HealthApi::new(reporter, drain))
        .max_decoding_message_size(SMALL_REQUEST_BYTES_MAX);

    let mut routes = RoutesBuilder::default();
    routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            TooLargeIsExhausted(blob),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(upload, auth));
    Ok(routes.routes())
}
