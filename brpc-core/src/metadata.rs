//! Metadata: HTTP/gRPC headers as ttrpc `KeyValue`s and back, and `grpc-timeout`
//! as ttrpc's `timeout_nano`.
//!
//! Values cross unchanged: ASCII values as they are, `-bin` values as the base64
//! text tonic already keeps them in, so binary metadata round-trips byte-exact.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tonic::Status;

use crate::wire::KeyValue;

/// Headers that belong to the gRPC-over-HTTP mapping, not to the application:
/// never sent as ttrpc metadata, and never accepted from a peer.
const RESERVED: &[&str] = &[
    "te",
    "content-type",
    "content-length",
    "user-agent",
    "host",
    "connection",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
];

/// `grpc-timeout` as a name made once: a name made from a `&str` is parsed
/// (and, inserted, copied) on every use.
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `grpc-status`, made once (see [`GRPC_TIMEOUT`]).
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

fn is_reserved(key: &str) -> bool {
    RESERVED.contains(&key)
}

/// The application metadata in `headers`, one `KeyValue` per value.
pub fn to_key_values(headers: &HeaderMap) -> Vec<KeyValue> {
    headers
        .iter()
        .filter(|(name, _)| !is_reserved(name.as_str()))
        .filter_map(|(name, value)| {
            // HeaderMap names are already lower-case. tonic only admits visible
            // ASCII in values, so a non-UTF-8 value can only come from a raw
            // http client; it is dropped rather than mangled.
            let value = value.to_str().ok()?;
            Some(KeyValue::new(name.as_str(), value))
        })
        .collect()
}

/// Appends a peer's metadata to `headers`, keys lower-cased.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the entry when a key or value is not a valid header.
pub fn append_key_values(headers: &mut HeaderMap, entries: Vec<KeyValue>) -> Result<(), Status> {
    for KeyValue { key, value } in entries {
        let key = key.to_ascii_lowercase();
        if is_reserved(&key) {
            continue;
        }
        let name = HeaderName::from_bytes(key.as_bytes())
            .map_err(|_| Status::invalid_argument(format!("invalid metadata key {key:?}")))?;
        // ttrpc's values are any UTF-8 string; gRPC text metadata (what a
        // tonic handler reads with `to_str`) is visible ASCII only.
        if !key.ends_with("-bin")
            && !value
                .bytes()
                .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            return Err(Status::invalid_argument(format!(
                "metadata value for key {key:?} is not printable ASCII: text metadata carries \
                 ASCII only (as in gRPC); send other bytes base64-encoded under a key ending \
                 in \"-bin\""
            )));
        }
        let value = HeaderValue::from_str(&value).map_err(|_| {
            Status::invalid_argument(format!("invalid metadata value for key {key:?}"))
        })?;
        // A header map holds at most 32 768 entries; past that, append
        // would panic.
        headers.try_append(name, value).map_err(|_| {
            Status::resource_exhausted("too many metadata entries for one header map")
        })?;
    }
    Ok(())
}

/// [`append_key_values`] for the metadata a peer answered a call with: a bad
/// entry is the peer's fault, not the caller's, so it is `INTERNAL` (the
/// code of a malformed answer), not `INVALID_ARGUMENT`.
///
/// # Errors
/// `INTERNAL` naming the bad entry.
pub fn append_answer_key_values(
    headers: &mut HeaderMap,
    entries: Vec<KeyValue>,
) -> Result<(), Status> {
    append_key_values(headers, entries).map_err(|status| {
        Status::internal(format!(
            "the peer answered with bad metadata: {}",
            status.message()
        ))
    })
}

