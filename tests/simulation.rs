//! Protocol acceptance tests on the deterministic network simulator (`blip::sim`).

use std::time::Duration;

use blip::proto::{Config, LateJoin, SlowReceiverPolicy};
use blip::sim::{self, Blackout, LinkConfig, SimConfig, SimReport, Stall};

fn lossy(loss: f64) -> LinkConfig {
    LinkConfig { loss, ..LinkConfig::default() }
}

fn run(cfg: &SimConfig) -> SimReport {
    match sim::run(cfg) {
        Ok(r) => r,
        Err(e) => panic!("simulation failed: {e}"),
    }
}

fn assert_perfect(r: &SimReport, what: &str) {
    assert!(r.in_order, "{what}: out of order: {r:?}");
    assert_eq!(r.duplicates, 0, "{what}: duplicates: {r:?}");
    assert_eq!(r.unreported_gaps, 0, "{what}: unreported gaps: {r:?}");
    assert_eq!(r.corrupt, 0, "{what}: corrupt payloads: {r:?}");
    assert_eq!(r.loss_events, 0, "{what}: loss events: {r:?}");
    assert_eq!(r.delivered, r.expected, "{what}: not everything delivered: {r:?}");
}

/// Loss on every receiver's links (data in, NAKs and STATUS out) over the grid the spec asks for.
#[test]
fn loss_grid_delivers_everything_in_order_exactly_once() {
    for loss in [0.0, 0.01, 0.05, 0.20, 0.30] {
        for receivers in [1, 4, 16] {
            let cfg = SimConfig {
                seed: 7 + receivers as u64,
                receivers,
                messages: 3000,
                message_size: 300,
                receiver_downlink: lossy(loss),
                receiver_uplink: lossy(loss),
                ..SimConfig::default()
            };
            let r = run(&cfg);
            assert_perfect(&r, &format!("loss {loss} receivers {receivers}"));
            if loss > 0.0 {
                assert!(r.lost_datagrams > 0, "the network must have dropped something at loss {loss}: {r:?}");
                assert!(r.retransmissions > 0);
            }
        }
    }
}

#[test]
fn reordering_and_duplication_are_harmless() {
    let link = LinkConfig { loss: 0.02, duplicate: 0.05, jitter: Duration::from_micros(300), ..LinkConfig::default() };
    let cfg = SimConfig {
        seed: 3,
        receivers: 4,
        receiver_downlink: link.clone(),
        receiver_uplink: link,
        ..SimConfig::default()
    };
    assert_perfect(&run(&cfg), "reorder+dup");
}

#[test]
fn burst_loss_is_repaired() {
    let cfg = SimConfig {
        seed: 11,
        receivers: 4,
        messages: 5000,
        receiver_downlink: LinkConfig { burst: Some((0.01, 0.1)), ..LinkConfig::default() },
        ..SimConfig::default()
    };
    let r = run(&cfg);
    assert_perfect(&r, "burst");
    assert!(r.lost_datagrams > 10, "{r:?}");
}

#[test]
fn several_senders_to_several_receivers() {
    let cfg = SimConfig {
        seed: 5,
        senders: 3,
        receivers: 4,
        receiver_downlink: lossy(0.05),
        receiver_uplink: lossy(0.05),
        ..SimConfig::default()
    };
    assert_perfect(&run(&cfg), "3 senders");
}

#[test]
fn large_messages_are_fragmented_and_reassembled_under_loss() {
    let cfg = SimConfig {
        seed: 9,
        receivers: 3,
        messages: 40,
        message_size: 200_000,
        batch: 1,
        send_interval: Duration::from_micros(200),
        receiver_downlink: lossy(0.05),
        ..SimConfig::default()
    };
    let r = run(&cfg);
    assert_perfect(&r, "large messages");
}

/// The sender's own link drops 10 %: every receiver misses the same datagrams. NAK suppression and the
/// retransmission linger must keep the repair cost near one retransmission per lost datagram.
#[test]
fn correlated_loss_costs_about_one_retransmission_per_lost_datagram() {
    let cfg = SimConfig {
        seed: 21,
        receivers: 16,
        messages: 4000,
        message_size: 300,
        sender_uplink: lossy(0.10),
        ..SimConfig::default()
    };
    let r = run(&cfg);
    assert_perfect(&r, "correlated");
    let lost = r.lost_datagrams as f64;
    assert!(lost > 50.0, "{r:?}");
    let retx_per_loss = r.retransmissions as f64 / lost;
    let naks_per_loss = r.naks as f64 / lost;
    println!(
        "correlated 10%, 16 receivers: {retx_per_loss:.2} retransmissions and {naks_per_loss:.2} NAKs per lost datagram"
    );
    assert!(retx_per_loss <= 1.5, "retransmissions per lost datagram {retx_per_loss:.2}: {r:?}");
    assert!(naks_per_loss <= 4.0, "NAKs per lost datagram {naks_per_loss:.2}: {r:?}");
}

