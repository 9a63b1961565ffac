//! Clients on Unix sockets: ttrpc over a byte stream, from brpc clients and
//! plain ttrpc ones alike. Each is admitted by its credentials, counted
//! against the connection limit, listed in the same registry as QUIC clients
//! and served by the same engine; only the accepting differs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use brpc_core::ConnectionId;
use brpc_core::bytestream;
use brpc_core::conn::{UnixCredentials, codes};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::state::{Counted, Listed, Shared};

/// One Unix socket being listened on.
pub(crate) struct Listening {
    path: PathBuf,
    accept: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// Stops accepting, drops the connection tasks (their peers are closed
    /// by the caller) and removes the socket file.
    pub(crate) fn stop(self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (replacing a stale socket file) and starts accepting.
pub(crate) fn listen(shared: &Arc<Shared>, path: &Path) -> std::io::Result<Listening> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    tracing::info!(path = %path.display(), "brpc server listening on a Unix socket");
    Ok(Listening {
        path: path.to_path_buf(),
        accept: tokio::spawn(accept_loop(shared.clone(), listener)),
    })
}

async fn accept_loop(shared: Arc<Shared>, listener: UnixListener) {
    // Owning the connection tasks here means stopping the listener drops
    // every connection task and, through it, every handler.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Some((credentials, counted)) = admit(&shared, &stream) {
                        connections.spawn(run_connection(shared.clone(), stream, credentials, counted));
                    }
                }
                Err(error) => {
                    // Out of file descriptors, most likely: wait for some to
                    // be freed rather than spin.
                    tracing::warn!(%error, "accepting on a Unix socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Whether to serve the client on `stream`: not while shutting down, only
/// with credentials the server accepts, and within the connection limit.
/// Gives its credentials and its place in the connection count.
fn admit(shared: &Shared, stream: &UnixStream) -> Option<(Option<UnixCredentials>, Counted)> {
    if shared.shutting_down.load(Ordering::SeqCst) {
        return None;
    }
    let credentials = bytestream::credentials(stream);
    if let Some(check) = &shared.unix_check
        && !credentials.is_some_and(|c| check(&c))
    {
        tracing::info!(?credentials, "Unix client refused by its credentials");
        return None;
    }
    let admitted = shared.connections.fetch_add(1, Ordering::SeqCst) < shared.max_connections;
    let counted = Counted(shared.connections.clone());
    if !admitted {
        tracing::info!(
            limit = shared.max_connections,
            "Unix client refused: at the connection limit"
        );
        return None;
    }
    Some((credentials, counted))
}

async fn run_connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    credentials: Option<UnixCredentials>,
    _counted: Counted,
) {
    let id = ConnectionId(shared.next_id.fetch_add(1, Ordering::Relaxed));
    let peer = bytestream::accept(
        stream,
        id,
        shared.limits,
        credentials,
        shared.buffer_total.clone(),
    );
    shared.registry.insert(peer.clone());
    // Unlists the peer however this task ends.
    let listed = Listed {
        shared,
        peer: peer.clone(),
    };
    // A shutdown that began after `admit` may have taken its list of peers
    // to drain before this one was listed: closed at once, as `admit` would
    // have refused it (listed first, read second; see the QUIC side).
    if listed.shared.shutting_down.load(Ordering::SeqCst) {
        peer.close(codes::CONN_GOING_AWAY, "server shutting down");
        return;
    }
    let span = tracing::info_span!("brpc.connection", id = %id, unix = true);
    async {
        tracing::debug!(?credentials, "Unix client connected");
        brpc_core::serve(peer.clone(), listed.shared.router.clone()).await;
        tracing::debug!(reason = ?peer.close_reason(), "Unix client disconnected");
    }
    .instrument(span)
    .await;
}
