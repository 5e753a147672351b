//! Membership: each node announces itself every `announce_interval`, says when it leaves, and is reported
//! expired after `member_timeout` of silence. A known node id heard with a new session is a restart.

use std::time::{Duration, Instant};

use super::Event;
use super::config::Config;
use super::events::EventQueue;
use crate::wire::{MemberRepr, MemberState};

/// A node this endpoint has heard announce itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable node identity.
    pub node_id: u64,
    /// Current incarnation.
    pub session: u64,
    /// Name it announced.
    pub name: String,
    /// When it was last heard.
    pub last_heard: Instant,
}

pub(crate) struct Membership {
    announce_at: Instant,
    interval: Duration,
    timeout: Duration,
    max: usize,
    members: Vec<Member>,
    leaving: bool,
    left: bool,
}

impl Membership {
    pub(crate) fn new(cfg: &Config, now: Instant) -> Membership {
        Membership {
            announce_at: now,
            interval: cfg.announce_interval,
            timeout: cfg.member_timeout,
            max: cfg.max_members,
            members: Vec::new(),
            leaving: false,
            left: false,
        }
    }

    pub(crate) fn members(&self) -> &[Member] {
        &self.members
    }

    pub(crate) fn handle(&mut self, now: Instant, session: u64, m: &MemberRepr<'_>, events: &mut EventQueue) -> bool {
        let pos = self.members.iter().position(|x| x.node_id == m.node_id);
        match (m.state, pos) {
            (MemberState::Leaving, Some(i)) if self.members[i].session == session => {
                let gone = self.members.swap_remove(i);
                events.push_back(Event::PeerLeft { node_id: gone.node_id, session });
            }
            (MemberState::Leaving, _) => {}
            (MemberState::Alive, Some(i)) => {
                let x = &mut self.members[i];
                x.last_heard = now;
                if x.session != session {
                    let old_session = x.session;
                    x.session = session;
                    x.name = m.name.to_owned();
                    events.push_back(Event::PeerRestarted { node_id: m.node_id, old_session, new_session: session });
                }
            }
            (MemberState::Alive, None) => {
                if self.members.len() >= self.max {
                    return false;
                }
                self.members.push(Member { node_id: m.node_id, session, name: m.name.to_owned(), last_heard: now });
                events.push_back(Event::PeerJoined { node_id: m.node_id, session, name: m.name.to_owned() });
            }
        }
        true
    }

    pub(crate) fn expire(&mut self, now: Instant, events: &mut EventQueue) {
        let timeout = self.timeout;
        self.members.retain(|m| {
            let alive = now.saturating_duration_since(m.last_heard) < timeout;
            if !alive {
                events.push_back(Event::PeerExpired { node_id: m.node_id, session: m.session });
            }
            alive
        });
    }

    /// The state to announce now, if an announcement is due.
    pub(crate) fn poll_announce(&mut self, now: Instant) -> Option<MemberState> {
        if self.left {
            return None;
        }
        if self.leaving {
            self.left = true;
            return Some(MemberState::Leaving);
        }
        if self.announce_at <= now {
            self.announce_at = now + self.interval;
            return Some(MemberState::Alive);
        }
        None
    }

    pub(crate) fn leave(&mut self, now: Instant) {
        self.leaving = true;
        self.announce_at = now;
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.left { None } else { Some(self.announce_at) }
    }
}