/// 0.1 ms one-way delay (the default links: 50 µs up + 50 µs down), default timing, 1 % loss.
#[test]
fn repair_latency_with_default_timing() {
    for receivers in [1, 4] {
        let cfg = SimConfig {
            seed: 33,
            receivers,
            messages: 20_000,
            message_size: 500,
            receiver_downlink: lossy(0.01),
            receiver_uplink: lossy(0.01),
            ..SimConfig::default()
        };
        let r = run(&cfg);
        assert_perfect(&r, "repair latency");
        assert!(r.repairs > 20, "{r:?}");
        println!("{receivers} receivers: repair p50 {:.3} ms, max {:.3} ms", r.repair_ms_p50, r.repair_ms_max);
        assert!(r.repair_ms_p50 <= 2.0, "p50 {}: {r:?}", r.repair_ms_p50);
        assert!(r.repair_ms_max <= 10.0, "max {}: {r:?}", r.repair_ms_max);
    }
}

/// The last datagram before the sender goes idle is lost: the idle heartbeat reveals it.
#[test]
fn tail_loss_before_idle_is_repaired_within_5ms() {
    for receivers in [1, 4] {
        let cfg = SimConfig {
            seed: 4,
            receivers,
            messages: 10,
            batch: 1,
            send_interval: Duration::from_millis(1),
            drop_datagrams: vec![9],
            ..SimConfig::default()
        };
        let r = run(&cfg);
        assert_perfect(&r, "tail loss");
        assert_eq!(r.repairs, receivers as u64, "{r:?}");
        println!("{receivers} receivers: lost final datagram repaired after {:.3} ms", r.repair_ms_max);
        assert!(r.repair_ms_max <= 5.0, "tail repaired after {} ms: {r:?}", r.repair_ms_max);
    }
}

/// A receiver cut off for longer than the window holds gets an exact loss event, then delivery resumes.
#[test]
fn outage_longer_than_window_yields_exact_loss_then_resumes() {
    let cfg = SimConfig {
        seed: 8,
        receivers: 2,
        messages: 6000,
        message_size: 1000,
        protocol: Config {
            window: 256,
            slow_receiver: SlowReceiverPolicy::DropAfter(Duration::from_millis(5)),
            ..Config::default()
        },
        blackouts: vec![Blackout { receiver: 0, from: Duration::from_millis(10), until: Duration::from_millis(60) }],
        ..SimConfig::default()
    };
    let r = run(&cfg);
    assert!(r.in_order && r.duplicates == 0 && r.unreported_gaps == 0 && r.corrupt == 0, "{r:?}");
    assert!(r.loss_events >= 1, "expected a loss event: {r:?}");
    assert!(r.lost_messages > 256, "the outage spans more than the window: {r:?}");
    // Exactness: every message is either delivered or inside a reported range, never both.
    assert_eq!(r.delivered + r.lost_messages, r.expected, "{r:?}");
}

/// A receiver cut off until long after the sender went idle, under "drop after": what the sender no longer
/// retains is reported as an exact loss once the receiver hears the sender again (a heartbeat, then the
/// repair of what the sender still retains), with no new data from the sender to close the gap.
#[test]
fn unrecoverable_tail_of_an_idle_sender_is_reported_without_new_data() {
    let until = Duration::from_millis(1500);
    let cfg = SimConfig {
        seed: 23,
        receivers: 2,
        messages: 2000,
        message_size: 1000,
        protocol: Config {
            window: 64,
            slow_receiver: SlowReceiverPolicy::DropAfter(Duration::from_millis(5)),
            ..Config::default()
        },
        blackouts: vec![Blackout { receiver: 0, from: Duration::from_millis(2), until }],
        ..SimConfig::default()
    };
    let r = run(&cfg);
    assert!(r.in_order && r.duplicates == 0 && r.unreported_gaps == 0 && r.corrupt == 0, "{r:?}");
    assert!(r.loss_events >= 1 && r.lost_messages > 64, "more than the window was lost: {r:?}");
    assert_eq!(r.delivered + r.lost_messages, r.expected, "{r:?}");
    // What the sender still retained (its last `window` datagrams, a message each) was repaired, not lost.
    assert!(r.lost_messages <= cfg.messages - 64, "the retained tail was reported lost: {r:?}");
    // Idle since long before the blackout ended, the sender heartbeats at most `heartbeat_max` apart.
    println!(
        "{} messages lost, all accounted for at {:.1} ms (blackout until {until:?})",
        r.lost_messages, r.virtual_ms
    );
    let latest = (until + cfg.protocol.heartbeat_max).as_secs_f64() * 1e3 + 50.0;
    assert!(r.virtual_ms <= latest, "the loss was reported at {} ms: {r:?}", r.virtual_ms);
}

