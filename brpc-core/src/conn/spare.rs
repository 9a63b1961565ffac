//! Buffers of large received frames, kept for the next large frame.
//!
//! A frame that arrives in several QUIC chunks, or in several reads of a
//! Unix socket, is reassembled in a buffer of its whole size, and its
//! message (and every `bytes` field of it) is a slice of that buffer. Freeing a buffer of a megabyte and allocating the
//! next one lets the allocator hand the pages back to the kernel in between
//! (glibc trims a thread's heap once its free top exceeds its trim
//! threshold), and the next frame's copy then faults every page in again:
//! `brpc-bench count brpc-direct 1000 --bytes 1048576 --tasks 4 --threads 2`
//! spent about a fifth of its samples in those page faults. So the buffer
//! of a large frame is kept here once its frame is split off, and a later
//! large frame takes it back as soon as nobody holds a slice of it any more
//! ([`BytesMut::try_reclaim`]).
//!
//! Bounded process-wide by [`LIMIT`] bytes of buffers, the oldest going
//! first; a buffer is only reused for a frame at least four fifths its size,
//! so a frame never holds much more memory than its budgets reserved for it
//! (its length: a kept buffer is at most a quarter larger, a new one at most
//! a page).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::BytesMut;

/// Frames of at least this many bytes (header included) are reassembled in a
/// kept buffer when one is free, and keep theirs when done.
pub(crate) const MIN: usize = 64 * 1024;

/// New buffers for large frames are whole multiples of this.
const PAGE: usize = 4096;

/// Most bytes of buffers kept at once, process-wide (some may still be held
/// by the messages received in them; those are not reused until dropped).
pub(crate) const LIMIT: usize = 8 << 20;

/// Buffers kept, oldest first, with the size of each one's allocation.
pub(crate) struct Spares {
    kept: VecDeque<(BytesMut, usize)>,
    bytes: usize,
    limit: usize,
}

static SPARES: Mutex<Spares> = Mutex::new(Spares::new(LIMIT));

/// Frames reassembled in a kept buffer so far, process-wide.
static REUSED: AtomicU64 = AtomicU64::new(0);

/// How many large frames so far were reassembled in a kept buffer instead of
/// a new one (process-wide; for tests).
pub fn reused() -> u64 {
    REUSED.load(Ordering::Relaxed)
}

