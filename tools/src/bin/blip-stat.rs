//! Live counters of running Blip nodes, read from their counters sockets (see `docs/COUNTERS.md`): totals
//! and per-second rates per node and per peer, refreshed in place on a terminal.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blip::counters::{self, Snapshot};
use blip::proto::{PeerRole, PeerStats};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Live counters of running Blip nodes (nodes built with export_counters or BLIP_COUNTERS_DIR)"
)]
struct Cli {
    /// Directory of counters sockets [default: $BLIP_COUNTERS_DIR, else $XDG_RUNTIME_DIR/blip, else
    /// /tmp/blip-$UID].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Read this socket only instead of every socket of the directory (repeatable).
    #[arg(long)]
    socket: Vec<PathBuf>,
    /// Seconds between reads.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print one snapshot and exit (status 1 if a node could not be read).
    #[arg(long)]
    once: bool,
    /// Exit after this many reads.
    #[arg(long)]
    count: Option<u64>,
    /// One JSON object per node and read, one per line, instead of tables.
    #[arg(long)]
    json: bool,
    /// Also show node counters that are zero.
    #[arg(long)]
    all: bool,
    /// Leave out the per-peer tables.
    #[arg(long)]
    no_peers: bool,
}

/// Shown even at zero: the counters an operator looks for first.
const CORE: &[&str] = &[
    "messages_sent",
    "messages_delivered",
    "datagrams_sent",
    "datagrams_received",
    "retransmits",
    "naks_sent",
    "naks_received",
    "loss_events",
    "lost_datagrams",
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !(cli.interval > 0.0 && cli.interval.is_finite()) {
        eprintln!("blip-stat: --interval must be a positive number of seconds");
        return ExitCode::FAILURE;
    }
    let dir = cli.dir.clone().unwrap_or_else(|| match std::env::var_os(counters::ENV_DIR) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => counters::default_dir(),
    });
    let rounds = if cli.once { Some(1) } else { cli.count };
    let live = std::io::stdout().is_terminal() && !cli.json && rounds != Some(1);
    let mut prev: HashMap<PathBuf, (Instant, Snapshot)> = HashMap::new();
    let mut failed;
    let mut round = 0u64;
    loop {
        round += 1;
        let paths = if cli.socket.is_empty() { counters::list(&dir) } else { cli.socket.clone() };
        let mut out = String::new();
        if paths.is_empty() {
            let _ = writeln!(out, "no Blip node serves counters in {}", dir.display());
        }
        failed = false;
        let mut seen = HashMap::new();
        for path in &paths {
            let at = Instant::now();
            match counters::read(path) {
                Ok(s) => {
                    let before = prev.get(path).map(|(t, s)| (at.duration_since(*t).as_secs_f64(), s));
                    if cli.json {
                        json(&mut out, path, &s, before);
                    } else {
                        table(&mut out, &cli, &s, before);
                    }
                    seen.insert(path.clone(), (at, s));
                }
                Err(e) => {
                    failed = true;
                    if cli.json {
                        let _ = writeln!(
                            out,
                            "{{\"path\":{},\"error\":{}}}",
                            jstr(&path.display().to_string()),
                            jstr(&e.to_string())
                        );
                    } else {
                        let _ = writeln!(out, "{}: {e}\n", path.display());
                    }
                }
            }
        }
        prev = seen;
        let mut stdout = std::io::stdout().lock();
        let frame = if live {
            // Home and clear: the table refreshes in place.
            format!("\x1b[H\x1b[2J{out}")
        } else if rounds != Some(1) && !cli.json {
            format!("--- read {round} ---\n{out}")
        } else {
            out
        };
        if stdout.write_all(frame.as_bytes()).and_then(|_| stdout.flush()).is_err() {
            return ExitCode::SUCCESS; // the reader went away (e.g. `| head`)
        }
        drop(stdout);
        if rounds.is_some_and(|n| round >= n) {
            break;
        }
        std::thread::sleep(Duration::from_secs_f64(cli.interval));
    }
    if failed && cli.once { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn rate(now: u64, before: Option<u64>, dt: f64) -> Option<f64> {
    let b = before?;
    (dt > 0.0).then(|| now.saturating_sub(b) as f64 / dt)
}

fn fmt_rate(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{r:.0}"),
        Some(r) => format!("{r:.1}"),
        None => "-".into(),
    }
}

fn peer_label(s: &Snapshot, p: &PeerStats) -> String {
    match p.node_id {
        Some(id) => match s.member_name(id) {
            Some(name) if !name.is_empty() => format!("{id:016x} {name}"),
            _ => format!("{id:016x}"),
        },
        None => "-".into(),
    }
}

