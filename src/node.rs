//! The user API: build a [`Node`] on a group, publish with a [`Publisher`], receive with a [`Subscriber`].
//!
//! ```no_run
//! use std::time::Duration;
//! use blip::{Node, Received};
//!
//! let mut node = Node::builder().build()?; // loopback, TTL 0, group 239.255.77.1:47001
//! let mut publisher = node.publisher().unwrap();
//! let mut subscriber = node.subscriber().unwrap();
//! publisher.send(b"hello")?;
//! subscriber.poll(16, |r| {
//!     if let Received::Message(m) = r {
//!         println!("{} bytes from session {:x}", m.payload.len(), m.session);
//!     }
//! });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A node starts one engine thread (unless built with [`NodeBuilder::build_driven`], which runs the engine
//! in the caller's thread through [`Node::duty_cycle`]). Messages and deliveries cross between the
//! application and the engine through bounded lock-free rings; a full ring is back-pressure, never growth.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::counters::{self, CountersError, Identity, Snapshot};
use crate::engine::keys::KeyOp;
use crate::engine::poll::{PollBackend, PollOptions};
use crate::engine::{
    Backend, BackendKind, Command, Direct, Engine, EngineParts, HELD, HandleShared, IdleStrategy, Inlet, LossInjector,
    NodeStats, OUT_HEADER, OUT_LOSS, OUT_MESSAGE, OUT_RUN, Outlet, Shared, Side, TAKEN,
};
use crate::envelope::{self, Envelope, RequestId};
use crate::net::{self, Interface, NetError, SocketConfig, SocketReport};
use crate::proto::{
    Config, ConfigError, Endpoint, Event, LateJoin, Member, PeerStats, RunMessages, SlowReceiverPolicy,
};
use crate::request::Requester;
use crate::ring;
use crate::topic::{self, Filter, FilterError};

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring when the kernel has everything used, else poll. `BLIP_BACKEND=uring|poll` overrides this.
    #[default]
    Auto,
    /// io_uring, or an error if it is unavailable.
    Uring,
    /// The portable poll backend.
    Poll,
}

/// Why a node could not be built or could not go on. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A protocol setting is out of range.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// Socket setup failed.
    #[error("network: {0}")]
    Net(#[from] NetError),
    /// The requested backend cannot run here.
    #[error("backend {kind} unavailable: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        kind: BackendKind,
        /// Why (e.g. seccomp blocks io_uring, `ulimit -l` too low).
        reason: String,
    },
    /// `BLIP_BACKEND` holds something other than `uring`, `poll` or `auto`.
    #[error("BLIP_BACKEND={0} is not one of uring, poll, auto")]
    BadBackendEnv(String),
    /// A core named for pinning does not exist or cannot be used.
    #[error("cannot pin the engine to core {core}: {reason}")]
    Pinning {
        /// The core.
        core: usize,
        /// The OS's answer.
        reason: String,
    },
    /// The engine thread could not be started, or failed.
    #[error("engine: {0}")]
    Engine(String),
    /// A loss-injection probability outside 0..=1.
    #[error("injected loss {0} is not a probability between 0 and 1")]
    BadLoss(f64),
    /// A topic or subscription filter is not valid (see [`topic`](crate::topic)).
    #[error("topic: {0}")]
    Topic(#[from] FilterError),
    /// The node is shut down or its engine failed.
    #[error("node closed")]
    Closed,
    /// The counters socket could not be set up (see [`NodeBuilder::export_counters`]).
    #[error("counters export: {0}")]
    Counters(#[from] CountersError),
    /// [`Node::poll`] and subscribers exclude each other: a call that needs one on a node set up for the
    /// other (see [`NodeBuilder::direct_receive`]).
    #[error("{0}")]
    DirectReceive(&'static str),
    /// The call needs the thread that drives the node: build it with [`NodeBuilder::build_driven`].
    #[error("this call needs a node built with build_driven (it has no engine thread to ask)")]
    NotDriven,
}

/// What a node set up, for the record.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The backend in use.
    pub backend: BackendKind,
    /// Why it was chosen (probe result, override, or request).
    pub backend_reason: String,
    /// This incarnation's session id.
    pub session: u64,
    /// This node's id.
    pub node_id: u64,
    /// The group joined.
    pub group: SocketAddr,
    /// The core the engine thread is pinned to, if pinning was asked for.
    pub pinned_core: Option<usize>,
    /// Sockets as set up (sending address, buffer sizes, warnings).
    pub sockets: SocketReport,
}

/// Builds a [`Node`]. Every default keeps traffic on this host.
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    sockets: SocketConfig,
    protocol: Config,
    mtu: Option<usize>,
    backend: BackendChoice,
    idle: IdleStrategy,
    cores: Vec<usize>,
    loss: Option<(f64, u64)>,
    /// Both rings' size when set; `None`: [`PUBLISHER_RING`] and [`SUBSCRIBER_RING`].
    ring_bytes: Option<usize>,
    session: Option<u64>,
    local_delivery: bool,
    direct_receive: bool,
    local_only: bool,
    /// Filters subscribed from the start.
    subscriptions: Vec<String>,
    /// Where to serve counters; an empty path means the default directory.
    counters_dir: Option<PathBuf>,
}

impl Default for NodeBuilder {
    fn default() -> NodeBuilder {
        NodeBuilder {
            sockets: SocketConfig::default(),
            protocol: Config::default(),
            mtu: None,
            backend: BackendChoice::Auto,
            idle: IdleStrategy::default(),
            cores: Vec::new(),
            loss: None,
            ring_bytes: None,
            session: None,
            local_delivery: false,
            local_only: false,
            subscriptions: Vec::new(),
            direct_receive: false,
            counters_dir: None,
        }
    }
}

