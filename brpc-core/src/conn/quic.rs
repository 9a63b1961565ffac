//! QUIC settings shared by both roles: transport configs, the call and receive
//! windows, stable stateless-reset keys, endpoints with raised socket buffers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Default of [`TransportOptions::max_concurrent_calls`].
pub const DEFAULT_MAX_CONCURRENT_CALLS: u32 = 100;

/// Calls a peer may open at once on a new connection, before the window widens
/// to `max_concurrent_calls` (see [`CallLimits`](super::CallLimits)). quinn keeps
/// state for every stream it allows, so idle connections stay small.
pub const INITIAL_CALL_WINDOW: u32 = 8;

pub(crate) fn initial_call_window(max_concurrent_calls: u32) -> u32 {
    max_concurrent_calls.min(INITIAL_CALL_WINDOW)
}

/// Default size asked of the kernel for each endpoint's UDP receive and send
/// buffers (see [`TransportOptions::socket_buffer`]).
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// Default of [`TransportOptions::receive_window`]: 4 MiB of unread data per
/// connection, one maximum-size message.
pub const DEFAULT_RECEIVE_WINDOW: u64 = 4 << 20;

/// Most bytes the peer may send on one call's stream ahead of what this side
/// has read (QUIC `initial_max_stream_data`; quinn's default): what one
/// unread stream can hold of its connection's receive window. A receive
/// window smaller than this is the stream window too (one stream could not
/// use more of it).
pub const STREAM_RECEIVE_WINDOW: u32 = 1_250_000;

/// The stream window of a connection whose receive window is
/// `receive_window`: [`STREAM_RECEIVE_WINDOW`], or the receive window if
/// smaller.
pub(crate) fn stream_window(receive_window: u64) -> u64 {
    receive_window.min(STREAM_RECEIVE_WINDOW.into())
}

/// Default of [`TransportOptions::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of [`TransportOptions::keep_alive_interval`].
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);

/// Connection-level receive window (QUIC `initial_max_data`) of a server's
/// connection until its Hello succeeded and `authorize` admitted it: all a
/// client that has not identified itself can make the server hold in QUIC's
/// buffers. The Hello frame itself is read as it arrives (at most
/// `max_hello_size`), which returns credit, so a Hello larger than this
/// window still gets through.
pub const PRE_HELLO_RECEIVE_WINDOW: u32 = 16 * 1024;

/// Default of [`TransportOptions::max_udp_payload`]: QUIC's minimum, which
/// every path carries, so a connection does not search its path for a
/// larger size. Searching (QUIC path-MTU discovery, up to 1452 bytes on an
/// Ethernet path) costs every new connection a few full-size probes each
/// way and their acknowledgements, more than half the datagrams of its
/// start (a connection and its Hello over loopback: 24 datagrams, 15.9 KB
/// at 1452 on both sides; 11, 4.5 KB at 1200); a fleet reconnecting at once
/// pays that for every agent (a 30 000-agent restart storm,
/// `brpc-bench storm`, two interleaved runs each: all back in 24.9 and
/// 26.7 s at this value, 40.2 and 41.2 s at 1452). Raise it for bulk
/// transfer where paths carry more.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1200;

/// A [`TransportOptions::max_udp_payload`] for peers on one host, talking
/// over loopback (whose MTU is 65 536 bytes; TCP over it moves segments of
/// up to 64 KiB). `brpc-bench --stack quinn-buf`, 1 MiB echo at c=4, two
/// interleaved runs: 246 and 257 MB/s at 1452, 610 and 681 MB/s at
/// this; larger values gained nothing more there.
pub const LOOPBACK_MAX_UDP_PAYLOAD: u16 = 32 * 1024;

/// Above this [`TransportOptions::max_udp_payload`], a connection hands the
/// kernel one datagram per write: quinn puts up to 10 datagrams in one
/// segmented write (GSO), and Linux refuses a write of more than 64 KiB in
/// all, which quinn would count as lost packets.
const GSO_MAX_UDP_PAYLOAD: u16 = 6500;

/// The smallest UDP payload QUIC allows (RFC 9000 §14).
const MIN_UDP_PAYLOAD: u16 = 1200;

