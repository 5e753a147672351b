//! Runs one protocol simulation (see `blip::sim`) and prints what it measured.

use std::process::ExitCode;
use std::time::Duration;

use blip::proto::{Config, LateJoin, SlowReceiverPolicy};
use blip::sim::{self, LinkConfig, SimConfig, SimReport};
use clap::Parser;

/// Simulate Blip senders and receivers over a lossy virtual network, deterministically.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Probability that the network drops a packet on each receiver's links (data in, NAK/STATUS out).
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Probability that the sender's own link drops a packet (loss shared by every receiver).
    #[arg(long, default_value_t = 0.0)]
    sender_loss: f64,
    /// Number of receivers.
    #[arg(long, default_value_t = 4)]
    receivers: usize,
    /// Number of senders.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Message size in bytes (at least 16).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Seed of every random choice in the run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One-way delay in microseconds (split between uplink and downlink).
    #[arg(long, default_value_t = 100)]
    delay_us: u64,
    /// Extra random delay in microseconds on each receiver's downlink (reorders).
    #[arg(long, default_value_t = 0)]
    jitter_us: u64,
    /// Probability that a receiver's downlink duplicates a packet.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Retransmission window in datagrams.
    #[arg(long, default_value_t = blip::proto::DEFAULT_WINDOW)]
    window: usize,
    /// Largest datagram (UDP payload) in bytes.
    #[arg(long, default_value_t = blip::proto::DEFAULT_MAX_DATAGRAM)]
    max_datagram: usize,
    /// Late-join policy: oldest or next.
    #[arg(long, default_value = "oldest")]
    late_join: String,
    /// Slow-receiver policy: hold, or a number of milliseconds after which a slow receiver is dropped.
    #[arg(long, default_value = "hold")]
    slow_receiver: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match build(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blip-sim: {e}");
            return ExitCode::from(2);
        }
    };
    match sim::run(&cfg) {
        Ok(r) => {
            print(&r, args.json);
            if r.delivered + r.lost_messages + r.skipped_at_join == r.expected && r.unreported_gaps == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(sim::SimError::Unfinished { reason, report }) => {
            eprintln!("blip-sim: run did not finish ({reason})");
            print(&report, args.json);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("blip-sim: {e}");
            ExitCode::from(2)
        }
    }
}

fn build(a: &Args) -> Result<SimConfig, String> {
    for (name, p) in [("--loss", a.loss), ("--sender-loss", a.sender_loss), ("--duplicate", a.duplicate)] {
        if !(0.0..=1.0).contains(&p) {
            return Err(format!("{name} must be a probability between 0 and 1, got {p}"));
        }
    }
    let late_join = match a.late_join.as_str() {
        "oldest" => LateJoin::Oldest,
        "next" => LateJoin::Next,
        other => return Err(format!("--late-join must be 'oldest' or 'next', got '{other}'")),
    };
    let slow_receiver = match a.slow_receiver.as_str() {
        "hold" => SlowReceiverPolicy::HoldBack,
        ms => SlowReceiverPolicy::DropAfter(Duration::from_millis(
            ms.parse().map_err(|_| format!("--slow-receiver must be 'hold' or milliseconds, got '{ms}'"))?,
        )),
    };
    let protocol =
        Config { window: a.window, max_datagram: a.max_datagram, late_join, slow_receiver, ..Config::default() };
    protocol.validate().map_err(|e| e.to_string())?;
    let half = Duration::from_micros(a.delay_us) / 2;
    let link = |loss: f64| LinkConfig { loss, delay: half, ..LinkConfig::default() };
    Ok(SimConfig {
        seed: a.seed,
        senders: a.senders,
        receivers: a.receivers,
        messages: a.messages,
        message_size: a.size,
        protocol,
        sender_uplink: link(a.sender_loss),
        sender_downlink: link(0.0),
        receiver_uplink: link(a.loss),
        receiver_downlink: LinkConfig {
            jitter: Duration::from_micros(a.jitter_us),
            duplicate: a.duplicate,
            ..link(a.loss)
        },
        ..SimConfig::default()
    })
}

fn print(r: &SimReport, json: bool) {
    let rows: [(&str, String); 20] = [
        ("delivered", r.delivered.to_string()),
        ("expected", r.expected.to_string()),
        ("in_order", r.in_order.to_string()),
        ("duplicates", r.duplicates.to_string()),
        ("unreported_gaps", r.unreported_gaps.to_string()),
        ("corrupt", r.corrupt.to_string()),
        ("loss_events", r.loss_events.to_string()),
        ("lost_messages", r.lost_messages.to_string()),
        ("skipped_at_join", r.skipped_at_join.to_string()),
        ("naks", r.naks.to_string()),
        ("retransmissions", r.retransmissions.to_string()),
        ("lost_datagrams", r.lost_datagrams.to_string()),
        ("dropped_packets", r.dropped_packets.to_string()),
        ("virtual_ms", format!("{:.3}", r.virtual_ms)),
        ("repair_ms_p50", format!("{:.3}", r.repair_ms_p50)),
        ("repair_ms_p99", format!("{:.3}", r.repair_ms_p99)),
        ("repair_ms_max", format!("{:.3}", r.repair_ms_max)),
        ("repairs", r.repairs.to_string()),
        ("slow_receivers_dropped", r.slow_receivers_dropped.to_string()),
        ("sender_blocked", r.sender_blocked.to_string()),
    ];
    if json {
        let body: Vec<String> = rows.iter().map(|(k, v)| format!("  \"{k}\": {v}")).collect();
        println!("{{\n{}\n}}", body.join(",\n"));
    } else {
        for (k, v) in rows {
            println!("{k:<24}{v:>14}");
        }
    }
}