impl NodeBuilder {
    /// Multicast group address (default 239.255.77.1).
    pub fn group(mut self, group: IpAddr) -> Self {
        self.sockets.group.set_ip(group);
        self
    }
    /// UDP port (default 47001).
    pub fn port(mut self, port: u16) -> Self {
        self.sockets.group.set_port(port);
        self
    }
    /// Interface to join and send on (default loopback).
    pub fn interface(mut self, interface: Interface) -> Self {
        self.sockets.interface = interface;
        self
    }
    /// Multicast TTL / hop limit (default 0: the packets stay on this host).
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.sockets.ttl = ttl;
        self
    }
    /// Allow other sockets on this host to share the group and port (default on).
    pub fn reuse(mut self, reuse: bool) -> Self {
        self.sockets.reuse = reuse;
        self
    }
    /// Receive buffer to ask the kernel for, in bytes (default 4 MiB; clamped by `net.core.rmem_max`).
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.sockets.recv_buffer = bytes;
        self
    }
    /// Stream id inside the group (default 0).
    pub fn stream(mut self, stream: u32) -> Self {
        self.protocol.stream = stream;
        self
    }
    /// This node's stable id (default: random).
    pub fn node_id(mut self, id: u64) -> Self {
        self.protocol.node_id = id;
        self
    }
    /// How often this node announces itself, and how long a silent peer is kept before it is reported
    /// expired (defaults in docs/PROTOCOL.md section 8).
    pub fn membership(mut self, announce_interval: Duration, member_timeout: Duration) -> Self {
        self.protocol.announce_interval = announce_interval;
        self.protocol.member_timeout = member_timeout;
        self
    }

    /// This node's name, announced to the group (at most 64 bytes).
    pub fn name(mut self, name: &str) -> Self {
        self.protocol.node_name = name.to_owned();
        self
    }
    /// Path MTU in bytes (default 1500); datagrams are sized to fit it after IP and UDP headers.
    pub fn mtu(mut self, mtu: usize) -> Self {
        self.mtu = Some(mtu);
        self
    }
    /// Retransmission window and receive buffer, in datagrams (default 4096).
    pub fn window(mut self, datagrams: usize) -> Self {
        self.protocol.window = datagrams;
        self.protocol.receive_buffer = datagrams;
        self
    }
    /// Largest message (default 64 MiB).
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.protocol.max_message = bytes;
        self
    }
    /// Slow-receiver policy (default: hold the sender back).
    pub fn slow_receiver(mut self, policy: SlowReceiverPolicy) -> Self {
        self.protocol.slow_receiver = policy;
        self
    }
    /// Late-join policy (default: from the oldest retained datagram).
    pub fn late_join(mut self, policy: LateJoin) -> Self {
        self.protocol.late_join = policy;
        self
    }
    /// Which sources this node hears (default: all). Denied datagrams are dropped before parsing and
    /// counted (`Stats::denied`).
    pub fn access(mut self, list: crate::proto::AccessList) -> Self {
        self.protocol.access = list;
        self
    }
    /// Seals every packet with authenticated encryption under these pre-shared keys (default: off). Every
    /// node of the group needs the same keys; packets that are not sealed under one of them are dropped and
    /// counted. Rotate keys at run time with [`Node::add_key`], [`Node::use_key`] and [`Node::remove_key`].
    pub fn encryption(mut self, keys: crate::proto::Keyring) -> Self {
        self.protocol.encryption = Some(keys);
        self
    }
    /// Replaces the whole protocol configuration (sizes, timers, policies).
    pub fn protocol(mut self, config: Config) -> Self {
        self.protocol = config;
        self
    }
    /// Backend choice (default: probe).
    pub fn backend(mut self, choice: BackendChoice) -> Self {
        self.backend = choice;
        self
    }
    /// How the engine waits when idle (default: spin 50 µs, then park).
    pub fn idle(mut self, idle: IdleStrategy) -> Self {
        self.idle = idle;
        self
    }
    /// Pin the engine thread to the first of these cores.
    pub fn cores(mut self, cores: &[usize]) -> Self {
        self.cores = cores.to_vec();
        self
    }
    /// Drop this fraction of received datagrams on purpose (seeded), to exercise repair on real sockets.
    pub fn inject_loss(mut self, probability: f64, seed: u64) -> Self {
        self.loss = Some((probability, seed));
        self
    }
    /// Size of each ring between the application and the engine: from every publisher and to every
    /// subscriber (default 256 KiB from a publisher, 4 MiB to a subscriber). Messages up to half a ring
    /// travel in it, larger ones through a side channel (one allocation each).
    pub fn ring_bytes(mut self, bytes: usize) -> Self {
        self.ring_bytes = Some(bytes);
        self
    }
    /// Fixes the session id (default: random). Tests use it for reproducibility.
    pub fn session(mut self, session: u64) -> Self {
        self.session = Some(session);
        self
    }

    /// Also deliver this node's own messages to its own subscribers whose filters select them (default
    /// off). They arrive with this node's session, in the order they were published.
    pub fn local_delivery(mut self, on: bool) -> Self {
        self.local_delivery = on;
        self
    }

    /// For [`build_driven`](Self::build_driven): the thread that drives the node takes every delivery itself
    /// with [`Node::poll`], straight from the protocol's buffers, with no subscriber ring. Such a node has no
    /// subscribers: [`Node::subscriber`] returns `None`; [`Node::subscribe`], [`Node::requester`], builder
    /// subscriptions and [`local_delivery`](Self::local_delivery) are refused with
    /// [`Error::DirectReceive`], and so is [`build`](Self::build).
    pub fn direct_receive(mut self) -> Self {
        self.direct_receive = true;
        self
    }

    /// Subscribes to `filter` from the node's start, before it announces itself to the group, so that no
    /// message on those topics can arrive before the subscription exists (a request to every member, for
    /// example). Take the subscriber with [`Node::subscribe`] and the same filter. A filter that is not
    /// valid makes `build` fail.
    pub fn subscribe(mut self, filter: &str) -> Self {
        self.subscriptions.push(filter.to_owned());
        self
    }

    /// An in-process bus: no sockets and no network at all. Publishers and subscribers of this node use the
    /// same API as on a networked node and see each other's messages (local delivery is on).
    pub fn local_only(mut self) -> Self {
        self.local_only = true;
        self.local_delivery = true;
        self
    }

    /// Serves this node's live counters on a Unix socket `<dir>/<pid>-<node id>.sock`, for `blip-stat` and
    /// [`counters::read`] (see the [`counters`] module and `docs/COUNTERS.md`). The directory is created
    /// with mode 0700 if needed. Costs one thread that blocks in `accept`; the socket is removed when the
    /// node shuts down. Without this call, the environment variable `BLIP_COUNTERS_DIR` turns the export on
    /// (empty: the default directory).
    pub fn export_counters(mut self, dir: impl Into<PathBuf>) -> Self {
        self.counters_dir = Some(dir.into());
        self
    }
    /// Like [`export_counters`](Self::export_counters), in [`counters::default_dir`]:
    /// `$XDG_RUNTIME_DIR/blip`, else `/tmp/blip-<uid>`.
    pub fn export_counters_default(mut self) -> Self {
        self.counters_dir = Some(PathBuf::new());
        self
    }

    fn counters_dir(&self) -> Option<PathBuf> {
        let dir = match &self.counters_dir {
            Some(d) => d.clone(),
            None => PathBuf::from(std::env::var_os(counters::ENV_DIR)?),
        };
        Some(if dir.as_os_str().is_empty() { counters::default_dir() } else { dir })
    }

    /// Starts the counters server of a node just assembled (dropping the node on failure stops it).
    fn finish(&self, mut node: Node) -> Result<Node, Error> {
        if let Some(dir) = self.counters_dir() {
            node.counters = Some(counters::Server::start(&dir, node.identity.clone(), node.factory.shared.clone())?);
        }
        Ok(node)
    }

    fn prepare(&self) -> Result<(Config, BackendKind, String, u64), Error> {
        let mut protocol = self.protocol.clone();
        let ip_overhead = if self.sockets.group.is_ipv4() { 28 } else { 48 };
        if let Some(mtu) = self.mtu {
            protocol.max_datagram = mtu.saturating_sub(ip_overhead);
        } else if !self.sockets.group.is_ipv4() {
            protocol.max_datagram = 1500 - ip_overhead;
        }
        if protocol.node_id == 0 {
            protocol.node_id = random_u64();
        }
        protocol.validate()?;
        if let Some((p, _)) = self.loss
            && !(0.0..=1.0).contains(&p)
        {
            return Err(Error::BadLoss(p));
        }
        let (kind, reason) = if self.local_only {
            (BackendKind::Local, "in-process node (NodeBuilder::local_only)".to_owned())
        } else {
            choose_backend(self.backend)?
        };
        let session = self.session.unwrap_or_else(random_u64);
        Ok((protocol, kind, reason, session))
    }

    /// Opens the sockets, chooses the backend and starts the engine thread.
    pub fn build(self) -> Result<Node, Error> {
        if self.direct_receive {
            return Err(Error::DirectReceive("Node::poll runs on the thread that drives the node: use build_driven"));
        }
        if self.local_only {
            return self.build_local();
        }
        let (mut protocol, kind, reason, session) = self.prepare()?;
        let sockets = net::open(&self.sockets)?;
        ignore_own_packets(&sockets, session);
        let report = sockets.report.clone();
        fit_receive_buffer(&mut protocol, &report);
        let (mut parts, handles) = self.channels(protocol.clone(), session)?;
        parts.backend_reason = reason.clone();
        let shared = parts.shared.clone();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
        let idle = self.idle;
        let core = self.cores.first().copied();
        let max_datagram = protocol.max_datagram;
        let thread = std::thread::Builder::new()
            .name("blip-engine".into())
            .spawn(move || {
                if let Some(core) = core
                    && let Err(e) = pin_current_thread(core)
                {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                // The backend is created on the thread that uses it (io_uring SINGLE_ISSUER).
                match open_backend(kind, sockets.group, sockets.unicast, max_datagram) {
                    Ok(backend) => {
                        let engine = Engine::new(backend, parts);
                        let _ = ready_tx.send(Ok(()));
                        run_engine(engine, idle, &shared);
                    }
                    Err(e) => {
                        shared.closed.store(true, Ordering::SeqCst);
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::Engine(format!("cannot spawn the engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Engine("engine thread exited during setup".into()));
            }
        }
        log::info!("blip: node {session:016x} on {} with backend {kind} ({reason})", self.sockets.group);
        let info = NodeInfo {
            backend: kind,
            backend_reason: reason,
            session,
            node_id: protocol.node_id,
            group: self.sockets.group,
            pinned_core: core,
            sockets: report,
        };
        let identity = identity(&info, &protocol);
        self.finish(Node::assemble(info, identity, handles, Some(thread), None))
    }

    fn build_local(self) -> Result<Node, Error> {
        let (protocol, kind, reason, session) = self.prepare()?;
        let (mut parts, handles) = self.channels(protocol.clone(), session)?;
        parts.backend_reason = reason.clone();
        let idle = self.idle;
        let shared = parts.shared.clone();
        let thread = std::thread::Builder::new()
            .name("blip-engine".into())
            .spawn(move || {
                let engine = Engine::new(Box::new(crate::engine::local::LocalBackend::new()), parts);
                run_engine(engine, idle, &shared);
            })
            .map_err(|e| Error::Engine(format!("cannot spawn the engine thread: {e}")))?;
        let unspecified = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0);
        let report = SocketReport {
            local: unspecified,
            interface_index: 0,
            recv_buffer: 0,
            send_buffer: 0,
            warnings: vec!["in-process node: no sockets".into()],
        };
        let info = NodeInfo {
            backend: kind,
            backend_reason: reason,
            session,
            node_id: protocol.node_id,
            group: unspecified,
            pinned_core: None,
            sockets: report,
        };
        let identity = identity(&info, &protocol);
        self.finish(Node::assemble(info, identity, handles, Some(thread), None))
    }

    /// Like [`build`](Self::build), but spawns no thread: the caller drives the engine with
    /// [`Node::duty_cycle`] from the thread that called this. Pinning is the caller's business.
    pub fn build_driven(self) -> Result<Node, Error> {
        if self.direct_receive && (self.local_delivery || !self.subscriptions.is_empty() || self.local_only) {
            return Err(Error::DirectReceive(
                "a node that reads with Node::poll has no subscribers: no builder subscriptions, local delivery \
                 or local-only node",
            ));
        }
        let (mut protocol, kind, reason, session) = self.prepare()?;
        let sockets = net::open(&self.sockets)?;
        ignore_own_packets(&sockets, session);
        let report = sockets.report.clone();
        fit_receive_buffer(&mut protocol, &report);
        let (mut parts, handles) = self.channels(protocol.clone(), session)?;
        parts.backend_reason = reason.clone();
        let backend = open_backend(kind, sockets.group, sockets.unicast, protocol.max_datagram)?;
        let engine = Engine::new(backend, parts);
        let info = NodeInfo {
            backend: kind,
            backend_reason: reason,
            session,
            node_id: protocol.node_id,
            group: self.sockets.group,
            pinned_core: None,
            sockets: report,
        };
        let identity = identity(&info, &protocol);
        let mut node = Node::assemble(info, identity, handles, None, Some(engine));
        if self.direct_receive {
            node.subscriber = None;
            node.direct_receive = true;
        }
        self.finish(node)
    }

    fn channels(&self, protocol: Config, session: u64) -> Result<(EngineParts, Handles), Error> {
        let endpoint = Endpoint::new(protocol.clone(), session, random_u64(), Instant::now())?;
        let shared = Arc::new(Shared::new());
        let (commands_tx, commands_rx) = mpsc::channel();
        let factory = HandleFactory {
            shared: shared.clone(),
            commands: commands_tx,
            publisher_ring: self.ring_bytes.unwrap_or(PUBLISHER_RING),
            subscriber_ring: self.ring_bytes.unwrap_or(SUBSCRIBER_RING),
            max_message: protocol.max_message,
            node_id: protocol.node_id,
            next_private: 0,
        };
        let (publisher, inlet) = factory.publisher_pair();
        let (subscriber, outlet) = factory.subscriber_pair(None);
        subscriber.handle.custody.store(HELD, Ordering::SeqCst);
        let mut preset = Vec::new();
        let mut preset_outlets = Vec::new();
        for f in &self.subscriptions {
            let filter = parse_filter(f, protocol.node_id)?;
            let (sub, outlet) = factory.subscriber_pair(Some(filter));
            sub.handle.custody.store(HELD, Ordering::SeqCst);
            preset.push((f.clone(), sub));
            preset_outlets.push(outlet);
        }
        shared.keys.init(protocol.encryption.clone());
        let parts = EngineParts {
            endpoint,
            inlet,
            outlet,
            preset: preset_outlets,
            commands: commands_rx,
            local_delivery: self.local_delivery,
            direct_reader: self.direct_receive,
            shared,
            group: self.sockets.group,
            loss: self.loss.map(|(p, seed)| LossInjector::new(p, seed)),
            backend_reason: String::new(),
        };
        Ok((parts, Handles { publisher, subscriber, preset, factory }))
    }
}

fn identity(info: &NodeInfo, protocol: &Config) -> Identity {
    Identity {
        node_id: info.node_id,
        session: info.session,
        name: protocol.node_name.clone(),
        backend: info.backend.to_string(),
        group: info.group,
        stream: protocol.stream,
        started: Instant::now(),
    }
}

struct Handles {
    publisher: Publisher,
    subscriber: Subscriber,
    preset: Vec<(String, Subscriber)>,
    factory: HandleFactory,
}

/// Parses a subscription filter and refuses another node's private topics.
fn parse_filter(filter: &str, node_id: u64) -> Result<Filter, Error> {
    let filter = Filter::new(filter)?;
    if filter.names_foreign_private(node_id) {
        return Err(FilterError::Private(filter.as_str().to_owned()).into());
    }
    Ok(filter)
}

/// Frame flags of a whole message (not a fragment) in a publisher's ring.
const WHOLE_MESSAGE: u8 = crate::wire::FRAME_FIRST | crate::wire::FRAME_LAST;

/// Default size of a publisher's ring. Small enough to stay in a core's L2 cache while a burst goes through
/// it: with 4 MiB, a publisher that fills its ring before the engine drains it (what a driven node does)
/// wrote every message to memory the engine then read back from beyond the cache. A publisher runs at
/// most this far ahead of its engine; that costs nothing, since the engine takes messages only as fast
/// as the window opens anyway.
const PUBLISHER_RING: usize = 256 << 10;

/// Default size of a subscriber's ring: deliveries wait there for the application, so it is what a
/// subscriber that is not polled for a while can hold before it holds back the group.
const SUBSCRIBER_RING: usize = 4 << 20;

/// Makes publisher and subscriber handles with their engine ends, and hands new ones to a running engine.
struct HandleFactory {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    publisher_ring: usize,
    subscriber_ring: usize,
    max_message: usize,
    node_id: u64,
    /// Numbers the private reply topics of requesters.
    next_private: u64,
}

impl HandleFactory {
    fn publisher_pair(&self) -> (Publisher, Inlet) {
        let (tx, rx) = ring::frames::frame_ring(self.publisher_ring);
        let (large_tx, large_rx) = mpsc::channel();
        let handle = Arc::new(HandleShared::default());
        let publisher = Publisher {
            direct_max: tx.max_payload().min(self.max_message),
            ring: tx,
            large: large_tx,
            shared: self.shared.clone(),
            handle: handle.clone(),
            max_message: self.max_message,
            node_id: self.node_id,
        };
        (publisher, Inlet { ring: rx, side: large_rx, pending: None, shared: handle })
    }

    fn subscriber_pair(&self, filter: Option<Filter>) -> (Subscriber, Outlet) {
        let (tx, rx) = ring::ring(self.subscriber_ring);
        let (side_tx, side_rx) = mpsc::channel();
        let handle = Arc::new(HandleShared::default());
        let subscriber =
            Subscriber { ring: rx, run_at: (0, 0), side: side_rx, shared: self.shared.clone(), handle: handle.clone() };
        (subscriber, Outlet { ring: tx, side: side_tx, filter, shared: handle })
    }

    /// Sends a command to the engine and wakes it; false if the engine is gone.
    fn send(&self, cmd: Command) -> bool {
        if self.commands.send(cmd).is_err() {
            return false;
        }
        self.shared.command_pending.store(true, Ordering::SeqCst);
        self.shared.wake_engine();
        true
    }

    /// Sends a command to the engine; with `wait`, returns once the engine has taken the handle in.
    fn attach(&self, cmd: Command, handle: &HandleShared, wait: bool) -> Result<(), Error> {
        if self.shared.closed.load(Ordering::SeqCst) || !self.send(cmd) {
            return Err(Error::Closed);
        }
        if wait {
            let deadline = Instant::now() + Duration::from_secs(5);
            let closed = &self.shared.closed;
            let attached = handle
                .waiter
                .wait_until(deadline, || handle.attached.load(Ordering::SeqCst) || closed.load(Ordering::SeqCst));
            if !attached || !handle.attached.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
        }
        Ok(())
    }
}

/// Datagrams the kernel's receive buffer holds. The kernel charges each datagram its buffer's "truesize":
/// the payload rounded up to an allocation size plus about 768 bytes of bookkeeping (KERNEL-NOTES: 832 B for
/// a 64-byte datagram, 2,304 B for 1,200 bytes), against the buffer size as read back (on Linux twice the
/// grant).
fn socket_capacity(charged: usize, max_datagram: usize) -> usize {
    let truesize = (max_datagram + 320).next_power_of_two() + 768;
    charged / truesize
}

/// The receive buffer a receiver advertises (its flow-control credit) is at most what its socket holds, so a
/// sender never overruns the kernel's queue faster than the engine drains it.
fn fit_receive_buffer(protocol: &mut Config, sockets: &SocketReport) {
    let fits = socket_capacity(sockets.recv_buffer, protocol.max_datagram).max(2);
    if fits < protocol.receive_buffer {
        log::debug!("blip: receive_buffer {} lowered to {fits}, what the socket holds", protocol.receive_buffer);
        protocol.receive_buffer = fits;
    }
}

/// Runs an engine on the current thread until shutdown. A panic closes the node with an error instead of
/// leaving the application waiting on an engine that is gone (handles notice within a millisecond: their
/// waits are bounded).
fn run_engine(engine: Engine, idle: IdleStrategy, shared: &Shared) {
    let run = std::panic::AssertUnwindSafe(|| engine.run(idle));
    if std::panic::catch_unwind(run).is_err() {
        *shared.error.lock().unwrap_or_else(|e| e.into_inner()) = Some("engine panicked".into());
        shared.closed.store(true, Ordering::SeqCst);
    }
}

/// Has the kernel drop this node's own multicast packets looped back to its group socket, so they are
/// never copied out (the protocol would only drop them). Not fatal if the filter cannot be attached.
fn ignore_own_packets(sockets: &net::NodeSockets, session: u64) {
    if let Err(e) = net::drop_own_packets(&sockets.group, session) {
        log::debug!("blip: own-packet socket filter not attached ({e}); the protocol drops them instead");
    }
}

fn random_u64() -> u64 {
    // RandomState is seeded from the OS's randomness once per process and varied per instance.
    let mut h = RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

fn choose_backend(choice: BackendChoice) -> Result<(BackendKind, String), Error> {
    let env = std::env::var("BLIP_BACKEND").ok();
    let choice = match (choice, env.as_deref()) {
        (BackendChoice::Auto, Some("uring")) => (BackendChoice::Uring, "BLIP_BACKEND=uring"),
        (BackendChoice::Auto, Some("poll")) => (BackendChoice::Poll, "BLIP_BACKEND=poll"),
        (BackendChoice::Auto, Some("auto") | Some("") | None) => (BackendChoice::Auto, ""),
        (BackendChoice::Auto, Some(other)) => return Err(Error::BadBackendEnv(other.to_owned())),
        (c, _) => (c, "requested by the application"),
    };
    match choice {
        (BackendChoice::Poll, why) => Ok((BackendKind::Poll, why.to_owned())),
        (BackendChoice::Uring, why) => match uring_probe() {
            Ok(flags) => Ok((BackendKind::Uring, format!("{why}; {flags}"))),
            Err(reason) => Err(Error::BackendUnavailable { kind: BackendKind::Uring, reason }),
        },
        (BackendChoice::Auto, _) => match uring_probe() {
            Ok(flags) => Ok((BackendKind::Uring, format!("probe: io_uring available ({flags})"))),
            Err(reason) => Ok((BackendKind::Poll, format!("probe: io_uring unavailable ({reason}); using poll"))),
        },
    }
}

#[cfg(target_os = "linux")]
fn uring_probe() -> Result<String, String> {
    crate::engine::uring::probe().map(|p| p.to_string())
}

#[cfg(not(target_os = "linux"))]
fn uring_probe() -> Result<String, String> {
    Err("io_uring is Linux-only".into())
}

fn open_backend(
    kind: BackendKind,
    group: std::net::UdpSocket,
    unicast: std::net::UdpSocket,
    max_datagram: usize,
) -> Result<Box<dyn Backend>, Error> {
    match kind {
        // UDP GSO on send and GRO on receive wherever the kernel has them (each backend probes and falls back).
        BackendKind::Poll => {
            PollBackend::with_options(group, unicast, max_datagram, PollOptions { gso: true, gro: true })
                .map(|b| Box::new(b) as Box<dyn Backend>)
                .map_err(|e| Error::Engine(format!("poll backend: {e}")))
        }
        #[cfg(target_os = "linux")]
        BackendKind::Uring => {
            use crate::engine::uring::{RECV_OVERHEAD, UringOptions};
            // Each receive buffer holds one datagram after the kernel's header and source address.
            let buffer_size = (max_datagram + RECV_OVERHEAD).next_multiple_of(64).max(2048);
            let opts = UringOptions { buffer_size, gso: true, gro: true, ..UringOptions::default() };
            crate::engine::uring::UringBackend::new(group, unicast, opts)
                .map(|b| Box::new(b) as Box<dyn Backend>)
                .map_err(|e| Error::BackendUnavailable { kind, reason: e.to_string() })
        }
        #[cfg(not(target_os = "linux"))]
        BackendKind::Uring => Err(Error::BackendUnavailable { kind, reason: "io_uring is Linux-only".into() }),
        BackendKind::Local => Ok(Box::new(crate::engine::local::LocalBackend::new())),
    }
}

#[cfg(target_os = "linux")]
fn pin_current_thread(core: usize) -> Result<(), Error> {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    set.set(core).map_err(|e| Error::Pinning { core, reason: e.to_string() })?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| Error::Pinning { core, reason: e.to_string() })
}

#[cfg(not(target_os = "linux"))]
fn pin_current_thread(core: usize) -> Result<(), Error> {
    Err(Error::Pinning { core, reason: "pinning is only implemented on Linux".into() })
}

/// A member of a multicast group: one engine, any number of publishers and subscribers.
pub struct Node {
    info: NodeInfo,
    publisher: Option<Publisher>,
    subscriber: Option<Subscriber>,
    /// Subscribers made by `NodeBuilder::subscribe`, not yet taken.
    preset: Vec<(String, Subscriber)>,
    /// Makes handles; holds the state shared with the engine (`factory.shared`).
    factory: HandleFactory,
    thread: Option<JoinHandle<()>>,
    engine: Option<Engine>,
    identity: Identity,
    counters: Option<counters::Server>,
    /// Built with `NodeBuilder::direct_receive`: deliveries go to `Node::poll`, and there are no subscribers.
    direct_receive: bool,
}

impl Node {
    /// A builder with defaults that keep traffic on this host.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    fn assemble(
        info: NodeInfo,
        identity: Identity,
        h: Handles,
        thread: Option<JoinHandle<()>>,
        engine: Option<Engine>,
    ) -> Node {
        Node {
            info,
            publisher: Some(h.publisher),
            subscriber: Some(h.subscriber),
            preset: h.preset,
            factory: h.factory,
            thread,
            engine,
            identity,
            counters: None,
            direct_receive: false,
        }
    }

    /// What was set up: backend and why, session, sockets, pinning.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// A publisher. The first call takes the one made with the node; later calls add publishers (each with
    /// its own ring; messages keep their order per publisher). `None` once the node is closed. A publisher
    /// may move to another thread.
    pub fn publisher(&mut self) -> Option<Publisher> {
        if let Some(p) = self.publisher.take() {
            return Some(p);
        }
        let (publisher, inlet) = self.factory.publisher_pair();
        let handle = publisher.handle.clone();
        self.factory.attach(Command::AddInlet(inlet), &handle, false).ok()?;
        Some(publisher)
    }

    /// Takes the node's catch-all subscriber (once): every message (topic or not) except other nodes'
    /// private topics, every loss and every event, from the node's start. It may move to another thread.
    /// Poll it, or drop it to receive nothing: a subscriber that is kept but never polled fills its ring, and
    /// then this node, like any slow receiver, holds senders back (under the default policy).
    ///
    /// Until it is taken, nobody can poll it, so it never holds senders back: if its ring fills first (a node
    /// that only publishes), the engine stops delivering to it and this returns `None`.
    pub fn subscriber(&mut self) -> Option<Subscriber> {
        let subscriber = self.subscriber.take()?;
        let custody = &subscriber.handle.custody;
        custody.compare_exchange(HELD, TAKEN, Ordering::SeqCst, Ordering::SeqCst).ok().map(|_| subscriber)
    }

    /// A subscriber for the topics `filter` selects (see [`topic`](crate::topic) for the rules); filtering
    /// happens in the engine. It also receives every loss and event. If the builder subscribed to the same
    /// filter ([`NodeBuilder::subscribe`]), that subscriber is returned, holding everything since the
    /// node's start. Otherwise a new one receives the messages that arrive after this returns (on a node
    /// built with `build_driven`: after the next duty cycle).
    pub fn subscribe(&mut self, filter: &str) -> Result<Subscriber, Error> {
        if self.direct_receive {
            return Err(Error::DirectReceive("this node's deliveries go to Node::poll (NodeBuilder::direct_receive)"));
        }
        if let Some(i) = self.preset.iter().position(|(f, _)| f == filter) {
            let (_, sub) = self.preset.swap_remove(i);
            // A preset nobody took while its ring filled was given up: make a fresh one instead.
            if sub.handle.custody.compare_exchange(HELD, TAKEN, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return Ok(sub);
            }
        }
        let filter = parse_filter(filter, self.info.node_id)?;
        let (subscriber, outlet) = self.factory.subscriber_pair(Some(filter));
        let handle = subscriber.handle.clone();
        self.factory.attach(Command::AddOutlet(outlet), &handle, self.engine.is_none())?;
        Ok(subscriber)
    }

    /// A scatter-gather and request/reply helper with its own publisher and a private reply topic.
    pub fn requester(&mut self) -> Result<Requester, Error> {
        let k = self.factory.next_private;
        self.factory.next_private += 1;
        let reply_topic = topic::private_topic(self.info.node_id, &format!("reply.{k}"))?;
        let replies = self.subscribe(&reply_topic)?;
        let publisher = self.publisher().ok_or(Error::Closed)?;
        Ok(Requester::new(publisher, replies, reply_topic, self.factory.shared.clone(), self.info.node_id))
    }

    /// The nodes currently alive on the group (not this one), as last announced. Refreshed by the engine
    /// whenever membership changes; joins, leaves, expiries and restarts also arrive as events.
    pub fn peers(&self) -> Vec<Member> {
        self.factory.shared.members.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A snapshot of the counters (refreshed by the engine every 50 ms and whenever it goes idle).
    pub fn stats(&self) -> NodeStats {
        self.factory.shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Per-peer counters (refreshed by the engine every 50 ms): one row per sender this node follows and
    /// one per receiver of its stream.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.factory.shared.peers.lock().unwrap_or_else(|e| e.into_inner()).peers.clone()
    }

    /// Everything the counters socket serves, taken in this process: identity, node and per-peer counters.
    pub fn counters(&self) -> Snapshot {
        self.identity.snapshot(&self.factory.shared)
    }

    /// The counters socket, if [`NodeBuilder::export_counters`] (or `BLIP_COUNTERS_DIR`) turned it on.
    pub fn counters_path(&self) -> Option<&Path> {
        self.counters.as_ref().and_then(|c| c.path())
    }

    /// For a node built with [`NodeBuilder::build_driven`]: does one pass of engine work and, if there was
    /// none, waits at most `wait` for some. Returns the amount of work done. A threaded node returns 0.
    ///
    /// A pass transmits first and then receives: what a received datagram calls for (an acknowledgement, a
    /// repair, a NAK) leaves in the next pass, so call again at once while this returns more than 0.
    pub fn duty_cycle(&mut self, wait: Option<Duration>) -> Result<usize, Error> {
        match self.engine.as_mut() {
            Some(e) => e.duty_cycle(wait).map_err(|e| Error::Engine(e.to_string())),
            None => Ok(0),
        }
    }

    /// On a node built with [`NodeBuilder::build_driven`], sends a message without topic from the thread that
    /// drives it, straight into the retransmission window: no ring between, one copy fewer than a
    /// [`Publisher`], no wake. Messages fill the datagram being built and leave at the next
    /// [`duty_cycle`](Self::duty_cycle): run one after each burst (every few hundred kilobytes at most, and
    /// at once when latency matters). Their order is kept among the node's direct sends; with respect to
    /// publishers' messages they are like another publisher's. With [`NodeBuilder::local_delivery`], this
    /// node's own subscribers can poll them at once; one waiting in another thread is woken by the next
    /// duty cycle.
    ///
    /// [`SendError::Full`]: the window is full, or a message larger than a datagram is still being cut into
    /// fragments (run a duty cycle, which transmits and takes acknowledgements in, and try again); with
    /// [`NodeBuilder::local_delivery`], also when this node's own subscribers' rings are full (poll them).
    /// A threaded node refuses with [`SendError::NotDriven`]. Errors of the engine itself come from
    /// `duty_cycle`.
    #[inline(always)]
    pub fn try_send(&mut self, msg: &[u8]) -> Result<(), SendError> {
        let Some(engine) = self.engine.as_mut() else { return Err(SendError::NotDriven) };
        engine.send_direct(&[0u8; envelope::MIN_ENVELOPE_LEN], msg).map_err(|e| match e {
            crate::proto::SendError::WouldBlock => SendError::Full,
            crate::proto::SendError::TooLarge { size, max } => SendError::TooLarge { size, max },
        })
    }

    /// On a node built with [`NodeBuilder::direct_receive`] and [`NodeBuilder::build_driven`], hands what a
    /// catch-all [`Subscriber`] would receive to `handler`, from the thread that drives the node, straight
    /// from the protocol's buffers: no ring between, no copy. The receiving twin of
    /// [`try_send`](Self::try_send): call it after each [`duty_cycle`](Self::duty_cycle). Returns the
    /// messages and losses handed: about `max` at most (a datagram's messages are handed together; 0 hands
    /// nothing), and every pending event besides.
    ///
    /// Deliveries wait in the protocol for this call and count against the node's receive buffer: a reader
    /// that falls behind holds the senders back, as a full subscriber ring does (under the default
    /// [`SlowReceiverPolicy`]). The backend's choice is in [`info`](Self::info), not handed here. Refused
    /// with [`Error::NotDriven`] on a threaded node and [`Error::DirectReceive`] on a node without
    /// `direct_receive`.
    pub fn poll(&mut self, max: usize, mut handler: impl FnMut(Received<'_>)) -> Result<usize, Error> {
        let Some(engine) = self.engine.as_mut() else { return Err(Error::NotDriven) };
        if !self.direct_receive {
            return Err(Error::DirectReceive(
                "build the node with NodeBuilder::direct_receive to read with Node::poll",
            ));
        }
        Ok(engine.take_direct(max, &mut |d| match d {
            Direct::Message { session, seq, msg } => {
                if let Some(m) = Message::parse(session, seq, msg) {
                    handler(Received::Message(m));
                }
            }
            Direct::Loss { session, datagrams, messages } => handler(Received::Loss { session, datagrams, messages }),
            Direct::Event(e) => handler(Received::Event(e)),
        }))
    }

    /// Adds a key to the node's keyring: packets sealed under it are accepted from the engine's next pass on.
    /// Rotation, done on every node: add the new key, then [`use_key`](Self::use_key) it once every node
    /// has it, then [`remove_key`](Self::remove_key) the old one once every node sends under the new one.
    pub fn add_key(&self, key_id: u8, secret: [u8; crate::proto::KEY_LEN]) -> Result<(), crate::proto::KeyError> {
        self.key_op(KeyOp::Add(key_id, secret))
    }

    /// Seals this node's packets under the held key `key_id` from the engine's next pass on.
    pub fn use_key(&self, key_id: u8) -> Result<(), crate::proto::KeyError> {
        self.key_op(KeyOp::Use(key_id))
    }

    /// Removes a key that is not the sending key: packets sealed under it are dropped from then on.
    pub fn remove_key(&self, key_id: u8) -> Result<(), crate::proto::KeyError> {
        self.key_op(KeyOp::Remove(key_id))
    }

    fn key_op(&self, op: KeyOp) -> Result<(), crate::proto::KeyError> {
        // A closed engine takes no more commands; the copy still says what would have been refused.
        self.factory.shared.keys.request(op, |op| {
            self.factory.send(Command::Key(op));
        })
    }

    /// Whether the engine has stopped (shut down or failed; see [`error`](Self::error)).
    pub fn is_closed(&self) -> bool {
        self.factory.shared.closed.load(Ordering::SeqCst)
    }

    /// The error that stopped the engine, if one did.
    pub fn error(&self) -> Option<String> {
        self.factory.shared.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Announces departure, stops the engine, joins its thread and closes the sockets.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // The socket goes first, so that a listed socket always belongs to a running node.
        self.counters = None;
        self.factory.shared.shutdown.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Wake it until it has seen the flag; the wait is bounded by its own timers otherwise.
            self.factory.shared.wake_engine();
            let _ = t.join();
        }
        if let Some(mut e) = self.engine.take() {
            e.close();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a message was not taken. New causes may be added: match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No room now: a publisher's ring to the engine is full, or for [`Node::try_send`] the sender's window;
    /// the engine or the network is behind (back-pressure).
    #[error("no room: the publisher's ring or the sender's window is full")]
    Full,
    /// The message exceeds the configured maximum message size.
    #[error("message of {size} bytes exceeds the maximum of {max} bytes (NodeBuilder::max_message)")]
    TooLarge {
        /// Size of the message.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// The node is shut down or its engine failed.
    #[error("node closed")]
    Closed,
    /// `send_timeout` gave up.
    #[error("timed out waiting for room")]
    Timeout,
    /// The topic is not a valid topic name (see [`topic::validate_topic`]).
    #[error("invalid topic name (see blip::topic for the rules)")]
    BadTopic,
    /// A reply was asked for to a message that is not a request.
    #[error("not a request")]
    NotARequest,
    /// [`Node::try_send`] on a node whose engine runs on its own thread: use a [`Publisher`].
    #[error("direct sends need a node built with build_driven; use a Publisher")]
    NotDriven,
}

/// Hands messages to the engine. A node may have several; each may move to another thread.
pub struct Publisher {
    ring: ring::frames::FrameProducer,
    large: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    handle: Arc<HandleShared>,
    max_message: usize,
    /// Largest envelope and message `try_send` writes straight into the ring (the ring's frame limit and
    /// `max_message`, whichever is smaller).
    direct_max: usize,
    node_id: u64,
}

impl Publisher {
    /// Queues a message without topic, without blocking.
    #[inline(always)]
    pub fn try_send(&mut self, msg: &[u8]) -> Result<(), SendError> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(SendError::Closed);
        }
        if envelope::MIN_ENVELOPE_LEN + msg.len() > self.direct_max {
            return self.try_send_with(&Envelope::PLAIN, msg);
        }
        // The common case, without the general envelope code: two zero bytes, then the message, written
        // straight into the ring as a wire frame (no staging buffer on the stack to clear and copy through).
        let Some(published) = self.ring.push_parts(WHOLE_MESSAGE, &[0u8; envelope::MIN_ENVELOPE_LEN], msg) else {
            return Err(SendError::Full);
        };
        self.shared.wake_engine_fenced(published);
        Ok(())
    }

    /// Queues a message without topic, waiting while the ring is full (back-pressure).
    pub fn send(&mut self, msg: &[u8]) -> Result<(), SendError> {
        match self.try_send(msg) {
            Err(SendError::Full) => self.send_with(&Envelope::PLAIN, msg),
            other => other,
        }
    }

    /// Queues a message without topic, waiting at most `timeout` for room.
    pub fn send_timeout(&mut self, msg: &[u8], timeout: Duration) -> Result<(), SendError> {
        self.send_with_timeout(&Envelope::PLAIN, msg, timeout)
    }

    /// Publishes `msg` on `topic`, waiting while the ring is full. A private topic (see
    /// [`topic::private_topic`]) is addressed to its owner only.
    pub fn publish(&mut self, topic: &str, msg: &[u8]) -> Result<(), SendError> {
        let target = topic::private_owner(topic);
        self.send_with(&Envelope { topic, target, kind: envelope::Kind::Plain }, msg)
    }

    /// Like [`publish`](Self::publish) without blocking.
    pub fn try_publish(&mut self, topic: &str, msg: &[u8]) -> Result<(), SendError> {
        let target = topic::private_owner(topic);
        self.try_send_with(&Envelope { topic, target, kind: envelope::Kind::Plain }, msg)
    }

    /// Publishes `msg` on `topic` to node `node_id` only: every other node's engine drops it.
    pub fn send_to(&mut self, node_id: u64, topic: &str, msg: &[u8]) -> Result<(), SendError> {
        self.send_with(&Envelope { topic, target: Some(node_id), kind: envelope::Kind::Plain }, msg)
    }

    /// Answers a request (a message whose [`Message::request`] is set): the reply goes to the requester
    /// only, on the reply topic it named, carrying its correlation id and this node's id.
    pub fn reply(&mut self, request: &Message<'_>, msg: &[u8]) -> Result<(), SendError> {
        let Some((id, reply_topic)) = request.request() else { return Err(SendError::NotARequest) };
        let kind = envelope::Kind::Reply { correlation: id.correlation, replier: self.node_id };
        self.send_with(&Envelope { topic: reply_topic, target: Some(id.requester), kind }, msg)
    }

    /// This node's id (what replies carry).
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Queues a message with any envelope, waiting while the ring is full.
    pub fn send_with(&mut self, env: &Envelope<'_>, msg: &[u8]) -> Result<(), SendError> {
        loop {
            match self.send_with_timeout(env, msg, Duration::from_secs(3600)) {
                Err(SendError::Timeout) => continue,
                other => return other,
            }
        }
    }

    /// Queues a message with any envelope, waiting at most `timeout` for room.
    pub fn send_with_timeout(&mut self, env: &Envelope<'_>, msg: &[u8], timeout: Duration) -> Result<(), SendError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_send_with(env, msg) {
                Err(SendError::Full) => {}
                other => return other,
            }
            let shared = self.shared.clone();
            let handle = self.handle.clone();
            let need = (env.len() + msg.len()).min(self.ring.max_payload());
            let ring = &mut self.ring;
            if !handle.waiter.wait_until(deadline, || ring.has_room(need) || shared.closed.load(Ordering::Relaxed)) {
                return Err(SendError::Timeout);
            }
        }
    }

    /// Queues a message with any envelope without blocking.
    pub fn try_send_with(&mut self, env: &Envelope<'_>, msg: &[u8]) -> Result<(), SendError> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(SendError::Closed);
        }
        if env.validate().is_err() {
            return Err(SendError::BadTopic);
        }
        let total = env.len() + msg.len();
        if total > self.max_message {
            return Err(SendError::TooLarge { size: total, max: self.max_message });
        }
        let published = if total <= self.ring.max_payload() {
            self.ring.claim(total).map(|mut c| {
                let at = env.emit(&mut c);
                c[at..].copy_from_slice(msg);
                c.commit(WHOLE_MESSAGE)
            })
        } else if self.ring.has_room(0) {
            // Large messages go by channel; the marker keeps their place in the order.
            let mut v = vec![0u8; total];
            let at = env.emit(&mut v);
            v[at..].copy_from_slice(msg);
            let _ = self.large.send(v);
            self.ring.push_marker()
        } else {
            None
        };
        match published {
            Some(p) => {
                self.shared.wake_engine_fenced(p);
                Ok(())
            }
            None => Err(SendError::Full),
        }
    }

    /// Claims room for a `len`-byte message without topic, to be written in place, then
    /// [`Claim::commit`]ted. `len` must be at most [`max_claim`](Self::max_claim).
    #[inline]
    pub fn claim(&mut self, len: usize) -> Result<Claim<'_>, SendError> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(SendError::Closed);
        }
        if len > self.max_claim() {
            return Err(SendError::TooLarge { size: len, max: self.max_claim() });
        }
        match self.ring.claim(envelope::MIN_ENVELOPE_LEN + len) {
            Some(mut inner) => {
                inner[..envelope::MIN_ENVELOPE_LEN].fill(0); // the plain envelope
                Ok(Claim { inner, shared: &self.shared })
            }
            None => Err(SendError::Full),
        }
    }

    /// Largest message [`claim`](Self::claim) accepts.
    #[inline]
    pub fn max_claim(&self) -> usize {
        self.direct_max.saturating_sub(envelope::MIN_ENVELOPE_LEN)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.handle.gone.store(true, Ordering::SeqCst);
        self.shared.wake_engine();
    }
}

