//! Log fan-out: many loggers, several collectors, and no endpoint configuration at all.
//!
//! Every logger publishes its lines on topics `log.<app>.<level>`; every collector subscribes with a topic
//! filter (`log.>` for everything, `log.*.error` for errors only). Nobody knows anybody's address: loggers
//! and collectors only share the multicast group, and the collectors' engines drop what their filters do not
//! select before it reaches the application. Blip delivers each logger's messages to each collector
//! reliably and in the order they were published (order is per sender; lines of different loggers
//! interleave arbitrarily).
//!
//! All nodes run in this one process (one engine thread each) on loopback multicast with TTL 0. The run
//! checks that every collector received every line it selects, in order per logger, and nothing else.
//!
//! ```text
//! cargo run --example log_fanout
//! cargo run --example log_fanout -- --loggers 8 --lines 2000 --all-collectors 3 --error-collectors 2
//! ```
//!
//! Options: `--group ADDR` (in 239.255.0.0/16) `--port N` `--backend auto|poll|uring` `--loggers N`
//! `--lines N` (per logger) `--all-collectors N` `--error-collectors N` `--timeout SECS`.
//! Exit code 0 and a final `log_fanout: OK` line on success; a message and exit code 1 otherwise.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use blip::topic::Filter;
use blip::{Received, Subscriber};

#[path = "common/mod.rs"]
mod common;
use common::Args;

const APPS: &[&str] = &["web", "db", "auth", "cache", "billing", "search", "mail", "queue"];
/// One line in five is an error, so the error collectors see a real subset.
const LEVELS: &[&str] = &["info", "debug", "info", "warn", "error"];

fn main() -> ExitCode {
    common::finish("log_fanout", run())
}

/// Logger `i`'s application name; distinct for any number of loggers.
fn app(i: usize) -> String {
    let base = APPS[i % APPS.len()];
    if i < APPS.len() { base.to_owned() } else { format!("{base}{}", i / APPS.len()) }
}

fn level(logger: usize, line: u64) -> &'static str {
    LEVELS[(line as usize + logger) % LEVELS.len()]
}

fn run() -> Result<(), String> {
    let args = Args::parse(&["loggers", "lines", "all-collectors", "error-collectors", "timeout"])?;
    let loggers: usize = args.get("loggers", 4)?;
    let lines: u64 = args.get("lines", 500)?;
    let all_collectors: usize = args.get("all-collectors", 2)?;
    let error_collectors: usize = args.get("error-collectors", 1)?;
    let timeout = Duration::from_secs(args.get("timeout", 30)?);
    let deadline = Instant::now() + timeout;
    let net = args.net("239.255.71.1", 47101)?;
    println!(
        "log_fanout on {}:{}: {loggers} loggers x {lines} lines, {all_collectors} collectors on log.>, \
         {error_collectors} on log.*.error",
        net.group, net.port
    );

    // Collectors first: a logger's first lines must find them already in the group and subscribed.
    let mut nodes = Vec::new();
    let mut collectors = Vec::new();
    let filters = (0..all_collectors).map(|i| (format!("all-{i}"), "log.>"));
    let filters = filters.chain((0..error_collectors).map(|i| (format!("errors-{i}"), "log.*.error")));
    for (name, filter) in filters {
        let mut node = net.builder().name(&name).build().map_err(|e| format!("collector {name}: {e}"))?;
        let sub = node.subscribe(filter).map_err(|e| format!("collector {name}: {e}"))?;
        let filter = Filter::new(filter).map_err(|e| e.to_string())?;
        let (name2, (tx, rx)) = (name.clone(), mpsc::channel());
        thread::spawn(move || {
            let _ = tx.send(collect(sub, &filter, loggers, lines, deadline));
        });
        collectors.push((name2, rx));
        nodes.push(node);
    }

    let mut logger_threads = Vec::new();
    for i in 0..loggers {
        let name = format!("logger-{}", app(i));
        let mut node = net.builder().name(&name).build().map_err(|e| format!("{name}: {e}"))?;
        // A publish-only node drops its catch-all subscriber: nobody would read the other loggers' lines it
        // collects.
        drop(node.subscriber());
        let mut publisher = node.publisher().ok_or("logger node closed")?;
        logger_threads.push(thread::spawn(move || -> Result<_, String> {
            let app = app(i);
            for n in 0..lines {
                let lvl = level(i, n);
                let text = format!("app={app} n={n} level={lvl} request handled in {}us", 100 + n % 900);
                publisher.publish(&format!("log.{app}.{lvl}"), text.as_bytes()).map_err(|e| e.to_string())?;
            }
            // Returned, not dropped: the node keeps serving repairs until the collectors are done.
            Ok(publisher)
        }));
        nodes.push(node);
    }
    let mut publishers = Vec::new();
    for t in logger_threads {
        publishers.push(t.join().map_err(|_| "a logger thread panicked")??);
    }

    let mut failures = Vec::new();
    for (name, rx) in collectors {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        match rx.recv_timeout(left) {
            Ok(Ok(r)) => println!(
                "  collector {name:<9} ({}): {} lines from {} loggers, in order, none unselected",
                r.filter, r.lines, r.loggers
            ),
            Ok(Err(e)) => failures.push(format!("collector {name}: {e}")),
            Err(_) => failures.push(format!("collector {name}: no report within the timeout")),
        }
    }
    drop(publishers);
    for node in nodes {
        node.shutdown();
    }
    if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) }
}

