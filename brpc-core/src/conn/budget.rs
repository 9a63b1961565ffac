//! Budgets of inbound bytes held in brpc's own buffers: a frame being
//! reassembled reserves its whole announced length from its connection's
//! budget and from the side's total before any of its data is read.
//!
//! What QUIC buffers before brpc reads it is bounded separately, by the
//! connection's receive window. A frame that finds no room waits (its data
//! stays in QUIC, so the peer is slowed by flow control) unless it is the
//! Request of a new call, which is refused at once with `RESOURCE_EXHAUSTED`.
//!
//! A waiting frame's stream keeps up to a stream window
//! ([`STREAM_RECEIVE_WINDOW`], or the receive window if smaller) of the
//! connection's receive window unread. Enough of them would fill it, and
//! the frames that do have room could then never receive the rest of their
//! data: nothing would move until the idle limit reset them. So over QUIC a
//! [`WaitingRoom`] widens the connection's window by a stream window for
//! each frame that waits at once, and refuses a frame beyond its size (its
//! call fails with `RESOURCE_EXHAUSTED`) rather than let it wait.
//!
//! Outside the budgets, a process keeps the buffers of up to 8 MiB of large
//! frames (64 KiB or more) it received, so the next large frame is
//! reassembled in one of them rather than in memory the allocator has to
//! fault in again (`spare`); a buffer is reused only once nobody holds a
//! part of its frame.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[cfg(doc)]
use super::quic::STREAM_RECEIVE_WINDOW;
use super::quic::stream_window;

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
    /// A QUIC connection's own budget: where its frames wait for room.
    room: Option<WaitingRoom>,
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
        Self::with_room(limit, None)
    }

    /// A QUIC connection's own budget of `limit` bytes, with the room its
    /// frames wait in (kept here: each call's reader holds this budget
    /// already, so the room costs it nothing more).
    pub(crate) fn with_room(limit: usize, room: Option<WaitingRoom>) -> Self {
        MemoryBudget(Arc::new(Inner {
            limit,
            used: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            room,
        }))
    }

    /// The room this connection's frames wait in, if it has one.
    pub(crate) fn waiting_room(&self) -> Option<&WaitingRoom> {
        self.0.room.as_ref()
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

/// The two budgets a connection's reads are charged to (over QUIC the
/// connection's also holds the room its frames wait for them in).
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

    /// Why a frame was refused a place to wait for room.
    pub(crate) fn too_many_waiting_message(&self, wanted: usize) -> String {
        let most = self.connection.waiting_room().map_or(0, |room| room.most);
        let (which, setting, budget) = self.fullest(wanted);
        format!(
            "{most} frames of this connection's calls are already waiting for room in \
             {which} inbound buffer budget ({} of {} bytes reserved by frames being received; \
             this frame needs {wanted}); make fewer large calls at once, or raise {setting} \
             (and, for more to wait, buffer_per_connection and receive_window: as many may \
             wait as there are 1.25 MB stream windows in the smaller of the connection's \
             budget and three receive windows)",
            budget.in_use(),
            budget.limit()
        )
    }

    /// The budget that has no room for `wanted` more bytes, its name and
    /// the setting that sizes it.
    fn fullest(&self, wanted: usize) -> (&'static str, &'static str, &MemoryBudget) {
        if self.connection.in_use() + wanted > self.connection.limit() {
            (
                "this connection's",
                "buffer_per_connection",
                &self.connection,
            )
        } else {
            ("the receiver's total", "buffer_total", &self.total)
        }
    }

    /// Why a new call was refused.
    pub(crate) fn exhausted_message(&self, wanted: usize) -> String {
        let (which, _, budget) = self.fullest(wanted);
        format!(
            "{which} inbound buffer budget is used up ({} of {} bytes reserved by frames \
             being received; this Request needs {wanted}); retry later",
            budget.in_use(),
            budget.limit()
        )
    }
}

/// Where the frames of a QUIC connection wait for room in its budgets. A
/// waiting frame's stream may hold a stream window of unread data, so the
/// connection's receive window is widened by a stream window for each of
/// the most frames that have waited at once, and the frames being received
/// still have the whole unwidened window to arrive in.
///
/// The window is never narrowed again: quinn does not take back credit it
/// announced (narrowing only holds back as much of what is read next), and
/// widening after a narrowing would add to it, so a peer making frames wait
/// and stop over and over could earn credit without end. Widened for the
/// most waiters at once, it stays within four receive windows.
///
/// At most `most` wait at once: as many stream windows as fit in the
/// connection's budget or three receive windows, whichever is less (at
/// least one). The second bound keeps the frames being received able to
/// earn more credit: quinn announces credit only in steps of an eighth of
/// the (widened) window, at most half the unwidened one (while data other
/// streams leave unread stays under the other half).
pub(crate) struct WaitingRoom {
    connection: quinn::Connection,
    /// The connection's receive window before any frame waited.
    window: u64,
    /// What one waiting frame's stream may hold unread.
    stream_window: u64,
    most: usize,
    /// The window is set under this lock, so the last one set is the widest.
    places: Mutex<Places>,
}

