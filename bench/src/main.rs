//! `graviton-bench`: runs one scenario against a server and prints its figures (and
//! appends them as a JSON line with `--json`), waits for a server to accept
//! connections, or builds the comparison report of a results directory.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use graviton_bench::client::Client;
use graviton_bench::error::{Error, Result};
use graviton_bench::report;
use graviton_bench::scenario::{self, Common, Scenario, ScenarioResult};

#[derive(Parser)]
#[command(
    name = "graviton-bench",
    version,
    about = "Load generator and benchmark report for Graviton"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    /// Client runtime worker threads (default: the cores this process may use).
    #[arg(long, global = true)]
    client_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Scenario(Scenario),
    /// Wait until a server accepts gRPC connections at --addr.
    Wait {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Combine a results directory (fio.json, *.jsonl) into summary.json, summary.txt
    /// and summary.svg.
    Report {
        /// The results directory written by scripts/bench.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.client_threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("graviton-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("graviton-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Scenario(scenario) => {
            let result = scenario::run(&cli.common, &scenario).await?;
            print_result(&result);
            if let Some(path) = &cli.common.json {
                append_json_line(path, &result)?;
            }
            Ok(())
        }
        Command::Wait { timeout } => {
            wait(&cli.common.addr, Duration::from_secs_f64(timeout.max(0.0))).await
        }
        Command::Report { dir } => {
            let text = report::write(&dir)?;
            print!("{text}");
            Ok(())
        }
    }
}

async fn wait(addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match Client::connect(addr, 1, false).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn print_result(result: &ScenarioResult) {
    println!("{}", report::TABLE_HEADER);
    for line in report::result_lines(result) {
        println!("{line}");
    }
    if let Some(memory) = &result.server_memory {
        println!(
            "server pid {}: VmRSS {} -> peak {} MiB, VmHWM {} MiB",
            memory.pid,
            memory.vm_rss_start_kib / 1024,
            memory.vm_rss_peak_kib / 1024,
            memory.vm_hwm_kib / 1024
        );
    }
}

fn append_json_line(path: &PathBuf, result: &ScenarioResult) -> Result<()> {
    let line = serde_json::to_string(result)
        .map_err(|e| Error::Usage(format!("cannot encode result: {e}")))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    writeln!(file, "{line}").map_err(|e| Error::io(format!("write {}", path.display()), e))
}
