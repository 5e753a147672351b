//! Request/reply and scatter-gather over a group.
//!
//! A [`Requester`] (from [`Node::requester`](crate::Node::requester)) publishes a request on a topic with
//! a fresh correlation id and its own private reply topic; every node that subscribes to that topic may
//! answer with [`Publisher::reply`](crate::Publisher::reply), which addresses the reply to the requester
//! alone. The requester collects replies until a timeout, an expected count, or (by default) until every
//! node alive on the group has answered, and says which live nodes did not.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::Shared;
use crate::envelope::{Envelope, Kind, RequestId};
use crate::node::{Publisher, Received, SendError, Subscriber};

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Node id of the replier.
    pub from: u64,
    /// Session of the replier.
    pub session: u64,
    /// The reply's bytes.
    pub payload: Vec<u8>,
}

/// What a scatter-gather collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gathered {
    /// Replies in arrival order, at most one per replier.
    pub replies: Vec<Reply>,
    /// Nodes alive on the group when the gathering ended that did not reply.
    pub missing: Vec<u64>,
    /// Whether it ended because the expected replies were in (false: the timeout ended it).
    pub complete: bool,
}

/// When a scatter-gather is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// When every node alive on the group (as known at that moment, so late joiners count) has replied.
    /// A node is a member from its start: responders should subscribe on the builder
    /// ([`NodeBuilder::subscribe`](crate::NodeBuilder::subscribe)), or a request that reaches one before its
    /// application subscribed is not delivered to it, and it is reported missing.
    AllPeers,
    /// When this many distinct nodes have replied.
    Count(usize),
    /// Only the timeout ends it.
    UntilTimeout,
}

/// Sends requests and gathers their replies. Has its own publisher and subscriber.
pub struct Requester {
    publisher: Publisher,
    replies: Subscriber,
    reply_topic: String,
    shared: Arc<Shared>,
    node_id: u64,
    next_correlation: u64,
}

impl Requester {
    pub(crate) fn new(
        publisher: Publisher,
        replies: Subscriber,
        reply_topic: String,
        shared: Arc<Shared>,
        node_id: u64,
    ) -> Requester {
        Requester { publisher, replies, reply_topic, shared, node_id, next_correlation: 1 }
    }

    /// The private topic replies come back on.
    pub fn reply_topic(&self) -> &str {
        &self.reply_topic
    }

    /// Publishes a request on `topic` to every node and gathers replies until `expect` is met or `timeout`
    /// passes. Replies to earlier requests that arrive late are discarded.
    pub fn scatter(
        &mut self,
        topic: &str,
        payload: &[u8],
        expect: Expect,
        timeout: Duration,
    ) -> Result<Gathered, SendError> {
        self.gather(None, topic, payload, expect, timeout)
    }

    /// Sends a request on `topic` to node `target` only and waits up to `timeout` for its reply.
    pub fn request(
        &mut self,
        target: u64,
        topic: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Option<Reply>, SendError> {
        let g = self.gather(Some(target), topic, payload, Expect::Count(1), timeout)?;
        Ok(g.replies.into_iter().next())
    }

    fn gather(
        &mut self,
        target: Option<u64>,
        topic: &str,
        payload: &[u8],
        expect: Expect,
        timeout: Duration,
    ) -> Result<Gathered, SendError> {
        let deadline = Instant::now() + timeout;
        let correlation = self.next_correlation;
        self.next_correlation += 1;
        let id = RequestId { correlation, requester: self.node_id };
        let env = Envelope { topic, target, kind: Kind::Request { id, reply_topic: &self.reply_topic } };
        self.publisher.send_with_timeout(&env, payload, timeout)?;
        let mut replies: Vec<Reply> = Vec::new();
        let mut seen = HashSet::new();
        let complete = loop {
            self.replies.poll(usize::MAX, |r| {
                if let Received::Message(m) = r
                    && let Kind::Reply { correlation: c, replier } = m.kind()
                    && c == correlation
                    && seen.insert(replier)
                {
                    replies.push(Reply { from: replier, session: m.session, payload: m.payload.to_vec() });
                }
            });
            let done = match expect {
                Expect::Count(n) => replies.len() >= n,
                Expect::AllPeers => {
                    let peers = self.shared.members.lock().unwrap_or_else(|e| e.into_inner());
                    !peers.is_empty() && peers.iter().all(|p| seen.contains(&p.node_id))
                }
                Expect::UntilTimeout => false,
            };
            if done {
                break true;
            }
            let now = Instant::now();
            if now >= deadline || self.replies.is_closed() {
                break false;
            }
            self.replies.wait(deadline - now);
        };
        let missing = match target {
            Some(t) if !seen.contains(&t) => vec![t],
            Some(_) => Vec::new(),
            None => {
                let peers = self.shared.members.lock().unwrap_or_else(|e| e.into_inner());
                peers.iter().map(|p| p.node_id).filter(|id| !seen.contains(id)).collect()
            }
        };
        Ok(Gathered { replies, missing, complete })
    }
}
