//! Live counters, readable from another process while a node runs.
//!
//! A node built with [`NodeBuilder::export_counters`](crate::NodeBuilder::export_counters) (or with the
//! environment variable `BLIP_COUNTERS_DIR` set) serves its counters on a Unix stream socket
//! `<dir>/<pid>-<node id as 16 hex digits>.sock`. Each connection gets one [`Snapshot`] in the text format
//! below, and the node closes it. [`list`] finds the sockets in a directory and [`read`] fetches one, with a
//! timeout, exactly as the `blip-stat` tool does. The format and the location are described for operators
//! in `docs/COUNTERS.md`.
//!
//! The counters themselves are plain integers that the engine thread alone writes; it copies them into a
//! mutex-guarded snapshot every 50 ms (and when it goes idle), and the socket is served from that copy by
//! a small thread that blocks in `accept`, so a reader never touches the engine's hot path.
//!
//! # Format, version 1
//!
//! UTF-8 text, one item per line, `\n`-terminated:
//!
//! ```text
//! blip-counters v1
//! node_id 00000000000004d2
//! session 9f1c2e3d4b5a6978
//! name example
//! pid 4242
//! backend io_uring
//! group 239.255.77.1:47001
//! stream 0
//! uptime_ms 15230
//! messages_sent 1000
//! ...
//! member 000000000000162e 1122334455667788 other-node
//! peer sender 1122334455667788 node=000000000000162e addr=127.0.0.1:40312 datagrams=12 bytes=9000 ...
//! end
//! ```
//!
//! - Line 1 names the format and its version; a reader rejects versions it does not know.
//! - `key value` lines: the identity keys above (ids in hex, `uptime_ms` in milliseconds), then one line
//!   per node counter with a decimal value (the fields of [`Stats`], [`NodeStats`] and
//!   [`BackendStats`], under their field names). A reader keeps counter keys it does not
//!   know in [`Snapshot::extra`] and skips other unknown lines, so counters can be added within version 1.
//! - `member <node id> <session> <name>`: a node that announced itself. `peer <role> <session> node=<id|->
//!   addr=<address|-> key=value...`: one row of [`PeerStats`].
//! - `name` and member names escape `\` as `\\`, newline as `\n` and carriage return as `\r`.
//! - `end` closes the snapshot; a reply without it is [`CountersError::Truncated`].

mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::{BackendStats, NodeStats};
use crate::proto::{PeerCounters, PeerRole, PeerStats, Stats};

pub(crate) use server::{Identity, Server};
pub use server::{default_dir, list, read, read_timeout};

/// First line of a version-1 snapshot.
pub const MAGIC_V1: &str = "blip-counters v1";
/// Largest reply [`read`] accepts.
pub const MAX_SNAPSHOT: usize = 16 << 20;
/// How long [`read`] waits for a node to answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Environment variable that turns the export on for every node of a process: a directory, or empty for
/// [`default_dir`].
pub const ENV_DIR: &str = "BLIP_COUNTERS_DIR";

/// A node that announced itself to this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its node id.
    pub node_id: u64,
    /// Its current session.
    pub session: u64,
    /// The name it announced.
    pub name: String,
}

/// One node's counters at one moment, as served on its socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The node's id.
    pub node_id: u64,
    /// Its session (this incarnation).
    pub session: u64,
    /// Its announced name (may be empty).
    pub name: String,
    /// The process serving it.
    pub pid: u32,
    /// The backend running it (`io_uring` or `poll`).
    pub backend: String,
    /// The group joined.
    pub group: SocketAddr,
    /// The stream inside the group.
    pub stream: u32,
    /// Time since the node was built.
    pub uptime: Duration,
    /// Node counters.
    pub stats: NodeStats,
    /// Counters this version does not know (from a newer node), in the order received.
    pub extra: Vec<(String, u64)>,
    /// Nodes that announced themselves.
    pub members: Vec<MemberInfo>,
    /// Per-peer counters.
    pub peers: Vec<PeerStats>,
}

