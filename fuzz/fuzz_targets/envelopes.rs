//! Arbitrary bytes as every protobuf envelope brpc decodes from a peer:
//! no panic; what decodes re-encodes and decodes to the same value.
#![no_main]

use brpc_core::session::GoAway;
use brpc_core::wire::{HelloRequest, HelloResponse, Metadata, Request, Response};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::decode(data) {
        let again = M::decode(&m.encode_to_vec()[..]).expect("re-decode");
        assert_eq!(m, again);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Request>(data);
    round_trip::<Response>(data);
    round_trip::<HelloRequest>(data);
    round_trip::<HelloResponse>(data);
    round_trip::<Metadata>(data);
    round_trip::<GoAway>(data);
    if let Ok(r) = Response::decode(data) {
        let _ = brpc_core::status::from_wire(r.status.unwrap_or_default());
    }
    if let Ok(r) = Request::decode(data) {
        let mut headers = http::HeaderMap::new();
        let _ = brpc_core::metadata::append_key_values(&mut headers, r.metadata);
    }
});