/// Room for one message in the publisher's ring; write it, then commit.
pub struct Claim<'a> {
    inner: ring::frames::FrameClaim<'a>,
    shared: &'a Shared,
}

impl Claim<'_> {
    /// Publishes the message.
    #[inline]
    pub fn commit(self) {
        let published = self.inner.commit(WHOLE_MESSAGE);
        self.shared.wake_engine_fenced(published);
    }
}

impl std::ops::Deref for Claim<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        &self.inner[envelope::MIN_ENVELOPE_LEN..]
    }
}

impl std::ops::DerefMut for Claim<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.inner[envelope::MIN_ENVELOPE_LEN..]
    }
}

/// A message as a subscriber sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The sender's session.
    pub session: u64,
    /// The message's sequence number in that session.
    pub seq: u64,
    /// Its topic ("" for a message sent without one).
    pub topic: &'a str,
    /// The bytes, borrowed until the subscriber's handler returns.
    pub payload: &'a [u8],
    /// The whole message, envelope first: the rarely needed parts of the envelope are read from it on
    /// demand, which keeps this value small on the hot path.
    message: &'a [u8],
}

impl<'a> Message<'a> {
    #[inline]
    fn parse(session: u64, seq: u64, message: &'a [u8]) -> Option<Message<'a>> {
        // The engine parsed the envelope before routing, so this does not fail.
        let (env, payload) = Envelope::parse_routed(message).ok()?;
        Some(Message { session, seq, topic: env.topic, payload, message })
    }

    fn envelope(&self) -> Envelope<'a> {
        Envelope::parse_routed(self.message).map(|(env, _)| env).unwrap_or(Envelope::PLAIN)
    }