/// The largest `max_udp_payload_size` QUIC allows (RFC 9000 §18.2).
const MAX_UDP_PAYLOAD: u16 = 65_527;

/// QUIC settings a [`Server`](../../brpc_server) or client applies to its connections.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Most calls the other side may have open to us at once (QUIC bidirectional
    /// stream limit). Further calls wait for a free slot; they do not fail.
    /// A connection starts at [`INITIAL_CALL_WINDOW`] and widens to this once
    /// three quarters of that are in use.
    pub max_concurrent_calls: u32,
    /// A connection that receives nothing for this long is closed, failing
    /// its calls with `UNAVAILABLE` (QUIC `max_idle_timeout`; the shorter of
    /// the two sides' values applies). Default 10 s: with keep-alives every
    /// 3 s a live peer sends at least three packets per period, each retried
    /// by QUIC's loss recovery, so only a peer that is gone (or a path that
    /// is down for the whole period) reaches it.
    pub idle_timeout: Duration,
    /// Send a keep-alive (QUIC PING) this often while idle (`None`: never).
    /// Default 3 s (a server's builder starts with `None`: the dialer's
    /// PINGs and the ACKs they draw keep both sides' idle timers running):
    /// often enough that the idle timeout never fires on a live but quiet
    /// connection and that NAT bindings (often 30 s for UDP) stay open;
    /// about 40 bytes each way per period.
    pub keep_alive_interval: Option<Duration>,
    /// Most bytes the peer may have sent on a connection that this side has
    /// not yet read, across all its calls (QUIC connection flow control;
    /// default 4 MiB; widened, to four times at most, once frames have had
    /// to wait for room in the inbound buffer budget). Each call's stream is
    /// further limited to [`STREAM_RECEIVE_WINDOW`] (1.25 MB) or this, if
    /// smaller. With a server's `max_connections`, this bounds what QUIC
    /// buffers for peers.
    pub receive_window: u64,
    /// Bytes asked of the kernel for the endpoint's UDP receive and send
    /// buffers (`SO_RCVBUF` / `SO_SNDBUF`). The kernel's defaults (about
    /// 208 KB on Linux) overflow under bulk transfer: every datagram dropped
    /// there is a QUIC loss, and the congestion controller halves its window.
    /// Linux caps the value at `net.core.rmem_max` / `wmem_max`; raise those
    /// to let a larger value take effect. Memory is only used while datagrams
    /// are queued, so idle connections cost nothing extra.
    pub socket_buffer: usize,
    /// Largest UDP payload this side sends (default
    /// [`DEFAULT_MAX_UDP_PAYLOAD`], 1200 bytes: QUIC's minimum, no path-MTU
    /// search) and accepts (this, and at least 1472). Connections start at
    /// 1200; above it, QUIC path-MTU discovery raises each to the largest
    /// size its path carries, up to the smaller of the two sides' values,
    /// with a few full-size probes each way when the connection starts.
    /// Raise it on both sides where paths carry larger packets, for bulk
    /// transfer with fewer packets: 1452 on Ethernet paths, loopback
    /// ([`LOOPBACK_MAX_UDP_PAYLOAD`], 2.5 times the throughput there) or
    /// jumbo-frame networks (8952). Each connection that reaches the size
    /// keeps a send buffer of it, and each endpoint a receive buffer of 2048
    /// times what it accepts (address space, touched only by datagrams that
    /// arrive); above 6500 bytes datagrams are written one at a time. Values outside
    /// QUIC's range count as its bounds, 1200 and 65 527.
    pub max_udp_payload: u16,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive_interval: Some(DEFAULT_KEEP_ALIVE_INTERVAL),
            receive_window: DEFAULT_RECEIVE_WINDOW,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
        }
    }
}

#[doc(hidden)]
/// The quinn transport configuration a dialer uses: the call window and
/// receive window of `options` from the start (it only talks to the server
/// it chose, which opens calls only after Hello).
pub fn transport_config(options: &TransportOptions) -> Arc<quinn::TransportConfig> {
    let mut config = base_config(options);
    config.max_concurrent_bidi_streams(initial_call_window(options.max_concurrent_calls).into());
    config.receive_window(clamp_varint(options.receive_window));
    Arc::new(config)
}

