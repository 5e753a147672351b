//! A receiving endpoint driven by an arbitrary sequence of datagrams, time steps and reads: it must never
//! panic, and whatever it delivers must be well formed.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blip::proto::{Config, Endpoint};
use libfuzzer_sys::fuzz_target;

#[path = "drive.rs"]
mod drive;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let cfg = Config { window: 64, receive_buffer: 64, max_message: 1 << 16, ..Config::default() };
    let mut ep = Endpoint::new(cfg, 1, 2, now).unwrap();
    let mut buf = vec![0u8; 2048];
    let mut rest = data;
    // Each step: [op u8][len u16][len bytes]; op picks the source and whether time advances.
    while rest.len() >= 3 {
        let (op, len) = (rest[0], u16::from_be_bytes([rest[1], rest[2]]) as usize);
        rest = &rest[3..];
        let take = len.min(rest.len());
        let (datagram, tail) = rest.split_at(take);
        rest = tail;
        let from = SocketAddr::from(([127, 0, 0, 1 + (op & 3)], 4000));
        if op & 0x10 != 0 {
            now += Duration::from_micros(u64::from(op) * 97);
        }
        ep.handle_datagram(now, from, datagram);
        drive::after_datagram(&mut ep, now, &mut buf, op & 0x20 == 0);
    }
    let _ = ep.poll_timeout();
});
