//! Mapping between the wire `google.rpc.Status` and `tonic::Status`, and the
//! one wording of the message-size error.
//!
//! Codes and messages map one to one; the wire's `details` travel in tonic's
//! `details()` bytes as an encoded `google.rpc.Status`, as gRPC does.

use prost::Message;
use tonic::{Code, Status};

use super::envelope as wire;

/// A wire status as a `tonic::Status`.
pub fn from_wire(status: wire::Status) -> Status {
    let code = Code::from_i32(status.code);
    if status.details.is_empty() {
        Status::new(code, status.message)
    } else {
        let message = status.message.clone();
        Status::with_details(code, message, status.encode_to_vec().into())
    }
}

/// A `tonic::Status` as a wire status.
pub fn to_wire(status: &Status) -> wire::Status {
    let details = if status.details().is_empty() {
        Vec::new()
    } else {
        wire::Status::decode(status.details())
            .map(|s| s.details)
            .unwrap_or_default()
    };
    wire::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details,
    }
}

/// `RESOURCE_EXHAUSTED` for a message of `len` bytes over the maximum `max`,
/// in the words containerd's ttrpc uses (peers match on them).
pub fn too_large(len: usize, max: usize) -> Status {
    Status::resource_exhausted(too_large_message(len, max))
}

/// The text of [`too_large`].
pub fn too_large_message(len: usize, max: usize) -> String {
    format!("message length {len} exceed maximum message size of {max}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_code_message_and_details() {
        let wire_status = wire::Status {
            code: Code::FailedPrecondition as i32,
            message: "état invalide ✗".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                value: vec![0x0a, 0x01, 0x41],
            }],
        };
        let status = from_wire(wire_status.clone());
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "état invalide ✗");
        assert_eq!(to_wire(&status), wire_status);
    }

    #[test]
    fn unknown_code_becomes_unknown() {
        let s = from_wire(wire::Status {
            code: 99,
            message: "x".into(),
            details: vec![],
        });
        assert_eq!(s.code(), Code::Unknown);
    }
}
