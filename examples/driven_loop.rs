//! Driven loop: nodes without engine threads, run from the application's own loop.
//!
//! A node built with [`NodeBuilder::build_driven`] starts no thread: the application calls
//! [`Node::duty_cycle`] from its loop, and that loop may send with [`Node::try_send`], straight into the
//! retransmission window, and take deliveries with [`Node::poll`], straight from the protocol's buffers,
//! with no ring in between either way (`NodeBuilder::direct_receive`). This suits a pipeline stage that owns its core (pin it
//! with `taskset` or your runtime) and wants no other thread of Blip's beside it.
//!
//! Here one thread runs both ends: a feed node sends `--messages` ticks of `--size` bytes in bursts, running
//! a duty cycle after each burst (and whenever its window is full, which is flow control waiting for the
//! reader's acknowledgements); a reader node, driven from the same loop, checks that every tick arrives
//! once and in order. All on loopback multicast with TTL 0.
//!
//! ```text
//! cargo run --release --example driven_loop
//! cargo run --release --example driven_loop -- --messages 1000000 --size 256
//! ```
//!
//! Options: `--group ADDR` (in 239.255.0.0/16) `--port N` `--backend auto|poll|uring` `--messages N`
//! `--size N` (at least 8) `--burst N` (messages between duty cycles) `--timeout SECS`. Exit code 0 and a
//! final `driven_loop: OK` line on success; a message and exit code 1 otherwise.
//!
//! [`NodeBuilder::build_driven`]: blip::NodeBuilder::build_driven
//! [`Node::duty_cycle`]: blip::Node::duty_cycle
//! [`Node::try_send`]: blip::Node::try_send
//! [`Node::poll`]: blip::Node::poll

use std::process::ExitCode;
use std::time::{Duration, Instant};

use blip::{IdleStrategy, Received, SendError};

#[path = "common/mod.rs"]
mod common;
use common::Args;

fn main() -> ExitCode {
    common::finish("driven_loop", run())
}

fn run() -> Result<(), String> {
    let args = Args::parse(&["messages", "size", "burst", "timeout"])?;
    let net = args.net("239.255.0.81", 47081)?;
    let messages: u64 = args.get("messages", 200_000)?;
    let size: usize = args.get("size", 64)?;
    let burst: u64 = args.get("burst", 1024)?.max(1);
    let timeout = Duration::from_secs(args.get("timeout", 60)?);
    if size < 8 {
        return Err("--size must be at least 8 (each tick carries its number)".into());
    }
    // Busy-spin: a duty cycle with nothing to do returns at once instead of waiting in the kernel.
    let builder = |name| net.builder().name(name).idle(IdleStrategy::BusySpin);
    let mut feed = builder("feed").build_driven().map_err(|e| format!("feed node: {e}"))?;
    // The reader's deliveries go to its own loop (`Node::poll`), not to a subscriber.
    let mut reader = builder("reader").direct_receive().build_driven().map_err(|e| format!("reader node: {e}"))?;

    let (start, deadline) = (Instant::now(), Instant::now() + timeout);
    let mut tick = vec![0u8; size];
    let (mut sent, mut next, mut full) = (0u64, 0u64, 0u64);
    let mut problem = None;
    while next < messages && problem.is_none() {
        if Instant::now() > deadline {
            return Err(format!("timed out: {sent} sent, {next} received in order"));
        }
        // A burst of ticks, written straight into the feed's window.
        let burst_end = (sent + burst).min(messages);
        while sent < burst_end {
            tick[..8].copy_from_slice(&sent.to_le_bytes());
            match feed.try_send(&tick) {
                Ok(()) => sent += 1,
                Err(SendError::Full) => {
                    full += 1;
                    break;
                }
                Err(e) => return Err(format!("tick {sent}: {e}")),
            }
        }
        // One pass of each engine: the feed transmits the burst and the reader takes it in (its
        // acknowledgement leaves in its next pass, at the next tick).
        feed.duty_cycle(Some(Duration::ZERO)).map_err(|e| format!("feed: {e}"))?;
        reader.duty_cycle(Some(Duration::ZERO)).map_err(|e| format!("reader: {e}"))?;
        // The reader's own loop takes what arrived, with no subscriber ring in between.
        let taken = reader.poll(usize::MAX, |r| match r {
            Received::Message(m) => {
                let n = m.payload.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                if n != Some(next) || m.payload.len() != size {
                    problem.get_or_insert(format!("expected tick {next}, got {n:?} ({} bytes)", m.payload.len()));
                }
                next += 1;
            }
            Received::Loss { messages, .. } => {
                problem.get_or_insert(format!("ticks lost for good: {messages:?}"));
            }
            _ => {}
        });
        taken.map_err(|e| format!("reader: {e}"))?;
    }
    if let Some(p) = problem {
        return Err(p);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "driven_loop: {messages} ticks of {size} bytes in order in {secs:.2} s ({:.2} M/s, one thread for both \
         nodes); the feed's window was full {full} times",
        messages as f64 / secs / 1e6
    );
    Ok(())
}