impl std::fmt::Debug for WaitingRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingRoom")
            .field("window", &self.window)
            .field("most", &self.most)
            .finish_non_exhaustive()
    }
}

impl WaitingRoom {
    /// A room for `connection`, whose receive window is `window` and whose
    /// own budget holds `budget` bytes.
    pub(crate) fn new(connection: quinn::Connection, window: u64, budget: usize) -> Self {
        let (stream_window, most) = Self::places(window, budget);
        WaitingRoom {
            connection,
            window,
            stream_window,
            most,
            places: Mutex::new(Places::default()),
        }
    }

    /// The stream window of a connection whose receive window is `window`,
    /// and how many frames may wait at once.
    fn places(window: u64, budget: usize) -> (u64, usize) {
        let stream_window = stream_window(window).max(1);
        let room = (budget as u64).min(window.saturating_mul(3));
        let most = usize::try_from(room / stream_window).unwrap_or(usize::MAX);
        (stream_window, most.max(1))
    }

    /// A place for one more waiting frame, given back when the returned
    /// guard drops; `None` if the room is full. `budget` is the one that
    /// holds this room (the guard keeps it).
    pub(crate) fn enter(&self, budget: &MemoryBudget) -> Option<Waiter> {
        let mut places = self.places.lock().unwrap_or_else(|e| e.into_inner());
        match places.enter(self.most) {
            Entry::Full => return None,
            Entry::Entered => {}
            Entry::Widen(waiting) => {
                let window = self
                    .window
                    .saturating_add((waiting as u64).saturating_mul(self.stream_window));
                self.connection.set_receive_window(
                    quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX),
                );
            }
        }
        Some(Waiter(budget.clone()))
    }
}

/// A frame's place in a [`WaitingRoom`] (held through the budget that holds
/// the room).
pub(crate) struct Waiter(MemoryBudget);

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(room) = self.0.waiting_room() {
            let mut places = room.places.lock().unwrap_or_else(|e| e.into_inner());
            places.waiting = places.waiting.saturating_sub(1);
        }
    }
}

/// Frames waiting now, and the most that have waited at once.
#[derive(Debug, Default)]
struct Places {
    waiting: usize,
    widest: usize,
}

/// What a frame entering a [`WaitingRoom`] finds.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    /// `most` frames wait already.
    Full,
    /// A place in the window as widened already.
    Entered,
    /// A place, once the window is widened for this many frames.
    Widen(usize),
}

impl Places {
    fn enter(&mut self, most: usize) -> Entry {
        if self.waiting >= most {
            return Entry::Full;
        }
        self.waiting += 1;
        if self.waiting <= self.widest {
            return Entry::Entered;
        }
        self.widest = self.waiting;
        Entry::Widen(self.widest)
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

    #[test]
    fn the_waiting_room_holds_a_budget_or_three_windows_of_stream_windows() {
        use crate::conn::{DEFAULT_BUFFER_PER_CONNECTION, DEFAULT_RECEIVE_WINDOW};
        // 12 MiB (three 4 MiB windows, less than 16 MiB) of 1.25 MB windows.
        assert_eq!(
            WaitingRoom::places(DEFAULT_RECEIVE_WINDOW, DEFAULT_BUFFER_PER_CONNECTION),
            (1_250_000, 10)
        );
        // A window smaller than a stream's is the stream window.
        assert_eq!(WaitingRoom::places(256 << 10, 4 << 20), (256 << 10, 3));
        // A budget smaller than a stream window still lets one wait.
        assert_eq!(WaitingRoom::places(4 << 20, 1 << 20), (1_250_000, 1));
        assert_eq!(WaitingRoom::places(0, 0), (1, 1));
    }

    #[test]
    fn the_window_widens_only_for_more_waiters_than_ever_before() {
        let mut places = Places::default();
        assert_eq!(places.enter(2), Entry::Widen(1));
        assert_eq!(places.enter(2), Entry::Widen(2));
        assert_eq!(places.enter(2), Entry::Full);
        places.waiting -= 1;
        places.waiting -= 1;
        // Frames that wait and leave over and over earn no more credit.
        for _ in 0..3 {
            assert_eq!(places.enter(2), Entry::Entered);
            places.waiting -= 1;
        }
        assert_eq!(places.enter(2), Entry::Entered);
        assert_eq!(places.enter(2), Entry::Entered);
        assert_eq!(places.enter(2), Entry::Full);
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
