//! One call's machine as the engine holds it: alone, when one task both
//! reads and sends (unary calls), or shared by the half that reads frames
//! into it and the half that asks it what to send (streamed input, a
//! streamed request's pump).

use std::sync::{Arc, Mutex};

use crate::wire::Call;

/// A call's machine, shared by the half that reads frames into it and the
/// half that asks it what to send.
pub(crate) type SharedCall = Arc<Mutex<Call>>;

/// A call's machine, held alone until a second task needs it: a unary call
/// pays for neither the shared allocation nor the locks.
#[derive(Debug)]
pub(crate) enum CallCell {
    Alone(Call),
    Shared(SharedCall),
}

impl CallCell {
    /// Acts on the machine.
    pub(crate) fn with<T>(&mut self, f: impl FnOnce(&mut Call) -> T) -> T {
        match self {
            CallCell::Alone(call) => f(call),
            CallCell::Shared(call) => f(&mut lock(call)),
        }
    }

    /// Reads the machine.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Call) -> T) -> T {
        match self {
            CallCell::Alone(call) => f(call),
            CallCell::Shared(call) => f(&lock(call)),
        }
    }

    /// The machine shared from now on, for a second task.
    pub(crate) fn share(&mut self) -> SharedCall {
        match self {
            CallCell::Shared(call) => call.clone(),
            CallCell::Alone(call) => {
                let shared = Arc::new(Mutex::new(call.clone()));
                *self = CallCell::Shared(shared.clone());
                shared
            }
        }
    }
}

impl super::io::CallTimer for CallCell {
    fn timeout(&mut self) -> Option<std::time::Instant> {
        self.read(Call::poll_timeout)
    }

    fn progress(&mut self, mid_frame: bool, arrived: usize) {
        self.with(|call| call.note_bytes_then(now, mid_frame, arrived));
    }
}

impl super::io::CallTimer for SharedCall {
    fn timeout(&mut self) -> Option<std::time::Instant> {
        lock(self).poll_timeout()
    }

    fn progress(&mut self, mid_frame: bool, arrived: usize) {
        lock(self).note_bytes_then(now, mid_frame, arrived);
    }
}

/// Locks a call's machine. It holds no invariant a panic elsewhere could
/// break halfway, so a poisoned lock is used as it is.
pub(crate) fn lock(call: &SharedCall) -> std::sync::MutexGuard<'_, Call> {
    call.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The engine's clock, as the call machine takes it (tokio's, so paused
/// time in tests moves it too).
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
