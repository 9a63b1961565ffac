//! A UDP relay between one client and a server, for making a peer vanish
//! without a word (stop forwarding) or a server be replaced behind the same
//! address (forward to another one). This kernel has no netem.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
        let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind front");
        let back = UdpSocket::bind("127.0.0.1:0").await.expect("bind back");
        let addr = front.local_addr().expect("front addr");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            forwarding: AtomicBool::new(true),
            client_budget: AtomicUsize::new(usize::MAX),
            from_server: AtomicUsize::new(0),
        });
        let task = tokio::spawn(run(front, back, shared.clone()));
        Relay { addr, shared, task }
    }

    /// A relay on 127.0.0.1 forwarding to `target` that holds every
    /// datagram for `delay` in each direction (a round trip of twice it),
    /// in order.
    pub async fn start_delayed(target: SocketAddr, delay: std::time::Duration) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind front"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind back"));
        let addr = front.local_addr().expect("front addr");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            forwarding: AtomicBool::new(true),
            client_budget: AtomicUsize::new(usize::MAX),
            from_server: AtomicUsize::new(0),
        });
        let task = tokio::spawn(run_delayed(front, back, shared.clone(), delay));
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

async fn run(front: UdpSocket, back: UdpSocket, shared: Arc<Shared>) {
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
                    let _ = back.send_to(&from_client[..n], target).await;
                }
            }
            Ok((n, from)) = back.recv_from(&mut from_server) => {
                let target = *shared.target.lock().expect("target");
                if from == target && shared.forwarding.load(Ordering::SeqCst)
                    && let Some(client) = client
                {
                    shared.from_server.fetch_add(1, Ordering::SeqCst);
                    let _ = front.send_to(&from_server[..n], client).await;
                }
            }
        }
    }
}

/// [`run`] with every datagram held for `delay`: each direction's datagrams
/// go through a queue to a task that sends each at its time.
async fn run_delayed(
    front: Arc<UdpSocket>,
    back: Arc<UdpSocket>,
    shared: Arc<Shared>,
    delay: std::time::Duration,
) {
    type Queue = tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>, SocketAddr)>;
    fn sender(socket: Arc<UdpSocket>) -> (Queue, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>, SocketAddr)>();
        let task = tokio::spawn(async move {
            while let Some((at, datagram, to)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                let _ = socket.send_to(&datagram, to).await;
            }
        });
        (tx, task)
    }
    let (to_server, to_server_task) = sender(back.clone());
    let (to_client, to_client_task) = sender(front.clone());
    // The senders go with this task (aborted when the relay is dropped).
    struct AbortOnDrop([tokio::task::JoinHandle<()>; 2]);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.iter().for_each(tokio::task::JoinHandle::abort);
        }
    }
    let _senders = AbortOnDrop([to_server_task, to_client_task]);
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
                    let at = tokio::time::Instant::now() + delay;
                    let _ = to_server.send((at, from_client[..n].to_vec(), target));
                }
            }
            Ok((n, from)) = back.recv_from(&mut from_server) => {
                let target = *shared.target.lock().expect("target");
                if from == target && shared.forwarding.load(Ordering::SeqCst)
                    && let Some(client) = client
                {
                    shared.from_server.fetch_add(1, Ordering::SeqCst);
                    let at = tokio::time::Instant::now() + delay;
                    let _ = to_client.send((at, from_server[..n].to_vec(), client));
                }
            }
        }
    }
}