    /// Plain message, request or reply.
    pub fn kind(&self) -> envelope::Kind<'a> {
        self.envelope().kind
    }

    /// Whether it was addressed to this node alone.
    pub fn is_directed(&self) -> bool {
        self.envelope().target.is_some()
    }

    /// If this is a request: its identity and where replies go (answer with [`Publisher::reply`]).
    pub fn request(&self) -> Option<(RequestId, &'a str)> {
        match self.kind() {
            envelope::Kind::Request { id, reply_topic } => Some((id, reply_topic)),
            _ => None,
        }
    }
}

/// What a subscriber receives, in order per sender. New kinds of delivery may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received<'a> {
    /// The next message.
    Message(Message<'a>),
    /// Messages that can no longer be repaired.
    Loss {
        /// The sender's session.
        session: u64,
        /// Lost datagram sequence numbers.
        datagrams: Range<u64>,
        /// Lost message sequence numbers (`None` if nothing had been delivered from that sender before).
        messages: Option<Range<u64>>,
    },
    /// Membership, sender and receiver events.
    Event(Event),
    /// The node's first delivery: the backend that runs it and why it was chosen.
    BackendChosen {
        /// The backend.
        kind: BackendKind,
        /// Probe result, override or request.
        reason: &'a str,
    },
}

