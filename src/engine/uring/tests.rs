//! Loopback tests of the io_uring backend. They keep every packet on this host: 127.0.0.1, groups in
//! 239.255.0.0/16 joined on 127.0.0.1, IP_MULTICAST_IF 127.0.0.1, TTL 0. Each test uses its own group and
//! port, and they run one at a time (the fd-count test needs a quiet process). A test that finds io_uring
//! unavailable prints why and passes.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::engine::test_support::{FULL, GSO_N, group_socket, send_plan, unicast_socket};

use super::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether io_uring works here; prints the reason to skip otherwise.
fn available() -> bool {
    match probe() {
        Ok(report) => {
            eprintln!("{report}");
            true
        }
        Err(reason) => {
            eprintln!("skipping io_uring test: {reason}");
            false
        }
    }
}

fn backend(group: Ipv4Addr, port: u16, opts: UringOptions) -> UringBackend {
    UringBackend::new(group_socket(group, port), unicast_socket(), opts).expect("UringBackend::new")
}

/// Datagram `i`: 64..=1400 bytes, its index in the first 8, then a pattern that depends on the index.
fn fill(i: usize, buf: &mut [u8]) -> usize {
    let len = 64 + (i * 7919) % (1400 - 64 + 1);
    buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
    for (k, b) in buf[8..len].iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) + k) as u8;
    }
    len
}

fn check(i: usize, bytes: &[u8]) {
    let mut want = [0u8; 1400];
    let len = fill(i, &mut want);
    assert_eq!(bytes.len(), len, "datagram {i}: length");
    let got = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(got, i as u64, "datagram out of order");
    assert!(bytes == &want[..len], "datagram {i}: contents differ");
}

/// Receives on `rx` until `*next == until`, checking each datagram from `from` against [`fill`]; datagrams
/// from other sources (another process using the same group) are ignored.
fn receive_until(rx: &mut UringBackend, from: SocketAddr, next: &mut usize, until: usize, deadline: Instant) {
    while *next < until {
        assert!(Instant::now() < deadline, "timed out with {} of {until} datagrams received", *next);
        rx.receive(Some(Duration::from_millis(100)), &mut |src, bytes| {
            if src == from {
                check(*next, bytes);
                *next += 1;
            }
        })
        .expect("receive");
    }
}

#[test]
fn probe_reports_setup_flags() {
    let _serial = serial();
    match probe() {
        Ok(report) => {
            eprintln!("{report}");
            assert!(LADDER.iter().any(|r| r.name == report.setup_flags));
            let b = backend(Ipv4Addr::new(239, 255, 201, 10), 46_210, UringOptions::default());
            assert_eq!(b.setup_flags(), report.setup_flags);
            assert_eq!(b.kind(), BackendKind::Uring);
        }
        Err(reason) => eprintln!("skipping io_uring test: {reason}"),
    }
}

#[test]
fn invalid_options_are_refused() {
    let _serial = serial();
    let bad = [
        UringOptions { buffers: 1000, ..UringOptions::default() },
        UringOptions { buffer_size: RECV_OVERHEAD, ..UringOptions::default() },
        UringOptions { send_batch: 0, ..UringOptions::default() },
        UringOptions { entries: 0, ..UringOptions::default() },
    ];
    for opts in bad {
        let r = UringBackend::new(group_socket(Ipv4Addr::new(239, 255, 201, 11), 46_211), unicast_socket(), opts);
        assert!(matches!(r, Err(UringError::InvalidOptions(_))), "{opts:?} accepted");
    }
}

#[test]
fn group_ten_thousand_in_order() {
    let _serial = serial();
    if !available() {
        return;
    }
    const N: usize = 10_000;
    const BATCH: usize = 100;
    let group = Ipv4Addr::new(239, 255, 201, 1);
    let mut rx = backend(group, 46_201, UringOptions::default());
    // The sender's own group socket is on another port, so that it does not queue its own traffic.
    let mut tx = backend(group, 46_202, UringOptions::default());
    let dest = SocketAddr::from((group, 46_201));
    let from = tx.unicast_addr().unwrap();
    let mut buf = [0u8; 1400];
    let mut next = 0;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(30);
    for first in (0..N).step_by(BATCH) {
        let end = (first + BATCH).min(N);
        for i in first..end {
            let len = fill(i, &mut buf);
            tx.queue_send(dest, &buf[..len]).expect("queue_send");
        }
        tx.flush().expect("flush");
        receive_until(&mut rx, from, &mut next, end, deadline);
    }
    let elapsed = start.elapsed();
    eprintln!(
        "{N} datagrams in {elapsed:?}: {:.0} datagrams/s (send and receive on one thread); rx {:?}; tx {:?}",
        N as f64 / elapsed.as_secs_f64(),
        rx.uring_stats(),
        tx.uring_stats()
    );
    assert_eq!(rx.uring_stats().truncated + rx.uring_stats().malformed + rx.uring_stats().recv_errors, 0);
    assert_eq!(tx.uring_stats().send_errors, 0);
}

