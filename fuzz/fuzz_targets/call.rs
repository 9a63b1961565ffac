//! Random interleavings of received frames, sends and timer ticks through
//! the per-call machine (`wire::Call`), for both roles. Checks its
//! invariants: no panic; no message is received after the other side's end;
//! nothing is sent after this side's end, and at most one final frame; a
//! deadline that has passed always ends the call.
#![no_main]

use std::time::{Duration, Instant};

use brpc_core::wire::{
    Call, CallConfig, Failure, Flags, Frame, FrameType, Inbound, KeyValue, Request, RequestShape,
};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let config = CallConfig {
        max_message_size: 64,
        idle_limit: (setup & 2 != 0).then_some(Duration::from_secs(3)),
        metadata_frames: setup & 4 != 0,
    };
    let start = Instant::now();
    let mut now = start;
    let caller = setup & 1 == 1;
    let mut call = if caller {
        Call::caller(1, config)
    } else {
        Call::callee(1, config, now)
    };
    let mut received_end = false;
    let mut finals = 0;
    // Each step: an opcode byte, an argument byte, then (for frames) a
    // payload of up to 31 bytes.
    while rest.len() >= 2 {
        let (op, arg) = (rest[0], rest[1]);
        rest = &rest[2..];
        let len = usize::from(arg % 32).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        let payload = Bytes::copy_from_slice(payload);
        match op % 12 {
            // A received frame of any type, flags and id.
            0..=3 => {
                rest = tail;
                let kind = FrameType::from_u8(op / 12 % 8);
                let stream_id = if arg & 0x80 != 0 { 3 } else { 1 };
                let frame = Frame::new(stream_id, kind, Flags::from_bits(arg >> 3), payload);
                let was_done = call.is_done();
                match call.recv(frame, now) {
                    Ok(Inbound::Message(_)) => assert!(!received_end && !was_done),
                    Ok(Inbound::Closed | Inbound::Finished { .. }) => {
                        assert!(!received_end);
                        received_end = true;
                    }
                    Ok(_) => {}
                    Err(_) => assert!(call.is_done()),
                }
            }
            // A well-formed Request, so the callee gets past its first frame.
            4 => {
                let request = Request {
                    service: "s.S".into(),
                    method: "M".into(),
                    timeout_nano: i64::from(arg as i8) * 100_000_000,
                    ..Default::default()
                };
                let flags = Flags::from_bits(op / 12 % 8);
                let frame =
                    Frame::new(1, FrameType::Request, flags, request.encode_to_vec().into());
                let _ = call.recv(frame, now);
            }
            // Sends.
            5 => check_send(&mut call, &mut finals, false, |c| {
                c.send_request(
                    payload.clone(),
                    if arg & 1 == 0 {
                        RequestShape::Single
                    } else {
                        RequestShape::Stream
                    },
                )
            }),
            6 => check_send(&mut call, &mut finals, false, |c| {
                c.send_message(payload.clone())
            }),
            7 => check_send(&mut call, &mut finals, true, |c| c.close_send()),
            8 => {
                let entries = vec![
                    KeyValue {
                        key: "k".into(),
                        value: "v".into()
                    };
                    usize::from(arg % 3)
                ];
                let _ = call.send_headers(entries.clone());
                let _ = call.send_trailers(entries);
            }
            9 => {
                let status = tonic::Status::new(tonic::Code::from_i32(i32::from(arg % 17)), "x");
                check_send(&mut call, &mut finals, true, |c| {
                    c.send_response(&status, payload.clone())
                        .map(|(frame, _code)| frame)
                });
            }
            10 => check_send(&mut call, &mut finals, true, |c| c.send_close()),
            // Time passes; timers fire; or the call is aborted.
            _ => {
                if arg & 0x80 != 0 {
                    let _ = call.abort(if arg & 1 == 0 {
                        Failure::Cancelled
                    } else {
                        Failure::Truncated
                    });
                    assert!(call.is_finished());
                } else {
                    call.note_bytes(now, arg & 1 == 1, usize::from(arg) << 8);
                    now += Duration::from_millis(u64::from(arg) * 50);
                    let deadline_passed = call.deadline().is_some_and(|at| at <= now);
                    let expired = call.handle_timeout(now);
                    if deadline_passed {
                        assert!(call.is_finished(), "a passed deadline ends the call");
                    }
                    if let Some(abort) = expired {
                        assert!(call.is_finished());
                        if abort.response.is_some() {
                            finals += 1;
                        }
                    }
                }
            }
        }
        assert!(finals <= 1, "two final frames");
        if let Some(at) = call.poll_timeout() {
            assert!(!call.is_finished() && at >= start);
        }
    }
});

/// A send must fail once this side has ended; a successful final one counts.
fn check_send(
    call: &mut Call,
    finals: &mut u32,
    is_final: bool,
    send: impl FnOnce(&mut Call) -> Result<Frame, tonic::Status>,
) {
    let ended = call.is_send_done();
    let result = send(call);
    if ended {
        assert!(result.is_err(), "sent after the end");
    }
    if result.is_ok() && is_final {
        *finals += 1;
    }
}
