//! Status query: scatter-gather over the group, with responders that come and go.
//!
//! Responder nodes subscribe to `status.query` and answer every request with [`Publisher::reply`], which
//! goes to the asking node alone. A querying node sends one request per round with
//! [`Requester::scatter`] and `Expect::AllPeers`: the round ends as soon as every node alive on the group
//! has answered, or at the timeout, and says which live nodes did not answer. The querier never lists its
//! responders: group membership (the nodes' periodic announcements) tells it who should answer, so a
//! responder that joins during the run is asked, and expected, from the next round on.
//!
//! All nodes run in this one process (one engine thread each) on loopback multicast with TTL 0. The run
//! succeeds when a round after the late responder joined includes its reply and the final round is complete
//! with nobody missing. (A node is a member, and so expected, from the moment it starts, which can be a
//! little before its application has subscribed: a round that catches a node in between reports it missing
//! after the round timeout. That is why only the final round has to be complete; the run adds rounds past
//! `--rounds` until it is, within `--timeout`.)
//!
//! ```text
//! cargo run --example status_query
//! cargo run --example status_query -- --responders 5 --rounds 15 --join-round 5
//! ```
//!
//! Options: `--group ADDR` (in 239.255.0.0/16) `--port N` `--backend auto|poll|uring` `--responders N`
//! `--rounds N` `--interval-ms N` (between round starts) `--join-round N` (when the late responder starts)
//! `--timeout SECS`. Exit code 0 and a final `status_query: OK` line on success; a message and exit code 1
//! otherwise.
//!
//! [`Publisher::reply`]: blip::Publisher::reply
//! [`Requester::scatter`]: blip::Requester::scatter

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blip::proto::LateJoin;
use blip::{Expect, Gathered, Received};

#[path = "common/mod.rs"]
mod common;
use common::{ANNOUNCE, Args, MEMBER_TIMEOUT, Net};

const QUERIER_ID: u64 = 0x5100;
const LATE_ID: u64 = 0x51ff;
/// A round normally ends early, when everybody answered; this bounds a round with a silent member.
const ROUND_TIMEOUT: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    common::finish("status_query", run())
}

fn run() -> Result<(), String> {
    let args = Args::parse(&["responders", "rounds", "interval-ms", "join-round", "timeout"])?;
    let responders: u64 = args.get("responders", 3)?;
    let rounds: u32 = args.get("rounds", 10)?;
    let interval = Duration::from_millis(args.get("interval-ms", 200)?);
    let join_round: u32 = args.get("join-round", 4)?;
    let deadline = Instant::now() + Duration::from_secs(args.get("timeout", 30)?);
    let net = args.net("239.255.71.2", 47102)?;
    if join_round < 1 || join_round >= rounds {
        return Err(format!("--join-round {join_round} must be between 1 and --rounds - 1 ({})", rounds - 1));
    }
    println!(
        "status_query on {}:{}: {responders} responders, {rounds} rounds, late joiner at round {join_round}",
        net.group, net.port
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads: Vec<(String, JoinHandle<Result<u64, String>>)> = (1..=responders)
        .map(|i| (format!("resp-{i}"), responder(net, QUERIER_ID + i, format!("resp-{i}"), stop.clone(), deadline)))
        .collect();
    let result = query(net, responders, rounds, interval, join_round, deadline, &mut threads, &stop);
    stop.store(true, Ordering::Relaxed);
    let mut failures: Vec<String> = result.err().into_iter().collect();
    for (name, t) in threads {
        match t.join() {
            Ok(Ok(handled)) => println!("  {name} answered {handled} requests"),
            Ok(Err(e)) => failures.push(format!("{name}: {e}")),
            Err(_) => failures.push(format!("{name}: thread panicked")),
        }
    }
    if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) }
}

