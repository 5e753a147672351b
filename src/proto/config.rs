//! Protocol configuration: sizes, timers and policies, with defaults sized for a LAN (see docs/PROTOCOL.md,
//! "Timers and constants", for the reasoning behind each default).

use std::time::Duration;

use crate::wire::{DATA_HEADER_LEN, FRAME_HEADER_LEN, MAX_NAME_LEN, MEMBER_HEADER_LEN, SEAL_OVERHEAD};

/// Largest UDP payload over IPv4 (65,535 − 20 − 8).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Default datagram size: a 1500-byte Ethernet MTU less 20 bytes of IPv4 and 8 of UDP.
pub const DEFAULT_MAX_DATAGRAM: usize = 1472;
/// Default retransmission window and receive buffer, in datagrams.
pub const DEFAULT_WINDOW: usize = 4096;
/// Default largest message.
pub const DEFAULT_MAX_MESSAGE: usize = 64 << 20;
/// Default upper bound of the random delay before a receiver's first NAK for a gap.
pub const DEFAULT_NAK_BACKOFF: Duration = Duration::from_micros(1000);
/// Default time a receiver waits for a repair before asking again.
pub const DEFAULT_NAK_RETRY: Duration = Duration::from_micros(3000);
/// Default time during which repeated NAKs for the same datagram are answered once.
pub const DEFAULT_RETRANSMIT_LINGER: Duration = Duration::from_micros(500);
/// Default first heartbeat delay after the sender's last datagram (then doubling).
pub const DEFAULT_HEARTBEAT_MIN: Duration = Duration::from_micros(500);
/// Default longest heartbeat interval of an idle sender.
pub const DEFAULT_HEARTBEAT_MAX: Duration = Duration::from_secs(1);
/// Default interval of a receiver's periodic STATUS to each sender it follows.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// Default silence after which a receiver forgets a sender.
pub const DEFAULT_SENDER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default silence after which a sender stops counting a receiver for flow control.
pub const DEFAULT_RECEIVER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default interval of MEMBER announcements.
pub const DEFAULT_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);
/// Default silence after which a member is reported expired.
pub const DEFAULT_MEMBER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default most remote senders followed at once.
pub const DEFAULT_MAX_SENDERS: usize = 256;
/// Default most receivers a sender tracks for flow control.
pub const DEFAULT_MAX_RECEIVERS: usize = 1024;
/// Default most members tracked.
pub const DEFAULT_MAX_MEMBERS: usize = 1024;
/// Default capacity of the sender's queue of NAKed ranges awaiting retransmission.
pub const DEFAULT_RETRANSMIT_QUEUE: usize = 1024;
/// Default bound on the memory all reassemblies in progress may take together, in bytes.
pub const DEFAULT_MAX_REASSEMBLY: usize = 256 << 20;
/// Default retransmission budget per requester, in bytes per second.
pub const DEFAULT_RETRANSMIT_RATE: u64 = 64 << 20;
/// Default burst of that budget, in bytes.
pub const DEFAULT_RETRANSMIT_BURST: u64 = 4 << 20;

/// What a sender does about a live receiver that falls a whole window behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowReceiverPolicy {
    /// Never overwrite a datagram a live receiver still needs: `send` returns `WouldBlock` until it catches up.
    HoldBack,
    /// Hold back for at most this long, then stop waiting for that receiver, report
    /// [`Event::SlowReceiverDropped`](super::Event::SlowReceiverDropped), and let it take a loss.
    DropAfter(Duration),
}

/// Where a receiver starts when it first hears a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateJoin {
    /// With the first new datagram heard (no history).
    Next,
    /// With the oldest datagram the sender still retains (repaired by NAK).
    Oldest,
}

