//! The closed-loop load driver: `concurrency` workers, each issuing its next operation as
//! soon as its last one finished, until an op count or a duration is reached.
//!
//! Operations are numbered from a shared counter; the number picks the blob (so every
//! put writes a blob of its own) and the connection. Each worker records into its own
//! `Recorder`; the phase's elapsed time runs from the first op's start to the last op's
//! end. The first failing operation stops the phase and is returned.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::stats::Recorder;

/// When a phase ends.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    /// After this many operations in all.
    Ops(u64),
    /// Once this much time has passed; operations under way then run to completion.
    Duration(Duration),
}

/// What one operation did: its kind (for the histogram) and the payload bytes it moved.
pub struct Done {
    pub kind: &'static str,
    pub bytes: u64,
}

/// A finished phase.
pub struct Phase {
    pub recorder: Recorder,
    pub elapsed: Duration,
    /// The first op number not used, for a following phase to continue from.
    pub next_index: u64,
}

/// Runs `op(index)` from `concurrency` workers with indexes from `first_index` on.
pub async fn closed_loop<Op, Fut>(
    concurrency: usize,
    limit: Limit,
    first_index: u64,
    op: Op,
) -> Result<Phase>
where
    Op: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Done>> + Send + 'static,
{
    let counter = Arc::new(AtomicU64::new(first_index));
    let (end_index, run_for) = match limit {
        Limit::Ops(count) => (first_index + count, None),
        Limit::Duration(duration) => (u64::MAX, Some(duration)),
    };
    let started = Instant::now();
    let deadline = run_for.map(|duration| started + duration);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let counter = Arc::clone(&counter);
        let op = op.clone();
        workers.spawn(async move {
            let mut recorder = Recorder::default();
            loop {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    break;
                }
                let index = counter.fetch_add(1, Ordering::Relaxed);
                if index >= end_index {
                    break;
                }
                let op_started = Instant::now();
                let done = op(index).await?;
                recorder.record(done.kind, op_started.elapsed(), done.bytes);
            }
            Ok::<Recorder, Error>(recorder)
        });
    }
    let mut recorder = Recorder::default();
    while let Some(joined) = workers.join_next().await {
        let worker = joined.map_err(|e| Error::Usage(format!("a load worker panicked: {e}")))?;
        match worker {
            Ok(worker) => recorder.merge(&worker),
            Err(error) => {
                workers.abort_all();
                return Err(error);
            }
        }
    }
    let elapsed = started.elapsed();
    let next_index = counter.load(Ordering::Relaxed).min(end_index);
    Ok(Phase {
        recorder,
        elapsed,
        next_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn op_count_is_exact_and_indexes_unique() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let phase = closed_loop(8, Limit::Ops(100), 5, move |index| {
            let log = Arc::clone(&log);
            async move {
                log.lock().unwrap().push(index);
                Ok(Done {
                    kind: "op",
                    bytes: 10,
                })
            }
        })
        .await
        .unwrap();
        let (figures, _) = phase.recorder.summarise(phase.elapsed);
        assert_eq!(figures.ops, 100);
        assert_eq!(figures.bytes, 1000);
        assert_eq!(phase.next_index, 105);
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (5..105).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn first_error_stops_the_phase() {
        let result = closed_loop(
            4,
            Limit::Duration(Duration::from_secs(30)),
            0,
            |index| async move {
                if index == 3 {
                    Err(Error::Usage("boom".into()))
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Ok(Done {
                        kind: "op",
                        bytes: 0,
                    })
                }
            },
        )
        .await;
        assert!(matches!(result, Err(Error::Usage(m)) if m == "boom"));
    }
}