#[doc(hidden)]
/// The quinn transport configuration a server uses for every new connection:
/// until Hello succeeds the client may open only the Hello stream and send
/// at most [`PRE_HELLO_RECEIVE_WINDOW`] bytes ahead of what the server read.
/// [`admit`] widens both once the client is admitted.
pub fn server_transport_config(options: &TransportOptions) -> Arc<quinn::TransportConfig> {
    let mut config = base_config(options);
    config.max_concurrent_bidi_streams(1u32.into());
    config.receive_window(PRE_HELLO_RECEIVE_WINDOW.into());
    Arc::new(config)
}

#[doc(hidden)]
/// Opens an admitted connection up to the windows of `options`: the initial
/// call window and the full receive window (the server's half of
/// [`server_transport_config`]).
pub fn admit(connection: &quinn::Connection, options: &TransportOptions) {
    connection.set_receive_window(clamp_varint(options.receive_window));
    connection
        .set_max_concurrent_bi_streams(initial_call_window(options.max_concurrent_calls).into());
}

fn base_config(options: &TransportOptions) -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    // brpc never uses unidirectional streams.
    config.max_concurrent_uni_streams(0u32.into());
    config.stream_receive_window(clamp_varint(stream_window(options.receive_window)));
    // Nor QUIC datagrams: none are accepted (quinn would otherwise advertise
    // them and buffer up to a receive window of them per connection, which
    // nothing here reads).
    config.datagram_receive_buffer_size(None);
    config.max_idle_timeout(quinn::IdleTimeout::try_from(options.idle_timeout).ok());
    config.keep_alive_interval(options.keep_alive_interval);
    let payload = max_udp_payload(options);
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(payload);
    config.mtu_discovery_config(Some(discovery));
    if payload > GSO_MAX_UDP_PAYLOAD {
        config.enable_segmentation_offload(false);
    }
    config
}

/// [`TransportOptions::max_udp_payload`], within what QUIC allows.
fn max_udp_payload(options: &TransportOptions) -> u16 {
    options
        .max_udp_payload
        .clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
}

fn clamp_varint(value: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(value.min(quinn::VarInt::MAX.into_inner()))
        .unwrap_or(quinn::VarInt::MAX)
}

#[doc(hidden)]
/// An endpoint configuration whose stateless-reset key and connection-id
/// validation key are derived from a stable `secret` (a server's TLS private
/// key, or a configured secret). A server restarted with the same secret
/// recognises its predecessor's connection ids as its own and answers their
/// packets with a stateless reset that the clients accept, so they learn
/// within one round trip that the connection is gone instead of waiting out
/// their idle timeout. (quinn's default draws both keys at random per
/// endpoint, and drops packets with ids it did not issue.)
pub fn stable_endpoint_config(secret: &[u8]) -> quinn::EndpointConfig {
    let reset_key = derived_key(b"brpc stateless reset key v1\0", secret);
    let ids = SignedConnectionIds::for_secret(secret);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // quinn sends at most one stateless reset per 20 ms by default (and one
    // per batch of datagrams received at once): after a restart under a
    // fleet, a few agents a second learned of it and the rest waited out
    // their idle timeout (brpc-bench storm: 2000 agents back after 13.2 s,
    // 3.2 s without the limit). A reset is always smaller than the packet
    // that caused it, and none is sent for packets too small to carry one,
    // so answering every stray packet amplifies nothing and cannot loop.
    config.min_reset_interval(Duration::ZERO);
    config.cid_generator(move || Box::new(ids.clone()));
    config
}

/// An HMAC-SHA256 key for `label`'s use, derived from `secret`.
fn derived_key(label: &[u8], secret: &[u8]) -> ring::hmac::Key {
    let digest = ring::digest::digest(&ring::digest::SHA256, &[label, secret].concat());
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref())
}