/// Configuration of an [`Endpoint`](super::Endpoint).
#[derive(Debug, Clone)]
pub struct Config {
    /// Stream id inside the group; packets of other streams are ignored.
    pub stream: u32,
    /// This node's stable identity (kept across restarts; the session changes).
    pub node_id: u64,
    /// Optional human-readable name, at most 64 bytes.
    pub node_name: String,
    /// Largest datagram (UDP payload) emitted.
    pub max_datagram: usize,
    /// Retransmission window, in datagrams (allocated once: `window × max_datagram` bytes).
    pub window: usize,
    /// Per-sender receive buffer (out of order and not yet consumed), in datagrams.
    pub receive_buffer: usize,
    /// Largest message accepted by `send` and reassembled by receivers.
    pub max_message: usize,
    /// Memory all reassemblies in progress (across every sender followed) may take together; a fragment
    /// that would exceed it makes its message a reported loss instead.
    pub max_reassembly: usize,
    /// Upper bound of the random delay before a receiver's NAK for a gap (first NAKs, retries and held-back
    /// NAKs alike); no delay when the sender's heartbeat reports exactly one receiver.
    pub nak_backoff: Duration,
    /// Time a receiver waits for a repair before asking again.
    pub nak_retry: Duration,
    /// Repeated NAKs for the same datagram within this time are answered once.
    pub retransmit_linger: Duration,
    /// First heartbeat delay after the last datagram; doubles while idle.
    pub heartbeat_min: Duration,
    /// Longest heartbeat interval while idle.
    pub heartbeat_max: Duration,
    /// Interval of periodic STATUS reports to each followed sender.
    pub status_interval: Duration,
    /// Silence after which a receiver forgets a sender.
    pub sender_timeout: Duration,
    /// Silence after which a sender stops counting a receiver.
    pub receiver_timeout: Duration,
    /// Slow-receiver policy.
    pub slow_receiver: SlowReceiverPolicy,
    /// Late-join policy.
    pub late_join: LateJoin,
    /// Interval of MEMBER announcements.
    pub announce_interval: Duration,
    /// Silence after which a member is reported expired.
    pub member_timeout: Duration,
    /// Most remote senders followed at once; packets from further ones are dropped and counted.
    pub max_senders: usize,
    /// Most receivers tracked for flow control.
    pub max_receivers: usize,
    /// Most members tracked.
    pub max_members: usize,
    /// Capacity of the queue of NAKed ranges awaiting retransmission.
    pub retransmit_queue: usize,
    /// Retransmission budget of each receiver that reports STATUS, in bytes per second (0: unlimited).
    /// Requesters that never reported share one budget of a sixteenth of that (`STRANGER_SHARE`), so
    /// forged NAKs cannot make this node an amplifier.
    pub retransmit_rate: u64,
    /// Burst of that budget, in bytes.
    pub retransmit_burst: u64,
    /// Which sources are heard at all (default: every source).
    pub access: super::AccessList,
    /// Authenticated encryption of every packet under these pre-shared keys (default: off). With it on,
    /// unsealed packets are dropped, and every packet sent is sealed, [`SEAL_OVERHEAD`] bytes larger, still
    /// within `max_datagram`. The keys given here are those at creation; rotate them through the endpoint.
    pub encryption: Option<super::Keyring>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            stream: 0,
            node_id: 0,
            node_name: String::new(),
            max_datagram: DEFAULT_MAX_DATAGRAM,
            window: DEFAULT_WINDOW,
            receive_buffer: DEFAULT_WINDOW,
            max_message: DEFAULT_MAX_MESSAGE,
            max_reassembly: DEFAULT_MAX_REASSEMBLY,
            nak_backoff: DEFAULT_NAK_BACKOFF,
            nak_retry: DEFAULT_NAK_RETRY,
            retransmit_linger: DEFAULT_RETRANSMIT_LINGER,
            heartbeat_min: DEFAULT_HEARTBEAT_MIN,
            heartbeat_max: DEFAULT_HEARTBEAT_MAX,
            status_interval: DEFAULT_STATUS_INTERVAL,
            sender_timeout: DEFAULT_SENDER_TIMEOUT,
            receiver_timeout: DEFAULT_RECEIVER_TIMEOUT,
            slow_receiver: SlowReceiverPolicy::HoldBack,
            late_join: LateJoin::Oldest,
            announce_interval: DEFAULT_ANNOUNCE_INTERVAL,
            member_timeout: DEFAULT_MEMBER_TIMEOUT,
            max_senders: DEFAULT_MAX_SENDERS,
            max_receivers: DEFAULT_MAX_RECEIVERS,
            max_members: DEFAULT_MAX_MEMBERS,
            retransmit_queue: DEFAULT_RETRANSMIT_QUEUE,
            retransmit_rate: DEFAULT_RETRANSMIT_RATE,
            retransmit_burst: DEFAULT_RETRANSMIT_BURST,
            access: super::AccessList::default(),
            encryption: None,
        }
    }
}