/// Why a snapshot could not be served, fetched or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    /// A file or socket operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The node did not answer within the timeout.
    #[error("{0}: no answer within the timeout (is the node hung?)")]
    Timeout(PathBuf),
    /// The counters directory belongs to another user, so sockets in it could be forged or read by them.
    #[error("counters directory {path} is owned by uid {owner}, not by this user: choose another directory")]
    NotOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// A live node of this process already serves the same path (two nodes with one node id).
    #[error("{0} is served by a live node already (two nodes with the same node id in one process?)")]
    InUse(PathBuf),
    /// Unix sockets are not available on this platform.
    #[error("counters export needs Unix domain sockets, which this platform lacks")]
    Unsupported,
    /// The reply is not UTF-8.
    #[error("snapshot is not UTF-8 text")]
    NotUtf8,
    /// The first line is not a Blip counters header.
    #[error("not a Blip counters snapshot (first line {0:?})")]
    BadMagic(String),
    /// A Blip counters snapshot of a version this reader does not know.
    #[error("counters format version {0} is not supported (this reader knows v1)")]
    Version(String),
    /// A line does not follow the format.
    #[error("line {line}: {reason}")]
    BadLine {
        /// Line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A required key is absent.
    #[error("snapshot lacks the {0} line")]
    Missing(&'static str),
    /// The reply stops before its `end` line.
    #[error("snapshot truncated (no end line)")]
    Truncated,
    /// The reply exceeds [`MAX_SNAPSHOT`].
    #[error("snapshot larger than {MAX_SNAPSHOT} bytes")]
    TooLarge,
}

/// Lists a struct's counter fields once, for encoding and decoding both.
macro_rules! counter_fields {
    ($ty:ident, $list:ident, $set:ident, [$($f:ident),* $(,)?]) => {
        fn $list(s: &$ty, out: &mut Vec<(&str, u64)>) {
            // Exhaustive on purpose: a field added to the struct fails to compile here until it is listed,
            // so no counter is left out of the export.
            let $ty { $($f),* } = s;
            $(out.push((stringify!($f), *$f));)*
        }
        fn $set(s: &mut $ty, key: &str, v: u64) -> bool {
            match key {
                $(stringify!($f) => s.$f = v,)*
                _ => return false,
            }
            true
        }
    };
}

counter_fields!(
    Stats,
    stats_list,
    stats_set,
    [
        messages_sent,
        bytes_sent,
        datagrams_sent,
        retransmits,
        retransmits_suppressed,
        retransmit_queue_full,
        retransmits_rate_limited,
        heartbeats_sent,
        flow_control_blocked,
        naks_sent,
        naks_received,
        naks_suppressed,
        status_sent,
        status_received,
        datagrams_received,
        repairs_received,
        messages_delivered,
        duplicates,
        beyond_buffer,
        malformed,
        denied,
        foreign_stream,
        own_packets,
        over_limit,
        oversized_messages,
        loss_events,
        lost_datagrams,
        unsealed_dropped,
        sealed_dropped,
        auth_failed,
        replayed,
        seal_evicted,
        seal_failed,
        events_dropped,
    ]
);

counter_fields!(
    PeerCounters,
    peer_list,
    peer_set,
    [
        datagrams,
        bytes,
        messages_delivered,
        naks_sent,
        repairs_received,
        duplicates,
        lost_datagrams,
        loss_events,
        naks_received,
        retransmits,
        retransmits_rate_limited,
        status_received,
        position,
    ]
);

counter_fields!(
    BackendStats,
    backend_list,
    backend_set,
    [
        send_errors,
        gso_sends,
        gso_fallbacks,
        gro_batches,
        truncated,
        malformed_reads,
        recv_errors,
        enobufs,
        plain_switches
    ]
);

fn node_list(s: &NodeStats, out: &mut Vec<(&str, u64)>) {
    let NodeStats {
        protocol,
        datagrams_in,
        injected_drops,
        unmatched,
        not_addressed,
        bad_envelope,
        local_deliveries,
        backend,
    } = s;
    stats_list(protocol, out);
    backend_list(backend, out);
    out.extend([
        ("datagrams_in", *datagrams_in),
        ("injected_drops", *injected_drops),
        ("unmatched", *unmatched),
        ("not_addressed", *not_addressed),
        ("bad_envelope", *bad_envelope),
        ("local_deliveries", *local_deliveries),
    ]);
}

fn node_set(s: &mut NodeStats, key: &str, v: u64) -> bool {
    match key {
        "datagrams_in" => s.datagrams_in = v,
        "injected_drops" => s.injected_drops = v,
        "unmatched" => s.unmatched = v,
        "not_addressed" => s.not_addressed = v,
        "bad_envelope" => s.bad_envelope = v,
        "local_deliveries" => s.local_deliveries = v,
        _ => return stats_set(&mut s.protocol, key, v) || backend_set(&mut s.backend, key, v),
    }
    true
}

/// A peer's counters as `(name, value)` pairs, in format order. `position` is a position, not a counter.
pub fn peer_counters(c: &PeerCounters) -> Vec<(&'static str, u64)> {
    let mut out = Vec::with_capacity(16);
    peer_list(c, &mut out);
    out
}

impl Snapshot {
    /// The node counters as `(name, value)` pairs, in format order, followed by [`extra`](Self::extra).
    pub fn counters(&self) -> Vec<(&str, u64)> {
        let mut out = Vec::with_capacity(40);
        node_list(&self.stats, &mut out);
        out.extend(self.extra.iter().map(|(k, v)| (k.as_str(), *v)));
        out
    }

    /// The node counter called `name` (a field of [`Stats`], [`NodeStats`] or [`BackendStats`], or an extra
    /// one).
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// The name a member announced, if `node_id` is a member.
    pub fn member_name(&self, node_id: u64) -> Option<&str> {
        self.members.iter().find(|m| m.node_id == node_id).map(|m| m.name.as_str())
    }

    /// The snapshot in the text format of the [module docs](self).
    pub fn encode(&self) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(2048 + 256 * self.peers.len());
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{MAGIC_V1}");
        let _ = writeln!(s, "node_id {:016x}", self.node_id);
        let _ = writeln!(s, "session {:016x}", self.session);
        let _ = writeln!(s, "name {}", escape(&self.name));
        let _ = writeln!(s, "pid {}", self.pid);
        let _ = writeln!(s, "backend {}", token(&self.backend));
        let _ = writeln!(s, "group {}", self.group);
        let _ = writeln!(s, "stream {}", self.stream);
        let _ = writeln!(s, "uptime_ms {}", self.uptime.as_millis());
        for (k, v) in self.counters() {
            let _ = writeln!(s, "{} {v}", token(k));
        }
        for m in &self.members {
            let _ = writeln!(s, "member {:016x} {:016x} {}", m.node_id, m.session, escape(&m.name));
        }
        for p in &self.peers {
            let _ = write!(s, "peer {} {:016x} node=", p.role, p.session);
            let _ = match p.node_id {
                Some(id) => write!(s, "{id:016x}"),
                None => write!(s, "-"),
            };
            let _ = match p.addr {
                Some(a) => write!(s, " addr={a}"),
                None => write!(s, " addr=-"),
            };
            for (k, v) in peer_counters(&p.counters) {
                let _ = write!(s, " {k}={v}");
            }
            s.push('\n');
        }
        s.push_str("end\n");
        s
    }

    /// Parses the text format. Total: any bytes give a snapshot or an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, CountersError> {
        let text = std::str::from_utf8(bytes).map_err(|_| CountersError::NotUtf8)?;
        let mut lines = text.split('\n').enumerate().map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)));
        match lines.next() {
            Some((_, MAGIC_V1)) => {}
            Some((_, first)) => {
                return Err(match first.strip_prefix("blip-counters v") {
                    Some(v) => CountersError::Version(v.chars().take(16).collect()),
                    None if first.is_empty() && text.len() <= 1 => CountersError::Truncated,
                    None => CountersError::BadMagic(first.chars().take(40).collect()),
                });
            }
            None => return Err(CountersError::Truncated),
        }
        let (mut node_id, mut session, mut pid, mut group) = (None, None, None, None);
        let mut snap = Snapshot {
            node_id: 0,
            session: 0,
            name: String::new(),
            pid: 0,
            backend: String::new(),
            group: SocketAddr::from(([0, 0, 0, 0], 0)),
            stream: 0,
            uptime: Duration::ZERO,
            stats: NodeStats::default(),
            extra: Vec::new(),
            members: Vec::new(),
            peers: Vec::new(),
        };
        let mut ended = false;
        for (line, l) in lines {
            if l == "end" {
                ended = true;
                break;
            }
            if l.is_empty() {
                continue;
            }
            let bad = |reason| CountersError::BadLine { line, reason };
            let (key, rest) = l.split_once(' ').unwrap_or((l, ""));
            match key {
                "node_id" => node_id = Some(hex(rest).ok_or(bad("node_id is not 16 hex digits"))?),
                "session" => session = Some(hex(rest).ok_or(bad("session is not 16 hex digits"))?),
                "name" => snap.name = unescape(rest),
                "pid" => pid = Some(rest.parse().map_err(|_| bad("pid is not a number"))?),
                "backend" => snap.backend = rest.to_owned(),
                "group" => group = Some(rest.parse().map_err(|_| bad("group is not an address:port"))?),
                "stream" => snap.stream = rest.parse().map_err(|_| bad("stream is not a number"))?,
                "uptime_ms" => {
                    snap.uptime = Duration::from_millis(rest.parse().map_err(|_| bad("uptime_ms is not a number"))?)
                }
                "member" => {
                    snap.members.push(parse_member(rest).ok_or(bad("member line: <node id> <session> <name>"))?)
                }
                "peer" => snap.peers.push(parse_peer(rest).map_err(bad)?),
                _ => {
                    // A counter (known or from a newer node); a non-numeric unknown key is future identity
                    // information and is skipped.
                    if let Ok(v) = rest.parse::<u64>()
                        && !node_set(&mut snap.stats, key, v)
                    {
                        snap.extra.push((key.to_owned(), v));
                    }
                }
            }
        }
        if !ended {
            return Err(CountersError::Truncated);
        }
        snap.node_id = node_id.ok_or(CountersError::Missing("node_id"))?;
        snap.session = session.ok_or(CountersError::Missing("session"))?;
        snap.pid = pid.ok_or(CountersError::Missing("pid"))?;
        snap.group = group.ok_or(CountersError::Missing("group"))?;
        Ok(snap)
    }
}

