//! Blip's benchmark: throughput and latency over real multicast (loopback by default), the raw-UDP ceiling
//! of the same machine, and both side by side (`compare`).
//!
//! By default each node's engine runs in its application thread (`NodeBuilder::build_driven`), so a
//! publisher and a subscriber need two threads, which fits a 2-core machine; `--threads` gives every node its
//! own engine thread instead.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blip::engine::Backend;
use blip::engine::poll::PollBackend;
use blip::net::{Interface, SocketConfig};
use blip::proto::{Cipher, Event, KEY_LEN, Keyring};
use blip::{BackendChoice, IdleStrategy, Node, NodeBuilder, Publisher, Received, Subscriber};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;

#[derive(Parser, Debug)]
#[command(version, about = "Throughput and latency of Blip over multicast, beside the raw-UDP ceiling")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Backend: auto, uring or poll.
    #[arg(long, default_value = "auto", global = true)]
    backend: String,
    /// Cores to pin to: the publisher's thread first, then subscribers' (comma-separated).
    #[arg(long, value_delimiter = ',', global = true)]
    cores: Vec<usize>,
    /// Interface to use (default: loopback; traffic stays on this host).
    #[arg(long, global = true)]
    interface: Option<String>,
    /// Multicast group.
    #[arg(long, default_value = "239.255.77.77", global = true)]
    group: IpAddr,
    /// UDP port.
    #[arg(long, default_value_t = 47_077, global = true)]
    port: u16,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64, global = true)]
    size: usize,
    /// Injected receive loss probability (0..1), repaired by the protocol.
    #[arg(long, default_value_t = 0.0, global = true)]
    loss: f64,
    /// Retransmission window in datagrams.
    #[arg(long, default_value_t = 4096, global = true)]
    window: usize,
    /// Path MTU.
    #[arg(long, default_value_t = 1500, global = true)]
    mtu: usize,
    /// Give every node its own engine thread instead of driving it from the application thread.
    #[arg(long, global = true)]
    threads: bool,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Seal every packet (authenticated encryption) under a random key shared by this run's nodes.
    #[arg(long, global = true)]
    encrypt: bool,
    /// Seal every packet under the 32-byte key in this file (implies --encrypt).
    #[arg(long, global = true)]
    key_file: Option<std::path::PathBuf>,
    /// The cipher of --encrypt / --key-file: aegis128l (the default) or aes256gcm.
    #[arg(long, global = true, default_value = "aegis128l")]
    cipher: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One publisher to N subscribers, as fast as flow control allows.
    Throughput(ThroughputArgs),
    /// Ping-pong round trips between two nodes (or a fixed rate with --rate).
    Latency(LatencyArgs),
    /// The same traffic on plain UDP multicast without reliability: the machine's ceiling.
    Raw(ThroughputArgs),
    /// Raw and Blip back to back, with their ratio.
    Compare(CompareArgs),
    /// One thread drives a publisher's node and a subscriber's node in turn: what the whole path costs one
    /// core per message (both engines, the application's side of both rings, the kernel's copies), with no
    /// second core to overlap with. Steadier than `throughput` on a shared machine, and runs under
    /// `valgrind --tool=callgrind` with `--backend poll` to count instructions.
    Cost(CostArgs),
    /// Internal: one subscriber of `throughput --processes`, run as a child process.
    #[command(hide = true)]
    SubscriberChild(ChildArgs),
}

#[derive(Args, Debug, Clone)]
struct ChildArgs {
    /// Messages to expect.
    #[arg(long)]
    messages: u64,
    /// Index of this subscriber (seeds its loss injector).
    #[arg(long)]
    index: usize,
    /// Wait in the kernel when idle instead of spinning (see `subscribe`).
    #[arg(long)]
    park: bool,
    /// Take deliveries with `Node::poll` (see `subscribe`).
    #[arg(long)]
    direct_receive: bool,
}

#[derive(Args, Debug, Clone)]
struct ThroughputArgs {
    /// Messages to send.
    #[arg(long, default_value_t = 2_000_000)]
    messages: u64,
    /// Subscribers.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Raw only: one message per datagram instead of packing.
    #[arg(long)]
    unpacked: bool,
    /// Raw only: plain sendmmsg/recvmmsg even where UDP GSO/GRO are available.
    #[arg(long)]
    no_gso: bool,
    /// Send for this many seconds instead of a number of messages (subscribers in threads only).
    #[arg(long)]
    seconds: Option<f64>,
    /// Run each subscriber in its own process instead of a thread.
    #[arg(long)]
    processes: bool,
    /// Write each message in place with `Publisher::claim` (as the raw path writes its datagrams) instead
    /// of copying it in with `Publisher::try_send`.
    #[arg(long)]
    claim: bool,
    /// Send from the thread that drives the publisher's node with `Node::try_send` (no ring between the
    /// application and the engine) instead of through a `Publisher`.
    #[arg(long, conflicts_with = "claim")]
    direct: bool,
    /// Subscribers take their deliveries with `Node::poll` from the thread that drives their node (no ring
    /// between the engine and the application) instead of through a `Subscriber`.
    #[arg(long)]
    direct_receive: bool,
}

#[derive(Args, Debug, Clone)]
struct CostArgs {
    /// Messages to send.
    #[arg(long, default_value_t = 2_000_000)]
    messages: u64,
    /// Send with `Node::try_send` (no ring) instead of through a `Publisher`.
    #[arg(long)]
    direct: bool,
    /// Read with `Node::poll` (no ring) instead of through a `Subscriber`.
    #[arg(long)]
    direct_receive: bool,
    /// Ping-pong instead of a stream: `--messages` round trips of one message each way, both ends driven
    /// from one thread, so under callgrind the count is the user-space work of a round trip's two hops.
    /// `--direct` sends and reads without rings at both ends.
    #[arg(long, conflicts_with = "direct_receive")]
    ping: bool,
}

#[derive(Args, Debug, Clone)]
struct LatencyArgs {
    /// Round trips measured.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Round trips before measuring.
    #[arg(long, default_value_t = 10_000)]
    warmup: u64,
    /// Fixed sending rate in messages per second (latency corrected for coordinated omission); 0 = ping-pong.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// The same round trips on plain UDP sockets (`send_to` and a spun non-blocking `recv`), without
    /// reliability: the machine's ceiling that `compare` sets Blip's latency against.
    #[arg(long)]
    raw: bool,
    /// Send with `Node::try_send` and read with `Node::poll` from the thread that drives each node (no
    /// rings) instead of through a `Publisher` and a `Subscriber`.
    #[arg(long, conflicts_with = "raw")]
    direct: bool,
}