/// A configuration value out of range; the message says which and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `max_datagram` cannot hold the DATA header and one byte of payload, or exceeds a UDP payload.
    #[error("max_datagram {0} out of range: must be {min}..={MAX_UDP_PAYLOAD} (the path MTU is too small for the Blip header)", min = MIN_DATAGRAM)]
    DatagramSize(usize),
    /// `window` or `receive_buffer` is below 2 datagrams or above 2^20.
    #[error("{name} {value} out of range: must be 2..=1048576 datagrams")]
    BufferSize {
        /// Which setting.
        name: &'static str,
        /// The value given.
        value: usize,
    },
    /// `node_name` is longer than 64 bytes.
    #[error("node_name is {0} bytes; at most 64 are allowed")]
    NameTooLong(usize),
    /// Encryption is on and `max_datagram` cannot hold the largest control packet and a seal.
    #[error("max_datagram {0} too small with encryption on: must be at least {min} (MIN_DATAGRAM + SEAL_OVERHEAD)", min = MIN_DATAGRAM + SEAL_OVERHEAD)]
    SealedDatagramSize(usize),
    /// A timer is zero where it must be positive, or `heartbeat_min` exceeds `heartbeat_max`.
    #[error("timer {0} must be positive (and heartbeat_min <= heartbeat_max)")]
    Timer(&'static str),
    /// A bound (`max_senders`, `max_receivers`, `max_members`, `retransmit_queue`, `max_message`) is zero.
    #[error("{0} must be at least 1")]
    ZeroBound(&'static str),
}

/// Smallest usable `max_datagram`: room for the largest MEMBER packet (header and a 64-byte name), which is
/// also larger than a HEARTBEAT, a STATUS, a NAK with one range, and a DATA header with a frame and a byte.
pub const MIN_DATAGRAM: usize = MEMBER_HEADER_LEN + MAX_NAME_LEN;

const _: () = assert!(MIN_DATAGRAM > DATA_HEADER_LEN + FRAME_HEADER_LEN);

impl Config {
    /// Largest packet before sealing: `max_datagram`, less [`SEAL_OVERHEAD`] when encryption is on, so
    /// that every sealed datagram still fits `max_datagram`.
    pub fn packet_limit(&self) -> usize {
        if self.encryption.is_some() { self.max_datagram - SEAL_OVERHEAD } else { self.max_datagram }
    }

    /// Checks every value; [`Endpoint::new`](super::Endpoint::new) calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_DATAGRAM..=MAX_UDP_PAYLOAD).contains(&self.max_datagram) {
            return Err(ConfigError::DatagramSize(self.max_datagram));
        }
        if self.encryption.is_some() && self.max_datagram < MIN_DATAGRAM + SEAL_OVERHEAD {
            return Err(ConfigError::SealedDatagramSize(self.max_datagram));
        }
        for (name, value) in [("window", self.window), ("receive_buffer", self.receive_buffer)] {
            if !(2..=1 << 20).contains(&value) {
                return Err(ConfigError::BufferSize { name, value });
            }
        }
        if self.node_name.len() > MAX_NAME_LEN {
            return Err(ConfigError::NameTooLong(self.node_name.len()));
        }
        for (name, d) in [
            ("nak_retry", self.nak_retry),
            ("heartbeat_min", self.heartbeat_min),
            ("status_interval", self.status_interval),
            ("sender_timeout", self.sender_timeout),
            ("receiver_timeout", self.receiver_timeout),
            ("announce_interval", self.announce_interval),
            ("member_timeout", self.member_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Timer(name));
            }
        }
        if self.heartbeat_min > self.heartbeat_max {
            return Err(ConfigError::Timer("heartbeat_max"));
        }
        for (name, v) in [
            ("max_senders", self.max_senders),
            ("max_receivers", self.max_receivers),
            ("max_members", self.max_members),
            ("retransmit_queue", self.retransmit_queue),
            ("max_message", self.max_message),
            ("max_reassembly", self.max_reassembly),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroBound(name));
            }
        }
        Ok(())
    }
}
