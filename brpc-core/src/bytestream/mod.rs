//! The same ttrpc frames over a byte stream (a Unix socket here; any
//! `AsyncRead + AsyncWrite` through [`serve_stream`] and [`connect_stream`]),
//! calls multiplexed by stream id as containerd's ttrpc does, so brpc talks
//! to plain ttrpc peers (containerd shims, ttrpc-rust, Go ttrpc) both ways.
//!
//! The same tonic services ([`Router`]) and [`Channel`](crate::Channel) work
//! here as over QUIC. What a byte stream lacks: per-call flow control (a call
//! that stops reading is dropped after its 64-frame buffer stays full for a
//! second), cancellation signals (ttrpc has none: a dropped call is abandoned
//! locally, the handler runs to its deadline), and TLS (use Unix socket
//! permissions and [`UnixCredentials`]).
//!
//! brpc peers recognise each other with the `brpc.v1.Session/Hello` call: a
//! brpc dialer sends it first; a plain ttrpc server answers it with an error,
//! and the dialer then speaks plain ttrpc. Only after a successful Hello does
//! either side send response metadata frames, and only then may the acceptor
//! call the dialer (even stream ids).

mod link;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

pub(crate) use link::Link;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

use crate::bridge::Router;
pub use crate::conn::UnixCredentials;
use crate::conn::{CallLimits, ConnectionId, Labels, Peer, PeerInfo, Side};

type CredentialCheck = Arc<dyn Fn(&UnixCredentials) -> bool + Send + Sync>;

/// Admits only peers running as the same user as this process (ttrpc's
/// `UnixSocketRequireSameUser`).
pub fn require_same_user() -> impl Fn(&UnixCredentials) -> bool + Send + Sync + Clone {
    let me = current_credentials();
    move |c| Some((c.uid, c.gid)) == me.map(|m| (m.uid, m.gid))
}

/// Admits only peers with this user and group id (ttrpc's `UnixSocketRequireUidGid`).
pub fn require_uid_gid(
    uid: u32,
    gid: u32,
) -> impl Fn(&UnixCredentials) -> bool + Send + Sync + Clone {
    move |c| c.uid == uid && c.gid == gid
}

/// Admits only root peers (ttrpc's `UnixSocketRequireRoot`).
pub fn require_root() -> impl Fn(&UnixCredentials) -> bool + Send + Sync + Clone {
    require_uid_gid(0, 0)
}

/// This process's own credentials, read the way a peer would see them.
fn current_credentials() -> Option<UnixCredentials> {
    let (a, _b) = std::os::unix::net::UnixStream::pair().ok()?;
    let a = UnixStream::from_std({
        a.set_nonblocking(true).ok()?;
        a
    })
    .ok()?;
    credentials(&a)
}

fn credentials(stream: &UnixStream) -> Option<UnixCredentials> {
    let cred = stream.peer_cred().ok()?;
    Some(UnixCredentials {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// Options of a byte-stream connection.
#[derive(Clone, Default)]
pub struct ByteStreamOptions {
    limits: CallLimits,
    admit: Option<CredentialCheck>,
}

impl std::fmt::Debug for ByteStreamOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteStreamOptions")
            .field("limits", &self.limits)
            .field("checks_credentials", &self.admit.is_some())
            .finish()
    }
}

impl ByteStreamOptions {
    /// Largest frame sent or accepted (default 4 MiB, as ttrpc).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.limits.max_message_size = bytes;
        self
    }

    /// Accepting side: admits a Unix peer only if `check` passes on its
    /// credentials (e.g. [`require_same_user`]); others are disconnected at once.
    pub fn require(
        mut self,
        check: impl Fn(&UnixCredentials) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.admit = Some(Arc::new(check));
        self
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn peer_for(
    link: Link,
    side: Side,
    credentials: Option<UnixCredentials>,
    limits: CallLimits,
) -> Peer {
    let info = PeerInfo {
        connection_id: ConnectionId(NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        name: String::new(),
        labels: Labels::new(),
        connected_at: SystemTime::now(),
        identity: None,
    };
    Peer::new_multiplexed(Arc::new(link), side, info, limits, credentials)
}

/// Dials over any byte stream: serves `router` to the acceptor (if it is brpc)
/// and returns the handle to call it. Sends the brpc Hello first; a plain ttrpc
/// acceptor refuses it and the connection continues as plain ttrpc.
pub async fn connect_stream<S>(io: S, router: Router, options: ByteStreamOptions) -> Peer
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let link = Link::spawn(io, Side::Dialer, options.limits.max_message_size);
    let peer = peer_for(link.clone(), Side::Dialer, None, options.limits);
    if crate::session::hello_bytestream(&peer).await.is_ok() {
        link.set_remote_is_brpc();
    }
    tokio::spawn(crate::session::serve(peer.clone(), router));
    peer
}

/// Dials the Unix socket at `path` (see [`connect_stream`]).
///
/// # Errors
/// The OS error if the socket cannot be reached.
pub async fn connect_unix(
    path: impl AsRef<Path>,
    router: Router,
    options: ByteStreamOptions,
) -> std::io::Result<Peer> {
    let stream = UnixStream::connect(path).await?;
    Ok(connect_stream(stream, router, options).await)
}

/// Serves one accepted byte stream with `router` until it closes, and returns
/// the handle to call the dialer (usable once the dialer has said brpc Hello).
pub async fn serve_stream<S>(
    io: S,
    router: Router,
    options: ByteStreamOptions,
    credentials: Option<UnixCredentials>,
) -> Peer
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let link = Link::spawn(io, Side::Acceptor, options.limits.max_message_size);
    let peer = peer_for(link, Side::Acceptor, credentials, options.limits);
    tokio::spawn(crate::session::serve(peer.clone(), router));
    peer
}

/// A ttrpc server on a Unix socket. Dropping it stops accepting and closes
/// every connection.
pub struct UnixServer {
    path: PathBuf,
    peers: Arc<std::sync::Mutex<Vec<Peer>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for UnixServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixServer")
            .field("path", &self.path)
            .finish()
    }
}

/// Listens on the Unix socket `path` (removing a stale socket file first) and
/// serves `router` to every connection.
///
/// # Errors
/// The OS error if the socket cannot be bound.
pub fn serve_unix(
    path: impl AsRef<Path>,
    router: Router,
    options: ByteStreamOptions,
) -> std::io::Result<UnixServer> {
    let path = path.as_ref().to_path_buf();
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    let peers: Arc<std::sync::Mutex<Vec<Peer>>> = Arc::default();
    let list = peers.clone();
    let accept = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { break };
                    let creds = credentials(&stream);
                    if let Some(admit) = &options.admit
                        && !creds.is_some_and(|c| admit(&c))
                    {
                        tracing::info!(?creds, "unix peer refused by its credentials");
                        drop(stream);
                        continue;
                    }
                    let peer = serve_stream(stream, router.clone(), options.clone(), creds).await;
                    list.lock().unwrap_or_else(|e| e.into_inner()).push(peer.clone());
                    let list = list.clone();
                    connections.spawn(async move {
                        let _ = peer.closed_reason().await;
                        list.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .retain(|p| p.connection_id() != peer.connection_id());
                        peer.close(0, "server stopped");
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Ok(UnixServer {
        path,
        peers,
        accept,
    })
}

impl UnixServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connected peers (to call a brpc dialer back).
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.accept.abort();
        for peer in self.peers() {
            peer.close(0, "server stopped");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