#[derive(Args, Debug, Clone)]
struct CompareArgs {
    #[command(flatten)]
    throughput: ThroughputArgs,
    /// Round trips for the latency comparison (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    count: u64,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    machine_cpus(); // before any pinning narrows what the thread sees
    let mut c = cli.common;
    let mut generated_key = None;
    if let Err(e) = cipher_choice(&c.cipher) {
        eprintln!("blip-bench: {e}");
        return ExitCode::from(2);
    }
    if c.encrypt && c.key_file.is_none() {
        match random_key_file() {
            Ok(path) => {
                c.key_file = Some(path.clone());
                generated_key = Some(path);
            }
            Err(e) => {
                eprintln!("blip-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if !(0.0..=1.0).contains(&c.loss) {
        eprintln!("blip-bench: --loss must be between 0 and 1");
        return ExitCode::from(2);
    }
    if let Some(Cmd::Latency(a)) = &cli.command
        && a.raw
        && c.loss > 0.0
    {
        eprintln!("blip-bench: --loss drops datagrams in Blip's receive path; the raw ping-pong has none (nor repair)");
        return ExitCode::from(2);
    }
    if c.size < 16 {
        eprintln!("blip-bench: --size must be at least 16 (sequence and timestamp live in the message)");
        return ExitCode::from(2);
    }
    let cmd = cli.command.unwrap_or(Cmd::Compare(CompareArgs {
        throughput: ThroughputArgs {
            messages: 2_000_000,
            subscribers: 1,
            unpacked: false,
            no_gso: false,
            seconds: None,
            processes: false,
            claim: false,
            direct: false,
            direct_receive: false,
        },
        count: 50_000,
        runs: 3,
    }));
    let result = match cmd {
        Cmd::Throughput(a) => throughput(&c, &a).map(|r| report(&c, &[r])),
        Cmd::Raw(a) => raw_throughput(&c, &a).map(|r| report(&c, &[r])),
        Cmd::Latency(a) => latency(&c, &a, a.raw).map(|r| report(&c, &[r])),
        Cmd::Compare(a) => compare(&c, &a).map(|rows| report(&c, &rows)),
        Cmd::Cost(a) => cost(&c, &a).map(|r| report(&c, &[r])),
        Cmd::SubscriberChild(a) => subscriber_child(&c, &a),
    };
    if let Some(path) = generated_key {
        let _ = std::fs::remove_file(path);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blip-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, String>;

/// One line of the report.
#[derive(Debug, Clone, Default)]
struct Row {
    name: String,
    backend: String,
    messages: u64,
    expected: u64,
    seconds: f64,
    msgs_per_sec: f64,
    mb_per_sec: f64,
    losses: u64,
    naks: u64,
    retransmits: u64,
    cpu_s_per_m: f64,
    latency: Option<[f64; 6]>,
    ratio: Option<f64>,
    /// `compare`: each run's raw and Blip figures, measured back to back.
    runs: Vec<RunPair>,
}

/// One `compare` run: the raw ceiling and Blip's rate, and what the raw path lost (it has no repair: its
/// receiver drops what arrives while it is descheduled, and its rate counts only what arrived).
#[derive(Debug, Clone, Copy)]
struct RunPair {
    raw: f64,
    blip: f64,
    raw_lost: f64,
}

/// Writes a random 32-byte key to a new private file in the temporary directory, for `--encrypt`.
fn random_key_file() -> Result<std::path::PathBuf> {
    use std::io::Read;
    let mut key = [0u8; KEY_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("cannot read a random key from /dev/urandom: {e}"))?;
    let path = std::env::temp_dir().join(format!("blip-bench-key-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(&path)
        .and_then(|mut f| f.write_all(&key))
        .map_err(|e| format!("cannot write the key file {}: {e}", path.display()))?;
    Ok(path)
}

/// The keyring of `--key-file`, if given.
fn keyring(c: &Common) -> Result<Option<Keyring>> {
    let Some(path) = &c.key_file else { return Ok(None) };
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read --key-file {}: {e}", path.display()))?;
    let key: [u8; KEY_LEN] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("--key-file {} holds {} bytes; a key is {KEY_LEN}", path.display(), b.len()))?;
    Ok(Some(Keyring::new(1, key).with_cipher(cipher_choice(&c.cipher)?)))
}

fn cipher_choice(s: &str) -> Result<Cipher> {
    match s {
        "aegis128l" => Ok(Cipher::Aegis128L),
        "aes256gcm" => Ok(Cipher::Aes256Gcm),
        o => Err(format!("--cipher must be aegis128l or aes256gcm, not {o}")),
    }
}

fn backend_choice(s: &str) -> Result<BackendChoice> {
    match s {
        "auto" => Ok(BackendChoice::Auto),
        "uring" => Ok(BackendChoice::Uring),
        "poll" => Ok(BackendChoice::Poll),
        o => Err(format!("--backend must be auto, uring or poll, not {o}")),
    }
}

fn builder(c: &Common, port_offset: u16) -> Result<NodeBuilder> {
    let mut b = Node::builder()
        .backend(backend_choice(&c.backend)?)
        .group(c.group)
        .port(c.port + port_offset)
        .window(c.window)
        .mtu(c.mtu)
        .idle(IdleStrategy::BusySpin);
    if let Some(i) = &c.interface {
        b = b.interface(Interface::Name(i.clone()));
    }
    if let Some(keys) = keyring(c)? {
        b = b.encryption(keys);
    }
    Ok(b)
}

fn build(b: NodeBuilder, threads: bool) -> Result<Node> {
    if threads { b.build() } else { b.build_driven() }.map_err(|e| e.to_string())
}

/// [`build`], for a node whose thread reads with `Node::poll` when `direct_receive` (its subscribers' way
/// otherwise).
fn build_reading(b: NodeBuilder, direct_receive: bool, threads: bool) -> Result<Node> {
    build(if direct_receive { b.direct_receive() } else { b }, threads)
}

/// [`builder`] with `--loss` injected, under `seed`, when asked for.
fn lossy_builder(c: &Common, port_offset: u16, seed: u64) -> Result<NodeBuilder> {
    let b = builder(c, port_offset)?;
    Ok(if c.loss > 0.0 { b.inject_loss(c.loss, seed) } else { b })
}

fn pin(cores: &[usize], index: usize) {
    #[cfg(target_os = "linux")]
    if let Some(&core) = cores.get(index) {
        let mut set = nix::sched::CpuSet::new();
        if set.set(core).is_ok() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    }
}

fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let Some(close) = stat.rfind(')') else { return 0.0 };
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

struct Progress {
    on: bool,
    last: Instant,
}

impl Progress {
    fn new(json: bool) -> Progress {
        Progress { on: std::io::stderr().is_terminal() && !json, last: Instant::now() }
    }
    fn show(&mut self, what: &str, done: u64, total: u64) {
        if self.on && self.last.elapsed() > Duration::from_millis(250) {
            self.last = Instant::now();
            eprint!("\r{what}: {done}/{total} ({:.0} %)   ", done as f64 * 100.0 / total.max(1) as f64);
            let _ = std::io::stderr().flush();
        }
    }
    fn done(&self) {
        if self.on {
            eprint!("\r{:60}\r", "");
        }
    }
}

fn fill(buf: &mut [u8], seq: u64) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
}

/// Messages sent with `Node::try_send` between two duty cycles: about what a publisher's 256 KiB ring holds,
/// so that both ways of sending hand the engine the same bursts.
fn direct_round(size: usize) -> u64 {
    ((256 << 10) / (size as u64 + 8)).max(1)
}

/// A row name's mark for the ways around the rings: `direct` for both `Node::try_send` and `Node::poll`,
/// else the one used.
fn direct_suffix(send: bool, receive: bool) -> &'static str {
    match (send, receive) {
        (true, true) => " direct",
        (true, false) => " direct-send",
        (false, true) => " direct-recv",
        (false, false) => "",
    }
}

/// Drives a driven node (no-op for a threaded one) without waiting.
fn drive(node: &mut Node) -> Result<usize> {
    node.duty_cycle(Some(Duration::ZERO)).map_err(|e| e.to_string())
}

/// Empty duty cycles in a row before a parking subscriber waits in the kernel, and how long it waits at most.
const IDLE_SPINS: u32 = 64;
const IDLE_WAIT: Duration = Duration::from_micros(500);

/// One subscriber: counts messages until `target` (which the publisher may lower when sending for a fixed
/// time) are delivered or reported lost, then keeps its node alive until `stop`. Returns (delivered,
/// seconds from the second message to the last, lost). With `park`, a driven node that found nothing to do
/// for `IDLE_SPINS` cycles in a row waits in the kernel for its next datagram (up to `IDLE_WAIT`). With
/// `direct_receive`, the thread takes deliveries with `Node::poll` instead of a `Subscriber`.
fn subscribe(
    c: &Common,
    index: usize,
    target: &AtomicU64,
    stop: &AtomicBool,
    done: &AtomicU64,
    park: bool,
    direct_receive: bool,
) -> Result<(u64, f64, u64)> {
    let mut node = build_reading(lossy_builder(c, 0, 1000 + index as u64)?, direct_receive, c.threads)?;
    let mut sub = Reader::new(&mut node, direct_receive)?;
    let (mut got, mut losses, mut first, mut last) = (0u64, 0u64, None::<Instant>, Instant::now());
    let mut idle = 0u32;
    let deadline = Instant::now() + Duration::from_secs(300);
    while got + losses < target.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
        if Instant::now() > deadline {
            return Err(format!("subscriber {index} timed out at {got} of {}", target.load(Ordering::Relaxed)));
        }
        let work = if park && idle >= IDLE_SPINS {
            node.duty_cycle(Some(IDLE_WAIT)).map_err(|e| e.to_string())?
        } else {
            drive(&mut node)?
        };
        let before = got;
        let mut handle = |r: Received<'_>| match r {
            Received::Message(_) => {
                got += 1;
                if got == 2 {
                    first = Some(Instant::now());
                }
            }
            Received::Loss { messages: Some(m), .. } => losses += m.end - m.start,
            _ => {}
        };
        sub.poll(&mut node, usize::MAX, &mut handle)?;
        if let (Reader::Ring(sub), true) = (&mut sub, c.threads) {
            sub.wait(Duration::from_millis(1));
        }
        if got > before {
            last = Instant::now();
        }
        idle = if work == 0 && got == before { idle + 1 } else { 0 };
    }
    let secs = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
    done.fetch_add(1, Ordering::SeqCst);
    // Keep the node (and its STATUS) alive until the publisher is finished.
    while !stop.load(Ordering::Relaxed) {
        drive(&mut node)?;
        std::thread::park_timeout(Duration::from_micros(200));
    }
    Ok((got, secs, losses))
}

/// `throughput --processes`: a child process running one subscriber; prints `RESULT delivered secs lost`.
fn subscriber_child(c: &Common, a: &ChildArgs) -> Result<()> {
    pin(&c.cores, a.index + 1);
    let target = AtomicU64::new(a.messages.max(2));
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    // Stop as soon as everything is in: the parent learns the result from stdout.
    let r = std::thread::scope(|scope| {
        let h = scope.spawn(|| subscribe(c, a.index, &target, &stop, &done, a.park, a.direct_receive));
        while done.load(Ordering::SeqCst) == 0 && !h.is_finished() {
            std::thread::park_timeout(Duration::from_millis(1));
        }
        stop.store(true, Ordering::SeqCst);
        h.join().map_err(|_| "subscriber panicked".to_string())?
    })?;
    println!("RESULT {} {} {}", r.0, r.1, r.2);
    Ok(())
}

fn throughput(c: &Common, a: &ThroughputArgs) -> Result<Row> {
    if a.processes && a.seconds.is_some() {
        return Err("--seconds works with subscribers in threads only; use --messages with --processes".into());
    }
    if (a.direct || a.direct_receive) && c.threads {
        return Err(
            "--direct and --direct-receive use the thread that drives the node; they do not go with --threads".into()
        );
    }
    let n = if a.seconds.is_some() { u64::MAX } else { a.messages.max(2) };
    let target = Arc::new(AtomicU64::new(n));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<Result<(u64, f64, u64)>>();
    let mut handles = Vec::new();
    let mut children = Vec::new();
    // More busy threads than cores (the publisher's and one per subscriber): idle subscribers wait in the
    // kernel, so that spinning ones do not take the publisher's core.
    let park = !c.threads && a.subscribers + 1 > machine_cpus();
    let direct_receive = a.direct_receive;
    for s in 0..a.subscribers {
        if a.processes {
            children.push(spawn_subscriber_process(c, s, n, park, a.direct_receive)?);
            continue;
        }
        let (c2, tx, done, stop, target) = (c.clone(), tx.clone(), done.clone(), stop.clone(), target.clone());
        handles.push(std::thread::spawn(move || {
            pin(&c2.cores, s + 1);
            let _ = tx.send(subscribe(&c2, s, &target, &stop, &done, park, direct_receive));
        }));
    }
    drop(tx);
    pin(&c.cores, 0);
    let mut node = build(builder(c, 0)?, c.threads)?;
    let backend = node.info().backend.to_string();
    let mut publisher = node.publisher().ok_or("publisher taken")?;
    let mut own = node.subscriber().ok_or("subscriber taken")?;
    let mut msg = vec![0u8; c.size];
    // Message 0 introduces the publisher; wait for every subscriber to report before timing.
    fill(&mut msg, 0);
    publisher.try_send(&msg).map_err(|e| e.to_string())?;
    let mut joined = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while joined < a.subscribers {
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            return Err(format!("only {joined} of {} subscribers reported", a.subscribers));
        }
        drive(&mut node)?;
        own.poll(64, |r| {
            if let Received::Event(Event::ReceiverJoined { .. }) = r {
                joined += 1
            }
        });
        if c.threads {
            own.wait(Duration::from_millis(1));
        }
    }
    let cpu0 = cpu_seconds();
    let mut progress = Progress::new(c.json);
    let mut seq = 1;
    let (round, mut next_drive) = (direct_round(c.size), direct_round(c.size));
    let send_until = a.seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    while seq < n {
        if seq % 1024 == 0 && send_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        let sent = if a.direct {
            fill(&mut msg, seq);
            if seq == next_drive {
                drive(&mut node)?;
                next_drive += round;
            }
            node.try_send(&msg)
        } else if a.claim {
            publisher.claim(c.size).map(|mut m| {
                fill(&mut m, seq);
                m.commit()
            })
        } else {
            fill(&mut msg, seq);
            publisher.try_send(&msg)
        };
        match sent {
            Ok(()) => seq += 1,
            Err(blip::SendError::Full) => {
                drive(&mut node)?;
                if c.threads {
                    // Wait for room (the engine runs in its own thread).
                    fill(&mut msg, seq);
                    let _ = publisher.send(&msg).map(|_| seq += 1);
                }
                progress.show("sending", seq, if send_until.is_some() { seq } else { n });
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    // Everything sent (a fixed-time run now knows its total).
    let n = seq;
    target.store(n, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut child_results = Vec::new();
    while (done.load(Ordering::SeqCst) < handles.len() as u64 || child_results.len() < children.len())
        && Instant::now() < deadline
    {
        drive(&mut node)?;
        own.poll(usize::MAX, |_| {});
        for (i, ch) in children.iter_mut().enumerate() {
            if !child_results.iter().any(|(j, _)| *j == i)
                && let Some(status) = ch.try_wait().map_err(|e| e.to_string())?
            {
                let mut out = String::new();
                if let Some(o) = ch.stdout.as_mut() {
                    let _ = std::io::Read::read_to_string(o, &mut out);
                }
                child_results.push((i, parse_child(status.success(), &out)));
            }
        }
        if c.threads || !children.is_empty() {
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }
    for ch in children.iter_mut() {
        // Only our own children, by their handles.
        if ch.try_wait().ok().flatten().is_none() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
    progress.done();
    let cpu = cpu_seconds() - cpu0;
    stop.store(true, Ordering::SeqCst);
    let stats = node.stats();
    let mut row = Row {
        name: format!("blip {}B 1->{}{}", c.size, a.subscribers, direct_suffix(a.direct, a.direct_receive)),
        backend,
        expected: n * a.subscribers as u64,
        naks: stats.protocol.naks_received,
        retransmits: stats.protocol.retransmits,
        ..Row::default()
    };
    let mut rates = Vec::new();
    if child_results.len() < children.len() {
        return Err(format!("{} of {} subscriber processes finished", child_results.len(), children.len()));
    }
    for r in rx.iter().chain(child_results.into_iter().map(|(_, r)| r)) {
        let (got, secs, losses) = r?;
        row.messages += got;
        row.losses += losses;
        rates.push((got.saturating_sub(1)) as f64 / secs.max(1e-9));
        row.seconds = row.seconds.max(secs);
    }
    for h in handles {
        let _ = h.join();
    }
    // Per-subscriber rate (the slowest), and the aggregate in the name's fan-out.
    row.msgs_per_sec = rates.iter().cloned().fold(f64::INFINITY, f64::min);
    row.mb_per_sec = row.msgs_per_sec * c.size as f64 / 1e6;
    row.cpu_s_per_m = cpu / (n as f64 / 1e6);
    if a.subscribers > 1 {
        row.name += &format!(" (aggregate {:.0} msgs/s)", rates.iter().sum::<f64>());
    }
    Ok(row)
}

/// `cost`: both nodes driven from this thread. The publisher fills its ring, then each engine takes one
/// duty cycle and the subscriber drains what arrived; loopback delivers inside the publisher's send, so
/// every cycle moves what was queued. Reports the rate one core reaches and its CPU seconds per million.
fn cost(c: &Common, a: &CostArgs) -> Result<Row> {
    pin(&c.cores, 0);
    if a.ping {
        return cost_ping(c, a);
    }
    let n = a.messages.max(2);
    let mut sub_node = build_reading(lossy_builder(c, 0, 1000)?, a.direct_receive, false)?;
    let mut sub = Reader::new(&mut sub_node, a.direct_receive)?;
    let mut node = build(builder(c, 0)?, false)?;
    let backend = node.info().backend.to_string();
    let mut publisher = node.publisher().ok_or("publisher taken")?;
    let mut own = node.subscriber().ok_or("subscriber taken")?;
    let mut msg = vec![0u8; c.size];
    let (mut got, mut losses) = (0u64, 0u64);
    fn tally(r: Received<'_>, got: &mut u64, losses: &mut u64) {
        match r {
            Received::Message(_) => *got += 1,
            Received::Loss { messages: Some(m), .. } => *losses += m.end - m.start,
            _ => {}
        }
    }
    // Message 0 introduces the publisher; time from the subscriber's report on.
    fill(&mut msg, 0);
    publisher.try_send(&msg).map_err(|e| e.to_string())?;
    let mut joined = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !joined {
        if Instant::now() > deadline {
            return Err("the subscriber did not report within 20 s".into());
        }
        drive(&mut node)?;
        drive(&mut sub_node)?;
        sub.poll(&mut sub_node, usize::MAX, |r| tally(r, &mut got, &mut losses))?;
        own.poll(64, |r| joined |= matches!(r, Received::Event(Event::ReceiverJoined { .. })));
    }
    let (cpu0, start) = (cpu_seconds(), Instant::now());
    let deadline = start + Duration::from_secs(300);
    let mut progress = Progress::new(c.json);
    let mut seq = 1;
    while got + losses < n {
        if Instant::now() > deadline {
            return Err(format!("timed out at {got} of {n} delivered"));
        }
        let round_end = seq + direct_round(c.size);
        while seq < n {
            fill(&mut msg, seq);
            let sent = if a.direct {
                if seq >= round_end {
                    break;
                }
                node.try_send(&msg)
            } else {
                publisher.try_send(&msg)
            };
            match sent {
                Ok(()) => seq += 1,
                Err(blip::SendError::Full) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        drive(&mut node)?;
        drive(&mut sub_node)?;
        sub.poll(&mut sub_node, usize::MAX, |r| tally(r, &mut got, &mut losses))?;
        own.poll(usize::MAX, |_| {});
        progress.show("cost", got, n);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    progress.done();
    let stats = node.stats();
    // Message 0 was delivered before the clock started.
    let timed = n - 1;
    Ok(Row {
        name: format!("blip {}B 1 core{}", c.size, direct_suffix(a.direct, a.direct_receive)),
        backend,
        messages: got,
        expected: n,
        seconds: secs,
        msgs_per_sec: timed as f64 / secs.max(1e-9),
        mb_per_sec: timed as f64 * c.size as f64 / secs.max(1e-9) / 1e6,
        losses,
        naks: stats.protocol.naks_received,
        retransmits: stats.protocol.retransmits,
        cpu_s_per_m: cpu / (timed as f64 / 1e6),
        ..Row::default()
    })
}

/// Segments per GSO send: the kernel's cap is 64 or 128 segments and 65,507 bytes in all.
const GSO_SEGMENTS: usize = 64;

/// Plain sockets for the raw path. With `gso` set to a segment size, the sender uses UDP_SEGMENT and the
/// receiver UDP_GRO; returns whether that worked (else plain sendmmsg/recvmmsg).
fn spawn_subscriber_process(
    c: &Common,
    index: usize,
    messages: u64,
    park: bool,
    direct_receive: bool,
) -> Result<std::process::Child> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("subscriber-child")
        .args(["--messages", &messages.to_string(), "--index", &index.to_string()])
        .args(["--backend", &c.backend, "--group", &c.group.to_string(), "--port", &c.port.to_string()])
        .args(["--size", &c.size.to_string(), "--loss", &c.loss.to_string(), "--window", &c.window.to_string()])
        .args(["--mtu", &c.mtu.to_string()])
        .args(park.then_some("--park"))
        .args(direct_receive.then_some("--direct-receive"))
        .stdout(std::process::Stdio::piped());
    if !c.cores.is_empty() {
        cmd.arg("--cores").arg(c.cores.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","));
    }
    if let Some(i) = &c.interface {
        cmd.args(["--interface", i]);
    }
    if c.threads {
        cmd.arg("--threads");
    }
    if let Some(path) = &c.key_file {
        cmd.arg("--key-file").arg(path).args(["--cipher", &c.cipher]);
    }
    cmd.spawn().map_err(|e| format!("cannot start a subscriber process: {e}"))
}

fn parse_child(ok: bool, out: &str) -> Result<(u64, f64, u64)> {
    let line =
        out.lines().find(|l| l.starts_with("RESULT ")).ok_or_else(|| format!("subscriber process failed: {out}"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| f.get(i).ok_or("short RESULT line").map(|s| s.to_string());
    if !ok {
        return Err(format!("subscriber process failed: {out}"));
    }
    Ok((
        num(1)?.parse().map_err(|_| "bad RESULT")?,
        num(2)?.parse().map_err(|_| "bad RESULT")?,
        num(3)?.parse().map_err(|_| "bad RESULT")?,
    ))
}

fn raw_sockets(c: &Common, port_offset: u16, gso: Option<usize>) -> Result<(PollBackend, SocketAddr, bool)> {
    let mut cfg = SocketConfig { group: SocketAddr::new(c.group, c.port + port_offset), ..SocketConfig::default() };
    if let Some(i) = &c.interface {
        cfg.interface = Interface::Name(i.clone());
    }
    let s = blip::net::open(&cfg).map_err(|e| e.to_string())?;
    let offload = gso.is_some_and(|segment| enable_offload(&s.group, &s.unicast, segment));
    let b = PollBackend::new(s.group, s.unicast, 65_507).map_err(|e| e.to_string())?;
    Ok((b, cfg.group, offload))
}

#[cfg(target_os = "linux")]
fn enable_offload(group: &std::net::UdpSocket, unicast: &std::net::UdpSocket, segment: usize) -> bool {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(unicast, sockopt::UdpGsoSegment, &(segment as i32)).is_ok()
        && setsockopt(group, sockopt::UdpGroSegment, &true).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn enable_offload(_: &std::net::UdpSocket, _: &std::net::UdpSocket, _: usize) -> bool {
    false
}

/// How long the raw receiver waits for more after the last datagram before it takes the rest as dropped.
const RAW_QUIET: Duration = Duration::from_millis(500);
/// When the raw receiver reads the CPU clock after its last datagram: later than any pause of a sender that
/// is still sending, and early within `RAW_QUIET`, whose spin would otherwise be charged to the traffic.
const RAW_QUIET_SAMPLE: Duration = Duration::from_millis(20);

/// Plain UDP multicast, the fastest path the kernel offers: UDP GSO on the sender and GRO on the receiver
/// where available (else sendmmsg → recvmmsg), a busy-polling receiver, messages packed into MTU-sized
/// datagrams (or one per datagram with --unpacked). No reliability: what the kernel drops is reported.
/// Each message is framed as `[len u16][bytes]`; a datagram holds whole records, so a GRO buffer (several
/// datagrams back to back) parses the same way.
fn raw_throughput(c: &Common, a: &ThroughputArgs) -> Result<Row> {
    let n = a.messages;
    let per_datagram = if a.unpacked { 1 } else { ((c.mtu - 28) / (c.size + 2)).max(1) };
    let segment = per_datagram * (c.size + 2);
    let gso = (!a.no_gso).then_some(segment);
    let ready = Arc::new(AtomicBool::new(false));
    let sent_all = Arc::new(AtomicBool::new(false));
    let (c2, r2, s2) = (c.clone(), ready.clone(), sent_all.clone());
    // Returns (delivered, seconds from the first datagram to the last, the process's CPU seconds when the
    // traffic ended): a receiver that waits out the kernel's drops spins for `RAW_QUIET` after the last
    // datagram, and that spin is not the cost of moving the messages.
    let rx = std::thread::spawn(move || -> Result<(u64, f64, f64)> {
        pin(&c2.cores, 1);
        let (mut b, _, _) = raw_sockets(&c2, 1, gso)?;
        r2.store(true, Ordering::SeqCst);
        let (mut got, mut first, mut last) = (0u64, None::<Instant>, Instant::now());
        let mut idle_since = Instant::now();
        let mut cpu_at_quiet = None;
        while got < n {
            let k = b
                .receive(Some(Duration::ZERO), &mut |_, bytes| {
                    let mut off = 0;
                    while off + 2 <= bytes.len() {
                        let len = u16::from_le_bytes([bytes[off], bytes[off + 1]]) as usize;
                        off += 2 + len;
                        got += 1;
                    }
                })
                .map_err(|e| e.to_string())?;
            if k > 0 {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                idle_since = last;
                cpu_at_quiet = None;
            } else if first.is_some() || s2.load(Ordering::Relaxed) {
                let quiet = idle_since.elapsed();
                if quiet > RAW_QUIET {
                    break; // the sender is done and the rest was dropped by the kernel
                }
                if quiet > RAW_QUIET_SAMPLE && cpu_at_quiet.is_none() {
                    // This thread spun through `quiet` on a core of its own; that is not traffic either.
                    cpu_at_quiet = Some(cpu_seconds() - quiet.as_secs_f64());
                }
            }
        }
        let secs = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
        Ok((got, secs, cpu_at_quiet.unwrap_or_else(cpu_seconds)))
    });
    pin(&c.cores, 0);
    let (mut b, group, offload) = raw_sockets(c, 1, gso)?;
    // With GSO one send carries many segments; the last segment of a send may be short.
    let per_send = if offload { per_datagram * GSO_SEGMENTS.min(65_507 / segment) } else { per_datagram };
    let sends = n.div_ceil(per_send as u64);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            return Err("raw receiver did not start".into());
        }
        std::thread::yield_now();
    }
    let cpu0 = cpu_seconds();
    let mut dgram = vec![0u8; per_send * (c.size + 2)];
    let mut sent = 0u64;
    let mut progress = Progress::new(c.json);
    for d in 0..sends {
        let k = per_send.min((n - sent) as usize);
        let mut off = 0;
        for _ in 0..k {
            dgram[off..off + 2].copy_from_slice(&(c.size as u16).to_le_bytes());
            fill(&mut dgram[off + 2..off + 2 + c.size], sent);
            off += 2 + c.size;
            sent += 1;
        }
        b.queue_send(group, &dgram[..off]).map_err(|e| e.to_string())?;
        if d % 256 == 0 {
            progress.show("raw", sent, n);
        }
    }
    b.flush().map_err(|e| e.to_string())?;
    // Once all is sent, a receiver that never saw a datagram gives up after `RAW_QUIET` too.
    sent_all.store(true, Ordering::SeqCst);
    let (got, secs, cpu_end) = rx.join().map_err(|_| "raw receiver panicked")??;
    progress.done();
    let cpu = cpu_end - cpu0;
    let rate = got as f64 / secs.max(1e-9);
    Ok(Row {
        name: format!("raw {}B {}", c.size, if a.unpacked { "unpacked" } else { "packed" }),
        backend: if offload { "GSO/GRO" } else { "sendmmsg/recvmmsg" }.into(),
        messages: got,
        expected: n,
        seconds: secs,
        msgs_per_sec: rate,
        mb_per_sec: rate * c.size as f64 / 1e6,
        losses: n - got,
        cpu_s_per_m: cpu / (n as f64 / 1e6),
        ..Row::default()
    })
}

/// `cost --ping`: round trips between two nodes driven in turn from this thread. A datagram sent on
/// loopback is queued at the receiver when the send returns, so each hop takes one duty cycle of each node
/// and no empty spins (more than 1 % of hops with an empty cycle is reported on stderr: not a clean count).
fn cost_ping(c: &Common, a: &CostArgs) -> Result<Row> {
    let direct = a.direct;
    // Injected loss (`--loss`) at both ends: a hop then includes its repair.
    let (mut ping_node, mut ping) = PingEnd::open(lossy_builder(c, 0, 2000)?, direct, false)?;
    let (mut pong_node, mut pong) = PingEnd::open(lossy_builder(c, 0, 2001)?, direct, false)?;
    let backend = ping_node.info().backend.to_string();
    let n = a.messages.max(2);
    let mut msg = vec![0u8; c.size];
    let mut progress = Progress::new(c.json);
    let (mut empty, mut start, mut cpu0) = (0u64, Instant::now(), cpu_seconds());
    let deadline = Instant::now() + Duration::from_secs(300);
    // Round trip 0 introduces the ends to each other (joins, first reports); time from round trip 1 on.
    for i in 0..n {
        if i == 1 {
            (empty, start, cpu0) = (0, Instant::now(), cpu_seconds());
        }
        msg[..8].copy_from_slice(&i.to_le_bytes()); // --size is at least 16
        empty += ping_hop((&mut ping_node, &mut ping), (&mut pong_node, &mut pong), &msg, deadline)?;
        empty += ping_hop((&mut pong_node, &mut pong), (&mut ping_node, &mut ping), &msg, deadline)?;
        if i % 1024 == 0 {
            progress.show("round trips", i, n);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    progress.done();
    let timed = n - 1;
    if empty > timed / 100 {
        eprintln!("blip-bench: {empty} hops of {} needed more than one cycle (not a clean count)", timed * 2);
    }
    Ok(Row {
        name: format!("blip {}B 1 core ping{}", c.size, if direct { " direct" } else { "" }),
        backend,
        messages: n,
        expected: n,
        seconds: secs,
        msgs_per_sec: timed as f64 / secs.max(1e-9),
        mb_per_sec: 0.0,
        naks: [&ping_node, &pong_node].iter().map(|n| n.stats().protocol.naks_received).sum(),
        retransmits: [&ping_node, &pong_node].iter().map(|n| n.stats().protocol.retransmits).sum(),
        cpu_s_per_m: cpu / (timed as f64 / 1e6),
        ..Row::default()
    })
}

/// One hop of `cost --ping`: `from` sends `msg` and runs a duty cycle; `to` runs until it has it. Returns
/// the receiver's cycles that found nothing.
fn ping_hop(
    from: (&mut Node, &mut PingEnd),
    to: (&mut Node, &mut PingEnd),
    msg: &[u8],
    deadline: Instant,
) -> Result<u64> {
    let (sn, se) = from;
    let (rn, re) = to;
    while !se.try_send(sn, msg) {
        drive(sn)?;
    }
    drive(sn)?;
    let (mut got, mut empty) = (false, 0);
    loop {
        drive(rn)?;
        // This hop's message: same length, same round-trip index in its first bytes.
        re.poll(rn, |r| got |= matches!(r, Received::Message(m) if m.payload == msg))?;
        if got {
            return Ok(empty);
        }
        if Instant::now() > deadline {
            return Err("a ping-pong hop took over 300 s".into());
        }
        empty += 1;
        // What the receiver waits for may be a retransmission or a STATUS: let the sender run too.
        drive(sn)?;
    }
}

fn percentiles(h: &Histogram<u64>) -> [f64; 6] {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    [q(0.5), q(0.9), q(0.99), q(0.999), q(0.9999), h.max() as f64 / 1000.0]
}

/// How a benchmark's subscriber reads: through a `Subscriber`, or with `Node::poll` from the thread that
/// drives its node (`--direct-receive`; the node is built with `NodeBuilder::direct_receive`).
enum Reader {
    Ring(Subscriber),
    Direct,
}

impl Reader {
    fn new(node: &mut Node, direct: bool) -> Result<Self> {
        if direct { Ok(Reader::Direct) } else { Ok(Reader::Ring(node.subscriber().ok_or("subscriber taken")?)) }
    }

    fn poll(&mut self, node: &mut Node, max: usize, f: impl FnMut(Received<'_>)) -> Result<usize> {
        match self {
            Reader::Ring(s) => Ok(s.poll(max, f)),
            Reader::Direct => node.poll(max, f).map_err(|e| e.to_string()),
        }
    }
}

/// How a Blip end of the ping-pong sends and reads: through a `Publisher` and a `Subscriber`, or with
/// `Node::try_send` and `Node::poll` from the thread that drives the node (`latency --direct`).
struct PingEnd {
    /// `None`: sends go through `Node::try_send`.
    publisher: Option<Publisher>,
    reader: Reader,
}

impl PingEnd {
    /// Builds the end's node from `b` (reading with `Node::poll` when `direct`) and takes its ways in and out.
    fn open(b: NodeBuilder, direct: bool, threads: bool) -> Result<(Node, Self)> {
        let mut node = build_reading(b, direct, threads)?;
        let publisher = if direct { None } else { Some(node.publisher().ok_or("publisher taken")?) };
        let reader = Reader::new(&mut node, direct)?;
        Ok((node, PingEnd { publisher, reader }))
    }

    /// Whether the message was taken (not: the ring or window is full).
    fn try_send(&mut self, node: &mut Node, msg: &[u8]) -> bool {
        match &mut self.publisher {
            Some(p) => p.try_send(msg).is_ok(),
            None => node.try_send(msg).is_ok(),
        }
    }

    fn poll(&mut self, node: &mut Node, f: impl FnMut(Received<'_>)) -> Result<()> {
        self.reader.poll(node, 64, f).map(drop)
    }
}

/// The raw ping-pong's sockets: the fastest plain path for one datagram at a time, a `send_to` and a
/// non-blocking `recv` spun on, one system call each (batching calls such as recvmmsg cost more here, with
/// nothing to batch). The socket layout is a node's: sends leave from the unicast socket, the group's
/// traffic arrives on the group socket. Pings and pongs use two ports of the group, so that neither end
/// receives its own datagrams (Blip's nodes drop theirs in the kernel with a socket filter).
struct RawPing {
    sockets: blip::net::NodeSockets,
    /// Where the other end listens.
    peer: SocketAddr,
}

impl RawPing {
    /// What the report's backend column says.
    const PATH: &str = "send/recv";
    /// Port offsets (from `--port`) the pinger and the ponger listen on.
    const PINGER: u16 = 3;
    const PONGER: u16 = 4;

    /// The sockets of the end that listens on `--port` + `listen` and sends to `--port` + `send`.
    fn open(c: &Common, listen: u16, send: u16) -> Result<Self> {
        let mut cfg = SocketConfig { group: SocketAddr::new(c.group, c.port + listen), ..SocketConfig::default() };
        if let Some(i) = &c.interface {
            cfg.interface = Interface::Name(i.clone());
        }
        let sockets = blip::net::open(&cfg).map_err(|e| e.to_string())?;
        Ok(Self { sockets, peer: SocketAddr::new(c.group, c.port + send) })
    }

    /// Sends one datagram to the other end; one the kernel has no room for is dropped, as raw UDP would (the
    /// pinger sends again after `RAW_RESEND`).
    fn send(&self, bytes: &[u8]) -> Result<()> {
        match self.sockets.unicast.send_to(bytes, self.peer) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                Ok(())
            }
            Err(e) => Err(format!("raw send: {e}")),
        }
    }

    /// One non-blocking read from the group socket (both sockets are non-blocking): `None` when nothing
    /// waits. A datagram longer than `buf` is cut to it.
    fn try_recv(&self, buf: &mut [u8]) -> Result<Option<usize>> {
        match self.sockets.group.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                Ok(None)
            }
            Err(e) => Err(format!("raw receive: {e}")),
        }
    }
}

/// How long the raw ping-pong waits for a reply before sending the ping again.
const RAW_RESEND: Duration = Duration::from_millis(100);

/// Ping-pong between two nodes (the ponger in a second thread); raw = plain sockets instead of Blip.
fn latency(c: &Common, a: &LatencyArgs, raw: bool) -> Result<Row> {
    let (hist, backend) = latency_run(c, a, raw)?;
    Ok(latency_row(c, a, raw, &hist, backend))
}

/// The row of a latency measurement (`hist`: round trips in nanoseconds).
fn latency_row(c: &Common, a: &LatencyArgs, raw: bool, hist: &Histogram<u64>, backend: String) -> Row {
    Row {
        name: format!(
            "{} latency {}B{}{}",
            if raw { "raw" } else { "blip" },
            c.size,
            if a.direct { " direct" } else { "" },
            if a.rate > 0 { format!(" @{}/s", a.rate) } else { String::new() }
        ),
        backend,
        messages: hist.len(),
        expected: hist.len(),
        latency: Some(percentiles(hist)),
        ..Row::default()
    }
}

/// One latency measurement: the round trips (nanoseconds) and the path that carried them.
fn latency_run(c: &Common, a: &LatencyArgs, raw: bool) -> Result<(Histogram<u64>, String)> {
    if a.direct && c.threads {
        return Err("--direct uses the thread that drives each node; it does not go with --threads".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    // The ponger's sockets are open (its group joined) before the first ping: raw UDP would lose a ping
    // sent earlier.
    let ready = Arc::new(AtomicBool::new(false));
    let (c2, s2, r2, direct) = (c.clone(), stop.clone(), ready.clone(), a.direct);
    let ponger = std::thread::spawn(move || -> Result<()> {
        pin(&c2.cores, 1);
        if raw {
            let sock = RawPing::open(&c2, RawPing::PONGER, RawPing::PINGER)?;
            r2.store(true, Ordering::SeqCst);
            let mut buf = vec![0u8; c2.size + 1];
            while !s2.load(Ordering::Relaxed) {
                if let Some(n) = sock.try_recv(&mut buf)?
                    && buf[..n].first() == Some(&b'P')
                {
                    buf[0] = b'R';
                    sock.send(&buf[..n])?;
                }
            }
            return Ok(());
        }
        let (mut node, mut end) = PingEnd::open(builder(&c2, 2)?.stream(0), direct, c2.threads)?;
        r2.store(true, Ordering::SeqCst);
        let mut reply = vec![0u8; c2.size];
        while !s2.load(Ordering::Relaxed) {
            drive(&mut node)?;
            let mut pending = false;
            end.poll(&mut node, |r| {
                if let Received::Message(m) = r
                    && m.payload.first() == Some(&b'P')
                {
                    reply.copy_from_slice(m.payload);
                    reply[0] = b'R';
                    pending = true;
                }
            })?;
            if pending {
                while !end.try_send(&mut node, &reply) {
                    drive(&mut node)?;
                }
                drive(&mut node)?;
            }
        }
        Ok(())
    });
    pin(&c.cores, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.load(Ordering::SeqCst) && !ponger.is_finished() {
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            return Err("the ponger did not start within 10 s".into());
        }
        std::thread::yield_now();
    }
    let total = a.warmup + a.count;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut msg = vec![0u8; c.size];
    msg[0] = b'P';
    let mut progress = Progress::new(c.json);
    let result = (|| -> Result<String> {
        let mut node_opt = None;
        let mut raw_sock = None;
        let mut pubsub = None;
        if raw {
            raw_sock = Some(RawPing::open(c, RawPing::PINGER, RawPing::PONGER)?);
        } else {
            let (node, end) = PingEnd::open(lossy_builder(c, 2, 77)?, a.direct, c.threads)?;
            pubsub = Some(end);
            node_opt = Some(node);
        }
        let backend = node_opt.as_ref().map(|n| n.info().backend.to_string()).unwrap_or(RawPing::PATH.into());
        let interval = if a.rate > 0 { Some(Duration::from_secs_f64(1.0 / a.rate as f64)) } else { None };
        let start = Instant::now();
        let mut i = 0u64;
        while i < total {
            let intended = match interval {
                Some(iv) => start + iv * i as u32,
                None => Instant::now(),
            };
            while Instant::now() < intended {
                std::hint::spin_loop();
            }
            msg[1..9].copy_from_slice(&i.to_le_bytes());
            let sent_at = Instant::now();
            let deadline = sent_at + Duration::from_secs(5);
            let mut got = false;
            if let Some(sock) = raw_sock.as_ref() {
                let mut reply = [0u8; 16];
                sock.send(&msg)?;
                let mut resend_at = sent_at + RAW_RESEND;
                while !got {
                    let now = Instant::now();
                    if now > deadline {
                        return Err(format!("raw ping {i} lost (no reply in 5 s)"));
                    }
                    if now > resend_at {
                        // Raw UDP has no repair: a ping or pong the kernel dropped is sent again (the
                        // round trip then counts from the first send).
                        sock.send(&msg)?;
                        resend_at = now + RAW_RESEND;
                    }
                    // Only the first 9 bytes matter; a longer datagram is truncated into `reply`.
                    if let Some(n) = sock.try_recv(&mut reply)? {
                        got = n >= 9 && reply[0] == b'R' && reply[1..9] == i.to_le_bytes();
                    }
                }
            } else {
                let node = node_opt.as_mut().unwrap();
                let end = pubsub.as_mut().unwrap();
                while !end.try_send(node, &msg) {
                    drive(node)?;
                }
                while !got {
                    if Instant::now() > deadline {
                        return Err(format!("no pong for ping {i} in 5 s"));
                    }
                    drive(node)?;
                    end.poll(node, |r| {
                        if let Received::Message(m) = r {
                            got |= m.payload.first() == Some(&b'R') && m.payload[1..9] == i.to_le_bytes();
                        }
                    })?;
                }
            }
            let end = Instant::now();
            if i >= a.warmup {
                let from = if interval.is_some() { intended } else { sent_at };
                hist.record((end - from).as_nanos().max(1) as u64).map_err(|e| e.to_string())?;
            }
            i += 1;
            if i % 1024 == 0 {
                progress.show("round trips", i, total);
            }
        }
        Ok(backend)
    })();
    stop.store(true, Ordering::SeqCst);
    let ponged = ponger.join().map_err(|_| "ponger panicked".to_string())?;
    progress.done();
    let backend = result?;
    ponged?;
    Ok((hist, backend))
}

/// Slices per path in each of `compare`'s latency runs (see `compare`).
const LATENCY_SLICES: u64 = 5;

fn median_by<T: Clone>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v[v.len() / 2].clone()
}

fn compare(c: &Common, a: &CompareArgs) -> Result<Vec<Row>> {
    let runs = a.runs.max(1);
    // Blip through a publisher and subscribers, as given; and, where the nodes are driven from their threads
    // and nothing else was asked for, also with `Node::try_send` and `Node::poll` (no rings), beside the
    // same raw runs.
    let mut ways = vec![a.throughput.clone()];
    let given = a.throughput.claim || a.throughput.direct || a.throughput.direct_receive;
    if !c.threads && !given {
        ways.push(ThroughputArgs { direct: true, direct_receive: true, ..a.throughput.clone() });
    }
    let mut raw = Vec::new();
    let mut blip: Vec<Vec<Row>> = vec![Vec::new(); ways.len()];
    for _ in 0..runs {
        raw.push(raw_throughput(c, &a.throughput)?);
        for (way, rows) in ways.iter().zip(&mut blip) {
            rows.push(throughput(c, way)?);
        }
    }
    let raw_runs: Vec<(f64, f64)> =
        raw.iter().map(|r| (r.msgs_per_sec, 1.0 - r.messages as f64 / r.expected.max(1) as f64)).collect();
    let raw = median_by(raw, |r| r.msgs_per_sec);
    let mut rows = Vec::new();
    for way in blip {
        let pairs = raw_runs
            .iter()
            .zip(&way)
            .map(|(&(raw, raw_lost), b)| RunPair { raw, blip: b.msgs_per_sec, raw_lost })
            .collect();
        let mut row = median_by(way, |r| r.msgs_per_sec);
        row.ratio = Some(row.msgs_per_sec / raw.msgs_per_sec.max(1e-9));
        row.runs = pairs;
        rows.push(row);
    }
    rows.insert(0, raw);
    if a.count > 0 {
        let la = LatencyArgs { count: a.count, warmup: a.count / 10, rate: 0, raw: false, direct: false };
        // Each run's round trips are measured in `LATENCY_SLICES` slices per path, the paths taking turns
        // slice by slice, so that a machine that slows down for a second or two during the compare slows
        // every path alike; each run's pair is reported as for throughput.
        let slices = LATENCY_SLICES.min(a.count.max(1));
        let slice = LatencyArgs { count: a.count / slices, warmup: (a.count / 10 / slices).max(1), ..la.clone() };
        // The paths: raw UDP; Blip through a Publisher and a Subscriber; where the nodes are driven from their
        // threads, Blip with `Node::try_send` and `Node::poll`, as for throughput; and the poll backend beside
        // io_uring when the choice was left to the probe (README, Performance: the backends hand a datagram
        // over differently).
        let mut paths: Vec<(Common, LatencyArgs, bool)> =
            vec![(c.clone(), slice.clone(), true), (c.clone(), slice.clone(), false)];
        if !c.threads {
            paths.push((c.clone(), LatencyArgs { direct: true, ..slice.clone() }, false));
        }
        let mut probed = false;
        let mut per_path: Vec<Vec<Row>> = Vec::new();
        for _ in 0..runs {
            let mut hists: Vec<Option<(Histogram<u64>, String)>> = vec![None; paths.len()];
            for _ in 0..slices {
                let mut k = 0;
                while k < paths.len() {
                    let (pc, pa, raw) = &paths[k];
                    let (h, path) = latency_run(pc, pa, *raw)?;
                    // Which backend `auto` takes (probe, BLIP_BACKEND, a fallback at setup) is known from the first
                    // Blip node built: the poll path joins the list then, in this same slice.
                    if !*raw && !std::mem::replace(&mut probed, true) && c.backend == "auto" && path != "poll" {
                        paths.push((Common { backend: "poll".into(), ..c.clone() }, slice.clone(), false));
                        hists.push(None);
                    }
                    match hists[k].as_mut() {
                        Some((m, _)) => m.add(&h).map_err(|e| format!("merging histograms: {e}"))?,
                        None => hists[k] = Some((h, path)),
                    }
                    k += 1;
                }
            }
            per_path.resize_with(paths.len(), Vec::new);
            for ((h, path), ((pc, pa, raw), rows)) in hists.into_iter().flatten().zip(paths.iter().zip(&mut per_path)) {
                rows.push(latency_row(pc, &LatencyArgs { count: a.count, ..pa.clone() }, *raw, &h, path));
            }
        }
        let p50 = |r: &Row| r.latency.map_or(0.0, |l| l[0]);
        let mut per_path = per_path.into_iter();
        let raws = per_path.next().unwrap_or_default();
        let raw_runs: Vec<f64> = raws.iter().map(p50).collect();
        let raw_l = median_by(raws, p50);
        let raw_p50 = p50(&raw_l).max(1e-9);
        rows.push(raw_l);
        for way in per_path.filter(|w| !w.is_empty()) {
            let pairs =
                raw_runs.iter().zip(&way).map(|(&raw, b)| RunPair { raw, blip: p50(b), raw_lost: 0.0 }).collect();
            let mut row = median_by(way, p50);
            row.ratio = Some(p50(&row) / raw_p50);
            row.runs = pairs;
            rows.push(row);
        }
    }
    Ok(rows)
}

/// `, "runs": [...]` for a compare row: each run's raw and Blip figures (messages/s, or p50 µs for a
/// latency row) and their ratio.
fn runs_json(runs: &[RunPair]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let items: Vec<String> = runs
        .iter()
        .map(|p| {
            format!(
                "{{\"raw\": {:.2}, \"blip\": {:.2}, \"ratio\": {:.3}, \"raw_lost\": {:.4}}}",
                p.raw,
                p.blip,
                p.blip / p.raw.max(1e-9),
                p.raw_lost
            )
        })
        .collect();
    format!(", \"runs\": [{}]", items.join(", "))
}

/// The CPUs this process may use, as found before `--cores` pinned the main thread to one of them.
fn machine_cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn report(c: &Common, rows: &[Row]) {
    let cipher = c.key_file.as_ref().and_then(|_| cipher_choice(&c.cipher).ok());
    let cores = if c.cores.is_empty() { "none".to_owned() } else { format!("{:?}", c.cores) };
    let where_ = c.interface.clone().unwrap_or_else(|| "loopback".into());
    if c.json {
        let mut out = format!(
            "{{\n  \"kernel\": \"{}\",\n  \"cpus\": {},\n  \"pinning\": \"{cores}\",\n  \"interface\": \"{where_}\",\n  \"loss\": {},\n  \"encrypted\": {},\n  \"cipher\": {},\n  \"results\": [\n",
            kernel(),
            machine_cpus(),
            c.loss,
            c.key_file.is_some(),
            cipher.map(|c| format!("\"{c}\"")).unwrap_or_else(|| "null".into())
        );
        for (i, r) in rows.iter().enumerate() {
            let lat = r.latency.map(|l| {
                format!(
                    ", \"p50_us\": {:.2}, \"p90_us\": {:.2}, \"p99_us\": {:.2}, \"p999_us\": {:.2}, \"p9999_us\": {:.2}, \"max_us\": {:.2}",
                    l[0], l[1], l[2], l[3], l[4], l[5]
                )
            });
            out += &format!(
                "    {{\"name\": \"{}\", \"backend\": \"{}\", \"messages\": {}, \"expected\": {}, \"seconds\": {:.4}, \"msgs_per_sec\": {:.0}, \"mb_per_sec\": {:.2}, \"losses\": {}, \"naks\": {}, \"retransmits\": {}, \"cpu_s_per_million\": {:.3}{}{}}}{}\n",
                r.name,
                r.backend,
                r.messages,
                r.expected,
                r.seconds,
                r.msgs_per_sec,
                r.mb_per_sec,
                r.losses,
                r.naks,
                r.retransmits,
                r.cpu_s_per_m,
                lat.unwrap_or_default(),
                r.ratio.map(|x| format!(", \"ratio_to_raw\": {x:.3}")).unwrap_or_default() + &runs_json(&r.runs),
                if i + 1 < rows.len() { "," } else { "" }
            );
        }
        out += "  ]\n}";
        println!("{out}");
        return;
    }
    println!(
        "blip-bench: kernel {}, {} cpus, pinning {cores}, interface {where_}, injected loss {}, encryption {}",
        kernel(),
        machine_cpus(),
        c.loss,
        cipher.map(|c| format!("on ({c})")).unwrap_or_else(|| "off".into())
    );
    println!(
        "{:<30} {:<18} {:>12} {:>9} {:>11} {:>9} {:>7} {:>8} {:>9} {:>7}",
        "run", "backend", "msgs/s", "MB/s", "delivered", "lost", "NAKs", "retrans", "cpu s/M", "ratio"
    );
    for r in rows {
        if let Some(l) = r.latency {
            println!(
                "{:<30} {:<18} p50 {:.1} µs  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  p99.99 {:.1}  max {:.1}{}",
                r.name,
                r.backend,
                l[0],
                l[1],
                l[2],
                l[3],
                l[4],
                l[5],
                r.ratio.map(|x| format!("   ratio p50 {x:.2}")).unwrap_or_default()
            );
        } else {
            println!(
                "{:<30} {:<18} {:>12.0} {:>9.1} {:>11} {:>9} {:>7} {:>8} {:>9.3} {:>7}",
                r.name,
                r.backend,
                r.msgs_per_sec,
                r.mb_per_sec,
                format!("{}/{}", r.messages, r.expected),
                r.losses,
                r.naks,
                r.retransmits,
                r.cpu_s_per_m,
                r.ratio.map(|x| format!("{x:.2}")).unwrap_or_default()
            );
        }
    }
    // The ceiling moves from run to run on a shared machine: each run's pair, measured back to back.
    for r in rows.iter().filter(|r| r.runs.len() > 1) {
        let m = |v: f64| if r.latency.is_some() { format!("{v:.1} µs") } else { format!("{:.1} M", v / 1e6) };
        let runs: Vec<String> = r
            .runs
            .iter()
            .map(|p| {
                let lost = if p.raw_lost >= 0.0005 {
                    format!(" (raw lost {:.1} %)", p.raw_lost * 100.0)
                } else {
                    String::new()
                };
                format!("{} / {} = {:.2}{lost}", m(p.blip), m(p.raw), p.blip / p.raw.max(1e-9))
            })
            .collect();
        let what = if r.latency.is_some() { format!(" {} p50", r.backend) } else { String::new() };
        println!("{}{what} per run (Blip / raw): {}", r.name, runs.join(", "));
    }
}
