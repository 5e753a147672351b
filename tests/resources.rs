//! Resource tests, each in this binary alone and serialised (they measure the whole process):
//! zero allocation per message in steady state, no file descriptor leak, and an idle node's CPU use.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blip::{BackendChoice, Received};
use common::*;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `count` 64-byte messages and receives them all without allocating in this loop.
fn pump(publisher: &mut blip::Publisher, sub: &mut blip::Subscriber, first: u64, count: u64, buf: &mut [u8; 64]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut sent, mut got) = (first, first);
    let end = first + count;
    while got < end {
        assert!(Instant::now() < deadline, "pump stalled at {got} of {end}");
        while sent < end {
            buf[..8].copy_from_slice(&sent.to_le_bytes());
            match publisher.try_send(&buf[..]) {
                Ok(()) => sent += 1,
                Err(blip::SendError::Full) => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        sub.wait(Duration::from_millis(5));
        sub.poll(usize::MAX, |r| {
            if let Received::Message(m) = r {
                assert_eq!(m.seq, got, "out of order");
                got += 1;
            }
        });
    }
}

fn zero_allocation(backend: BackendChoice) {
    let group = unique_group();
    // A small window so that the warm-up laps every ring and buffer once.
    let mut rx = builder(backend, group).window(256).build().unwrap();
    let mut tx = builder(backend, group).window(256).build().unwrap();
    let mut sub = rx.subscriber().unwrap();
    let mut publisher = tx.publisher().unwrap();
    let mut own = tx.subscriber().unwrap();
    // Joining the membership table allocates once per peer; let the sender hear the receiver's
    // announcement (up to a second away) before measuring, so only steady-state traffic is counted. Both
    // events are awaited together: the announcement may arrive before the receiver's first STATUS.
    publisher.send(&[0u8; 64]).expect("send message 0");
    wait_events(&mut own, 2, Duration::from_secs(5), "the receiver's STATUS and announcement", |e| {
        matches!(e, blip::proto::Event::ReceiverJoined { .. } | blip::proto::Event::PeerJoined { .. })
    });
    let mut buf = [0u8; 64];
    // Message 0 went in the handshake; the subscriber sees it first.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut first = None;
    while first.is_none() {
        assert!(Instant::now() < deadline, "message 0 never arrived");
        sub.wait(Duration::from_millis(10));
        sub.poll(1, |r| {
            if let Received::Message(m) = r {
                first = Some(m.seq == 0);
            }
        });
    }
    assert_eq!(first, Some(true), "the first delivery must be message 0");
    pump(&mut publisher, &mut sub, 1, 200_000, &mut buf);
    // The per-peer counters are copied out every 50 ms into a table sized on first use: let that first
    // copy happen before measuring (the warm-up alone may take less than 50 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.peer_stats().is_empty() || tx.peer_stats().is_empty() {
        assert!(Instant::now() < deadline, "no per-peer counters published within 5 s");
        std::thread::park_timeout(Duration::from_millis(10));
    }
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    pump(&mut publisher, &mut sub, 200_001, 200_000, &mut buf);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    assert_eq!(allocations, 0, "allocations during 200,000 messages in steady state");
    // The counters agree that the messages went through the protocol (the snapshot lags a little).
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.stats().protocol.messages_delivered < 400_001 {
        assert!(Instant::now() < deadline, "stats say {} delivered", rx.stats().protocol.messages_delivered);
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

fn no_fd_leak(backend: BackendChoice) {
    let before = open_fds();
    for _ in 0..3 {
        let group = unique_group();
        let mut a = builder(backend, group).build().unwrap();
        let b = builder(backend, group).build().unwrap();
        let mut p = a.publisher().unwrap();
        p.send(b"x").unwrap();
        drop(p);
        a.shutdown();
        drop(b);
    }
    assert_eq!(open_fds(), before, "file descriptors open after three nodes came and went");
}

/// utime + stime of this process, in clock ticks (100 per second on Linux).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn idle_cpu(backend: BackendChoice) {
    let mut node = builder(backend, unique_group()).build().unwrap();
    let mut p = node.publisher().unwrap();
    p.send(b"one message, then silence").unwrap();
    std::thread::park_timeout(Duration::from_millis(200)); // let the engine settle
    let t0 = cpu_ticks();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        std::thread::park_timeout(Duration::from_millis(500));
    }
    let used = (cpu_ticks() - t0) as f64 / 100.0 / start.elapsed().as_secs_f64();
    println!("{backend:?}: idle node used {:.2} % of a core", used * 100.0);
    assert!(used < 0.05, "idle node used {:.1} % of a core", used * 100.0);
    assert!(!node.is_closed());
}

// Every test holds the lock from its first line: the io_uring probe in `uring_or_skip` opens a ring and
// allocates, which another test's count of descriptors or allocations would otherwise see.

#[test]
fn poll_zero_allocation_in_steady_state() {
    let _g = serial();
    zero_allocation(BackendChoice::Poll);
}

#[test]
fn uring_zero_allocation_in_steady_state() {
    let _g = serial();
    if uring_or_skip() {
        zero_allocation(BackendChoice::Uring);
    }
}

#[test]
fn poll_no_fd_leak() {
    let _g = serial();
    no_fd_leak(BackendChoice::Poll);
}

#[test]
fn uring_no_fd_leak() {
    let _g = serial();
    if uring_or_skip() {
        no_fd_leak(BackendChoice::Uring);
    }
}

#[test]
fn poll_idle_node_uses_under_5_percent() {
    let _g = serial();
    idle_cpu(BackendChoice::Poll);
}

#[test]
fn uring_idle_node_uses_under_5_percent() {
    let _g = serial();
    if uring_or_skip() {
        idle_cpu(BackendChoice::Uring);
    }
}