#[test]
fn buffer_exhaustion_rearms_and_loses_nothing() {
    let _serial = serial();
    if !available() {
        return;
    }
    const N: usize = 1_000;
    let group = Ipv4Addr::new(239, 255, 201, 2);
    let mut rx = backend(group, 46_203, UringOptions { buffers: 8, ..UringOptions::default() });
    let mut tx = backend(group, 46_204, UringOptions::default());
    let dest = SocketAddr::from((group, 46_203));
    let from = tx.unicast_addr().unwrap();
    let mut buf = [0u8; 1400];
    for i in 0..N {
        let len = fill(i, &mut buf);
        tx.queue_send(dest, &buf[..len]).expect("queue_send");
    }
    tx.flush().expect("flush");
    let mut next = 0;
    receive_until(&mut rx, from, &mut next, N, Instant::now() + Duration::from_secs(10));
    let stats = rx.uring_stats();
    eprintln!("rx {stats:?}");
    assert!(stats.enobufs > 0, "the 8-buffer ring never ran dry: the test did not exercise re-arming");
    assert!(stats.rearms >= stats.enobufs);
}

#[test]
fn unicast_and_send_errors() {
    let _serial = serial();
    if !available() {
        return;
    }
    let mut a = backend(Ipv4Addr::new(239, 255, 201, 3), 46_205, UringOptions::default());
    // Without GRO, so that a receive buffer holds 1904 bytes and the truncation below happens.
    let mut b =
        backend(Ipv4Addr::new(239, 255, 201, 3), 46_206, UringOptions { gro: false, ..UringOptions::default() });
    let to = b.unicast_addr().unwrap();
    let from = a.unicast_addr().unwrap();
    a.queue_send(to, b"unicast hello").unwrap();
    a.flush().unwrap();
    let mut got = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.is_none() {
        assert!(Instant::now() < deadline, "unicast datagram not received within 5 s");
        b.receive(Some(Duration::from_millis(100)), &mut |src, bytes| {
            if src == from {
                got = Some(bytes.to_vec());
            }
        })
        .unwrap();
    }
    assert_eq!(got.as_deref(), Some(&b"unicast hello"[..]));

    // Longer than a receive buffer holds (but not than a send slot): dropped and counted as truncated; the
    // datagram after it arrives.
    assert!(2000 > b.max_datagram());
    a.queue_send(to, &[7u8; 2000]).unwrap();
    a.queue_send(to, b"after").unwrap();
    a.flush().unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.is_empty() {
        assert!(Instant::now() < deadline, "datagram after the oversized one not received within 5 s");
        b.receive(Some(Duration::from_millis(100)), &mut |src, bytes| {
            if src == from {
                got.push(bytes.to_vec());
            }
        })
        .unwrap();
    }
    assert_eq!(got, [b"after".to_vec()]);
    assert_eq!(b.uring_stats().truncated, 1);

    // Too large for a slot: refused up front.
    let big = vec![0u8; UringOptions::default().buffer_size + 1];
    assert_eq!(a.queue_send(to, &big).unwrap_err().kind(), io::ErrorKind::InvalidInput);

    // The kernel refuses an IPv6 destination on an IPv4 socket (EAFNOSUPPORT): counted, not returned.
    // Nothing is sent anywhere.
    a.queue_send("[::1]:9".parse().unwrap(), b"refused").unwrap();
    a.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.uring_stats().send_errors == 0 {
        assert!(Instant::now() < deadline, "send error not counted within 5 s");
        a.receive(Some(Duration::from_millis(10)), &mut |_, _| {}).unwrap();
    }
    assert_eq!(a.uring_stats().send_errors, 1);
}

