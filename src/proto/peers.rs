//! Per-peer counters: what this endpoint exchanged with each sender it follows and each receiver of its own
//! stream. The engine thread is their only writer, so they are plain integers bumped beside the endpoint's
//! own [`Stats`](super::Stats); readers get copies through [`Endpoint::peer_stats`](super::Endpoint::peer_stats).

use std::net::SocketAddr;

/// Which side of a stream the peer is on, seen from this endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// A remote sender whose stream this endpoint receives.
    Sender,
    /// A remote receiver that reports to this endpoint's sender.
    Receiver,
}

impl PeerRole {
    /// The role's name in the counters format and the tools: `sender` or `receiver`.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Sender => "sender",
            PeerRole::Receiver => "receiver",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<PeerRole> {
        match s {
            "sender" => Some(PeerRole::Sender),
            "receiver" => Some(PeerRole::Receiver),
            _ => None,
        }
    }
}

impl std::fmt::Display for PeerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters kept per peer. A peer's row only fills the fields of its role; the others stay 0. All only
/// grow, except `position`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Sender: DATA and HEARTBEAT packets received from it (duplicates included).
    pub datagrams: u64,
    /// Sender: bytes of those packets.
    pub bytes: u64,
    /// Sender: messages delivered from its stream.
    pub messages_delivered: u64,
    /// Sender: NAK packets sent to it.
    pub naks_sent: u64,
    /// Sender: DATA datagrams received as retransmissions and stored.
    pub repairs_received: u64,
    /// Sender: DATA datagrams received again after they had been received.
    pub duplicates: u64,
    /// Sender: datagrams covered by loss events.
    pub lost_datagrams: u64,
    /// Sender: loss events delivered.
    pub loss_events: u64,
    /// Receiver: NAK packets received from it.
    pub naks_received: u64,
    /// Receiver: datagrams queued for retransmission in answer to its NAKs.
    pub retransmits: u64,
    /// Receiver: NAKed datagrams refused because it exceeded its retransmission budget.
    pub retransmits_rate_limited: u64,
    /// Receiver: STATUS packets received from it.
    pub status_received: u64,
    /// Sender: the next datagram this endpoint will deliver from it. Receiver: the next datagram it said it
    /// expects (its last STATUS).
    pub position: u64,
}

/// One row of [`Endpoint::peer_stats`](super::Endpoint::peer_stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer's session.
    pub session: u64,
    /// Which side of a stream it is on. A node that both sends to and receives from this one has a row for
    /// each role.
    pub role: PeerRole,
    /// Its node id, if it announced itself with this session.
    pub node_id: Option<u64>,
    /// The address its packets come from (known for senders; receivers' STATUS is not tracked by address).
    pub addr: Option<SocketAddr>,
    /// The counters.
    pub counters: PeerCounters,
}