/// Parses a `grpc-timeout` value ("100m", "5S", …).
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` value: at most 8 digits, in the finest
/// unit that fits.
pub fn format_grpc_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        // Round up so the receiver never sees a shorter timeout than was left.
        let n = nanos.div_ceil(per);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}"))
                .unwrap_or(HeaderValue::from_static("99999999H"));
        }
    }
    HeaderValue::from_static("99999999H")
}

/// The remaining time as ttrpc's `timeout_nano` (0 = none).
pub fn to_timeout_nano(timeout: Option<Duration>) -> i64 {
    match timeout {
        None => 0,
        Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX).max(1),
    }
}

/// ttrpc's `timeout_nano` as a duration; 0 means none. A negative value
/// means the deadline had already passed when the caller sent the call (Go's
/// ttrpc does this): the serving side answers `DEADLINE_EXCEEDED` without
/// running the handler, and this function returns `None` for it.
pub fn from_timeout_nano(nanos: i64) -> Option<Duration> {
    (nanos > 0).then(|| Duration::from_nanos(nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_entries_are_an_error_not_a_panic() {
        // A header map holds at most 32 768 entries; a peer can send more.
        let entries: Vec<KeyValue> = (0..40_000)
            .map(|i| KeyValue::new(format!("k{i}"), "v"))
            .collect();
        let mut headers = HeaderMap::new();
        let status = append_key_values(&mut headers, entries).expect_err("too many");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn reserved_headers_stay_out() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert("grpc-timeout", HeaderValue::from_static("5S"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.insert("x-bin", HeaderValue::from_static("AAEC/w"));
        let kv = to_key_values(&h);
        assert_eq!(
            kv,
            vec![
                KeyValue::new("x-a", "1"),
                KeyValue::new("x-a", "2"),
                KeyValue::new("x-bin", "AAEC/w"),
            ]
        );
        let mut back = HeaderMap::new();
        append_key_values(&mut back, kv).unwrap();
        assert_eq!(back.get_all("x-a").iter().count(), 2);
        assert_eq!(back.get("x-bin").unwrap(), "AAEC/w");
    }

    #[test]
    fn peer_cannot_set_reserved_or_invalid_headers() {
        let mut h = HeaderMap::new();
        append_key_values(&mut h, vec![KeyValue::new("GRPC-TIMEOUT", "1n")]).unwrap();
        assert!(h.is_empty());
        let err = append_key_values(&mut h, vec![KeyValue::new("bad key", "v")]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = append_key_values(&mut h, vec![KeyValue::new("k", "line\nbreak")]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        append_key_values(&mut h, vec![KeyValue::new("X-Upper", "v")]).unwrap();
        assert_eq!(h.get("x-upper").unwrap(), "v");
    }

    #[test]
    fn grpc_timeout_round_trip() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(200),
            Duration::from_secs(5),
            Duration::from_secs(86_400 * 365),
        ] {
            let v = format_grpc_timeout(d);
            let back = parse_grpc_timeout(&v).unwrap();
            assert!(back >= d, "{v:?}");
            assert!(back - d < d / 1000 + Duration::from_nanos(1), "{v:?}");
        }
        assert_eq!(
            parse_grpc_timeout(&HeaderValue::from_static("100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(&HeaderValue::from_static("100x")), None);
        assert_eq!(
            parse_grpc_timeout(&HeaderValue::from_static("123456789S")),
            None
        );
        assert_eq!(to_timeout_nano(Some(Duration::from_secs(5))), 5_000_000_000);
        assert_eq!(from_timeout_nano(0), None);
        assert_eq!(from_timeout_nano(-3), None);
    }

    #[test]
    fn non_ascii_text_metadata_is_refused_with_a_hint() {
        let mut headers = HeaderMap::new();
        let err = append_key_values(&mut headers, vec![KeyValue::new("x-name", "Zoë")])
            .expect_err("non-ASCII value");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("-bin"), "{}", err.message());
        append_key_values(&mut headers, vec![KeyValue::new("x-name", "Zoe\tok")])
            .expect("ASCII with a tab");
        assert_eq!(headers["x-name"], "Zoe\tok");
    }
}