fn hex(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn parse_member(rest: &str) -> Option<MemberInfo> {
    let mut it = rest.splitn(3, ' ');
    let node_id = hex(it.next()?)?;
    let session = hex(it.next()?)?;
    Some(MemberInfo { node_id, session, name: unescape(it.next().unwrap_or("")) })
}

fn parse_peer(rest: &str) -> Result<PeerStats, &'static str> {
    let mut it = rest.split(' ');
    let role = it.next().and_then(PeerRole::parse).ok_or("peer role is not sender or receiver")?;
    let session = it.next().and_then(hex).ok_or("peer session is not 16 hex digits")?;
    let mut p = PeerStats { session, role, node_id: None, addr: None, counters: PeerCounters::default() };
    for kv in it {
        let (k, v) = kv.split_once('=').ok_or("peer field is not key=value")?;
        match (k, v) {
            ("node" | "addr", "-") => {}
            ("node", v) => p.node_id = Some(hex(v).ok_or("peer node is not 16 hex digits")?),
            ("addr", v) => p.addr = Some(v.parse().map_err(|_| "peer addr is not an address:port")?),
            (k, v) => {
                let v = v.parse().map_err(|_| "peer counter is not a number")?;
                // Unknown peer counters come from a newer node; they are skipped.
                let _ = peer_set(&mut p.counters, k, v);
            }
        }
    }
    Ok(p)
}