#[test]
fn wake_interrupts_receive() {
    let _serial = serial();
    if !available() {
        return;
    }
    let (ready_tx, ready_rx) = mpsc::channel::<Arc<dyn Wake>>();
    let (done_tx, done_rx) = mpsc::channel::<io::Result<usize>>();
    let worker = thread::spawn(move || {
        // Created on the thread that uses it (SINGLE_ISSUER).
        let mut b = backend(Ipv4Addr::new(239, 255, 201, 4), 46_207, UringOptions::default());
        ready_tx.send(b.waker()).unwrap();
        // 1: woken while waiting.
        done_tx.send(b.receive(None, &mut |_, _| {})).unwrap();
        // 2: a wake that comes before the wait makes the next wait return too.
        b.waker().wake();
        done_tx.send(b.receive(None, &mut |_, _| {})).unwrap();
    });
    let waker = ready_rx.recv_timeout(Duration::from_secs(5)).expect("backend thread did not start within 5 s");
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        waker.wake();
        match done_rx.recv_timeout(Duration::from_millis(1)) {
            Ok(r) => break r,
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(e) => panic!("receive(None) did not return within 5 s of repeated wakes: {e:?}"),
        }
    };
    assert_eq!(first.expect("receive"), 0);
    let second = done_rx.recv_timeout(Duration::from_secs(5)).expect("a wake before receive(None) was lost");
    assert_eq!(second.expect("receive"), 0);
    worker.join().unwrap();
    // Waking after the backend is gone is harmless.
    waker.wake();
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn drop_closes_every_fd() {
    let _serial = serial();
    if !available() {
        return;
    }
    // Other tests of the crate may open descriptors concurrently: retry a few times; a real leak shows
    // on every attempt.
    let group = Ipv4Addr::new(239, 255, 201, 5);
    let mut seen = Vec::new();
    let leaked = leaked_teardowns();
    for _ in 0..5 {
        let before = open_fds();
        let mut a = backend(group, 46_208, UringOptions::default());
        let b = backend(group, 46_209, UringOptions::default());
        let (wa, wb) = (a.waker(), b.waker());
        // Leave operations in flight: a send, and a datagram for `b` that it never reads.
        a.queue_send(SocketAddr::from((group, 46_209)), b"in flight").unwrap();
        a.flush().unwrap();
        drop(a);
        drop(b);
        // The wakers keep their eventfds open.
        let with_wakers = open_fds();
        wa.wake();
        drop(wa);
        drop(wb);
        let after = open_fds();
        assert_eq!(leaked_teardowns(), leaked, "a backend dropped on its own thread failed to drain its ring");
        if after == before && with_wakers == before + 2 {
            return;
        }
        seen.push((before, with_wakers, after));
    }
    panic!("descriptors leaked: (before, with wakers only, after) = {seen:?}");
}

#[test]
fn idle_receive_waits_for_its_timeout() {
    let _serial = serial();
    if !available() {
        return;
    }
    let mut b = backend(Ipv4Addr::new(239, 255, 201, 6), 46_212, UringOptions::default());
    // Nothing arrives and nobody wakes: the wait must last its timeout (the eventfd read must not complete
    // by itself), then return 0.
    let start = Instant::now();
    let n = b.receive(Some(Duration::from_millis(200)), &mut |_, _| {}).unwrap();
    let waited = start.elapsed();
    assert_eq!(n, 0);
    assert!(waited >= Duration::from_millis(190), "returned after {waited:?}, before its 200 ms timeout");
    assert!(waited < Duration::from_secs(5), "a 200 ms wait took {waited:?}");
    // A zero timeout never waits.
    let start = Instant::now();
    assert_eq!(b.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap(), 0);
    assert!(start.elapsed() < Duration::from_millis(100));
}

#[test]
fn other_thread_is_refused_and_drop_there_leaks_memory() {
    let _serial = serial();
    if !available() {
        return;
    }
    let leaked = leaked_teardowns();
    let b = backend(Ipv4Addr::new(239, 255, 201, 7), 46_213, UringOptions::default());
    if !b.setup_flags().contains("SINGLE_ISSUER") {
        eprintln!("ring is not SINGLE_ISSUER ({}): nothing to test", b.setup_flags());
        return;
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut b = b;
        let r = b.receive(Some(Duration::ZERO), &mut |_, _| {});
        drop(b);
        tx.send(r.map_err(|e| e.to_string())).unwrap();
    });
    let r = rx.recv_timeout(Duration::from_secs(10)).expect("other thread did not finish within 10 s");
    let err = r.expect_err("a SINGLE_ISSUER ring accepted another thread");
    assert!(err.contains("SINGLE_ISSUER"), "unhelpful error: {err}");
    assert_eq!(leaked_teardowns(), leaked + 1, "dropped on a foreign thread, the backend should leak its buffers");
}

#[test]
fn every_rung_of_the_ladder_works() {
    let _serial = serial();
    if !available() {
        return;
    }
    const N: usize = 300;
    let group = Ipv4Addr::new(239, 255, 201, 8);
    let mut tx = backend(group, 46_214, UringOptions::default());
    let from = tx.unicast_addr().unwrap();
    let dest = SocketAddr::from((group, 46_215));
    for (k, rung) in LADDER.iter().enumerate() {
        let opts = UringOptions { buffers: 16, ..UringOptions::default() };
        let mut rx = match UringBackend::with_ladder(group_socket(group, 46_215), unicast_socket(), opts, k) {
            Ok(rx) => rx,
            Err(e) => {
                eprintln!("rung {} unavailable here: {e}", rung.name);
                continue;
            }
        };
        eprintln!("rung {}: ring built with {}", rung.name, rx.setup_flags());
        let mut buf = [0u8; 1400];
        for i in 0..N {
            let len = fill(i, &mut buf);
            tx.queue_send(dest, &buf[..len]).unwrap();
        }
        tx.flush().unwrap();
        let mut next = 0;
        receive_until(&mut rx, from, &mut next, N, Instant::now() + Duration::from_secs(10));
        // A wake before the wait ends it at once.
        rx.waker().wake();
        let start = Instant::now();
        assert_eq!(rx.receive(Some(Duration::from_secs(5)), &mut |_, _| {}).unwrap(), 0);
        assert!(start.elapsed() < Duration::from_secs(4), "{}: wake lost", rung.name);
    }
}

