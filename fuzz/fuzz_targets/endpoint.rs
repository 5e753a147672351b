//! A receiving endpoint driven by an arbitrary sequence of datagrams, time steps and reads: it must never
//! panic, and whatever it delivers must be well formed.
#![no_main]

use std::time::Instant;

use blip::proto::{Config, Endpoint};
use libfuzzer_sys::fuzz_target;

#[path = "drive.rs"]
mod drive;

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let cfg = Config { window: 64, receive_buffer: 64, max_message: 1 << 16, ..Config::default() };
    let mut ep = Endpoint::new(cfg, 1, 2, now).unwrap();
    let mut buf = vec![0u8; 2048];
    drive::steps(data, &mut now, |op, now, from, datagram| {
        ep.handle_datagram(now, from, datagram);
        drive::after_datagram(&mut ep, now, &mut buf, op);
    });
    let _ = ep.poll_timeout();
});
