//! What the endpoint targets share: the input's steps, each a datagram with its source and time step, and
//! what follows each datagram (timers, transmissions, reads checked, events).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blip::proto::{Batch, Delivery, Endpoint};

/// Splits the input into steps `[op u8][len u16][len bytes]` and calls `step(op, source, datagram)` for
/// each, after advancing `now` when op bit 4 is set. Op bits 0-1 pick the source; bits 3 and 5 choose how to
/// read (see `after_datagram`); bits 6-7 are the target's own.
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

/// Runs timers and transmissions, then reads what is ready unless op bit 5 is set: message by message, or
/// with `recv_batch` when op bit 3 is set (a run's count must match its frames, in sequence).
pub fn after_datagram(ep: &mut Endpoint, now: Instant, buf: &mut [u8], op: u8) {
    ep.handle_timeout(now);
    while ep.poll_transmit(now, buf).is_some() {}
    if op & 0x20 == 0 {
        loop {
            let d = if op & 0x08 != 0 {
                match ep.recv_batch() {
                    Some(Batch::Run(run)) => {
                        let seqs: Vec<u64> = run.messages().map(|m| m.seq).collect();
                        assert_eq!(seqs.len() as u64, run.count);
                        assert!(run.count >= 2);
                        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs[0] == run.first_seq);
                        continue;
                    }
                    Some(Batch::One(d)) => d,
                    None => break,
                }
            } else {
                match ep.recv() {
                    Some(d) => d,
                    None => break,
                }
            };
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