/// Connection ids a server issues and can tell from others after a restart:
/// [`CID_NONCE_LEN`] random bytes, then the first [`CID_SIGNATURE_LEN`] bytes
/// of their HMAC-SHA256 under a key derived from the server's stable secret.
///
/// quinn's `HashedConnectionIdGenerator` does the same with 3 random bytes:
/// 16.7 million ids. After a restart under a fleet, the ids of the old
/// connections and of the new ones then overlapped: an agent whose old id the
/// new server had meanwhile issued to another agent had its packets routed to
/// that connection (which could not decrypt them) instead of answered with a
/// stateless reset, and learned of the restart only at its idle timeout
/// (`brpc-bench storm 10000`: 9–14 agents in 10 000, 40 s for all back
/// instead of 10 s; quinn gives a connection up to 8 ids, so 100 000 of
/// them hold up to 800 000 of the 16.7 million). 8 random bytes make that
/// overlap negligible.
#[derive(Clone)]
struct SignedConnectionIds {
    key: ring::hmac::Key,
}

/// Random bytes at the start of a [`SignedConnectionIds`] id.
const CID_NONCE_LEN: usize = 8;
/// Signature bytes after the nonce: enough that a stray packet rarely passes
/// as one of ours (it would be answered with a stateless reset, smaller than
/// itself; nothing worse).
const CID_SIGNATURE_LEN: usize = 4;

impl SignedConnectionIds {
    /// The ids of a server with this stable secret.
    fn for_secret(secret: &[u8]) -> Self {
        Self {
            key: derived_key(b"brpc connection id key v2\0", secret),
        }
    }

    fn signature(&self, nonce: &[u8]) -> ring::hmac::Tag {
        ring::hmac::sign(&self.key, nonce)
    }
}

impl quinn_proto::ConnectionIdGenerator for SignedConnectionIds {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let mut id = [0u8; CID_NONCE_LEN + CID_SIGNATURE_LEN];
        let (nonce, signature) = id.split_at_mut(CID_NONCE_LEN);
        // rustls's ring provider uses the same generator; it cannot fail on
        // the platforms ring supports.
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), nonce)
            .expect("the system's random number generator failed");
        signature.copy_from_slice(&self.signature(nonce).as_ref()[..CID_SIGNATURE_LEN]);
        quinn_proto::ConnectionId::new(&id)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != CID_NONCE_LEN + CID_SIGNATURE_LEN {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, signature) = cid.split_at(CID_NONCE_LEN);
        let expected = self.signature(nonce);
        // Not secret: a forged id earns a stateless reset, nothing else.
        if expected.as_ref()[..CID_SIGNATURE_LEN] == *signature {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_NONCE_LEN + CID_SIGNATURE_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[doc(hidden)]
/// A quinn endpoint on a UDP socket bound to `addr`, with the socket buffers
/// of `options`, serving with `server` if given, with `config` (see
/// [`stable_endpoint_config`]; `None`: quinn's default, with random keys),
/// accepting datagrams of up to `options.max_udp_payload` (quinn's 1472 at
/// least). Must be called inside a tokio runtime.
///
/// # Errors
/// The socket could not be created or bound, or there is no runtime.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    options: &TransportOptions,
    config: Option<quinn::EndpointConfig>,
) -> io::Result<quinn::Endpoint> {
    let socket = udp_socket(addr, options.socket_buffer)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime found"))?;
    let mut config = config.unwrap_or_default();
    // quinn's default (1472, an Ethernet frame's over IPv4) is above brpc's
    // default, 1200: peers configured higher may send up to it.
    let default = u16::try_from(config.get_max_udp_payload_size()).unwrap_or(MAX_UDP_PAYLOAD);
    let accepted = max_udp_payload(options).max(default);
    config
        .max_udp_payload_size(accepted)
        .map_err(|e| io::Error::other(format!("max_udp_payload {accepted}: {e}")))?;
    quinn::Endpoint::new(config, server, socket, runtime)
}

