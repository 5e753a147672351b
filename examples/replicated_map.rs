//! Replicated map: a key-value map kept identical on every node by broadcast commands, with a node that
//! joins late and catches up from a snapshot.
//!
//! Every node publishes its changes as commands (`map.set` with `set <n> <key> <value>`, `map.del` with
//! `del <n> <key>`, where `n` counts the writer's commands from 1) and applies commands only as they are
//! delivered, its own included: the nodes are built with `local_delivery(true)`, so a writer sees its own
//! commands come back in the order it published them, like everybody else. Blip guarantees order per
//! sender only; commands of different writers interleave differently on different nodes. That is harmless
//! here because each node writes only its own keys (`<node>.<k>`): commands on one key all come from one
//! writer, so they are applied in the same order everywhere, and every replica ends the same.
//!
//! A node that joins late (built with `LateJoin::Next`, so it gets no history from the senders' windows)
//! catches up in three steps:
//! 1. it takes its catch-all subscriber right away, so that from its start every command is buffered;
//! 2. it asks one peer for a snapshot (`Requester::scatter` on `map.snapshot` with `Expect::Count(1)`): the
//!    map, plus for every writer session the sequence number of the last message applied and the writer's
//!    command count at that point;
//! 3. it installs the snapshot and applies the buffered commands that are newer than those positions. If
//!    the first newer buffered command of a writer does not follow the snapshot's count (the peer was behind
//!    on that writer when it answered), the snapshot is too old and the node asks again.
//!
//! From then on every replica checks that each writer's commands follow each other without a gap.
//!
//! All nodes run in this one process (one engine thread each) on loopback multicast with TTL 0. The run
//! succeeds when every node, the late joiner included, has applied every command and all maps are
//! identical (compared in-process) and non-trivial.
//!
//! ```text
//! cargo run --example replicated_map
//! cargo run --example replicated_map -- --nodes 5 --ops 1000 --interval-ms 1
//! ```
//!
//! Options: `--group ADDR` (in 239.255.0.0/16) `--port N` `--backend auto|poll|uring` `--nodes N` (started
//! at once; one more joins late) `--ops N` (commands per node) `--interval-ms N` (between a node's
//! commands) `--late-at N` (the late node starts once node 0 has written this many) `--timeout SECS`. Exit
//! code 0 and a final `replicated_map: OK` line on success; a message and exit code 1 otherwise.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blip::proto::LateJoin;
use blip::{Expect, Node, Received, Subscriber};

#[path = "common/mod.rs"]
mod common;
use common::{ANNOUNCE, Args, MEMBER_TIMEOUT, Net};

const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    common::finish("replicated_map", run())
}

#[derive(Clone, Copy)]
struct Settings {
    net: Net,
    /// Writers in all, the late joiner included.
    writers: usize,
    ops: u64,
    interval: Duration,
    deadline: Instant,
}

/// What a node sends the main thread once it has applied every command of every writer.
struct Report {
    name: String,
    map: BTreeMap<String, String>,
    deletes: u64,
}

