//! The counters and tap tools run as separate processes against a node of this test, the way an operator
//! runs them.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use blip::{BackendChoice, Node, NodeBuilder};

/// A group and port of this test binary alone (loopback, 239.255.0.0/16, TTL 0 by default).
fn unique_group() -> (IpAddr, u16) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() as u16;
    (IpAddr::V4(Ipv4Addr::new(239, 255, 251, ((pid % 200) + n % 50 + 1) as u8)), 60_000 + (pid % 50) * 10 + n % 10)
}

fn builder(group: (IpAddr, u16)) -> NodeBuilder {
    Node::builder().backend(BackendChoice::Poll).group(group.0).port(group.1)
}

/// Runs blip-stat with `args` to completion (at most 20 s); returns its status and stdout.
fn blip_stat(args: &[&std::ffi::OsStr], what: &str) -> (std::process::ExitStatus, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_blip-stat"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start blip-stat");
    finish(child, Duration::from_secs(20), what)
}

/// Waits for a child this test started, killing it (by its handle) if it overruns; returns status and stdout.
fn finish(mut child: Child, limit: Duration, what: &str) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut out = String::new();
            child.stdout.take().expect("piped stdout").read_to_string(&mut out).expect("read output");
            return (status, out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish in time");
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

#[test]
fn blip_stat_once_shows_a_running_nodes_counters() {
    let dir = std::env::temp_dir().join(format!("blip-stat-test-{}", std::process::id()));
    let mut node = builder(unique_group()).name("stat-test").export_counters(&dir).build().unwrap();
    let mut publisher = node.publisher().unwrap();
    for _ in 0..7 {
        publisher.send(b"counted").unwrap();
    }
    // The engine publishes every 50 ms; wait (bounded) until the socket shows all seven.
    let path: PathBuf = node.counters_path().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while blip::counters::read(&path).unwrap().counter("messages_sent") != Some(7) {
        assert!(Instant::now() < deadline, "the node never counted its messages");
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let id = format!("{:016x}", node.info().node_id);

    let (status, out) = blip_stat(&["--once".as_ref(), "--socket".as_ref(), path.as_os_str()], "blip-stat --once");
    assert!(status.success(), "blip-stat failed: {out}");
    assert!(out.contains(&format!("node {id} \"stat-test\"")), "{out}");
    assert!(out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["messages_sent", "7", "-"]), "{out}");

    // The whole directory, as JSON.
    let args = ["--count", "2", "--interval", "0.1", "--json", "--dir"].map(std::ffi::OsStr::new);
    let (status, out) = blip_stat(&[&args[..], &[dir.as_os_str()]].concat(), "blip-stat --json");
    assert!(status.success(), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains(&format!("\"node_id\":\"{id}\"")) && lines[0].contains("\"messages_sent\":7"), "{out}");
    assert!(lines[1].contains("\"rates\":{"), "the second read has rates: {out}");

    drop(publisher);
    drop(node);
    assert!(!path.exists());
    let (status, out) =
        blip_stat(&["--once".as_ref(), "--socket".as_ref(), path.as_os_str()], "blip-stat on a gone node");
    assert!(!status.success(), "reading a gone node must fail: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn blip_tap_prints_a_senders_data() {
    let group = unique_group();
    let mut tap = Command::new(env!("CARGO_BIN_EXE_blip-tap"))
        .args(["--group", &group.0.to_string(), "--port", &group.1.to_string()])
        .args(["--kinds", "data", "--count", "3", "--seconds", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start blip-tap");
    // The tap says when it has joined; nothing it could print is sent before that.
    let mut ready = String::new();
    BufReader::new(tap.stderr.take().unwrap()).read_line(&mut ready).expect("tap stderr");
    assert!(ready.contains("listening on"), "blip-tap: {ready}");

    let mut node = builder(group).build().unwrap();
    let session = format!("{:016x}", node.info().session);
    let mut publisher = node.publisher().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0u32;
    let out = loop {
        if let Some(status) = tap.try_wait().expect("try_wait") {
            assert!(status.success(), "blip-tap failed");
            let mut out = String::new();
            tap.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            break out;
        }
        if Instant::now() > deadline {
            let _ = tap.kill();
            let _ = tap.wait();
            panic!("blip-tap did not stop after --count 3");
        }
        publisher.publish("tap.test", format!("hello tap {i}").as_bytes()).unwrap();
        i += 1;
        std::thread::park_timeout(Duration::from_millis(20));
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].contains(&format!("DATA      session={session}")), "{out}");
    assert!(lines[0].contains("seq=0 msg_seq=0 low=0") && lines[0].contains("\"hello tap 0\""), "{out}");
    assert!(lines[0].contains("topic=tap.test 11B"), "the envelope is decoded: {out}");
    assert!(lines.iter().all(|l| l.contains(" DATA ") && l.contains(&session)), "{out}");
}

/// Runs blip-bench with `args` on a group and port of its own, to completion (at most `limit`); returns its
/// status and stdout.
fn blip_bench(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String) {
    let (group, port) = unique_group();
    let child = Command::new(env!("CARGO_BIN_EXE_blip-bench"))
        .args(args)
        .args(["--group", &group.to_string(), "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start blip-bench");
    finish(child, limit, &format!("blip-bench {}", args.join(" ")))
}

#[test]
fn blip_bench_seals_with_the_chosen_cipher() {
    for (cipher, name) in [("aegis128l", "AEGIS-128L"), ("aes256gcm", "AES-256-GCM")] {
        let args = ["throughput", "--size", "1024", "--messages", "3000", "--encrypt", "--cipher", cipher, "--json"];
        let (status, out) = blip_bench(&args, Duration::from_secs(60));
        assert!(status.success(), "{cipher}: {status}\n{out}");
        assert!(out.contains("\"encrypted\": true") && out.contains(&format!("\"cipher\": \"{name}\"")), "{out}");
        assert!(out.contains("\"messages\": 3000, \"expected\": 3000"), "every message delivered: {out}");
    }
    let status = Command::new(env!("CARGO_BIN_EXE_blip-bench"))
        .args(["throughput", "--messages", "10", "--cipher", "rot13"])
        .stderr(Stdio::null())
        .status()
        .expect("run blip-bench");
    assert_eq!(status.code(), Some(2), "an unknown cipher is a usage error");
}

#[test]
fn blip_bench_cost_claim_and_direct_deliver_every_message() {
    for args in [
        &["cost", "--messages", "20000"][..],
        &["cost", "--messages", "20000", "--direct"][..],
        &["cost", "--messages", "20000", "--direct", "--direct-receive"][..],
        &["cost", "--messages", "20000", "--ping"][..],
        &["cost", "--messages", "20000", "--ping", "--direct"][..],
        &["throughput", "--messages", "20000", "--claim"][..],
        &["throughput", "--messages", "20000", "--direct", "--direct-receive"][..],
        &["throughput", "--messages", "20000", "--direct"][..],
    ] {
        let (status, out) = blip_bench(&[args, &["--json"]].concat(), Duration::from_secs(60));
        assert!(status.success(), "{args:?}: {status}\n{out}");
        assert!(out.contains("\"messages\": 20000, \"expected\": 20000"), "{args:?}: every message delivered: {out}");
    }
}

#[test]
fn blip_bench_reports_the_machines_cpus_when_pinned() {
    // Pinning the benchmark's threads must not change what the header says the machine has.
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (status, out) = blip_bench(&["cost", "--messages", "1000", "--cores", "0", "--json"], Duration::from_secs(60));
    assert!(status.success(), "{status}\n{out}");
    assert!(out.contains(&format!("\"cpus\": {cpus},")), "expected {cpus} cpus: {out}");
}

#[test]
fn blip_bench_compare_completes() {
    // The main job, small: raw and Blip throughput, then raw and Blip ping-pong (whose ponger must be up
    // before the first raw ping, which has no repair), the raw one on plain send/recv.
    let args = ["compare", "--messages", "20000", "--count", "300", "--runs", "1", "--json"];
    let (status, out) = blip_bench(&args, Duration::from_secs(90));
    assert!(status.success(), "{status}\n{out}");
    for name in [
        "raw 64B packed",
        "blip 64B 1->1",
        "blip 64B 1->1 direct",
        "raw latency 64B",
        "blip latency 64B",
        "blip latency 64B direct",
    ] {
        assert!(out.contains(&format!("\"name\": \"{name}\"")), "{name} missing: {out}");
    }
    // Where the probe chose io_uring, the poll backend's latency is measured beside it.
    let uring = out.contains("\"name\": \"blip latency 64B\", \"backend\": \"io_uring\"");
    if uring {
        assert!(out.contains("\"name\": \"blip latency 64B\", \"backend\": \"poll\""), "no poll latency: {out}");
    }
    // Two ways of sending, two of the ping-pong (and poll's), each with its ratio.
    let ratios = if uring { 5 } else { 4 };
    assert_eq!(out.matches("\"ratio_to_raw\"").count(), ratios, "every Blip row has a ratio: {out}");
    assert!(out.contains("\"raw_lost\": "), "each run says what the raw path lost: {out}");
    assert!(out.contains("\"name\": \"raw latency 64B\", \"backend\": \"send/recv\""), "{out}");
    assert!(out.contains("\"ratio_to_raw\"") && out.contains("\"runs\": [{\"raw\": "), "{out}");
}

#[test]
fn blip_bench_raw_latency_runs_alone() {
    // The ceiling `compare` sets Blip's round trips against, on its own: plain sockets, no reliability.
    let (status, out) =
        blip_bench(&["latency", "--raw", "--count", "300", "--warmup", "30", "--json"], Duration::from_secs(60));
    assert!(status.success(), "{status}\n{out}");
    assert!(out.contains("\"name\": \"raw latency 64B\", \"backend\": \"send/recv\""), "{out}");
    assert!(out.contains("\"p50_us\": "), "{out}");
    // Injected loss is Blip's; asking it of the raw path is an error, not a silent no-op.
    let (status, out) = blip_bench(&["latency", "--raw", "--loss", "0.1", "--count", "10"], Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "refused as a usage error: {out}");
}

#[test]
fn blip_bench_fans_out_to_more_subscribers_than_cores() {
    // More busy threads than this machine has cores: idle subscribers wait in the kernel (on two cores
    // that is every run with 4 subscribers) and must still be woken for every message.
    let (status, out) =
        blip_bench(&["throughput", "--messages", "20000", "--subscribers", "4", "--json"], Duration::from_secs(60));
    assert!(status.success(), "{status}\n{out}");
    assert!(out.contains("\"messages\": 80000, \"expected\": 80000"), "every subscriber gets every message: {out}");
}

#[test]
fn blip_bench_direct_receive_delivers_every_message() {
    // Subscribers that take deliveries with Node::poll, four of them (idle ones parking on two cores).
    let args = ["throughput", "--messages", "20000", "--subscribers", "4", "--direct-receive", "--json"];
    let (status, out) = blip_bench(&args, Duration::from_secs(60));
    assert!(status.success(), "{status}\n{out}");
    assert!(out.contains("direct-recv"), "{out}");
    assert!(out.contains("\"messages\": 80000, \"expected\": 80000"), "every subscriber gets every message: {out}");
}

#[test]
fn blip_bench_direct_latency_runs() {
    // Ping-pong with Node::try_send and Node::poll on both ends: every round trip completes.
    let (status, out) =
        blip_bench(&["latency", "--direct", "--count", "300", "--warmup", "30", "--json"], Duration::from_secs(60));
    assert!(status.success(), "{status}\n{out}");
    assert!(out.contains("\"name\": \"blip latency 64B direct\""), "{out}");
    assert!(out.contains("\"messages\": 300, \"expected\": 300"), "{out}");
    let (status, out) = blip_bench(&["--threads", "latency", "--direct", "--count", "10"], Duration::from_secs(30));
    assert!(!status.success(), "--direct with --threads must be refused: {out}");
}