/// A UDP socket bound to `addr` that asked the kernel for `buffer` bytes of
/// receive and send buffer (`0`: the kernel's default).
fn udp_socket(addr: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a kernel that refuses a size keeps its default, which
    // works, only slower under load.
    if buffer > 0 {
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn max_udp_payload_is_kept_within_quics_bounds() {
        let options = |bytes| TransportOptions {
            max_udp_payload: bytes,
            ..TransportOptions::default()
        };
        assert_eq!(max_udp_payload(&options(0)), 1200);
        assert_eq!(max_udp_payload(&options(1452)), 1452);
        assert_eq!(max_udp_payload(&options(u16::MAX)), 65_527);
        // An endpoint takes any value, and accepts at least quinn's 1472.
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for bytes in [0, 1452, LOOPBACK_MAX_UDP_PAYLOAD, u16::MAX] {
            endpoint(loopback, None, &options(bytes), None).expect("endpoint");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn socket_buffers_are_raised_above_the_kernel_default() {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let size = |s: &std::net::UdpSocket| {
            let s = socket2::SockRef::from(s);
            (s.recv_buffer_size().unwrap(), s.send_buffer_size().unwrap())
        };
        let default = size(&udp_socket(loopback, 0).unwrap());
        let raised = size(&udp_socket(loopback, DEFAULT_SOCKET_BUFFER).unwrap());
        // Linux caps the request at net.core.[rw]mem_max and doubles it; even
        // at the smallest usual cap (208 KB) the result exceeds the default.
        assert!(raised.0 > default.0, "receive {raised:?} vs {default:?}");
        assert!(raised.1 > default.1, "send {raised:?} vs {default:?}");
    }

    #[test]
    fn a_server_with_the_same_secret_recognises_its_connection_ids() {
        use quinn_proto::ConnectionIdGenerator;
        let mut before = SignedConnectionIds::for_secret(b"secret");
        let after = SignedConnectionIds::for_secret(b"secret");
        let other = SignedConnectionIds::for_secret(b"another secret");
        for _ in 0..100 {
            let id = before.generate_cid();
            assert_eq!(id.len(), before.cid_len());
            assert!(after.validate(&id).is_ok());
            assert!(other.validate(&id).is_err());
            let mut altered = id.to_vec();
            altered[0] ^= 1;
            let altered = quinn_proto::ConnectionId::new(&altered);
            assert!(after.validate(&altered).is_err());
            let shorter = quinn_proto::ConnectionId::new(&id[..id.len() - 1]);
            assert!(after.validate(&shorter).is_err());
        }
    }

    /// After a restart, the old connections' ids must not be issued again to
    /// new connections: a client still sending on its old id would reach a
    /// stranger's connection instead of getting a stateless reset. A server
    /// with 100 000 connections holds several ids for each, and issues as
    /// many again when they reconnect.
    #[test]
    fn connection_ids_do_not_repeat_across_a_fleet() {
        use quinn_proto::ConnectionIdGenerator;
        let mut ids = SignedConnectionIds::for_secret(b"secret");
        let mut seen = std::collections::HashSet::new();
        let repeated = (0..200_000)
            .filter(|_| !seen.insert(ids.generate_cid()))
            .count();
        // quinn's HashedConnectionIdGenerator (3 random bytes) repeats about
        // 1 200 times in 200 000.
        assert_eq!(repeated, 0);
    }

    #[test]
    fn defaults_notice_a_silent_peer_within_ten_seconds() {
        let options = TransportOptions::default();
        assert!(options.idle_timeout <= Duration::from_secs(10));
        let keep_alive = options
            .keep_alive_interval
            .expect("keep-alive on by default");
        // At least three keep-alives per idle period.
        assert!(keep_alive * 3 <= options.idle_timeout, "{keep_alive:?}");
        assert!(options.receive_window <= 16 << 20, "bounded receive window");
        assert!(u64::from(PRE_HELLO_RECEIVE_WINDOW) <= 64 * 1024);
    }

    #[test]
    fn endpoint_binds_ipv4_and_ipv6_loopback() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let options = TransportOptions::default();
        let v4 = endpoint("127.0.0.1:0".parse().unwrap(), None, &options, None).unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
        // ::1 may be missing in some sandboxes; only check it when it binds.
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            let v6 = endpoint("[::1]:0".parse().unwrap(), None, &options, None).unwrap();
            assert!(v6.local_addr().unwrap().is_ipv6());
        }
    }
}