/// Receives deliveries from the engine. A node may have several; each may move to another thread.
pub struct Subscriber {
    ring: ring::Consumer,
    /// Where to resume in the `OUT_RUN` record at the head of the ring when the last poll stopped inside
    /// it: byte offset in its frames and message sequence (offset 0: not started).
    run_at: (usize, u64),
    side: mpsc::Receiver<Side>,
    shared: Arc<Shared>,
    handle: Arc<HandleShared>,
}

impl Subscriber {
    /// Calls `handler` for up to `max` ready deliveries without blocking; returns how many.
    pub fn poll(&mut self, max: usize, mut handler: impl FnMut(Received<'_>)) -> usize {
        let (mut n, mut released) = (0, false);
        while n < max {
            let Some(rec) = self.ring.peek() else { break };
            match rec.tag() {
                OUT_MESSAGE => {
                    let session = u64::from_ne_bytes(rec[..8].try_into().expect("record header"));
                    let seq = u64::from_ne_bytes(rec[8..16].try_into().expect("record header"));
                    if let Some(m) = Message::parse(session, seq, &rec[OUT_HEADER..]) {
                        handler(Received::Message(m));
                    }
                }
                OUT_RUN => {
                    let session = u64::from_ne_bytes(rec[..8].try_into().expect("record header"));
                    let first = u64::from_ne_bytes(rec[8..16].try_into().expect("record header"));
                    let at = if self.run_at.0 == 0 { (0, first) } else { self.run_at };
                    let mut msgs = RunMessages::resume(session, &rec[OUT_HEADER..], at);
                    while n < max {
                        let Some(m) = msgs.next() else { break };
                        if let Some(m) = Message::parse(m.session, m.seq, m.payload) {
                            handler(Received::Message(m));
                        }
                        n += 1;
                    }
                    if msgs.clone().next().is_none() {
                        self.run_at = (0, 0);
                    } else {
                        // `max` reached inside the run: the rest is delivered by the next poll.
                        self.run_at = msgs.position();
                        break;
                    }
                    rec.release();
                    released = true;
                    continue;
                }
                OUT_LOSS => {
                    let v = |i: usize| u64::from_ne_bytes(rec[i * 8..i * 8 + 8].try_into().expect("loss record"));
                    let messages = (v(3) == 1).then(|| v(4)..v(5));
                    handler(Received::Loss { session: v(0), datagrams: v(1)..v(2), messages });
                }
                _ => match self.side.try_recv() {
                    Ok(Side::Message { session, seq, payload }) => {
                        if let Some(m) = Message::parse(session, seq, &payload) {
                            handler(Received::Message(m));
                        }
                    }
                    Ok(Side::Event(e)) => handler(Received::Event(e)),
                    Ok(Side::Backend(kind, reason)) => handler(Received::BackendChosen { kind, reason: &reason }),
                    Err(_) => {}
                },
            }
            rec.release();
            released = true;
            n += 1;
        }
        // Only freed ring space is news to an engine blocked on this ring (a poll may stop inside a run).
        if released && self.handle.blocked.load(Ordering::SeqCst) {
            self.shared.wake_engine();
        }
        n
    }

    /// Waits until a delivery is ready or `timeout` passes; returns whether one is ready.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        let ring = &mut self.ring;
        handle.waiter.wait_until(deadline, || !ring.is_empty() || shared.closed.load(Ordering::Relaxed))
            && !self.ring.is_empty()
    }

