//! Prints the decoded traffic of a Blip group, one line per packet, for debugging a live system.
//!
//! The tap joins the group like a node's receiving socket (same defaults: loopback, 239.255.77.1:47001) but
//! never sends anything: it does not announce itself, report STATUS or NAK, so the group does not know it
//! is there and flow control never waits for it. STATUS packets go by unicast to their sender, so a tap on
//! the group does not see them.

use std::fmt::Write as _;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blip::envelope::{Envelope, Kind as MessageKind};
use blip::net::{self, Interface, SocketConfig};
use blip::wire::{DataPacket, Kind, Packet};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "Print the decoded packets of a Blip group (listens only; never sends)")]
struct Cli {
    /// Multicast group.
    #[arg(long, default_value_t = IpAddr::V4(net::DEFAULT_GROUP))]
    group: IpAddr,
    /// UDP port.
    #[arg(long, default_value_t = net::DEFAULT_PORT)]
    port: u16,
    /// Interface to join on, by name or address (default: loopback).
    #[arg(long)]
    interface: Option<String>,
    /// Exit after printing this many packets.
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Print only these kinds (comma-separated): data, heartbeat, nak, status, member, bad.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Frames shown per DATA packet (the rest are counted).
    #[arg(long, default_value_t = 4)]
    frames: usize,
}

const KINDS: &[&str] = &["data", "heartbeat", "nak", "status", "member", "bad"];

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(k) = cli.kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        eprintln!("blip-tap: unknown kind {k:?}; kinds are {}", KINDS.join(", "));
        return ExitCode::FAILURE;
    }
    if cli.seconds.is_some_and(|s| !(s >= 0.0 && s.is_finite())) {
        eprintln!("blip-tap: --seconds must be a non-negative number");
        return ExitCode::FAILURE;
    }
    let interface = match &cli.interface {
        None => Interface::Loopback,
        Some(i) => match i.parse::<IpAddr>() {
            Ok(a) => Interface::Addr(a),
            Err(_) => Interface::Name(i.clone()),
        },
    };
    let group = SocketAddr::new(cli.group, cli.port);
    let cfg = SocketConfig { group, interface, ..SocketConfig::default() };
    let sockets = match net::open(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("blip-tap: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Only the group socket listens; the sending socket is closed unused, so the tap cannot send.
    let socket = sockets.group;
    drop(sockets.unicast);
    if let Err(e) =
        socket.set_nonblocking(false).and_then(|_| socket.set_read_timeout(Some(Duration::from_millis(100))))
    {
        eprintln!("blip-tap: socket setup: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!("blip-tap: listening on {group} (interface index {})", sockets.report.interface_index);
    let deadline = cli.seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut buf = vec![0u8; 65_536];
    let mut printed = 0u64;
    let mut line = String::with_capacity(512);
    let mut stdout = std::io::stdout().lock();
    while cli.count.is_none_or(|n| printed < n) {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("blip-tap: receive: {e}");
                return ExitCode::FAILURE;
            }
        };
        line.clear();
        let kind = describe(&mut line, from, &buf[..len], cli.frames);
        if !cli.kinds.is_empty() && !cli.kinds.iter().any(|k| k == kind) {
            continue;
        }
        if writeln!(stdout, "{line}").and_then(|_| stdout.flush()).is_err() {
            break; // the reader went away (e.g. `| head`)
        }
        printed += 1;
    }
    ExitCode::SUCCESS
}

/// Wall-clock time of day (UTC) with microseconds, to line up with other logs.
fn timestamp(out: &mut String) {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = t.as_secs() % 86_400;
    let _ = write!(out, "{:02}:{:02}:{:02}.{:06}", s / 3600, s / 60 % 60, s % 60, t.subsec_micros());
}

/// Appends the packet's line to `out`; returns its kind's filter name.
fn describe(out: &mut String, from: SocketAddr, bytes: &[u8], max_frames: usize) -> &'static str {
    timestamp(out);
    let _ = write!(out, " {from:<21} ");
    let packet = match Packet::parse(bytes) {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(out, "BAD       {} bytes: {e}; starts {}", bytes.len(), hex(&bytes[..bytes.len().min(16)]));
            return "bad";
        }
    };
    let h = packet.header();
    let name = match h.kind {
        Kind::Data => "DATA",
        Kind::Heartbeat => "HEARTBEAT",
        Kind::Nak => "NAK",
        Kind::Status => "STATUS",
        Kind::Member => "MEMBER",
    };
    let _ = write!(
        out,
        "{name:<9} session={:016x} stream={} flags={:#06x} len={}",
        h.session,
        h.stream,
        h.flags,
        bytes.len()
    );
    match packet {
        Packet::Data(d) => {
            data(out, &d, max_frames);
            "data"
        }
        Packet::Heartbeat(_, hb) => {
            let _ = write!(
                out,
                " next_seq={} low={} next_msg={} receivers={}",
                hb.next_seq, hb.low, hb.next_msg, hb.receivers
            );
            "heartbeat"
        }
        Packet::Nak(n) => {
            let _ = write!(out, " target={:016x} ranges=", n.target_session);
            for (i, r) in n.ranges().enumerate() {
                if i == 16 {
                    let _ = write!(out, ",+{} more", n.ranges().count() - 16);
                    break;
                }
                let _ = write!(out, "{}{}..{}", if i > 0 { "," } else { "" }, r.start, r.end());
            }
            "nak"
        }
        Packet::Status(_, s) => {
            let _ = write!(
                out,
                " target={:016x} next_expected={} capacity={}",
                s.target_session, s.next_expected, s.buffer_capacity
            );
            "status"
        }
        Packet::Member(m) => {
            let _ = write!(out, " node={:016x} state={:?} name={:?}", m.repr.node_id, m.repr.state, m.repr.name);
            "member"
        }
    }
}

