//! `graviton-null-server`: Graviton's gRPC API with no storage behind it (see the
//! `null_server` module). Prints `listening on ADDR` once bound; stops on SIGINT/SIGTERM.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use graviton_bench::null_server::{serve, Http2};
use graviton_bench::size::parse_bytes;

#[derive(Parser)]
#[command(
    name = "graviton-null-server",
    version,
    about = "Graviton's gRPC API, storing nothing"
)]
struct Cli {
    /// Address to listen on (port 0: any free port; the bound one is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Runtime worker threads (default: the cores this process may use).
    #[arg(long)]
    threads: Option<usize>,
    /// HTTP/2 initial stream window; the default is `graviton serve`'s, so that the
    /// ceiling is measured with the transport settings Graviton runs with.
    #[arg(long, value_parser = parse_bytes, default_value = "4MiB")]
    stream_window: Option<u64>,
    /// HTTP/2 initial connection window (default: `graviton serve`'s).
    #[arg(long, value_parser = parse_bytes, default_value = "4MiB")]
    connection_window: Option<u64>,
    /// Let HTTP/2 windows grow with the measured bandwidth-delay product.
    #[arg(long)]
    adaptive_window: bool,
}

fn window(bytes: Option<u64>) -> Result<Option<u32>, String> {
    bytes
        .map(|b| u32::try_from(b).map_err(|_| format!("window of {b} bytes exceeds 4 GiB")))
        .transpose()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let http2 = match (window(cli.stream_window), window(cli.connection_window)) {
        (Ok(stream), Ok(connection)) => Http2 {
            initial_stream_window_bytes: stream,
            initial_connection_window_bytes: connection,
            adaptive_window: cli.adaptive_window,
        },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("graviton-null-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let result = runtime
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|runtime| runtime.block_on(run(&cli.listen, http2)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("graviton-null-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(listen: &str, http2: Http2) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    serve(listener, http2, shutdown_signal())
        .await
        .map_err(|e| format!("server failed: {e}"))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
