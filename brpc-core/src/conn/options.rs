//! [`ConnectionOptions`]: the settings the server and client builders share,
//! held once. The builders' setters for them are generated from one list
//! ([`builder_setters!`](crate::builder_setters)), so each is written and
//! documented once.

use std::time::Duration;

use super::peer::CallLimits;
use super::quic::TransportOptions;

/// The limits and QUIC transport settings of each connection, the same on
/// both sides: the server's builder and the client's hold one each, and
/// `options(..)` on either takes a whole set (e.g. one shared by a fleet's
/// configuration code).
///
/// ```
/// use std::time::Duration;
/// use brpc_core::ConnectionOptions;
///
/// let options = ConnectionOptions::default()
///     .max_message_size(1 << 20)
///     .idle_timeout(Duration::from_secs(30))
///     .keep_alive_interval(Some(Duration::from_secs(10)));
/// assert_eq!(options.limits.max_message_size, 1 << 20);
/// // Server::builder().options(options.clone()); Client::builder().options(options);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConnectionOptions {
    /// What each call may do (message size, stall limit, buffering).
    pub limits: CallLimits,
    /// The QUIC settings (windows, timeouts, socket buffers).
    pub transport: TransportOptions,
}

impl ConnectionOptions {
    /// Largest message sent or received on any call (default 4 MiB).
    #[must_use]
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.limits.max_message_size = bytes;
        self
    }

    /// Most calls the other side may have open to this one at once (default
    /// 100). A connection starts by allowing 8 and widens to this once 6
    /// are in use: quinn keeps state for every stream it allows.
    #[must_use]
    pub fn max_concurrent_calls(mut self, calls: u32) -> Self {
        self.transport.max_concurrent_calls = calls;
        self.limits.max_concurrent_calls = calls;
        self
    }

    /// Bytes asked of the kernel for the UDP socket's receive and send
    /// buffers (default 4 MiB; `0` keeps the kernel's default). Small
    /// buffers drop datagrams under bulk transfer, which QUIC treats as
    /// congestion. Linux caps the value at `net.core.rmem_max` / `wmem_max`.
    #[must_use]
    pub fn socket_buffer(mut self, bytes: usize) -> Self {
        self.transport.socket_buffer = bytes;
        self
    }

    /// Largest UDP payload this side sends (default 1200, QUIC's minimum:
    /// connections do not probe their path for more) and accepts (this, and
    /// at least 1472). Set it on both sides to let QUIC path-MTU discovery
    /// grow a connection's packets where its path carries them: Ethernet
    /// (1452), loopback
    /// ([`LOOPBACK_MAX_UDP_PAYLOAD`](super::LOOPBACK_MAX_UDP_PAYLOAD), about
    /// 2.5 times the bulk throughput there) or jumbo frames (8952). See
    /// [`TransportOptions::max_udp_payload`] for what it costs.
    #[must_use]
    pub fn max_udp_payload(mut self, bytes: u16) -> Self {
        self.transport.max_udp_payload = bytes;
        self
    }

    /// Close a connection that has received nothing for this long, failing
    /// its calls with `UNAVAILABLE` (default 10 s; the shorter of the two
    /// sides' values applies). A server drops the peer from its registry; a
    /// client reconnects. See [`TransportOptions::idle_timeout`] for why
    /// 10 s.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.transport.idle_timeout = timeout;
        self
    }

    /// Send a QUIC keep-alive this often while a connection is quiet
    /// (default 3 s; `None` disables). Keep it well below both sides' idle
    /// timeouts. A server's builder starts with `None`: the client's
    /// keep-alives, each acknowledged, keep a connection alive for both
    /// sides, and a server pinging its whole fleet too would double what an
    /// idle fleet costs it. Set one on a server whose clients send none.
    #[must_use]
    pub fn keep_alive_interval(mut self, interval: Option<Duration>) -> Self {
        self.transport.keep_alive_interval = interval;
        self
    }

    /// Most bytes the other side may have in flight to this one that this
    /// side has not read yet, across all calls (QUIC connection flow
    /// control; default 4 MiB; widened, to four times at most, once frames
    /// have had to wait for room in
    /// [`buffer_per_connection`](Self::buffer_per_connection)).
    /// Each call's stream may hold at most 1.25 MB of it, or all of it if
    /// smaller. A server grants a connection only
    /// [`PRE_HELLO_RECEIVE_WINDOW`](super::PRE_HELLO_RECEIVE_WINDOW) (16 KiB)
    /// and one stream until its Hello succeeds.
    #[must_use]
    pub fn receive_window(mut self, bytes: u64) -> Self {
        self.transport.receive_window = bytes;
        self
    }

    /// Most bytes of partly received frames this side holds for one
    /// connection (default 16 MiB, never less than one maximum-size
    /// message). Each frame reserves its announced length before its data is
    /// read. A new call that finds no room is answered `RESOURCE_EXHAUSTED`
    /// (stream code `0x05`); a frame of a call already running waits, and
    /// QUIC flow control slows its sender. The connection's receive window
    /// is widened by a stream window (1.25 MB, or the receive window if
    /// smaller) for each of the most frames that have waited at once, so that
    /// the data their streams hold unread does not starve the frames being
    /// received; at most as many wait as there are stream windows in this
    /// (at least one maximum-size message) or three receive windows,
    /// whichever is less (at least one). A frame
    /// beyond that ends its call with `RESOURCE_EXHAUSTED`: raise this and
    /// `receive_window` to have more large messages in flight on one
    /// connection at once.
    #[must_use]
    pub fn buffer_per_connection(mut self, bytes: usize) -> Self {
        self.limits.buffer_per_connection = bytes;
        self
    }

    /// How long a call may stall mid-frame (or before its Request) before
    /// it is reset with stream code `0x04` (default 30 s; `None` disables).
    /// The answer to a call this side ended early (its deadline, a bad
    /// Request) waits as long for the peer's flow-control credit.
    #[must_use]
    pub fn call_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.limits.idle_timeout = timeout;
        self
    }
}