/// Keys and backend names are single tokens; anything else would break the line structure.
fn token(s: &str) -> String {
    s.chars().map(|c| if c.is_whitespace() || c == '=' { '_' } else { c }).collect()
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Snapshot {
        let mut stats = NodeStats::default();
        stats.protocol.messages_sent = 1000;
        stats.protocol.naks_received = 7;
        stats.datagrams_in = 55;
        stats.backend.plain_switches = 3;
        Snapshot {
            node_id: 0x4d2,
            session: 0x9f1c_2e3d_4b5a_6978,
            name: "a name\\with\nodd\rbits".into(),
            pid: 4242,
            backend: "io_uring".into(),
            group: "239.255.77.1:47001".parse().unwrap(),
            stream: 3,
            uptime: Duration::from_millis(15_230),
            stats,
            extra: vec![("from_the_future".into(), 9)],
            members: vec![MemberInfo { node_id: 0x162e, session: 0x1122, name: "other node".into() }],
            peers: vec![
                PeerStats {
                    session: 0x1122,
                    role: PeerRole::Sender,
                    node_id: Some(0x162e),
                    addr: Some("127.0.0.1:40312".parse().unwrap()),
                    counters: PeerCounters { datagrams: 12, bytes: 9000, position: 11, ..PeerCounters::default() },
                },
                PeerStats {
                    session: 0x3344,
                    role: PeerRole::Receiver,
                    node_id: None,
                    addr: None,
                    counters: PeerCounters { naks_received: 2, retransmits: 5, ..PeerCounters::default() },
                },
            ],
        }
    }

    #[test]
    fn roundtrip() {
        let s = sample();
        let text = s.encode();
        assert!(text.starts_with("blip-counters v1\nnode_id 00000000000004d2\n"), "{text}");
        assert!(text.contains("\nmessages_sent 1000\n"), "{text}");
        assert!(text.contains("\npeer receiver 0000000000003344 node=- addr=- "), "{text}");
        assert_eq!(Snapshot::decode(text.as_bytes()).unwrap(), s);
        assert_eq!(s.counter("naks_received"), Some(7));
        assert_eq!(s.counter("from_the_future"), Some(9));
    }

    /// Every node counter has its own name (the format is flat: a name used twice would be decoded into
    /// one field), and each survives a round trip on its own: distinct values for all of them come back.
    #[test]
    fn every_node_counter_has_its_own_name() {
        let mut names = Vec::new();
        node_list(&NodeStats::default(), &mut names);
        let mut stats = NodeStats::default();
        for (i, (name, _)) in names.iter().enumerate() {
            assert!(node_set(&mut stats, name, i as u64 + 1), "{name} is listed but not decoded");
        }
        let mut back = Vec::new();
        node_list(&stats, &mut back);
        let values: Vec<u64> = back.iter().map(|(_, v)| *v).collect();
        assert_eq!(values, (1..=names.len() as u64).collect::<Vec<_>>(), "a name is used twice: {back:?}");
    }

    #[test]
    fn errors_name_the_problem() {
        let text = sample().encode();
        let cut = &text[..text.len() - 4];
        assert!(matches!(Snapshot::decode(cut.as_bytes()), Err(CountersError::Truncated)));
        assert!(matches!(Snapshot::decode(b""), Err(CountersError::Truncated)));
        assert!(matches!(Snapshot::decode(b"hello\n"), Err(CountersError::BadMagic(_))));
        assert!(matches!(Snapshot::decode(b"blip-counters v2\nend\n"), Err(CountersError::Version(v)) if v == "2"));
        assert!(matches!(Snapshot::decode(b"blip-counters v1\nend\n"), Err(CountersError::Missing("node_id"))));
        let bad = text.replace("pid 4242", "pid x");
        assert!(matches!(Snapshot::decode(bad.as_bytes()), Err(CountersError::BadLine { line: 5, .. })));
        assert!(matches!(Snapshot::decode(&[0xff, 0xfe]), Err(CountersError::NotUtf8)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Snapshot::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mangled_snapshots(cut in 0usize..2000, at in 0usize..2000, byte: u8) {
            let mut b = sample().encode().into_bytes();
            let at = at % b.len();
            b[at] = byte;
            b.truncate(cut.max(1));
            let _ = Snapshot::decode(&b);
        }

        #[test]
        fn names_roundtrip(name in ".{0,64}") {
            let s = Snapshot { name: name.clone(), ..sample() };
            prop_assert_eq!(Snapshot::decode(s.encode().as_bytes()).unwrap().name, name);
        }
    }
}