    /// Waits up to `timeout` for the next delivery and returns an owned copy (allocates; use
    /// [`poll`](Self::poll) on hot paths).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Owned> {
        if !self.wait(timeout) {
            return None;
        }
        let mut out = None;
        self.poll(1, |r| {
            out = Some(match r {
                Received::Message(m) => Owned::Message {
                    session: m.session,
                    seq: m.seq,
                    topic: m.topic.to_owned(),
                    payload: m.payload.to_vec(),
                },
                Received::Loss { session, datagrams, messages } => Owned::Loss { session, datagrams, messages },
                Received::Event(e) => Owned::Event(e),
                Received::BackendChosen { kind, reason } => Owned::BackendChosen { kind, reason: reason.to_owned() },
            })
        });
        out
    }

    /// Whether the node has stopped.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.handle.gone.store(true, Ordering::SeqCst);
        self.shared.wake_engine();
    }
}

/// An owned delivery, from [`Subscriber::recv_timeout`]. New kinds of delivery may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Owned {
    /// A message.
    Message {
        /// The sender's session.
        session: u64,
        /// Its sequence number.
        seq: u64,
        /// Its topic ("" for none).
        topic: String,
        /// The bytes.
        payload: Vec<u8>,
    },
    /// A loss.
    Loss {
        /// The sender's session.
        session: u64,
        /// Lost datagrams.
        datagrams: Range<u64>,
        /// Lost messages.
        messages: Option<Range<u64>>,
    },
    /// An event.
    Event(Event),
    /// The backend that runs the node, and why.
    BackendChosen {
        /// The backend.
        kind: BackendKind,
        /// Why.
        reason: String,
    },
}