fn data(out: &mut String, d: &DataPacket<'_>, max_frames: usize) {
    let _ = write!(out, " seq={} msg_seq={} low={}", d.seq, d.msg_seq, d.low);
    if d.is_retransmit() {
        out.push_str(" retransmit");
    }
    let total = d.frames().count();
    let _ = write!(out, " frames={total}");
    for (k, f) in d.frames().enumerate().take(max_frames) {
        let flags = match (f.is_first(), f.is_last()) {
            (true, true) => "whole",
            (true, false) => "first",
            (false, true) => "last",
            (false, false) => "middle",
        };
        // Frame k belongs to message msg_seq + k (see the DATA layout).
        let _ = write!(out, " | msg={} {flags} {}", d.msg_seq + k as u64, describe_payload(f.payload, f.is_first()));
    }
    if total > max_frames {
        let _ = write!(out, " | +{} frames", total - max_frames);
    }
}

/// One frame's bytes, for a human. The first frame of a message starts with the application envelope
/// (docs/APPLICATION.md): its topic, addressee and request/reply ids are decoded; then the size of what
/// follows and a preview.
fn describe_payload(payload: &[u8], first: bool) -> String {
    let mut out = String::new();
    let mut body = payload;
    if first {
        match Envelope::parse(payload) {
            Ok((env, rest)) => {
                let topic = if env.topic.is_empty() { "-" } else { env.topic };
                let _ = write!(out, "topic={topic} ");
                if let Some(t) = env.target {
                    let _ = write!(out, "to={t:016x} ");
                }
                match env.kind {
                    MessageKind::Plain => {}
                    MessageKind::Request { id, reply_topic } => {
                        let _ = write!(
                            out,
                            "request={} from={:016x} reply_to={reply_topic} ",
                            id.correlation, id.requester
                        );
                    }
                    MessageKind::Reply { correlation, replier } => {
                        let _ = write!(out, "reply={correlation} from={replier:016x} ");
                    }
                }
                body = rest;
            }
            Err(e) => {
                let _ = write!(out, "bad envelope ({e}) ");
            }
        }
    }
    let head = &body[..body.len().min(16)];
    let ascii: String = head.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect();
    let more = if body.len() > head.len() { "…" } else { "" };
    let _ = write!(out, "{}B {}{more} \"{ascii}\"{more}", body.len(), hex(head));
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}
