//! A single-threaded progress signal: a counter that tasks of one shard wait on.
//!
//! Used for group commit: flushers raise the counter, waiters re-check their condition
//! whenever it is notified. Waiters are woken in the order they started waiting, which
//! keeps the deterministic simulation deterministic (tokio's `watch` wakes its waiters
//! in a per-process random order).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Signal {
    value: Cell<u64>,
    generation: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl Signal {
    pub fn value(&self) -> u64 {
        self.value.get()
    }

    /// The current generation, to pass to [`Signal::changed`].
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Raises the value (never lowers it) and wakes every waiter.
    pub fn raise(&self, value: u64) {
        self.value.set(self.value.get().max(value));
        self.notify();
    }

    /// Wakes every waiter so that it re-checks its condition.
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for waker in waiters {
            waker.wake();
        }
    }

    /// Resolves once the signal was notified after `generation` was read.
    pub fn changed(&self, generation: u64) -> Changed<'_> {
        Changed {
            signal: self,
            generation,
        }
    }
}

pub struct Changed<'a> {
    signal: &'a Signal,
    generation: u64,
}

impl Future for Changed<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.generation.get() != self.generation {
            return Poll::Ready(());
        }
        self.signal.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}