// ---- UDP GSO and GRO ----

/// Reaps `tx`'s send completions until `total` datagrams were sent or refused (bounded by 10 s).
fn settle(tx: &mut UringBackend, total: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tx.uring_stats().sent + tx.uring_stats().send_errors < total {
        assert!(Instant::now() < deadline, "send completions missing after 10 s: {:?}", tx.uring_stats());
        tx.receive(Some(Duration::from_millis(10)), &mut |_, _| {}).unwrap();
    }
}

/// Sends the plan from `tx` to `rx` (its group port and its unicast address) and checks what arrives.
fn run_plan(tx: &mut UringBackend, rx: &mut UringBackend, group: SocketAddr) {
    let (from, rx_addr) = (tx.unicast_addr().unwrap(), rx.unicast_addr().unwrap());
    let took = send_plan(tx, from, rx, rx_addr, group, false);
    eprintln!(
        "{GSO_N} datagrams in {took:?}; tx gso segments {}: {:?}; rx gro {}: {:?}",
        tx.gso_segments(),
        tx.uring_stats(),
        rx.gro(),
        rx.uring_stats()
    );
    assert_eq!(rx.uring_stats().truncated + rx.uring_stats().malformed + rx.uring_stats().recv_errors, 0);
    settle(tx, GSO_N as u64);
}

/// Datagrams written in the room the backend lends (in place in the GSO batch) arrive like queued ones,
/// including those that cannot join the batch they were written after (other destination, longer).
#[test]
fn lent_send_buffers_arrive_datagram_by_datagram() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 17);
    let mut rx = backend(group, 46_333, UringOptions::default());
    let mut tx = backend(group, 46_334, UringOptions::default());
    let (from, rx_addr) = (tx.unicast_addr().unwrap(), rx.unicast_addr().unwrap());
    let dest = SocketAddr::from((group, 46_333));
    send_plan(&mut tx, from, &mut rx, rx_addr, dest, true);
    assert_eq!(rx.uring_stats().truncated + rx.uring_stats().malformed + rx.uring_stats().recv_errors, 0);
    settle(&mut tx, GSO_N as u64);
    assert_eq!((tx.uring_stats().send_errors, tx.uring_stats().sent), (0, GSO_N as u64));
    assert!(tx.gso_segments() == 0 || tx.uring_stats().gso_sends > 0, "GSO on but no GSO send");
    // Committing without a lent buffer, or more than was lent, is refused.
    assert_eq!(tx.commit_send(dest, 10).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    let room = tx.send_buffer(100).len();
    assert_eq!(tx.commit_send(dest, room + 1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn gso_to_gro_arrives_datagram_by_datagram() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 11);
    let mut rx = backend(group, 46_311, UringOptions::default());
    let mut tx = backend(group, 46_312, UringOptions::default());
    assert!(rx.max_datagram() >= if rx.gro() { 65_535 } else { 2048 - RECV_OVERHEAD });
    run_plan(&mut tx, &mut rx, SocketAddr::from((group, 46_311)));
    assert_eq!(tx.uring_stats().send_errors, 0);
    assert_eq!(tx.uring_stats().sent, GSO_N as u64);
    if tx.gso_segments() == 0 {
        eprintln!("UDP GSO unavailable here: sent one datagram per send");
        return;
    }
    assert!(tx.uring_stats().gso_sends > 0, "GSO on but no GSO send");
    assert_eq!(tx.uring_stats().gso_fallbacks, 0);
    if rx.gro() {
        assert!(rx.uring_stats().gro_batches > 0, "GRO on but every batch arrived as separate datagrams");
    }
}

#[test]
fn gso_to_receiver_without_gro() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 12);
    let mut rx = backend(group, 46_313, UringOptions { gro: false, ..UringOptions::default() });
    let mut tx = backend(group, 46_314, UringOptions::default());
    assert!(!rx.gro());
    run_plan(&mut tx, &mut rx, SocketAddr::from((group, 46_313)));
    assert_eq!(tx.uring_stats().send_errors, 0);
    assert_eq!(rx.uring_stats().gro_batches, 0);
    assert!(tx.gso_segments() == 0 || tx.uring_stats().gso_sends > 0);
}

