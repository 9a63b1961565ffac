//! QUIC transport settings shared by both roles.

use std::sync::Arc;
use std::time::Duration;

/// QUIC settings a [`Server`](../../brpc_server) or client applies to its connections.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Most calls the other side may have open to us at once (QUIC bidirectional
    /// stream limit). Further calls wait for a free slot; they do not fail.
    pub max_concurrent_calls: u32,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Send a keep-alive this often while idle (`None`: never).
    pub keep_alive_interval: Option<Duration>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            max_concurrent_calls: 100,
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: None,
        }
    }
}

/// The quinn transport configuration for `options`.
pub fn transport_config(options: &TransportOptions) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.max_concurrent_bidi_streams(options.max_concurrent_calls.into());
    // brpc never uses unidirectional streams.
    config.max_concurrent_uni_streams(0u32.into());
    config.max_idle_timeout(quinn::IdleTimeout::try_from(options.idle_timeout).ok());
    config.keep_alive_interval(options.keep_alive_interval);
    Arc::new(config)
}