/// The setters both builders share, generated into each from this one list:
/// the [`ConnectionOptions`] ones (the builder has a field `options` of that
/// type) and the hosted services' ones (a field `router`, a
/// [`Router`](crate::Router)). Not for use outside brpc's role crates.
#[doc(hidden)]
#[macro_export]
macro_rules! builder_setters {
    () => {
        /// Takes a whole set of connection options at once (see
        /// [`ConnectionOptions`](brpc_core::ConnectionOptions)), replacing
        /// what the setters for them set before.
        pub fn options(mut self, options: $crate::ConnectionOptions) -> Self {
            self.options = options;
            self
        }

        /// Hosts a tonic-generated service (`FooServer::new(impl)`) for the
        /// other side to call.
        pub fn add_service<S: $crate::bridge::HostedService>(mut self, service: S) -> Self {
            self.router = self.router.add_service(service);
            self
        }

        /// Hosts a service on brpc's direct path, the lean way for the other
        /// side to call it: what `brpc-build` generates beside tonic's code,
        /// over the same trait (`greeter_brpc::GreeterService::new(impl
        /// Greeter)`). Its calls build no http request or response; tower
        /// [`layer`](Self::layer)s do not wrap them.
        pub fn add_direct<S: $crate::direct::DirectService>(mut self, service: S) -> Self {
            self.router = self.router.add_direct(service);
            self
        }

        /// With `true`, every call this side serves runs as a task of its
        /// own (as tonic's server runs each request), for handlers that block
        /// their thread or compute for long. By default the calls of one
        /// connection are polled by the task serving it: cheaper per call,
        /// but a blocking handler holds up the connection's other calls
        /// (a call that reads or writes a frame of 64 KiB or more over QUIC
        /// moves to a task of its own, but blocking work belongs in
        /// `spawn_blocking` all the same).
        pub fn task_per_call(mut self, yes: bool) -> Self {
            self.router = self.router.task_per_call(yes);
            self
        }

        /// Passes every call this side serves through a tower `layer` (e.g.
        /// `ConcurrencyLimitLayer`, `TimeoutLayer`, an auth layer). The first
        /// layer added is the outermost; the stack is shared by all
        /// connections. Calls to services added with
        /// [`add_direct`](Self::add_direct) skip the layers.
        pub fn layer<L: $crate::bridge::CallLayer>(mut self, layer: L) -> Self {
            self.router = self.router.layer(layer);
            self
        }

        $crate::builder_setters!(@options
            max_message_size(bytes: usize):
                "Largest message sent or received on any call (default 4 MiB).";
            max_concurrent_calls(calls: u32):
                "Most calls the other side may have open to this one at once (default 100).";
            socket_buffer(bytes: usize):
                "Bytes asked of the kernel for the UDP socket's buffers (default 4 MiB).";
            max_udp_payload(bytes: u16):
                "Largest UDP payload this side sends (default 1200, no path-MTU search; Ethernet 1452, loopback `LOOPBACK_MAX_UDP_PAYLOAD`) and accepts (at least 1472).";
            idle_timeout(timeout: std::time::Duration):
                "Close a connection that has received nothing for this long (default 10 s).";
            keep_alive_interval(interval: Option<std::time::Duration>):
                "Send a QUIC keep-alive this often while a connection is quiet (default 3 s on a client, none on a server).";
            receive_window(bytes: u64):
                "Most unread bytes the other side may have in flight to this one (default 4 MiB).";
            buffer_per_connection(bytes: usize):
                "Most bytes of partly received frames held for one connection (default 16 MiB).";
            call_idle_timeout(timeout: Option<std::time::Duration>):
                "How long a call may stall mid-frame before it is reset (default 30 s).";
        );
    };
    (@options $( $name:ident($arg:ident: $ty:ty): $summary:literal; )*) => {
        $(
            #[doc = $summary]
            #[doc = ""]
            #[doc = concat!(
                "Sets [`ConnectionOptions::", stringify!($name),
                "`](brpc_core::ConnectionOptions::", stringify!($name),
                "), which says more."
            )]
            pub fn $name(mut self, $arg: $ty) -> Self {
                self.options = self.options.$name($arg);
                self
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_setter_sets_its_field_and_the_call_limit_is_kept_in_both_places() {
        let options = ConnectionOptions::default()
            .max_message_size(1)
            .max_concurrent_calls(2)
            .socket_buffer(3)
            .idle_timeout(Duration::from_secs(4))
            .keep_alive_interval(None)
            .receive_window(6)
            .buffer_per_connection(7)
            .call_idle_timeout(Some(Duration::from_secs(8)));
        let (limits, transport) = (options.limits, options.transport);
        assert_eq!(limits.max_message_size, 1);
        assert_eq!(limits.max_concurrent_calls, 2);
        assert_eq!(transport.max_concurrent_calls, 2);
        assert_eq!(transport.socket_buffer, 3);
        assert_eq!(transport.idle_timeout, Duration::from_secs(4));
        assert_eq!(transport.keep_alive_interval, None);
        assert_eq!(transport.receive_window, 6);
        assert_eq!(limits.buffer_per_connection, 7);
        assert_eq!(limits.idle_timeout, Some(Duration::from_secs(8)));
    }
}