#[test]
fn gso_off_sends_one_datagram_per_send() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 13);
    let mut rx = backend(group, 46_315, UringOptions::default());
    let mut tx = backend(group, 46_316, UringOptions { gso: false, ..UringOptions::default() });
    assert_eq!(tx.gso_segments(), 0);
    run_plan(&mut tx, &mut rx, SocketAddr::from((group, 46_315)));
    assert_eq!(tx.uring_stats().send_errors, 0);
    let (t, r) = (tx.uring_stats(), rx.uring_stats());
    assert_eq!((t.sent, t.gso_sends, t.gso_fallbacks, r.gro_batches), (GSO_N as u64, 0, 0, 0));
}

/// Receives `count` datagrams from `from` on `rx` (bounded by 10 s) and returns their first bytes.
fn collect(rx: &mut UringBackend, from: SocketAddr, count: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < count {
        assert!(Instant::now() < deadline, "received {} of {count} datagrams within 10 s", got.len());
        rx.receive(Some(Duration::from_millis(100)), &mut |src, bytes| {
            if src == from {
                got.push(bytes[0]);
            }
        })
        .unwrap();
    }
    got
}

/// The kernel refuses GSO sends on a socket with SO_NO_CHECK (EINVAL), although the probe (other sockets)
/// found GSO working: the first GSO send's datagrams are counted as send errors, and the backend falls back
/// to one datagram per send for good.
#[test]
fn refused_gso_send_falls_back_for_good() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 14);
    let mut rx = backend(group, 46_317, UringOptions::default());
    let unicast = unicast_socket();
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from a live c_int; the fd is open (owned by
    // `unicast`).
    let r = unsafe {
        libc::setsockopt(
            unicast.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_NO_CHECK: {}", io::Error::last_os_error());
    let mut tx = UringBackend::new(group_socket(group, 46_318), unicast, UringOptions::default()).unwrap();
    if tx.gso_segments() == 0 {
        eprintln!("UDP GSO unavailable here: nothing to test");
        return;
    }
    let from = tx.unicast_addr().unwrap();
    let dest = SocketAddr::from((group, 46_317));
    // One batch of 10 (refused), then a datagram to make sure the completion was seen.
    for k in 0..10u8 {
        tx.queue_send(dest, &[k; 500]).unwrap();
    }
    tx.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tx.uring_stats().gso_fallbacks == 0 {
        assert!(Instant::now() < deadline, "refused GSO send not seen within 10 s: {:?}", tx.uring_stats());
        tx.receive(Some(Duration::from_millis(10)), &mut |_, _| {}).unwrap();
    }
    assert_eq!(tx.uring_stats().send_errors, 10);
    assert_eq!(tx.gso_segments(), 0, "still coalescing after a refused GSO send");
    // From now on one datagram per send: all arrive.
    for k in 0..20u8 {
        tx.queue_send(dest, &[k; 500]).unwrap();
    }
    tx.flush().unwrap();
    assert_eq!(collect(&mut rx, from, 20), (0..20).collect::<Vec<u8>>());
    settle(&mut tx, 30);
    let s = tx.uring_stats();
    assert_eq!((s.send_errors, s.gso_fallbacks, s.gso_sends, s.sent), (10, 1, 0, 20));
}

/// A GSO send past the kernel's segment cap is refused with EINVAL: its datagrams are counted as send errors
/// and the cap falls to 64; later batches go out as GSO sends again.
#[test]
fn gso_past_the_segment_cap_lowers_it() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 15);
    let mut rx = backend(group, 46_319, UringOptions::default());
    let mut tx = backend(group, 46_320, UringOptions::default());
    if tx.gso_segments() == 0 {
        eprintln!("UDP GSO unavailable here: nothing to test");
        return;
    }
    // Pretend the cap is higher than any kernel's (128).
    tx.st.gso.segments = 200;
    let (from, dest) = (tx.unicast_addr().unwrap(), SocketAddr::from((group, 46_319)));
    for _ in 0..150 {
        tx.queue_send(dest, &[1; 100]).unwrap();
    }
    tx.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tx.uring_stats().gso_fallbacks == 0 {
        assert!(Instant::now() < deadline, "refused GSO send not seen within 10 s: {:?}", tx.uring_stats());
        tx.receive(Some(Duration::from_millis(10)), &mut |_, _| {}).unwrap();
    }
    assert_eq!(tx.uring_stats().send_errors, 150);
    assert_eq!(tx.gso_segments(), 64);
    for k in 0..150 {
        tx.queue_send(dest, &[k as u8; 100]).unwrap();
    }
    tx.flush().unwrap();
    assert_eq!(collect(&mut rx, from, 150), (0..150).map(|k| k as u8).collect::<Vec<u8>>());
    settle(&mut tx, 300);
    let s = tx.uring_stats();
    assert_eq!((s.send_errors, s.gso_fallbacks), (150, 1));
    assert!(s.gso_sends >= 3, "150 datagrams at 64 per GSO send: {s:?}");
}

