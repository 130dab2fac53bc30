//! Telling threads to end: mini-redis's shutdown pattern, for std threads and the API's tokio
//! runtime alike. The owner of some background work holds a [`Stopper`]; every thread or task
//! that must end holds a [`StopToken`] cloned from it, checks [`StopToken::is_stopped`] between
//! steps and sleeps with [`StopToken::wait_timeout`] (or awaits [`StopToken::stopped`]), so a
//! stop wakes it at once instead of after its next period.
//!
//! Invariants:
//! - A stop is final: once stopped, a token stays stopped and every wait returns at once.
//! - Dropping the `Stopper` stops too, so no thread outlives its owner by accident (what a
//!   dropped channel sender used to guarantee).
//! - No waiter misses a stop: a blocking wait checks the flag under the mutex `stop` sets it
//!   under; an async wait registers with the `Notify` before it checks the flag.
//!
//! Each component that must end at its own moment (the API before the control socket's
//! commands, the heartbeat only after what the command left behind is stopped) owns a
//! `Stopper` of its own: one mechanism, one stop per thing that ends.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    stopped: Mutex<bool>,
    /// Wakes the blocking waiters.
    changed: Condvar,
    /// Wakes the async waiters.
    notify: Notify,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The owner's side: [`Stopper::stop`] (or dropping it) stops every token.
#[derive(Debug, Default)]
pub(crate) struct Stopper {
    token: StopToken,
}

/// The side a thread that must end holds; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct StopToken(Arc<Inner>);

impl Stopper {
    /// A stopper whose tokens are not stopped yet.
    pub(crate) fn new() -> Stopper {
        Stopper::default()
    }

    /// A token for a thread or task that must end when this stops.
    pub(crate) fn token(&self) -> StopToken {
        self.token.clone()
    }

    /// Stops every token and wakes every waiter. Returns whether this call stopped them (false
    /// when they were stopped already).
    pub(crate) fn stop(&self) -> bool {
        let inner = &self.token.0;
        let mut stopped = inner.lock();
        if *stopped {
            return false;
        }
        *stopped = true;
        drop(stopped);
        inner.changed.notify_all();
        inner.notify.notify_waiters();
        true
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop();
    }
}

impl StopToken {
    /// Whether the stop came.
    pub(crate) fn is_stopped(&self) -> bool {
        *self.0.lock()
    }

    /// Blocks until the stop.
    pub(crate) fn wait(&self) {
        let mut stopped = self.0.lock();
        while !*stopped {
            stopped = self
                .0
                .changed
                .wait(stopped)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until the stop or until `timeout` passed; returns whether the stop came. A
    /// timeout past what an `Instant` can hold waits for the stop alone.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> bool {
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            self.wait();
            return true;
        };
        let mut stopped = self.0.lock();
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = self
                .0
                .changed
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Resolves at the stop (for the API's tasks).
    pub(crate) async fn stopped(&self) {
        loop {
            // Registered before the check: a stop after the check still wakes it.
            let notified = self.0.notify.notified();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn a_stop_wakes_blocking_waiters_and_is_final() {
        let stopper = Stopper::new();
        let token = stopper.token();
        assert!(!token.is_stopped());
        assert!(!token.wait_timeout(Duration::from_millis(10)));
        let waiter = {
            let token = token.clone();
            thread::spawn(move || token.wait_timeout(Duration::from_secs(60)))
        };
        let forever = {
            let token = token.clone();
            thread::spawn(move || token.wait_timeout(Duration::MAX))
        };
        assert!(stopper.stop());
        assert!(!stopper.stop(), "only the first stop stops");
        assert!(waiter.join().unwrap());
        assert!(forever.join().unwrap());
        assert!(token.is_stopped());
        assert!(token.wait_timeout(Duration::ZERO));
        token.wait();
    }

    #[test]
    fn dropping_the_stopper_stops() {
        let stopper = Stopper::new();
        let token = stopper.token();
        let waiter = thread::spawn(move || token.wait());
        drop(stopper);
        waiter.join().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stop_wakes_async_waiters() {
        let stopper = Stopper::new();
        let token = stopper.token();
        let waiting = tokio::spawn({
            let token = token.clone();
            async move { token.stopped().await }
        });
        tokio::task::yield_now().await;
        thread::spawn(move || stopper.stop()).join().unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the stop wakes the task")
            .unwrap();
        // Already stopped: resolves at once.
        token.stopped().await;
    }
}
