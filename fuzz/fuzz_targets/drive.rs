//! What the endpoint targets do after each datagram: run timers, drain transmissions, optionally read and
//! check deliveries, drain events.

use std::time::Instant;

use blip::proto::{Delivery, Endpoint};

pub fn after_datagram(ep: &mut Endpoint, now: Instant, buf: &mut [u8], read: bool) {
    ep.handle_timeout(now);
    while ep.poll_transmit(now, buf).is_some() {}
    if read {
        while let Some(d) = ep.recv() {
            if let Delivery::Loss { datagrams, messages, .. } = d {
                assert!(datagrams.start <= datagrams.end);
                if let Some(m) = messages {
                    assert!(m.start <= m.end);
                }
            }
        }
    }
    while ep.poll_event().is_some() {}
}