impl Spares {
    pub(crate) const fn new(limit: usize) -> Self {
        Spares {
            kept: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// A kept buffer with room for `whole` bytes whose allocation is at most
    /// a quarter larger and held by nobody else, taken out of the set.
    fn take(&mut self, whole: usize) -> Option<(BytesMut, usize)> {
        let at = self.kept.iter_mut().position(|(buf, size)| {
            *size >= whole && *size - whole <= whole / 4 && buf.try_reclaim(whole)
        })?;
        let (buf, size) = self.kept.remove(at)?;
        self.bytes -= size;
        Some((buf, size))
    }

    /// Keeps `buf`, an empty buffer over an allocation of `size` bytes; the
    /// oldest kept buffers go to make room. Returns those (to be dropped
    /// outside any lock).
    fn keep(&mut self, buf: BytesMut, size: usize) -> Vec<BytesMut> {
        let mut gone = Vec::new();
        if size > self.limit {
            gone.push(buf);
            return gone;
        }
        while self.bytes + size > self.limit {
            let Some((old, old_size)) = self.kept.pop_front() else {
                break;
            };
            self.bytes -= old_size;
            gone.push(old);
        }
        self.kept.push_back((buf, size));
        self.bytes += size;
        gone
    }
}

/// Whether a frame of `whole` bytes (header included) is reassembled in a
/// buffer of its own, kept for a later frame when it is done with: one
/// large enough to be worth keeping, and not too large to be kept.
pub(crate) fn eligible(whole: usize) -> bool {
    (MIN..=LIMIT).contains(&whole)
}

/// Moves what `buf` holds of a frame of `whole` bytes (header included,
/// [`eligible`]) into a buffer with room for all of it: a kept one if one
/// is free, otherwise a new one. Returns the size of its allocation, for
/// [`give_back`].
pub(crate) fn own_buffer(buf: &mut BytesMut, whole: usize) -> usize {
    debug_assert!(eligible(whole));
    let (mut own, size) = take(whole);
    own.extend_from_slice(buf);
    *buf = own;
    size
}

/// Once the frame of a buffer from [`own_buffer`] (an allocation of `size`
/// bytes, 0: none) is split off `buf`: keeps the buffer for a later frame
/// when the frame was all of it, and `buf` starts again as `next`. `size`
/// is 0 afterwards.
pub(crate) fn give_back(buf: &mut BytesMut, size: &mut usize, next: impl FnOnce() -> BytesMut) {
    let size = std::mem::take(size);
    if size > 0 && buf.is_empty() {
        keep(std::mem::replace(buf, next()), size);
    }
}

/// A buffer for a frame of `whole` bytes, and the size of its allocation.
fn take(whole: usize) -> (BytesMut, usize) {
    let taken = SPARES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take(whole);
    if let Some(taken) = taken {
        REUSED.fetch_add(1, Ordering::Relaxed);
        return taken;
    }
    // Whole pages (as the allocator hands out buffers this large anyway),
    // so that a later frame a few bytes longer fits too.
    let buf = BytesMut::with_capacity(whole.next_multiple_of(PAGE));
    let size = buf.capacity();
    (buf, size)
}

/// Keeps `buf`, empty, over an allocation of `size` bytes.
fn keep(buf: BytesMut, size: usize) {
    let gone = SPARES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .keep(buf, size);
    drop(gone);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer of `size` as `take` makes it, filled with a frame of `size`
    /// bytes that is split off: the frame and what is left to keep.
    fn filled(size: usize) -> (bytes::Bytes, BytesMut) {
        let mut buf = BytesMut::with_capacity(size);
        buf.resize(size, 7);
        let frame = buf.split_to(size).freeze();
        (frame, buf)
    }

    #[test]
    fn a_kept_buffer_is_reused_once_its_frame_is_dropped() {
        let mut spares = Spares::new(LIMIT);
        let (frame, rest) = filled(MIN);
        let at = frame.as_ptr();
        assert!(spares.keep(rest, MIN).is_empty());
        // Its frame is still held: not reused.
        assert!(spares.take(MIN).is_none());
        drop(frame);
        let (buf, size) = spares.take(MIN).expect("the frame was dropped");
        assert_eq!(buf.as_ptr(), at, "the same allocation");
        assert!(buf.capacity() >= MIN && buf.is_empty());
        assert_eq!(size, MIN);
        assert!(spares.take(MIN).is_none(), "taken out of the set");
        assert_eq!(spares.bytes, 0);
    }

    #[test]
    fn a_kept_buffer_serves_frames_from_four_fifths_of_its_size_to_its_size() {
        let mut spares = Spares::new(LIMIT);
        let (_, rest) = filled(5 * MIN);
        spares.keep(rest, 5 * MIN);
        assert!(spares.take(5 * MIN + 1).is_none(), "too small");
        assert!(
            spares.take(4 * MIN - 1).is_none(),
            "over a quarter larger than the frame"
        );
        assert!(spares.take(4 * MIN).is_some());
    }

    #[test]
    fn the_oldest_buffers_go_beyond_the_limit() {
        let mut spares = Spares::new(3 * MIN);
        let frames: Vec<_> = (0..3).map(|_| filled(MIN)).collect();
        let first = frames[0].0.as_ptr();
        let mut rests = Vec::new();
        for (frame, rest) in frames {
            drop(frame);
            rests.push(rest);
        }
        for rest in rests {
            assert!(spares.keep(rest, MIN).is_empty());
        }
        let (_, fourth) = filled(MIN);
        let gone = spares.keep(fourth, MIN);
        assert_eq!(gone.len(), 1, "one buffer made room");
        assert_eq!(spares.bytes, 3 * MIN);
        // A buffer larger than the limit is never kept.
        let (_, huge) = filled(4 * MIN);
        assert_eq!(spares.keep(huge, 4 * MIN).len(), 1);
        assert_eq!(spares.bytes, 3 * MIN);
        // The first one kept was the one to go: the three left are the
        // others.
        let mut left = 0;
        while let Some((buf, _)) = spares.take(MIN) {
            assert_ne!(buf.as_ptr(), first);
            left += 1;
        }
        assert_eq!(left, 3);
    }
}