/// A lone datagram goes out at `flush`, not when a batch fills; so does the batch being filled on `receive`.
#[test]
fn flush_and_receive_send_the_open_batch() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 16);
    let mut rx = backend(group, 46_321, UringOptions::default());
    let mut tx = backend(group, 46_322, UringOptions::default());
    let (from, dest) = (tx.unicast_addr().unwrap(), SocketAddr::from((group, 46_321)));
    for round in 0..3u8 {
        tx.queue_send(dest, &[round; FULL]).unwrap();
        tx.flush().unwrap();
        assert_eq!(collect(&mut rx, from, 1), vec![round]);
    }
    // Two queued, no flush: the sender's own receive submits them.
    tx.queue_send(dest, &[7; FULL]).unwrap();
    tx.queue_send(dest, &[8; FULL]).unwrap();
    tx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    assert_eq!(collect(&mut rx, from, 2), vec![7, 8]);
}

/// A lone datagram with nothing else to submit leaves by `sendto`; a batch, or a datagram queued behind a
/// submission, goes through the ring. Either way it arrives, and a refusal is counted.
#[test]
fn lone_datagram_leaves_by_sendto() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 19);
    let mut rx = backend(group, 46_337, UringOptions::default());
    let mut tx = backend(group, 46_338, UringOptions::default());
    let (from, dest) = (tx.unicast_addr().unwrap(), SocketAddr::from((group, 46_337)));
    tx.queue_send(dest, &[1; 100]).unwrap();
    tx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    assert_eq!((tx.uring_stats().plain_sends, tx.uring_stats().sent), (1, 1), "{:?}", tx.uring_stats());
    assert_eq!(collect(&mut rx, from, 1), [1]);
    // Two datagrams: one GSO send, or (without GSO) two SendMsg, the second queued behind the first.
    tx.queue_send(dest, &[2; 100]).unwrap();
    tx.queue_send(dest, &[3; 100]).unwrap();
    tx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    settle(&mut tx, 3);
    assert_eq!((tx.uring_stats().plain_sends, tx.uring_stats().sent), (1, 3), "{:?}", tx.uring_stats());
    assert_eq!(collect(&mut rx, from, 2), [2, 3]);
    // Refused by the kernel (an IPv6 destination on an IPv4 socket; nothing is sent): counted, not returned.
    tx.queue_send("[::1]:9".parse().unwrap(), b"refused").unwrap();
    tx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    assert_eq!((tx.uring_stats().plain_sends, tx.uring_stats().send_errors), (1, 1), "{:?}", tx.uring_stats());
}

