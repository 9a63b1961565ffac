//! Backpressure: 1 GiB through one call's QUIC stream (client-streaming into a
//! receiver that starts slowly) with the process's peak heap bounded, proving
//! that no layer buffers without bound. The heap is measured by a counting
//! global allocator, the one place the workspace allows `unsafe`.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::EchoService;
use common::echo::EchoRequest;
use common::echo::echo_client::EchoClient;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1 << 20;

/// The tests here measure the process heap: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const TOTAL: usize = 1 << 30;
const MESSAGE: usize = MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_through_one_stream_with_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = common::server_with(echo);
    let client = common::client(&server, "agent").await;
    let mut sink = EchoClient::new(client.channel());

    let baseline = CURRENT.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    // The receiver sleeps 20 ms before each of its first 50 messages (1 s),
    // while the sender produces as fast as flow control lets it.
    let messages = tokio_stream::iter((0..TOTAL / MESSAGE).map(|seq| EchoRequest {
        text: if seq == 0 {
            "slow:50".into()
        } else {
            String::new()
        },
        blob: vec![seq as u8; MESSAGE],
        seq: seq as u64,
    }));
    let total = sink
        .sink(messages)
        .await
        .expect("transfer")
        .into_inner()
        .value;
    let peak = PEAK.load(Ordering::Relaxed) - baseline;

    assert_eq!(total as usize, TOTAL, "every byte arrived");
    assert_eq!(probe.sunk.load(Ordering::Relaxed), TOTAL);
    println!(
        "peak heap above baseline during 1 GiB: {:.1} MiB",
        peak as f64 / MIB as f64
    );
    // QUIC's windows (10 MB send, 1.25 MB per stream receive) and a few
    // messages in flight bound it; without backpressure it would approach 1 GiB.
    assert!(peak < 64 * MIB, "peak heap {} MiB", peak / MIB);
}

/// Hostile streams that start a 1 MiB frame, send half of it and stall: each
/// holds at most that one frame, and the idle limit resets them and frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_partial_frames_hold_one_frame_each_until_reset() {
    use bytes::BufMut;
    const STREAMS: usize = 20;
    let _serial = SERIAL.lock().await;
    let server = brpc::Server::builder()
        .call_idle_timeout(Some(std::time::Duration::from_millis(500)))
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let (conn, _id) = common::raw_client(&server, "staller").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let baseline = CURRENT.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (mut send, recv) = conn.open_bi().await.expect("open");
        let stream_id = brpc::core::wire::stream_id(send.id().index(), true);
        let mut partial = bytes::BytesMut::new();
        partial.put_u32(MIB as u32);
        partial.put_u32(stream_id);
        partial.put_u8(1);
        partial.put_u8(0);
        partial.put_slice(&vec![0u8; MIB / 2]);
        send.write_all(&partial).await.expect("write");
        streams.push((send, recv));
    }
    // Every stream is reset by the server once the idle limit passes.
    for (_send, mut recv) in streams {
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), recv.read(&mut buf))
            .await
            .expect("reset in time");
        assert!(matches!(read, Err(quinn::ReadError::Reset(_))), "{read:?}");
    }
    let peak = PEAK.load(Ordering::Relaxed) - baseline;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let left = CURRENT.load(Ordering::Relaxed).saturating_sub(baseline);
    println!(
        "{STREAMS} stalled 1 MiB frames: peak {:.1} MiB, left after reset {:.1} MiB",
        peak as f64 / MIB as f64,
        left as f64 / MIB as f64
    );
    // At most one frame (1 MiB) per stream on the server, plus the client's
    // half-frames in flight: far below what buffering beyond a frame would take.
    assert!(peak < STREAMS * 2 * MIB, "peak {} MiB", peak / MIB);
    assert!(left < 4 * MIB, "memory not released: {} MiB", left / MIB);
}
