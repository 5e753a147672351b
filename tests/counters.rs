//! Live counters read from outside the node, through its socket, the way `blip-stat` reads them.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blip::BackendChoice;
use blip::counters::{self, Snapshot};
use blip::proto::PeerRole;
use common::*;

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("blip-counters-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads `path` until `done` holds for the snapshot, or fails the test at the deadline with the last one.
fn read_until(path: &Path, what: &str, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = counters::read(path).expect("read counters");
        if done(&snap) {
            return snap;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last snapshot:\n{}", snap.encode());
        // The engine refreshes what the socket serves every 50 ms.
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

#[test]
fn counters_are_read_from_the_socket() {
    const N: u64 = 500;
    let dir = TempDir::new("read");
    let group = unique_group();
    let mut rx = builder(BackendChoice::Poll, group).name("receiver").export_counters(&dir.0).build().unwrap();
    let mut tx = builder(BackendChoice::Poll, group).name("sender").export_counters(&dir.0).build().unwrap();
    let rx_path = rx.counters_path().expect("rx socket").to_owned();
    let tx_path = tx.counters_path().expect("tx socket").to_owned();
    let mut listed = counters::list(&dir.0);
    listed.sort();
    let mut expected = vec![rx_path.clone(), tx_path.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    let name = tx_path.file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(name, format!("{}-{:016x}.sock", std::process::id(), tx.info().node_id));

    let mut sub = rx.subscriber().unwrap();
    let mut publisher = tx.publisher().unwrap();
    let mut own = tx.subscriber().unwrap();
    let collector = std::thread::spawn(move || collect(&mut sub, 1, N, Duration::from_secs(30)));
    handshake(&mut publisher, &mut own, 1, 100);
    send_rest(&mut publisher, N, 100);
    assert_perfect(&collector.join().unwrap(), N);

    let (tx_id, tx_session) = (tx.info().node_id, tx.info().session);
    let (rx_id, rx_session) = (rx.info().node_id, rx.info().session);
    let s = read_until(&tx_path, "the sender's counters", |s| {
        s.counter("messages_sent") == Some(N)
            && s.peers
                .iter()
                .any(|p| p.role == PeerRole::Receiver && p.node_id == Some(rx_id) && p.counters.position > 0)
    });
    assert_eq!((s.node_id, s.session, s.pid, s.name.as_str()), (tx_id, tx_session, std::process::id(), "sender"));
    assert_eq!(s.group, tx.info().group);
    assert_eq!(s.backend, "poll");
    // Protocol bytes include each message's application envelope (2 bytes without topic).
    assert_eq!(s.counter("bytes_sent"), Some(N * (100 + blip::envelope::MIN_ENVELOPE_LEN as u64)));
    assert!(s.counter("datagrams_sent").unwrap() >= N * 100 / 1500);
    let r = s.peers.iter().find(|p| p.role == PeerRole::Receiver).unwrap();
    assert_eq!(r.session, rx_session);
    assert!(r.counters.status_received > 0);
    assert_eq!(s.member_name(rx_id), Some("receiver"));

    let s = read_until(&rx_path, "the receiver's counters", |s| {
        s.counter("messages_delivered") == Some(N)
            && s.peers.iter().any(|p| p.role == PeerRole::Sender && p.counters.messages_delivered == N)
    });
    let p = s.peers.iter().find(|p| p.role == PeerRole::Sender).unwrap();
    assert_eq!((p.session, p.node_id), (tx_session, Some(tx_id)));
    assert_eq!(p.addr, Some(tx.info().sockets.local));
    assert_eq!(p.counters.lost_datagrams, 0);
    assert!(p.counters.bytes > N * 100, "{p:?}");
    // The row counts DATA and HEARTBEAT packets; the node counts the DATA it stored.
    assert!(p.counters.datagrams >= s.counter("datagrams_received").unwrap(), "{p:?}");
    // The same snapshot is available in process.
    assert_eq!(rx.counters().node_id, s.node_id);

    drop(tx);
    drop(rx);
    assert!(!tx_path.exists() && !rx_path.exists(), "sockets must be removed on shutdown");
    assert!(counters::list(&dir.0).is_empty());
}

#[test]
fn a_stale_socket_is_replaced_and_a_dead_node_cannot_hang_a_reader() {
    let dir = TempDir::new("stale");
    std::fs::create_dir_all(&dir.0).unwrap();
    let node_id = 0xfeed_0000_0000_0001u64;
    let path = dir.0.join(format!("{}-{node_id:016x}.sock", std::process::id()));
    // A socket file without a listener: what a node killed with SIGKILL leaves.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert!(counters::read(&path).is_err(), "reading a dead socket fails at once");

    // A listener that never answers: the reader gives up after its timeout.
    let hung = dir.0.join("hung.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&hung).unwrap();
    let t = Instant::now();
    let err = counters::read_timeout(&hung, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(err, counters::CountersError::Timeout(_)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));

    let node = builder(BackendChoice::Poll, unique_group()).node_id(node_id).export_counters(&dir.0).build().unwrap();
    assert_eq!(node.counters_path(), Some(path.as_path()));
    let s = counters::read(&path).expect("the new node answers on the old path");
    assert_eq!(s.node_id, node_id);
    drop(node);
    assert!(!path.exists());
}
