//! Arbitrary frame sequences through the per-call state machine, for both
//! roles: no panic, and once the machine reports an error or the end of the
//! call it never accepts another message.
#![no_main]

use brpc_core::wire::{CallState, Flags, Frame, FrameType, Inbound};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&role, mut rest)) = data.split_first() else {
        return;
    };
    let mut call = if role & 1 == 0 {
        CallState::callee(1)
    } else {
        CallState::caller(1)
    };
    let mut ended = false;
    // Each frame: kind, flags, stream id selector, payload length, payload.
    while rest.len() >= 4 {
        let (head, tail) = rest.split_at(4);
        let len = usize::from(head[3] % 32).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        let stream_id = if head[2] % 8 == 0 { 3 } else { 1 };
        let frame = Frame::new(
            stream_id,
            FrameType::from_u8(head[0] % 8),
            Flags::from_bits(head[1]),
            Bytes::copy_from_slice(payload),
        );
        match call.recv(frame) {
            Ok(Inbound::Message(_)) => assert!(!ended, "message after the end"),
            Ok(Inbound::Closed | Inbound::Finished { .. }) => ended = true,
            Ok(_) => {}
            Err(_) => {
                ended = true;
                assert!(call.is_done());
            }
        }
    }
});