fn run() -> Result<(), String> {
    let args = Args::parse(&["nodes", "ops", "interval-ms", "late-at", "timeout"])?;
    let nodes: usize = args.get("nodes", 3)?;
    let ops: u64 = args.get("ops", 300)?;
    let late_at: u64 = args.get("late-at", ops / 3)?;
    let s = Settings {
        net: args.net("239.255.71.4", 47104)?,
        writers: nodes + 1,
        ops,
        interval: Duration::from_millis(args.get("interval-ms", 3)?),
        deadline: Instant::now() + Duration::from_secs(args.get("timeout", 30)?),
    };
    if nodes < 1 || late_at > ops {
        return Err("need --nodes >= 1 and --late-at <= --ops".into());
    }
    println!(
        "replicated_map on {}:{}: {nodes} nodes + 1 late joiner, {ops} commands each; the late node starts \
         after {late_at} commands of node 0",
        s.net.group, s.net.port
    );
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let mut threads: Vec<(String, JoinHandle<Result<(), String>>)> = Vec::new();
    for i in 0..nodes {
        let name = format!("n{i}");
        let start = Start::Initial { ready: ready.clone(), nodes: nodes as u64 };
        let counter = (i == 0).then(|| progress.clone());
        threads.push((name.clone(), replica(s, name, start, counter, tx.clone(), stop.clone())));
    }
    let result = (|| {
        while progress.load(Ordering::Relaxed) < late_at {
            if Instant::now() >= s.deadline {
                return Err(format!("node 0 wrote only {} commands", progress.load(Ordering::Relaxed)));
            }
            thread::sleep(Duration::from_millis(2));
        }
        println!("node n0 has written {late_at} commands: starting the late node");
        threads.push(("late".into(), replica(s, "late".into(), Start::Late, None, tx.clone(), stop.clone())));
        let mut reports: Vec<Report> = Vec::new();
        while reports.len() < s.writers {
            match rx.recv_timeout(s.deadline.saturating_duration_since(Instant::now())) {
                Ok(r) => reports.push(r),
                Err(_) => {
                    let have: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
                    return Err(format!("only {have:?} applied every command before the timeout"));
                }
            }
        }
        Ok(reports)
    })();
    // Everybody keeps running until all are done: a node that left early could not repair its messages.
    stop.store(true, Ordering::Relaxed);
    let mut failures: Vec<String> = Vec::new();
    for (name, t) in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{name}: {e}")),
            Err(_) => failures.push(format!("{name}: thread panicked")),
        }
    }
    match result {
        Ok(reports) => {
            let reference = &reports[0];
            for r in &reports {
                let mut h = DefaultHasher::new();
                r.map.hash(&mut h);
                println!(
                    "  {:<5} {} keys, {} deletes applied, digest {:016x}",
                    r.name,
                    r.map.len(),
                    r.deletes,
                    h.finish()
                );
                if r.map != reference.map {
                    let differ = r.map.iter().filter(|(k, v)| reference.map.get(*k) != Some(*v)).count();
                    failures.push(format!("{} differs from {} ({differ} entries)", r.name, reference.name));
                }
            }
            if reference.map.len() < 50 || reports.iter().any(|r| r.deletes == 0) {
                failures.push(format!("trivial map: {} keys", reference.map.len()));
            }
        }
        Err(e) => failures.insert(0, e),
    }
    if failures.is_empty() {
        println!("all {} maps identical", s.writers);
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

enum Start {
    /// Started with the others: subscribe, then wait until all have subscribed before writing.
    Initial { ready: Arc<AtomicU64>, nodes: u64 },
    /// Joins while the others write: buffer, fetch a snapshot, install, replay.
    Late,
}

/// A node in its own thread (the node lives and dies there): catches up if late, then writes its own keys
/// and applies everybody's commands until told to stop.
fn replica(
    s: Settings,
    name: String,
    start: Start,
    progress: Option<Arc<AtomicU64>>,
    report: mpsc::Sender<Report>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<(), String>> {
    thread::spawn(move || {
        let mut builder = s.net.builder().name(&name).membership(ANNOUNCE, MEMBER_TIMEOUT).local_delivery(true);
        if matches!(start, Start::Late) {
            // No history from the writers' retransmission windows (which could not hold all of it anyway):
            // everything before this node's start comes from the snapshot.
            builder = builder.late_join(LateJoin::Next);
        }
        let mut node = builder.build().map_err(|e| e.to_string())?;
        let own_id = node.info().node_id;
        let (mut sub, mut map) = match start {
            Start::Initial { ready, nodes } => {
                let sub = node.subscribe("map.>").map_err(|e| e.to_string())?;
                ready.fetch_add(1, Ordering::SeqCst);
                while ready.load(Ordering::SeqCst) < nodes {
                    if Instant::now() >= s.deadline {
                        return Err("the other nodes did not start".into());
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                (sub, Replica::default())
            }
            Start::Late => catch_up(&mut node, s.deadline)?,
        };
        let mut publisher = node.publisher().ok_or("node closed")?;
        let mut written = 0u64;
        let mut next_write = Instant::now();
        let mut reported = false;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= s.deadline {
                return Err(format!("timed out having applied {:?}", map.counts()));
            }
            if written < s.ops && now >= next_write {
                let (topic, text) = command(&name, written);
                publisher.publish(topic, text.as_bytes()).map_err(|e| e.to_string())?;
                written += 1;
                next_write += s.interval;
                if let Some(p) = &progress {
                    p.store(written, Ordering::Relaxed);
                }
            }
            let idle = if written < s.ops { next_write.saturating_duration_since(now) } else { ANNOUNCE };
            sub.wait(idle.min(Duration::from_millis(10)));
            let mut error = None;
            sub.poll(usize::MAX, |r| {
                let outcome = match r {
                    Received::Message(m) if m.topic == "map.set" || m.topic == "map.del" => {
                        map.apply(m.session, m.seq, m.topic, m.payload)
                    }
                    Received::Message(m) if m.topic == "map.snapshot" => match m.request() {
                        Some((id, _)) if id.requester != own_id => {
                            publisher.reply(&m, &map.snapshot()).map_err(|e| format!("snapshot reply: {e}"))
                        }
                        _ => Ok(()),
                    },
                    Received::Loss { session, messages, .. } => {
                        Err(format!("lost messages {messages:?} of session {session:x}: the map would diverge"))
                    }
                    _ => Ok(()),
                };
                if let Err(e) = outcome {
                    error.get_or_insert(e);
                }
            });
            if let Some(e) = error {
                return Err(e);
            }
            if !reported && written == s.ops && map.complete(s.writers, s.ops) {
                reported = true;
                let r = Report { name: name.clone(), map: map.map.clone(), deletes: map.deletes };
                report.send(r).map_err(|_| "main thread gone")?;
            }
        }
        node.shutdown();
        Ok(())
    })
}

/// Command `j` (from 0) of writer `name`: mostly new keys, some overwrites (which may recreate a deleted
/// key) and some deletes, all of the writer's own keys.
fn command(name: &str, j: u64) -> (&'static str, String) {
    let n = j + 1;
    match j % 5 {
        4 => ("map.del", format!("del {n} {name}.{}", j - 2)),
        3 => ("map.set", format!("set {n} {name}.{} u{j}", j / 2)),
        _ => ("map.set", format!("set {n} {name}.{j} v{j}")),
    }
}

/// Steps 1 to 3 of the doc comment. Returns the subscriber that holds everything after the buffer, and
/// the map with the buffer applied.
fn catch_up(node: &mut Node, deadline: Instant) -> Result<(Subscriber, Replica), String> {
    // Taken first: from the node's start, every command lands here, none is missed while we ask.
    let mut sub = node.subscriber().ok_or("catch-all subscriber already taken")?;
    let mut requester = node.requester().map_err(|e| e.to_string())?;
    let mut buffer: Vec<(u64, u64, String, Vec<u8>)> = Vec::new();
    let mut attempt = 0;
    loop {
        attempt += 1;
        if Instant::now() >= deadline {
            return Err(format!("no usable snapshot after {attempt} attempts"));
        }
        let g = requester
            .scatter("map.snapshot", b"", Expect::Count(1), SNAPSHOT_TIMEOUT)
            .map_err(|e| format!("snapshot request: {e}"))?;
        let Some(reply) = g.replies.first() else {
            println!("  late: no snapshot yet (attempt {attempt}), asking again");
            continue;
        };
        let mut lost = None;
        sub.poll(usize::MAX, |r| match r {
            Received::Message(m) if m.topic == "map.set" || m.topic == "map.del" => {
                buffer.push((m.session, m.seq, m.topic.to_owned(), m.payload.to_vec()))
            }
            Received::Loss { session, .. } => lost = Some(session),
            _ => {}
        });
        if let Some(session) = lost {
            return Err(format!("lost buffered commands of session {session:x}"));
        }
        let mut map = Replica::from_snapshot(&reply.payload)?;
        let (keys, writers) = (map.map.len(), map.applied.len());
        let before = map.counts();
        let mut skipped = 0;
        let mut outcome = Ok(());
        for (session, seq, topic, payload) in &buffer {
            match map.applied.get(session) {
                Some(&(last_seq, _)) if *seq <= last_seq => skipped += 1,
                _ => outcome = outcome.and_then(|()| map.apply(*session, *seq, topic, payload)),
            }
        }
        match outcome {
            Ok(()) => {
                println!(
                    "  late: installed a snapshot from node {:x} ({keys} keys, {writers} writers at {before:?}); \
                     {} buffered commands: {skipped} already in it, {} applied (attempt {attempt})",
                    reply.from,
                    buffer.len(),
                    buffer.len() - skipped
                );
                return Ok((sub, map));
            }
            Err(e) => {
                println!("  late: snapshot from node {:x} too old ({e}); asking again", reply.from);
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A replica's state: the map and, per writer session, the last applied message seq and command number.
#[derive(Default)]
struct Replica {
    map: BTreeMap<String, String>,
    applied: HashMap<u64, (u64, u64)>,
    deletes: u64,
}

impl Replica {
    /// Applies a delivered command. A command already covered by the snapshot this replica started from is
    /// skipped; otherwise its number must follow the writer's previous one.
    fn apply(&mut self, session: u64, seq: u64, topic: &str, payload: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(payload).map_err(|_| "command is not UTF-8")?;
        let parts: Vec<&str> = text.split(' ').collect();
        let n: u64 = parts.get(1).and_then(|n| n.parse().ok()).ok_or_else(|| format!("bad command {text:?}"))?;
        let (last_seq, last_n) = self.applied.get(&session).copied().unwrap_or((0, 0));
        if self.applied.contains_key(&session) && seq <= last_seq {
            return Ok(());
        }
        if n != last_n + 1 {
            return Err(format!("writer {session:x}: command {n} after {last_n} (a gap)"));
        }
        match (topic, parts.as_slice()) {
            ("map.set", ["set", _, key, value]) => {
                self.map.insert((*key).to_owned(), (*value).to_owned());
            }
            ("map.del", ["del", _, key]) => {
                self.map.remove(*key);
                self.deletes += 1;
            }
            _ => return Err(format!("bad command {text:?} on {topic}")),
        }
        self.applied.insert(session, (seq, n));
        Ok(())
    }

    /// Whether `writers` writers have each had `ops` commands applied.
    fn complete(&self, writers: usize, ops: u64) -> bool {
        self.applied.len() == writers && self.applied.values().all(|&(_, n)| n == ops)
    }

    fn counts(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.applied.values().map(|&(_, n)| n).collect();
        v.sort();
        v
    }

    /// `pos <session> <seq> <n>` lines, then `kv <key> <value>` lines, then `deletes <count>`.
    fn snapshot(&self) -> Vec<u8> {
        let mut out = String::new();
        for (session, (seq, n)) in &self.applied {
            out.push_str(&format!("pos {session:x} {seq} {n}\n"));
        }
        for (k, v) in &self.map {
            out.push_str(&format!("kv {k} {v}\n"));
        }
        out.push_str(&format!("deletes {}\n", self.deletes));
        out.into_bytes()
    }

    fn from_snapshot(bytes: &[u8]) -> Result<Replica, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "snapshot is not UTF-8")?;
        let mut r = Replica::default();
        for line in text.lines() {
            let bad = || format!("bad snapshot line {line:?}");
            match line.split(' ').collect::<Vec<_>>().as_slice() {
                ["pos", session, seq, n] => {
                    let session = u64::from_str_radix(session, 16).map_err(|_| bad())?;
                    r.applied.insert(session, (seq.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?));
                }
                ["kv", k, v] => {
                    r.map.insert((*k).to_owned(), (*v).to_owned());
                }
                ["deletes", d] => r.deletes = d.parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        Ok(r)
    }
}
