//! QUIC transport settings shared by both roles.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Default of [`TransportOptions::max_concurrent_calls`].
pub const DEFAULT_MAX_CONCURRENT_CALLS: u32 = 100;

/// Calls a peer may open at once on a new connection, before the window widens
/// to `max_concurrent_calls` (see [`CallLimits`](super::CallLimits)). quinn keeps
/// state for every stream it allows, so idle connections stay small.
pub const INITIAL_CALL_WINDOW: u32 = 16;

pub(crate) fn initial_call_window(max_concurrent_calls: u32) -> u32 {
    max_concurrent_calls.min(INITIAL_CALL_WINDOW)
}

/// Default size asked of the kernel for each endpoint's UDP receive and send
/// buffers (see [`TransportOptions::socket_buffer`]).
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// QUIC settings a [`Server`](../../brpc_server) or client applies to its connections.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Most calls the other side may have open to us at once (QUIC bidirectional
    /// stream limit). Further calls wait for a free slot; they do not fail.
    /// A connection starts at [`INITIAL_CALL_WINDOW`] and widens to this once
    /// three quarters of that are in use.
    pub max_concurrent_calls: u32,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Send a keep-alive this often while idle (`None`: never).
    pub keep_alive_interval: Option<Duration>,
    /// Bytes asked of the kernel for the endpoint's UDP receive and send
    /// buffers (`SO_RCVBUF` / `SO_SNDBUF`). The kernel's defaults (about
    /// 208 KB on Linux) overflow under bulk transfer: every datagram dropped
    /// there is a QUIC loss, and the congestion controller halves its window.
    /// Linux caps the value at `net.core.rmem_max` / `wmem_max`; raise those
    /// to let a larger value take effect. Memory is only used while datagrams
    /// are queued, so idle connections cost nothing extra.
    pub socket_buffer: usize,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: None,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
        }
    }
}

/// The quinn transport configuration for `options`.
pub fn transport_config(options: &TransportOptions) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.max_concurrent_bidi_streams(initial_call_window(options.max_concurrent_calls).into());
    // brpc never uses unidirectional streams.
    config.max_concurrent_uni_streams(0u32.into());
    config.max_idle_timeout(quinn::IdleTimeout::try_from(options.idle_timeout).ok());
    config.keep_alive_interval(options.keep_alive_interval);
    Arc::new(config)
}

/// A quinn endpoint on a UDP socket bound to `addr`, with the socket buffers
/// of `options`, serving with `server` if given. Must be called inside a
/// tokio runtime.
///
/// # Errors
/// The socket could not be created or bound, or there is no runtime.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    options: &TransportOptions,
) -> io::Result<quinn::Endpoint> {
    let socket = udp_socket(addr, options.socket_buffer)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
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
    fn endpoint_binds_ipv4_and_ipv6_loopback() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let options = TransportOptions::default();
        let v4 = endpoint("127.0.0.1:0".parse().unwrap(), None, &options).unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
        // ::1 may be missing in some sandboxes; only check it when it binds.
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            let v6 = endpoint("[::1]:0".parse().unwrap(), None, &options).unwrap();
            assert!(v6.local_addr().unwrap().is_ipv6());
        }
    }
}