fn stalled_burst(policy: SlowReceiverPolicy) -> SimReport {
    let cfg = SimConfig {
        seed: 12,
        receivers: 2,
        messages: 10_000,
        message_size: 1000,
        batch: 50,
        protocol: Config { slow_receiver: policy, ..Config::default() },
        stalls: vec![Stall { receiver: 0, from: Duration::ZERO, until: Duration::from_millis(300) }],
        ..SimConfig::default()
    };
    run(&cfg)
}

/// A burst of 10,000 messages to a receiver that stops reading: "hold back" blocks the sender and loses
/// nothing once the receiver resumes.
#[test]
fn stalled_receiver_hold_back_loses_nothing() {
    let r = stalled_burst(SlowReceiverPolicy::HoldBack);
    assert_perfect(&r, "hold back");
    assert!(r.sender_blocked > 0, "the sender must have been held back: {r:?}");
    assert_eq!(r.slow_receivers_dropped, 0);
    assert!(r.virtual_ms >= 300.0, "delivery cannot finish before the receiver resumes: {r:?}");
}

/// The same burst under "drop after 20 ms": the sender stops waiting, the stalled receiver gets an exact loss
/// event, the other receiver gets everything.
#[test]
fn stalled_receiver_drop_policy_reports_loss_and_frees_sender() {
    let r = stalled_burst(SlowReceiverPolicy::DropAfter(Duration::from_millis(20)));
    assert!(r.in_order && r.duplicates == 0 && r.unreported_gaps == 0 && r.corrupt == 0, "{r:?}");
    assert_eq!(r.slow_receivers_dropped, 1, "{r:?}");
    assert!(r.loss_events >= 1, "{r:?}");
    assert_eq!(r.delivered + r.lost_messages, r.expected, "{r:?}");
}

/// Late join: a receiver that hears the sender only after 5 ms.
#[test]
fn late_join_policies() {
    let base = SimConfig {
        seed: 14,
        receivers: 2,
        messages: 2000,
        blackouts: vec![Blackout { receiver: 1, from: Duration::ZERO, until: Duration::from_millis(5) }],
        ..SimConfig::default()
    };
    // Oldest: the late receiver repairs everything the sender still retains (here: all of it).
    let r = run(&SimConfig { protocol: Config { late_join: LateJoin::Oldest, ..Config::default() }, ..base.clone() });
    assert_perfect(&r, "late join oldest");
    // Next: the late receiver starts with the first datagram it hears and has no gap after it.
    let r = run(&SimConfig { protocol: Config { late_join: LateJoin::Next, ..Config::default() }, ..base });
    assert!(r.in_order && r.unreported_gaps == 0 && r.duplicates == 0 && r.loss_events == 0, "{r:?}");
    assert!(r.skipped_at_join > 0, "the late receiver should have started mid-stream: {r:?}");
    assert_eq!(r.delivered + r.skipped_at_join, r.expected, "{r:?}");
}

#[test]
fn runs_are_deterministic_per_seed() {
    let cfg = SimConfig { seed: 99, receivers: 4, receiver_downlink: lossy(0.1), ..SimConfig::default() };
    assert_eq!(run(&cfg), run(&cfg));
}

#[test]
fn a_livelock_is_reported_not_hung() {
    // Every packet dropped: nothing can ever be delivered, and the run must end with an error.
    let cfg = SimConfig {
        receivers: 1,
        receiver_downlink: lossy(1.0),
        max_virtual: Duration::from_secs(2),
        ..SimConfig::default()
    };
    assert!(matches!(sim::run(&cfg), Err(sim::SimError::Unfinished { .. })));
}

/// A receiver with a smaller buffer than the sender's window is never sent more than it can hold: its
/// STATUS carries its capacity and the sender stops there (no overrun, so nothing to retransmit).
#[test]
fn sender_respects_the_receivers_buffer_capacity() {
    let cfg = SimConfig {
        seed: 17,
        receivers: 2,
        messages: 5000,
        message_size: 1000,
        batch: 20,
        protocol: Config { window: 2048, receive_buffer: 64, ..Config::default() },
        stalls: vec![Stall { receiver: 0, from: Duration::from_millis(2), until: Duration::from_millis(40) }],
        ..SimConfig::default()
    };
    let r = run(&cfg);
    assert_perfect(&r, "small receive buffer");
    assert!(r.sender_blocked > 0, "the stalled receiver's credit should have held the sender: {r:?}");
    assert_eq!(r.retransmissions, 0, "no datagram should have been sent past a receiver's buffer: {r:?}");
}

