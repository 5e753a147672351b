//! Blip: reliable, ordered delivery of messages to IP multicast groups.
//!
//! The crate is cut the way quinn and smoltcp are: [`wire`] holds the packet formats, [`proto`] the
//! protocol as a sans-IO state machine (time, bytes and randomness go in; datagrams, timeouts and deliveries
//! come out), and [`sim`] a deterministic network simulator that drives it under any loss pattern.
#![warn(missing_docs)]

pub mod counters;
pub mod engine;
pub mod envelope;
pub mod net;
mod node;
pub mod proto;
pub mod request;
pub mod ring;
pub mod sim;
pub mod topic;
pub mod wire;

pub use engine::{BackendKind, BackendStats, IdleStrategy, NodeStats};
pub use node::{
    BackendChoice, Claim, Error, Message, Node, NodeBuilder, NodeInfo, Owned, Publisher, Received, SendError,
    Subscriber,
};
pub use proto::Member;
pub use request::{Expect, Gathered, Reply, Requester};

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The counters guide's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../docs/COUNTERS.md")]
pub struct CountersDoctests;