#[allow(clippy::too_many_arguments)]
fn query(
    net: Net,
    responders: u64,
    rounds: u32,
    interval: Duration,
    join_round: u32,
    deadline: Instant,
    threads: &mut Vec<(String, JoinHandle<Result<u64, String>>)>,
    stop: &Arc<AtomicBool>,
) -> Result<(), String> {
    let mut node = net
        .builder()
        .node_id(QUERIER_ID)
        .name("querier")
        .membership(ANNOUNCE, MEMBER_TIMEOUT)
        .build()
        .map_err(|e| format!("querier: {e}"))?;
    let mut requester = node.requester().map_err(|e| format!("querier: {e}"))?;
    while (node.peers().len() as u64) < responders {
        if Instant::now() >= deadline {
            return Err(format!("only {} of {responders} responders joined", node.peers().len()));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut late_answered_in = None;
    let mut last: Option<Gathered> = None;
    // Past the planned rounds, go on (until the deadline) while the late responder has not been heard or the
    // last round was not complete: on a loaded machine a node can take a while to start.
    let settled = |last: &Option<Gathered>, late: Option<u32>| {
        late.is_some() && last.as_ref().is_some_and(|g| g.complete && g.missing.is_empty())
    };
    for round in 1.. {
        if round > rounds && settled(&last, late_answered_in) {
            break;
        }
        if Instant::now() >= deadline {
            println!("deadline reached before round {round}");
            break;
        }
        if round == join_round {
            println!("round {round}: starting late responder (node {LATE_ID:x})");
            threads.push(("late".into(), responder(net, LATE_ID, "late".into(), stop.clone(), deadline)));
        }
        let start = Instant::now();
        let g = requester
            .scatter("status.query", format!("round {round}").as_bytes(), Expect::AllPeers, ROUND_TIMEOUT)
            .map_err(|e| format!("round {round}: {e}"))?;
        let names = node.peers();
        let name_of = |id: u64| names.iter().find(|p| p.node_id == id).map_or(format!("{id:x}"), |p| p.name.clone());
        println!(
            "round {round}: {} replies in {:.1} ms, {}, missing {:?}",
            g.replies.len(),
            start.elapsed().as_secs_f64() * 1e3,
            if g.complete { "complete" } else { "timed out" },
            g.missing.iter().map(|&id| name_of(id)).collect::<Vec<_>>()
        );
        for r in &g.replies {
            println!("    node {:x}: {}", r.from, String::from_utf8_lossy(&r.payload));
        }
        if g.replies.iter().any(|r| r.from == LATE_ID) {
            late_answered_in.get_or_insert(round);
        }
        last = Some(g);
        thread::sleep(interval.saturating_sub(start.elapsed()));
    }
    let last = last.ok_or("no rounds ran")?;
    let Some(first) = late_answered_in else { return Err("the late responder never answered".into()) };
    println!("the late responder answered from round {first} on (it started in round {join_round})");
    if !last.complete || !last.missing.is_empty() || last.replies.len() as u64 != responders + 1 {
        return Err(format!(
            "final round: {} of {} replies, complete {}, missing {:x?}",
            last.replies.len(),
            responders + 1,
            last.complete,
            last.missing
        ));
    }
    Ok(())
}

/// Starts a responder node in its own thread (the node lives and dies there); returns how many requests
/// it answered.
fn responder(
    net: Net,
    id: u64,
    name: String,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> JoinHandle<Result<u64, String>> {
    thread::spawn(move || {
        let started = Instant::now();
        let mut node = net
            .builder()
            .node_id(id)
            .name(&name)
            .membership(ANNOUNCE, MEMBER_TIMEOUT)
            // A status question only makes sense live: a joiner must not answer the requests it finds still
            // retained by the querier (their replies would be discarded anyway).
            .late_join(LateJoin::Next)
            // Subscribed from the start, so a query that arrives while this thread is still setting up is
            // answered rather than lost (the node is a member, and so expected to answer, from its start).
            .subscribe("status.query")
            .build()
            .map_err(|e| e.to_string())?;
        let mut sub = node.subscribe("status.query").map_err(|e| e.to_string())?;
        let mut publisher = node.publisher().ok_or("node closed")?;
        let mut handled = 0u64;
        let mut error = None;
        while !stop.load(Ordering::Relaxed) && error.is_none() {
            if Instant::now() >= deadline {
                return Err("still running at the deadline".into());
            }
            sub.wait(Duration::from_millis(10));
            sub.poll(usize::MAX, |r| {
                if let Received::Message(m) = r
                    && m.request().is_some()
                {
                    handled += 1;
                    let status =
                        format!("name={name} uptime={:.2}s handled={handled}", started.elapsed().as_secs_f64());
                    if let Err(e) = publisher.reply(&m, status.as_bytes()) {
                        error.get_or_insert(format!("reply: {e}"));
                    }
                }
            });
        }
        node.shutdown();
        error.map_or(Ok(handled), Err)
    })
}
