//! A UDP relay between one client and a server, for making a peer vanish
//! without a word (stop forwarding) or a server be replaced behind the same
//! address (forward to another one). This kernel has no netem.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

/// Forwards datagrams between the client that writes to [`Relay::addr`] and
/// the current target, until dropped.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    target: Mutex<SocketAddr>,
    forwarding: AtomicBool,
    /// Datagrams from the client still to be forwarded.
    client_budget: AtomicUsize,
    /// Datagrams forwarded from the server so far.
    from_server: AtomicUsize,
}

impl Relay {
    /// A relay on 127.0.0.1 forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        Relay::start_delayed(target, Duration::ZERO).await
    }

    /// A relay on 127.0.0.1 forwarding to `target` that holds every
    /// datagram for `delay` in each direction (a round trip of twice it),
    /// in order.
    pub async fn start_delayed(target: SocketAddr, delay: Duration) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind front"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind back"));
        let addr = front.local_addr().expect("front addr");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            forwarding: AtomicBool::new(true),
            client_budget: AtomicUsize::new(usize::MAX),
            from_server: AtomicUsize::new(0),
        });
        let task = tokio::spawn(run(front, back, shared.clone(), delay));
        Relay { addr, shared, task }
    }

    /// The address clients dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every datagram from now on, both ways: the peers vanish for
    /// each other without a CONNECTION_CLOSE.
    pub fn blackhole(&self) {
        self.shared.forwarding.store(false, Ordering::SeqCst);
    }

    /// Forwards only the client's next `n` datagrams, then drops the
    /// client's (the server's still pass): with 1, a handshake the server
    /// has started and the client never finishes.
    pub fn pass_from_client(&self, n: usize) {
        self.shared.client_budget.store(n, Ordering::SeqCst);
    }

    /// Datagrams forwarded from the server to the client so far.
    pub fn forwarded_from_server(&self) -> usize {
        self.shared.from_server.load(Ordering::SeqCst)
    }

    /// Forwards to `target` from now on (a server replaced behind the same
    /// address); datagrams from the old target are dropped.
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().expect("target") = target;
        self.shared.forwarding.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends datagrams from one socket, at once or each after a delay (then
/// through a queue to a task of its own, in order; aborted when dropped).
struct Forward {
    socket: Arc<UdpSocket>,
    delayed: Option<(Duration, Queue, tokio::task::JoinHandle<()>)>,
}

type Queue = tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>, SocketAddr)>;

impl Forward {
    fn new(socket: Arc<UdpSocket>, delay: Duration) -> Forward {
        let delayed = (!delay.is_zero()).then(|| {
            let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
                tokio::time::Instant,
                Vec<u8>,
                SocketAddr,
            )>();
            let sending = socket.clone();
            let task = tokio::spawn(async move {
                while let Some((at, datagram, to)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    let _ = sending.send_to(&datagram, to).await;
                }
            });
            (delay, queue, task)
        });
        Forward { socket, delayed }
    }

    async fn send(&self, datagram: &[u8], to: SocketAddr) {
        match &self.delayed {
            None => {
                let _ = self.socket.send_to(datagram, to).await;
            }
            Some((delay, queue, _)) => {
                let at = tokio::time::Instant::now() + *delay;
                let _ = queue.send((at, datagram.to_vec(), to));
            }
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        if let Some((_, _, task)) = &self.delayed {
            task.abort();
        }
    }
}

async fn run(front: Arc<UdpSocket>, back: Arc<UdpSocket>, shared: Arc<Shared>, delay: Duration) {
    let to_server = Forward::new(back.clone(), delay);
    let to_client = Forward::new(front.clone(), delay);
    let mut client: Option<SocketAddr> = None;
    let mut from_client = vec![0u8; 65536];
    let mut from_server = vec![0u8; 65536];
    loop {
        tokio::select! {
            Ok((n, from)) = front.recv_from(&mut from_client) => {
                client = Some(from);
                let budget = shared.client_budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                if shared.forwarding.load(Ordering::SeqCst) && budget.is_ok() {
                    let target = *shared.target.lock().expect("target");
                    to_server.send(&from_client[..n], target).await;
                }
            }
            Ok((n, from)) = back.recv_from(&mut from_server) => {
                let target = *shared.target.lock().expect("target");
                if from == target && shared.forwarding.load(Ordering::SeqCst)
                    && let Some(client) = client
                {
                    shared.from_server.fetch_add(1, Ordering::SeqCst);
                    to_client.send(&from_server[..n], client).await;
                }
            }
        }
    }
}
