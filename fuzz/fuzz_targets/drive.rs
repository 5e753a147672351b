//! What the endpoint targets share: the input's steps, each a datagram with its source and time step, and
//! what follows each datagram (timers, transmissions, reads checked, events).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blip::proto::{Delivery, Endpoint};

/// Splits the input into steps `[op u8][len u16][len bytes]` and calls `step(op, source, datagram)` for
/// each, after advancing `now` when op bit 4 is set. Op bits 0-1 pick the source; bit 5 skips reads (see
/// `after_datagram`); bits 6-7 are the target's own.
pub fn steps(data: &[u8], now: &mut Instant, mut step: impl FnMut(u8, Instant, SocketAddr, &[u8])) {
    let mut rest = data;
    while rest.len() >= 3 {
        let (op, len) = (rest[0], u16::from_be_bytes([rest[1], rest[2]]) as usize);
        rest = &rest[3..];
        let (datagram, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        if op & 0x10 != 0 {
            *now += Duration::from_micros(u64::from(op) * 97);
        }
        step(op, *now, SocketAddr::from(([127, 0, 0, 1 + (op & 3)], 4000)), datagram);
    }
}

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
