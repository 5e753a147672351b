//! The queue of [`Event`]s waiting for the application, bounded.
//!
//! Events come from the network (a peer joins, restarts, goes silent), so an application that never
//! polls them (a sans-IO user that only handles deliveries, or a node read with `Node::poll` that is not
//! polled for a long time) must not make the queue grow without end: past [`MAX_QUEUED_EVENTS`] the oldest
//! event is dropped and counted (`Stats::events_dropped`).

use std::collections::VecDeque;

use super::Event;

/// Events kept for the application at most.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// A FIFO of events that drops its oldest beyond [`MAX_QUEUED_EVENTS`].
#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    queue: VecDeque<Event>,
    dropped: u64,
}

impl EventQueue {
    /// Appends `e`, dropping the oldest event if the queue is full.
    pub(crate) fn push_back(&mut self, e: Event) {
        if self.queue.len() >= MAX_QUEUED_EVENTS {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back(e);
    }

    /// Takes the oldest event.
    pub(crate) fn pop_front(&mut self) -> Option<Event> {
        self.queue.pop_front()
    }

    /// Events dropped because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_events_are_dropped_and_counted() {
        let mut q = EventQueue::default();
        for session in 0..MAX_QUEUED_EVENTS as u64 + 10 {
            q.push_back(Event::ReceiverJoined { session });
        }
        assert_eq!((q.len(), q.dropped()), (MAX_QUEUED_EVENTS, 10));
        assert!(matches!(q.pop_front(), Some(Event::ReceiverJoined { session: 10 })));
    }
}
