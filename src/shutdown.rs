//! One shutdown signal for every loop of the process (in the manner of mini-redis's `Shutdown`).
//!
//! Blocking loops (the pipeline, the directory and lag threads) check [`Shutdown::is_triggered`]
//! between steps and sleep with [`Shutdown::sleep`], which returns at once when shutdown is
//! triggered; async tasks (the HTTP servers) await [`Shutdown::recv`]. Nothing polls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Inner {
    flag: AtomicBool,
    /// Wakes async waiters.
    notify: tokio::sync::Notify,
    /// Wakes blocking sleepers.
    lock: Mutex<()>,
    cv: Condvar,
}

/// A shutdown signal shared by every loop; cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

impl Shutdown {
    /// Asks every loop to stop, and wakes those waiting.
    pub fn trigger(&self) {
        self.inner.flag.store(true, Ordering::Release);
        self.inner.notify.notify_waiters();
        let _guard = self.inner.lock.lock().expect("not poisoned");
        self.inner.cv.notify_all();
    }

    /// Whether stopping was asked.
    pub fn is_triggered(&self) -> bool {
        self.inner.flag.load(Ordering::Acquire)
    }

    /// Waits (async) until shutdown is triggered.
    pub async fn recv(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }

    /// Sleeps (blocking) for `d`, or less if shutdown is triggered meanwhile. Returns whether
    /// shutdown was triggered.
    pub fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut guard = self.inner.lock.lock().expect("not poisoned");
        loop {
            if self.is_triggered() {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .inner
                .cv
                .wait_timeout(guard, left)
                .expect("not poisoned")
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleeper_wakes_when_shutdown_is_triggered() {
        let s = Shutdown::default();
        let t = s.clone();
        let started = Instant::now();
        let h = std::thread::spawn(move || t.sleep(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        assert!(h.join().unwrap());
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(!Shutdown::default().sleep(Duration::from_millis(1)));
    }

    #[tokio::test]
    async fn recv_returns_once_triggered_even_if_triggered_before() {
        let s = Shutdown::default();
        let t = s.clone();
        let waiter = tokio::spawn(async move { t.recv().await });
        tokio::task::yield_now().await;
        s.trigger();
        waiter.await.unwrap();
        s.recv().await;
    }
}
