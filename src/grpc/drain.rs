//! The server's shutdown phases, as seen by the requests in flight.
//!
//! `Serving` → `Draining` (the shutdown signal came: no new connections, calls in
//! flight go on, health watchers are told `NOT_SERVING` and their streams end) →
//! `Aborted` (the drain period ran out). Requests still running at `Aborted` (a stalled
//! upload, a client reading slowly) are stopped through this signal: every upload task
//! and every read stream waits on [`Drain::aborted`] next to its work, drops the work
//! (an `Upload` dropped is an upload aborted) and answers `UNAVAILABLE`. Only then does
//! the server shut the engine down, so the engine never waits on a request that nobody
//! will finish. Phases only move forward.

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    Draining,
    Aborted,
}

/// The server's side: moves the phase forward.
#[derive(Debug)]
pub(crate) struct DrainTrigger {
    sender: watch::Sender<Phase>,
}

/// The requests' side: waits for a phase. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Drain {
    receiver: watch::Receiver<Phase>,
}

pub(crate) fn channel() -> (DrainTrigger, Drain) {
    let (sender, receiver) = watch::channel(Phase::Serving);
    (DrainTrigger { sender }, Drain { receiver })
}

impl DrainTrigger {
    /// Another view of the phases, for the server's own waiting.
    pub(crate) fn subscribe(&self) -> Drain {
        Drain {
            receiver: self.sender.subscribe(),
        }
    }

    /// The shutdown signal came: calls in flight may finish.
    pub(crate) fn start_draining(&self) {
        self.advance(Phase::Draining);
    }

    /// The drain period ran out: every request waiting on [`Drain::aborted`] stops.
    pub(crate) fn abort_all(&self) {
        self.advance(Phase::Aborted);
    }

    fn advance(&self, phase: Phase) {
        self.sender.send_if_modified(|current| {
            let later = phase > *current;
            if later {
                *current = phase;
            }
            later
        });
    }
}

impl Drain {
    /// Resolves once the server is shutting down (or gone).
    pub(crate) async fn draining(&self) {
        self.reached(Phase::Draining).await;
    }

    /// Resolves once in-flight requests must stop: the drain period ran out, or the
    /// server that held the trigger is gone.
    pub(crate) async fn aborted(&self) {
        self.reached(Phase::Aborted).await;
    }

    async fn reached(&self, phase: Phase) {
        let mut receiver = self.receiver.clone();
        // An error means the trigger was dropped: the server is gone, stop as well.
        let _ = receiver.wait_for(|current| *current >= phase).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn resolves(future: impl std::future::Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_millis(20), future)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn phases_resolve_in_order() {
        let (trigger, drain) = channel();
        assert!(!resolves(drain.draining()).await);
        assert!(!resolves(drain.aborted()).await);
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.aborted().await }
        });
        trigger.start_draining();
        assert!(resolves(drain.draining()).await);
        assert!(!resolves(drain.aborted()).await);
        trigger.abort_all();
        trigger.start_draining(); // never moves back
        waiter.await.unwrap();
        assert!(resolves(drain.aborted()).await);
    }

    #[tokio::test]
    async fn a_dropped_trigger_aborts() {
        let (trigger, drain) = channel();
        drop(trigger);
        assert!(resolves(drain.aborted()).await);
    }
}
