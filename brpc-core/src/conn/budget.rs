//! Budgets of inbound bytes held in brpc's own buffers: a frame being
//! reassembled reserves its whole announced length from its connection's
//! budget and from the side's total before any of its data is read.
//!
//! What QUIC buffers before brpc reads it is bounded separately, by the
//! connection's receive window. A frame that finds no room waits (its data
//! stays in QUIC, so the peer is slowed by flow control) unless it is the
//! Request of a new call, which is refused at once with `RESOURCE_EXHAUSTED`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Default per-connection budget: four maximum-size (4 MiB) messages being
/// received at once.
pub const DEFAULT_BUFFER_PER_CONNECTION: usize = 16 << 20;

/// Default budget across all of one side's connections.
pub const DEFAULT_BUFFER_TOTAL: usize = 256 << 20;

/// A number of bytes that frames being received may reserve at once, shared
/// by every reader given a clone. Cheap to clone.
#[derive(Clone)]
pub struct MemoryBudget(Arc<Inner>);

struct Inner {
    limit: usize,
    used: AtomicUsize,
    /// Readers waiting for room: releases notify only when there are some,
    /// since `Notify::notify_waiters` takes a lock.
    waiting: AtomicUsize,
    freed: Notify,
}

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("limit", &self.limit())
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MemoryBudget(Arc::new(Inner {
            limit,
            used: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        }))
    }

    /// The budget's size.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, n: usize) -> bool {
        self.0
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(n).filter(|&total| total <= self.0.limit)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.0.used.fetch_sub(n, Ordering::SeqCst);
        // A waiter counts itself before it tries to reserve, so either it
        // sees this release or this load sees it.
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.freed.notify_waiters();
        }
    }
}

/// The two budgets a connection's reads are charged to.
#[derive(Clone, Debug)]
pub(crate) struct Budgets {
    pub(crate) connection: MemoryBudget,
    pub(crate) total: MemoryBudget,
}

impl Budgets {
    /// Reserves `n` bytes from both, or neither.
    pub(crate) fn try_reserve(&self, n: usize) -> bool {
        if !self.connection.try_reserve(n) {
            return false;
        }
        if !self.total.try_reserve(n) {
            self.connection.release(n);
            return false;
        }
        true
    }

    /// Reserves `n` bytes from both, waiting until both have room. `n` must
    /// not exceed either limit (the builders make the limits at least one
    /// maximum-size message).
    pub(crate) async fn reserve(&self, n: usize) {
        let _waiting = Waiting::enter(&self.connection, &self.total);
        loop {
            let connection = self.connection.0.freed.notified();
            let total = self.total.0.freed.notified();
            tokio::pin!(connection, total);
            // Registered before trying, so a release in between is not missed.
            connection.as_mut().enable();
            total.as_mut().enable();
            if self.try_reserve(n) {
                return;
            }
            tokio::select! {
                () = connection => {}
                () = total => {}
            }
        }
    }

    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            self.connection.release(n);
            self.total.release(n);
        }
    }

    /// Why a new call was refused.
    pub(crate) fn exhausted_message(&self, wanted: usize) -> String {
        let (which, budget) = if self.connection.in_use() + wanted > self.connection.limit() {
            ("this connection's", &self.connection)
        } else {
            ("the receiver's total", &self.total)
        };
        format!(
            "{which} inbound buffer budget is used up ({} of {} bytes reserved by frames \
             being received; this Request needs {wanted}); retry later",
            budget.in_use(),
            budget.limit()
        )
    }
}

/// Counts a reader as waiting on both budgets for as long as it lives.
struct Waiting<'a>(&'a MemoryBudget, &'a MemoryBudget);

impl<'a> Waiting<'a> {
    fn enter(connection: &'a MemoryBudget, total: &'a MemoryBudget) -> Self {
        connection.0.waiting.fetch_add(1, Ordering::SeqCst);
        total.0.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(connection, total)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.1.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(connection: usize, total: usize) -> Budgets {
        Budgets {
            connection: MemoryBudget::new(connection),
            total: MemoryBudget::new(total),
        }
    }

    #[test]
    fn reserves_from_both_or_neither() {
        let total = MemoryBudget::new(100);
        let a = Budgets {
            connection: MemoryBudget::new(60),
            total: total.clone(),
        };
        let b = Budgets {
            connection: MemoryBudget::new(60),
            total: total.clone(),
        };
        assert!(a.try_reserve(60));
        assert!(!a.try_reserve(1), "connection budget full");
        assert!(!b.try_reserve(41), "total budget would overflow");
        assert_eq!(
            b.connection.in_use(),
            0,
            "a refused reservation takes nothing"
        );
        assert!(b.try_reserve(40));
        assert_eq!(total.in_use(), 100);
        a.release(60);
        assert_eq!(total.in_use(), 40);
        assert!(b.exhausted_message(30).contains("connection's"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_reservation_proceeds_when_room_is_freed() {
        let shared = budgets(10, 10);
        assert!(shared.try_reserve(8));
        let waiter = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.reserve(5).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        shared.release(8);
        waiter.await.expect("reserved");
        assert_eq!(shared.total.in_use(), 5);
    }
}