/// Spins `rx.receive(Some(ZERO))`, collecting the first byte of each datagram from `from`, until `done`
/// holds (10 s at most).
fn spin_until(
    rx: &mut UringBackend,
    from: SocketAddr,
    got: &mut Vec<u8>,
    what: &str,
    done: impl Fn(&UringBackend, &[u8]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(rx, got) {
        assert!(Instant::now() < deadline, "{what}: not within 10 s ({got:?}, {:?})", rx.uring_stats());
        rx.receive(Some(Duration::ZERO), &mut |src, bytes| {
            if src == from {
                got.push(bytes[0]);
            }
        })
        .unwrap();
    }
}

/// A spinning backend with sparse traffic reads the group socket plainly, and goes back to its multishot
/// receive for a GRO batch, for a wait, and for bulk sending, losing and reordering nothing on the way.
#[test]
fn sparse_spinning_reads_the_group_socket_plainly() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 20);
    let mut rx = backend(group, 46_341, UringOptions::default());
    let mut tx = backend(group, 46_342, UringOptions::default());
    let (from, dest) = (tx.unicast_addr().unwrap(), SocketAddr::from((group, 46_341)));
    let plain = |rx: &UringBackend, _: &[u8]| rx.st.group_read == GroupRead::Plain;
    let mut got = Vec::new();

    // Idle spinning: the multishot receive is cancelled, then the socket is read plainly.
    for _ in 0..PLAIN_AFTER - 1 {
        rx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    }
    assert_eq!(rx.uring_stats().plain_switches, 0, "switched before {PLAIN_AFTER} sparse receives");
    spin_until(&mut rx, from, &mut got, "plain reads", plain);
    assert!(!rx.st.recv_armed[0] && got.is_empty(), "{:?}", rx.uring_stats());

    // Lone datagrams arrive by plain reads.
    for k in 1..=3u8 {
        tx.queue_send(dest, &[k; 100]).unwrap();
        tx.flush().unwrap();
        spin_until(&mut rx, from, &mut got, "a lone datagram", |_, g| g.len() == usize::from(k));
    }
    // At least: datagrams from elsewhere on the group would be read too.
    assert!(rx.uring_stats().plain_received >= 3 && rx.st.group_read == GroupRead::Plain, "{:?}", rx.uring_stats());

    // A GSO batch (one GRO read, or several datagrams without GRO) puts the multishot receive back.
    for k in 4..=9u8 {
        tx.queue_send(dest, &[k; 100]).unwrap();
    }
    tx.flush().unwrap();
    spin_until(&mut rx, from, &mut got, "a batch", |_, g| g.len() == 9);
    assert_eq!(rx.st.group_read, GroupRead::Multishot);
    rx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    assert!(rx.st.recv_armed[0], "multishot receive not re-armed: {:?}", rx.uring_stats());

    // Plain again; a receive that may wait arms the multishot receive, which takes what is queued.
    spin_until(&mut rx, from, &mut got, "plain reads again", plain);
    tx.queue_send(dest, &[10; 100]).unwrap();
    tx.flush().unwrap();
    while got.len() < 10 {
        rx.receive(Some(Duration::from_secs(5)), &mut |src, bytes| {
            if src == from {
                got.push(bytes[0]);
            }
        })
        .unwrap();
        assert_eq!(rx.st.group_read, GroupRead::Multishot);
    }

    // Plain again; `receive_all` reads everything queued.
    spin_until(&mut rx, from, &mut got, "plain reads a third time", plain);
    for k in 11..=13u8 {
        tx.queue_send(dest, &[k; 100]).unwrap();
        tx.flush().unwrap();
    }
    settle(&mut tx, 13);
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 13 {
        assert!(Instant::now() < deadline, "receive_all: {got:?}");
        rx.receive_all(&mut |src, bytes| {
            if src == from {
                got.push(bytes[0]);
            }
        })
        .unwrap();
    }
    assert_eq!(got, (1..=13).collect::<Vec<u8>>(), "lost or reordered");
    assert!(rx.uring_stats().plain_switches >= 3, "{:?}", rx.uring_stats());

    // A node that sends in bulk (sends in the ring every cycle) goes back to its multishot receive.
    spin_until(&mut tx, from, &mut Vec::new(), "the sender on plain reads", plain);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tx.st.group_read == GroupRead::Plain {
        assert!(Instant::now() < deadline, "a bulk sender stayed on plain reads: {:?}", tx.uring_stats());
        for _ in 0..4 {
            tx.queue_send(dest, &[0; 100]).unwrap();
        }
        tx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    }
}

/// A receive that may wait, called while the multishot receive's cancellation is under way, re-arms it once
/// the cancellation completes: a datagram sent while it waits arrives within the wait.
#[test]
fn a_wait_during_the_switch_to_plain_reads_still_receives() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 21);
    let mut rx = backend(group, 46_345, UringOptions::default());
    let dest = SocketAddr::from((group, 46_345));
    for _ in 0..PLAIN_AFTER {
        rx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    }
    assert_eq!(rx.st.group_read, GroupRead::Cancelling, "{:?}", rx.uring_stats());
    let tx = unicast_socket();
    let from = tx.local_addr().unwrap();
    // Sent once the receive below is (very likely) waiting; sent earlier, it would arrive either way.
    let sender = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        tx.send_to(b"late", dest).unwrap();
    });
    let (start, mut got) = (Instant::now(), 0);
    while got == 0 && start.elapsed() < Duration::from_secs(10) {
        rx.receive(Some(Duration::from_secs(10)), &mut |src, _| got += usize::from(src == from)).unwrap();
    }
    sender.join().unwrap();
    assert_eq!(got, 1, "nothing received in 10 s: {:?}, {:?}", rx.st.group_read, rx.uring_stats());
    assert_eq!(rx.st.group_read, GroupRead::Multishot);
}

/// Plain reads drop a datagram longer than a receive buffer as the multishot receive does, and count it;
/// the backend's common counters (`Backend::stats`) carry what its own counters say.
#[test]
fn plain_reads_count_truncated_datagrams() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 22);
    // Without GRO a plain read has a multishot buffer's room (`max_datagram`, 1904 bytes by default), so
    // 2000 bytes are truncated, as the multishot receive truncates them.
    let mut rx = backend(group, 46_347, UringOptions { gro: false, ..UringOptions::default() });
    let mut tx = backend(group, 46_348, UringOptions::default());
    let (from, dest) = (tx.unicast_addr().unwrap(), SocketAddr::from((group, 46_347)));
    let mut got = Vec::new();
    spin_until(&mut rx, from, &mut got, "plain reads", |rx, _| rx.st.group_read == GroupRead::Plain);
    assert!(2000 > rx.max_datagram());
    tx.queue_send(dest, &[7u8; 2000]).unwrap();
    tx.flush().unwrap();
    tx.queue_send(dest, &[8u8; 100]).unwrap();
    tx.flush().unwrap();
    spin_until(&mut rx, from, &mut got, "the datagram after the long one", |_, g| !g.is_empty());
    assert_eq!(got, [8]);
    let own = rx.uring_stats();
    assert_eq!((own.truncated, own.plain_received), (1, 1), "{own:?}");
    let common = Backend::stats(&rx);
    assert_eq!(
        common,
        BackendStats {
            send_errors: own.send_errors,
            gso_sends: own.gso_sends,
            gso_fallbacks: own.gso_fallbacks,
            gro_batches: own.gro_batches,
            truncated: 1,
            malformed_reads: own.malformed,
            recv_errors: own.recv_errors,
            enobufs: own.enobufs,
            plain_switches: own.plain_switches,
        }
    );
    assert!(common.plain_switches >= 1);
}