fn table(out: &mut String, cli: &Cli, s: &Snapshot, before: Option<(f64, &Snapshot)>) {
    let name = if s.name.is_empty() { String::new() } else { format!(" \"{}\"", s.name) };
    let _ = writeln!(
        out,
        "node {:016x}{name}  pid {}  session {:016x}  {}  {} stream {}  up {:.1}s  members {}",
        s.node_id,
        s.pid,
        s.session,
        s.backend,
        s.group,
        s.stream,
        s.uptime.as_secs_f64(),
        s.members.len()
    );
    let (dt, old) = match before {
        Some((dt, old)) if old.session == s.session => (dt, Some(old)),
        _ => (0.0, None),
    };
    let old_counters: HashMap<&str, u64> = old.map(|o| o.counters().into_iter().collect()).unwrap_or_default();
    let _ = writeln!(out, "  {:<28} {:>16} {:>12}", "counter", "total", "/s");
    for (k, v) in s.counters() {
        if v == 0 && !cli.all && !CORE.contains(&k) {
            continue;
        }
        let r = rate(v, old.map(|_| old_counters.get(k).copied().unwrap_or(0)), dt);
        let _ = writeln!(out, "  {k:<28} {v:>16} {:>12}", fmt_rate(r));
    }
    if cli.no_peers {
        out.push('\n');
        return;
    }
    let old_peer =
        |p: &PeerStats| old.and_then(|o| o.peers.iter().find(|q| q.session == p.session && q.role == p.role));
    let senders: Vec<&PeerStats> = s.peers.iter().filter(|p| p.role == PeerRole::Sender).collect();
    if !senders.is_empty() {
        let _ = writeln!(
            out,
            "  {:<16} {:<26} {:<21} {:>10} {:>9} {:>12} {:>10} {:>8} {:>7} {:>7} {:>6} {:>6} {:>10}",
            "sender",
            "node",
            "addr",
            "datagrams",
            "dgram/s",
            "bytes",
            "delivered",
            "msg/s",
            "naks",
            "repairs",
            "dups",
            "lost",
            "position"
        );
        for p in senders {
            let c = &p.counters;
            let o = old_peer(p).map(|o| o.counters);
            let addr = p.addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {:016x} {:<26} {:<21} {:>10} {:>9} {:>12} {:>10} {:>8} {:>7} {:>7} {:>6} {:>6} {:>10}",
                p.session,
                peer_label(s, p),
                addr,
                c.datagrams,
                fmt_rate(rate(c.datagrams, o.map(|o| o.datagrams), dt)),
                c.bytes,
                c.messages_delivered,
                fmt_rate(rate(c.messages_delivered, o.map(|o| o.messages_delivered), dt)),
                c.naks_sent,
                c.repairs_received,
                c.duplicates,
                c.lost_datagrams,
                c.position
            );
        }
    }
    let receivers: Vec<&PeerStats> = s.peers.iter().filter(|p| p.role == PeerRole::Receiver).collect();
    if !receivers.is_empty() {
        let _ = writeln!(
            out,
            "  {:<16} {:<26} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
            "receiver", "node", "naks", "naks/s", "retx", "limited", "status", "position"
        );
        for p in receivers {
            let c = &p.counters;
            let o = old_peer(p).map(|o| o.counters);
            let _ = writeln!(
                out,
                "  {:016x} {:<26} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
                p.session,
                peer_label(s, p),
                c.naks_received,
                fmt_rate(rate(c.naks_received, o.map(|o| o.naks_received), dt)),
                c.retransmits,
                c.retransmits_rate_limited,
                c.status_received,
                c.position
            );
        }
    }
    out.push('\n');
}

fn jstr(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json(out: &mut String, path: &Path, s: &Snapshot, before: Option<(f64, &Snapshot)>) {
    let _ = write!(
        out,
        "{{\"path\":{},\"node_id\":\"{:016x}\",\"session\":\"{:016x}\",\"name\":{},\"pid\":{},\"backend\":{},\"group\":\"{}\",\"stream\":{},\"uptime_ms\":{}",
        jstr(&path.display().to_string()),
        s.node_id,
        s.session,
        jstr(&s.name),
        s.pid,
        jstr(&s.backend),
        s.group,
        s.stream,
        s.uptime.as_millis()
    );
    let counters = s.counters();
    out.push_str(",\"counters\":{");
    for (i, (k, v)) in counters.iter().enumerate() {
        let _ = write!(out, "{}{}:{v}", if i > 0 { "," } else { "" }, jstr(k));
    }
    out.push('}');
    if let Some((dt, old)) = before.filter(|(dt, o)| *dt > 0.0 && o.session == s.session) {
        let old: HashMap<&str, u64> = old.counters().into_iter().collect();
        out.push_str(",\"rates\":{");
        for (i, (k, v)) in counters.iter().enumerate() {
            let r = v.saturating_sub(old.get(k).copied().unwrap_or(0)) as f64 / dt;
            let _ = write!(out, "{}{}:{r:.3}", if i > 0 { "," } else { "" }, jstr(k));
        }
        out.push('}');
    }
    out.push_str(",\"members\":[");
    for (i, m) in s.members.iter().enumerate() {
        let _ = write!(
            out,
            "{}{{\"node_id\":\"{:016x}\",\"session\":\"{:016x}\",\"name\":{}}}",
            if i > 0 { "," } else { "" },
            m.node_id,
            m.session,
            jstr(&m.name)
        );
    }
    out.push_str("],\"peers\":[");
    for (i, p) in s.peers.iter().enumerate() {
        let node = p.node_id.map(|id| format!("\"{id:016x}\"")).unwrap_or_else(|| "null".into());
        let addr = p.addr.map(|a| jstr(&a.to_string())).unwrap_or_else(|| "null".into());
        let _ = write!(
            out,
            "{}{{\"role\":\"{}\",\"session\":\"{:016x}\",\"node_id\":{node},\"addr\":{addr}",
            if i > 0 { "," } else { "" },
            p.role,
            p.session
        );
        for (k, v) in counters::peer_counters(&p.counters) {
            let _ = write!(out, ",\"{k}\":{v}");
        }
        out.push('}');
    }
    out.push_str("]}\n");
}
