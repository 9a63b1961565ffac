//! One call's machine as the two halves of the engine share it: the half
//! that reads frames into it and the half that asks it what to send.

/// A call's machine, shared by the half that reads frames into it and the
/// half that asks it what to send.
pub(crate) type SharedCall = std::sync::Arc<std::sync::Mutex<crate::wire::Call>>;

/// Locks a call's machine. It holds no invariant a panic elsewhere could
/// break halfway, so a poisoned lock is used as it is.
pub(crate) fn lock(call: &SharedCall) -> std::sync::MutexGuard<'_, crate::wire::Call> {
    call.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The engine's clock, as the call machine takes it (tokio's, so paused
/// time in tests moves it too).
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