struct Report {
    filter: String,
    lines: u64,
    loggers: usize,
}

/// Per-logger progress of one collector.
struct Stream {
    session: u64,
    last_seq: Option<u64>,
    /// Index into the lines this collector selects from that logger.
    next: usize,
}

/// Receives until every selected line of every logger arrived, checking filter, order and completeness; then
/// listens a little longer to catch anything extra.
fn collect(
    mut sub: Subscriber,
    filter: &Filter,
    loggers: usize,
    lines: u64,
    deadline: Instant,
) -> Result<Report, String> {
    let expected: Vec<Vec<u64>> = (0..loggers)
        .map(|i| (0..lines).filter(|&n| filter.matches(&format!("log.{}.{}", app(i), level(i, n)))).collect())
        .collect();
    let total: usize = expected.iter().map(Vec::len).sum();
    let by_app: HashMap<String, usize> = (0..loggers).map(|i| (app(i), i)).collect();
    let mut streams: Vec<Option<Stream>> = (0..loggers).map(|_| None).collect();
    let mut received = 0usize;
    let mut error = None;
    let mut linger_until = None;
    loop {
        let now = Instant::now();
        if let Some(e) = error {
            return Err(e);
        }
        match linger_until {
            Some(t) if now >= t => break,
            None if received == total => linger_until = Some(now + Duration::from_millis(200)),
            _ => {}
        }
        if now >= deadline {
            return Err(format!("timed out with {received} of {total} lines"));
        }
        sub.wait(Duration::from_millis(20));
        sub.poll(usize::MAX, |r| {
            let m = match r {
                Received::Message(m) => m,
                Received::Loss { session, messages, .. } => {
                    error.get_or_insert(format!("lost messages {messages:?} of session {session:x}"));
                    return;
                }
                _ => return,
            };
            let text = String::from_utf8_lossy(m.payload);
            let mut check = || -> Result<(), String> {
                if !filter.matches(m.topic) {
                    return Err(format!("received {:?}, which {filter} does not select", m.topic));
                }
                let field = |k: &str| text.split(' ').find_map(|f| f.strip_prefix(k)).map(str::to_owned);
                let (Some(a), Some(n)) = (field("app="), field("n=").and_then(|n| n.parse::<u64>().ok())) else {
                    return Err(format!("malformed line {text:?}"));
                };
                let i = *by_app.get(&a).ok_or_else(|| format!("line from unknown app {a:?}"))?;
                if m.topic != format!("log.{a}.{}", level(i, n)) {
                    return Err(format!("line {text:?} on the wrong topic {:?}", m.topic));
                }
                let s = streams[i].get_or_insert(Stream { session: m.session, last_seq: None, next: 0 });
                if s.session != m.session {
                    return Err(format!("app {a} from two sessions"));
                }
                if s.last_seq.is_some_and(|q| m.seq <= q) {
                    return Err(format!("app {a}: seq {} after {:?}", m.seq, s.last_seq));
                }
                s.last_seq = Some(m.seq);
                match expected[i].get(s.next) {
                    Some(&want) if want == n => s.next += 1,
                    want => return Err(format!("app {a}: got line {n}, expected {want:?} (out of order or extra)")),
                }
                Ok(())
            };
            match check() {
                Ok(()) => received += 1,
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        });
    }
    Ok(Report { filter: filter.to_string(), lines: received as u64, loggers: streams.iter().flatten().count() })
}