/// Sends one GSO batch of 8 full datagrams to a receiver whose group socket has `option` set, and returns
/// the datagrams it delivered (waiting in the ring, so the multishot receive reads them) and its stats;
/// `None` where GSO or GRO is missing.
fn gso_batch_to(group: Ipv4Addr, port: u16, option: impl FnOnce(&UdpSocket)) -> Option<(usize, UringStats)> {
    let sock = group_socket(group, port);
    option(&sock);
    let mut rx = UringBackend::new(sock, unicast_socket(), UringOptions::default()).expect("UringBackend::new");
    let mut tx = backend(group, port + 1, UringOptions::default());
    if !rx.gro() || tx.gso_segments() == 0 {
        eprintln!("skipping: no UDP GSO/GRO here");
        return None;
    }
    let dest = SocketAddr::from((group, port));
    for i in 0..8u8 {
        tx.queue_send(dest, &[i; FULL]).unwrap();
    }
    tx.flush().unwrap();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got < 8 && rx.uring_stats().malformed == 0 {
        assert!(Instant::now() < deadline, "nothing within 10 s ({got} delivered, {:?})", rx.uring_stats());
        rx.receive(Some(Duration::from_millis(20)), &mut |_, d| {
            assert_eq!(d.len(), FULL, "a datagram of the batch, not the batch");
            got += 1;
        })
        .unwrap();
    }
    Some((got, rx.uring_stats()))
}

/// Socket options that add control messages of their own come before the GRO segment size. A timestamp
/// leaves it room; a `SO_TIMESTAMPING` record (64 bytes) crowds it out, and the batch is dropped and
/// counted instead of being handed up as one datagram.
#[test]
fn receives_whose_control_data_lost_the_segment_size_are_dropped() {
    use nix::sys::socket::{TimestampingFlag, setsockopt, sockopt};
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 23);
    let stamped = |s: &UdpSocket| setsockopt(s, sockopt::ReceiveTimestamp, &true).expect("SO_TIMESTAMP");
    let Some((got, stats)) = gso_batch_to(group, 46_349, stamped) else { return };
    assert_eq!((got, stats.malformed, stats.gro_batches), (8, 0, 1), "{stats:?}");
    let flags = TimestampingFlag::SOF_TIMESTAMPING_SOFTWARE | TimestampingFlag::SOF_TIMESTAMPING_RX_SOFTWARE;
    let crowded = |s: &UdpSocket| setsockopt(s, sockopt::Timestamping, &flags).expect("SO_TIMESTAMPING");
    let Some((got, stats)) = gso_batch_to(group, 46_351, crowded) else { return };
    assert_eq!((got, stats.malformed), (0, 1), "{stats:?}");
}

/// Receive completions reaped without a sink wait in the stash for the next receive. A sink that panics
/// while they are delivered, in a backend used again after the panic was caught, must not get the ones
/// already delivered a second time (their buffers were given back to the kernel after the first).
#[test]
fn a_panicking_sink_does_not_get_stashed_datagrams_twice() {
    let _serial = serial();
    if !available() {
        return;
    }
    let group = Ipv4Addr::new(239, 255, 203, 24);
    let mut rx = backend(group, 46_353, UringOptions::default());
    let mut tx = backend(group, 46_354, UringOptions::default());
    let dest = SocketAddr::from((group, 46_353));
    for i in 0..3u8 {
        tx.queue_send(dest, &[i; 100]).unwrap();
        tx.flush().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.st.stash.len() < 3 {
        assert!(Instant::now() < deadline, "3 datagrams not stashed within 10 s ({})", rx.st.stash.len());
        rx.wait(Some(Duration::from_millis(20))).unwrap();
        rx.reap(None);
    }
    let mut got = Vec::new();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rx.receive(Some(Duration::ZERO), &mut |_, d| {
            assert_ne!(d[0], 1, "the sink fails on datagram 1");
            got.push(d[0]);
        })
    }));
    assert!(caught.is_err());
    rx.receive(Some(Duration::ZERO), &mut |_, d| got.push(d[0])).unwrap();
    assert_eq!(got, [0, 2], "datagram 1 is lost with the panic, 0 is not delivered again");
}