/// Reading with `recv_batch` (runs of whole messages at once) delivers exactly what `recv` does: the same
/// messages in the same order, the same losses, with the same protocol traffic.
#[test]
fn batched_reads_deliver_what_single_reads_do() {
    let outage = SimConfig {
        seed: 8,
        receivers: 2,
        messages: 6000,
        message_size: 100,
        batch: 30,
        protocol: Config {
            window: 64,
            slow_receiver: SlowReceiverPolicy::DropAfter(Duration::from_millis(5)),
            ..Config::default()
        },
        blackouts: vec![Blackout { receiver: 0, from: Duration::from_millis(1), until: Duration::from_millis(60) }],
        ..SimConfig::default()
    };
    let cases = [
        (
            "small messages, 5 % loss",
            SimConfig {
                seed: 21,
                receivers: 4,
                messages: 4000,
                message_size: 40,
                batch: 16,
                receiver_downlink: lossy(0.05),
                receiver_uplink: lossy(0.05),
                ..SimConfig::default()
            },
        ),
        (
            "two per datagram, reordered and duplicated",
            SimConfig {
                seed: 22,
                receivers: 2,
                message_size: 600,
                receiver_downlink: LinkConfig {
                    loss: 0.02,
                    duplicate: 0.05,
                    jitter: Duration::from_micros(300),
                    ..LinkConfig::default()
                },
                ..SimConfig::default()
            },
        ),
        (
            "fragments between whole messages",
            SimConfig {
                seed: 23,
                receivers: 2,
                messages: 600,
                message_size: 500,
                batch: 3,
                receiver_downlink: lossy(0.05),
                ..SimConfig::default()
            },
        ),
        ("outage with reported loss", outage),
    ];
    for (what, cfg) in cases {
        let single = run(&cfg);
        let batched = run(&SimConfig { batched_reads: true, ..cfg });
        assert!(batched.runs > 0, "{what}: no run was delivered: {batched:?}");
        assert_eq!(single.runs, 0, "{what}");
        assert_eq!(SimReport { runs: 0, ..batched }, single, "{what}");
    }
}

/// A sender whose window is smaller than its receiver's buffer still hears from the receiver before its
/// window fills (STATUS cadence follows the smaller of the two). Otherwise it would stall at every full window
/// until its idle heartbeat (`heartbeat_min` later) drew a STATUS: 3.6 times the virtual time here.
#[test]
fn a_sender_window_below_the_receivers_buffer_does_not_stall_at_each_window() {
    let cfg = |window: usize, receive_buffer: usize| SimConfig {
        seed: 31,
        receivers: 2,
        messages: 20_000,
        message_size: 1000,
        batch: 64,
        send_interval: Duration::from_micros(10),
        protocol: Config { window, receive_buffer, ..Config::default() },
        ..SimConfig::default()
    };
    let matched = run(&cfg(256, 256));
    let larger_buffer = run(&cfg(256, 4096));
    assert_perfect(&matched, "matched");
    assert_perfect(&larger_buffer, "receiver buffer above the sender's window");
    // Virtual time, so deterministic: the same run either way, within a margin.
    assert!(
        larger_buffer.virtual_ms < matched.virtual_ms * 1.25,
        "matched sizes took {:.2} ms, a larger receive buffer {:.2} ms",
        matched.virtual_ms,
        larger_buffer.virtual_ms
    );
}

/// Repairs are lost too (5 % on the receiver's link). Once the receiver has timed a repair it asks again
/// after the retransmission linger plus the measured repair time, not after the fixed `nak_retry` (3 ms):
/// the slowest 1 % of repairs (those whose first repair was lost) arrive before `nak_retry` has passed.
#[test]
fn a_lost_repair_is_asked_for_again_at_the_measured_repair_time() {
    let cfg = SimConfig {
        seed: 41,
        receivers: 1,
        messages: 40_000,
        message_size: 100,
        receiver_downlink: lossy(0.05),
        ..SimConfig::default()
    };
    let r = run(&cfg);
    assert_perfect(&r, "lost repairs");
    let nak_retry = Config::default().nak_retry.as_secs_f64() * 1e3;
    println!(
        "repair p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} repairs",
        r.repair_ms_p50, r.repair_ms_p99, r.repair_ms_max, r.repairs
    );
    assert!(r.retransmissions > r.lost_datagrams + 5, "some repairs must have been lost too: {r:?}");
    assert!(r.repair_ms_p99 < nak_retry, "p99 repair {} ms: {r:?}", r.repair_ms_p99);
}
