//! What the harness reads from, and does to, the machine it runs on: the server
//! process's memory (`/proc/PID/status`: `VmRSS` sampled while a scenario runs,
//! `VmHWM` at its end), the load average (other work skews figures), and dropping the
//! page cache between setup and timing.
//!
//! Both are best effort and say what happened: a missing `/proc` entry gives no memory
//! figures rather than made-up ones, and a read-only `/proc/sys` is recorded as such.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// The server's memory over one scenario, in KiB as the kernel reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServerMemory {
    pub pid: u32,
    /// `VmRSS` when the timed phase started.
    pub vm_rss_start_kib: u64,
    /// Largest `VmRSS` sampled every 50 ms during the timed phase.
    pub vm_rss_peak_kib: u64,
    /// `VmHWM` (peak resident set over the process's life) at the end.
    pub vm_hwm_kib: u64,
}

/// Samples a process's `VmRSS` in the background until `finish`.
pub struct MemorySampler {
    pid: u32,
    start_kib: u64,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl MemorySampler {
    /// Starts sampling `pid`; `None` if its status cannot be read.
    pub fn start(pid: u32) -> Option<MemorySampler> {
        let start_kib = status_field_kib(pid, "VmRSS")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut peak = start_kib;
            while !flag.load(Ordering::Relaxed) {
                if let Some(rss) = status_field_kib(pid, "VmRSS") {
                    peak = peak.max(rss);
                }
                tokio::time::sleep(SAMPLE_INTERVAL).await;
            }
            peak
        });
        Some(MemorySampler {
            pid,
            start_kib,
            stop,
            task,
        })
    }

    pub async fn finish(self) -> Option<ServerMemory> {
        self.stop.store(true, Ordering::Relaxed);
        let sampled_peak = self.task.await.ok()?;
        let now = status_field_kib(self.pid, "VmRSS").unwrap_or(0);
        Some(ServerMemory {
            pid: self.pid,
            vm_rss_start_kib: self.start_kib,
            vm_rss_peak_kib: sampled_peak.max(now),
            vm_hwm_kib: status_field_kib(self.pid, "VmHWM")?,
        })
    }
}

/// A `kB` field of `/proc/PID/status`.
pub fn status_field_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_field_kib(&status, field)
}

fn parse_status_field_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// The 1-minute load average (`/proc/loadavg`): other work on the machine skews
/// figures, so results record it.
pub fn load_average_1m() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Writes back dirty pages and drops the page cache, dentries and inodes. Returns
/// `"ok"`, or why not (not root, read-only `/proc/sys` in a container, …).
pub fn drop_caches() -> String {
    match std::process::Command::new("sync").status() {
        Ok(status) if status.success() => {}
        Ok(status) => return format!("failed: sync exited with {status}"),
        Err(e) => return format!("failed: cannot run sync: {e}"),
    }
    match std::fs::write("/proc/sys/vm/drop_caches", "3\n") {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("failed: /proc/sys/vm/drop_caches: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_fields() {
        let status = "Name:\tgraviton\nVmHWM:\t  123456 kB\nVmRSS:\t   65432 kB\n";
        assert_eq!(parse_status_field_kib(status, "VmHWM"), Some(123_456));
        assert_eq!(parse_status_field_kib(status, "VmRSS"), Some(65_432));
        assert_eq!(parse_status_field_kib(status, "VmSwap"), None);
    }

    #[test]
    fn reads_own_status() {
        assert!(status_field_kib(std::process::id(), "VmRSS").unwrap() > 0);
        assert!(load_average_1m().unwrap() >= 0.0);
    }
}
