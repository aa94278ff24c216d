//! Shard threads: one OS thread per shard, optionally pinned to a core, running its own
//! monoio runtime with its own io_uring ring.
//!
//! The runtime is built with monoio's fusion driver: io_uring when the kernel allows it
//! (ring flags `COOP_TASKRUN | SINGLE_ISSUER | DEFER_TASKRUN`, retried without them on
//! older kernels), else the epoll ("legacy") driver, which monoio picks itself when
//! io_uring is blocked by seccomp or `kernel.io_uring_disabled`. Which driver a shard got,
//! and why, is returned in [`DriverInfo`] so the caller can log it once at start.

use std::future::Future;
use std::io;
use std::thread::{self, JoinHandle};

use monoio::{FusionDriver, IoUringDriver, LegacyDriver, RuntimeBuilder};

/// Which I/O driver a shard's runtime uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// "io_uring" or "epoll".
    pub name: &'static str,
    /// Why this driver: which attempt succeeded, and what failed before it.
    pub reason: String,
    /// The core the thread is pinned to, if pinned.
    pub core: Option<usize>,
}

/// What a shard thread needs to start.
#[derive(Clone, Debug)]
pub struct ShardThreadConfig {
    pub index: usize,
    /// Pin to this core id (as listed by `core_affinity::get_core_ids`).
    pub core: Option<usize>,
    /// io_uring submission queue entries.
    pub ring_entries: u32,
    /// Use the epoll driver even if io_uring is available (for tests of the fallback).
    pub force_epoll: bool,
}

/// The core ids this process may run on, in order.
pub fn allowed_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|id| id.id).collect())
        .unwrap_or_default()
}

type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<IoUringDriver>,
    monoio::time::TimeDriver<LegacyDriver>,
>;

fn build_runtime(config: &ShardThreadConfig) -> io::Result<(Runtime, &'static str, String)> {
    if config.force_epoll {
        let runtime = RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()?;
        return Ok((
            runtime.into(),
            "epoll",
            "epoll forced by configuration".into(),
        ));
    }
    if !monoio::utils::detect_uring() {
        let runtime = RuntimeBuilder::<FusionDriver>::new()
            .enable_timer()
            .build()?;
        return Ok((
            runtime,
            "epoll",
            "io_uring is unavailable (blocked by seccomp or kernel.io_uring_disabled, RLIMIT_MEMLOCK too low for a ring, or not built in)"
                .into(),
        ));
    }
    let mut flags = io_uring::IoUring::builder();
    flags
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun();
    let tuned = RuntimeBuilder::<FusionDriver>::new()
        .with_entries(config.ring_entries)
        .uring_builder(flags)
        .enable_timer()
        .build();
    let tuned_error = match tuned {
        Ok(runtime) => {
            return Ok((
                runtime,
                "io_uring",
                "io_uring with COOP_TASKRUN|SINGLE_ISSUER|DEFER_TASKRUN".into(),
            ))
        }
        Err(error) => error,
    };
    let plain = RuntimeBuilder::<FusionDriver>::new()
        .with_entries(config.ring_entries)
        .enable_timer()
        .build();
    match plain {
        Ok(runtime) => Ok((
            runtime,
            "io_uring",
            format!("io_uring with default flags (tuned flags failed: {tuned_error})"),
        )),
        Err(plain_error) => {
            let runtime = RuntimeBuilder::<LegacyDriver>::new()
                .enable_timer()
                .build()?;
            Ok((
                runtime.into(),
                "epoll",
                format!(
                    "io_uring ring setup failed ({plain_error}; check RLIMIT_MEMLOCK), using epoll"
                ),
            ))
        }
    }
}

/// Starts a shard thread that builds its runtime and runs `body(driver_info)` on it to
/// completion. The thread's result is the body's output.
pub fn spawn_shard_thread<F, Fut, T>(
    config: ShardThreadConfig,
    body: F,
) -> io::Result<JoinHandle<io::Result<T>>>
where
    F: FnOnce(DriverInfo) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    thread::Builder::new()
        .name(format!("graviton-shard-{}", config.index))
        .spawn(move || {
            let mut pinned = None;
            if let Some(core) = config.core {
                if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    pinned = Some(core);
                } else {
                    tracing::warn!(shard = config.index, core, "could not pin shard thread");
                }
            }
            let (mut runtime, name, reason) = build_runtime(&config)?;
            let info = DriverInfo {
                name,
                reason,
                core: pinned,
            };
            Ok(runtime.block_on(body(info)))
        })
}
