//! Work queue: tasks auctioned to workers over the group, with a worker that dies holding a task.
//!
//! A dispatcher announces each task as a request on `work.bid` ([`Requester::scatter`] with
//! `Expect::AllPeers`); every worker replies with a bid (its load, and how much it has done). The dispatcher assigns the task
//! to the best bidder with [`Publisher::send_to`] on `work.assign`, which only that worker's node delivers;
//! the worker does the task and reports `work.done` to the dispatcher alone. Nobody configures anybody's
//! address: workers are whoever is in the group, and their replies carry their node ids.
//!
//! One worker is faulty: it shuts its node down as soon as it is given a task, without doing it. The
//! dispatcher notices in one of two ways, whichever comes first: the membership event saying the worker
//! left (`PeerLeft`, or `PeerExpired` for a worker that vanished without a word), or no `work.done` within
//! the task deadline. It then auctions the task again among the remaining workers.
//!
//! All nodes run in this one process (one engine thread each) on loopback multicast with TTL 0. The run
//! succeeds when every task was done exactly once (checked against what the workers themselves report)
//! and at least one task was reassigned.
//!
//! ```text
//! cargo run --example work_queue
//! cargo run --example work_queue -- --workers 6 --tasks 60 --work-ms 5
//! ```
//!
//! Options: `--group ADDR` (in 239.255.0.0/16) `--port N` `--backend auto|poll|uring` `--workers N`
//! (including the faulty one; at least 2) `--tasks N` `--work-ms N` (time per task) `--task-deadline-ms N`
//! `--timeout SECS`. Exit code 0 and a final `work_queue: OK` line on success; a message and exit code 1
//! otherwise.
//!
//! [`Requester::scatter`]: blip::Requester::scatter
//! [`Publisher::send_to`]: blip::Publisher::send_to

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::process::ExitCode;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blip::proto::Event;
use blip::{Expect, Node, Received};

#[path = "common/mod.rs"]
mod common;
use common::{ANNOUNCE, Args, MEMBER_TIMEOUT, Net};

const DISPATCHER_ID: u64 = 0x3000;
/// Worker node ids are 1..=N; the faulty one is 1, so it wins the first auction (all bids are equal then,
/// and ties go to the lowest id).
const FAULTY_ID: u64 = 1;
const BID_TIMEOUT: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    common::finish("work_queue", run())
}

struct Settings {
    workers: u64,
    tasks: u64,
    work: Duration,
    task_deadline: Duration,
    deadline: Instant,
}

fn run() -> Result<(), String> {
    let args = Args::parse(&["workers", "tasks", "work-ms", "task-deadline-ms", "timeout"])?;
    let s = Settings {
        workers: args.get("workers", 4)?,
        tasks: args.get("tasks", 20)?,
        work: Duration::from_millis(args.get("work-ms", 20)?),
        task_deadline: Duration::from_millis(args.get("task-deadline-ms", 2000)?),
        deadline: Instant::now() + Duration::from_secs(args.get("timeout", 30)?),
    };
    let net = args.net("239.255.71.3", 47103)?;
    if s.workers < 2 {
        return Err("--workers must be at least 2 (one of them fails)".into());
    }
    println!(
        "work_queue on {}:{}: {} tasks, {} workers (worker-{FAULTY_ID} fails on its first task)",
        net.group, net.port, s.tasks, s.workers
    );

    let mut node = net
        .builder()
        .node_id(DISPATCHER_ID)
        .name("dispatcher")
        .membership(ANNOUNCE, MEMBER_TIMEOUT)
        .build()
        .map_err(|e| format!("dispatcher: {e}"))?;
    let workers: Vec<_> =
        (1..=s.workers).map(|id| (id, worker(net, id, id == FAULTY_ID, s.work, s.deadline))).collect();
    let dispatched = dispatch(&mut node, &s);
    // Told to stop even after a failure, so that the workers end before their deadline.
    if let Some(mut p) = node.publisher() {
        let _ = p.publish("work.stop", b"");
    }
    let mut failures: Vec<String> = dispatched.as_ref().err().cloned().into_iter().collect();
    let mut done_by: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (id, t) in workers {
        match t.join() {
            Ok(Ok(done)) => {
                println!("  worker-{id} did {} tasks", done.len());
                for task in done {
                    done_by.entry(task).or_default().push(id);
                }
            }
            Ok(Err(e)) => failures.push(format!("worker-{id}: {e}")),
            Err(_) => failures.push(format!("worker-{id}: thread panicked")),
        }
    }
    node.shutdown();
    if let Ok(reassignments) = dispatched {
        // The workers' own account, independent of what reached the dispatcher.
        let twice: Vec<_> = done_by.iter().filter(|(_, w)| w.len() > 1).collect();
        if !twice.is_empty() {
            failures.push(format!("tasks done more than once (task, workers): {twice:?}"));
        }
        if done_by.len() as u64 != s.tasks {
            failures.push(format!("workers did {} distinct tasks of {}", done_by.len(), s.tasks));
        }
        if reassignments == 0 {
            failures.push("no task was reassigned, so the failure was never handled".into());
        }
        println!("{} tasks done exactly once; {reassignments} reassigned after a worker failure", done_by.len());
    }
    if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) }
}

/// Auctions and assigns every task, reassigning those of workers that fail; returns the number of
/// reassignments.
fn dispatch(node: &mut Node, s: &Settings) -> Result<usize, String> {
    let mut requester = node.requester().map_err(|e| e.to_string())?;
    let mut done_sub = node.subscribe("work.done").map_err(|e| e.to_string())?;
    let mut publisher = node.publisher().ok_or("dispatcher node closed")?;
    let past = |what: &str| -> Result<(), String> {
        if Instant::now() >= s.deadline { Err(format!("timed out {what}")) } else { Ok(()) }
    };
    while (node.peers().len() as u64) < s.workers {
        past(&format!("waiting for workers ({} of {} joined)", node.peers().len(), s.workers))?;
        thread::sleep(Duration::from_millis(10));
    }
    // A node is a member from its start, a moment before its application subscribes; a first auction in
    // that moment would miss its bid. One round that everybody answers shows that all workers listen.
    loop {
        past("waiting for every worker to answer")?;
        let g = requester.scatter("work.bid", b"warm-up", Expect::AllPeers, BID_TIMEOUT).map_err(|e| e.to_string())?;
        if g.complete && g.replies.len() as u64 == s.workers {
            break;
        }
    }

    let mut pending: VecDeque<u64> = (0..s.tasks).collect();
    let mut assigned: HashMap<u64, (u64, Instant)> = HashMap::new();
    let mut completed: HashMap<u64, u64> = HashMap::new();
    let mut failed: HashSet<u64> = HashSet::new();
    let mut reassignments = 0;
    while (completed.len() as u64) < s.tasks {
        past(&format!("with {} of {} tasks done", completed.len(), s.tasks))?;
        let mut error = None;
        let mut gone = Vec::new();
        done_sub.poll(usize::MAX, |r| match r {
            Received::Message(m) if m.topic == "work.done" => {
                let text = String::from_utf8_lossy(m.payload);
                let (Some(task), Some(worker)) = (field(&text, "task="), field(&text, "worker=")) else {
                    error.get_or_insert(format!("malformed report {text:?}"));
                    return;
                };
                if let Some(first) = completed.get(&task) {
                    error.get_or_insert(format!("task {task} done twice, by worker-{first} and worker-{worker}"));
                } else if assigned.get(&task).map(|a| a.0) != Some(worker) {
                    error.get_or_insert(format!("task {task} done by worker-{worker}, which no longer had it"));
                } else {
                    assigned.remove(&task);
                    completed.insert(task, worker);
                }
            }
            Received::Event(Event::PeerLeft { node_id, .. }) => gone.push((node_id, "left the group")),
            Received::Event(Event::PeerExpired { node_id, .. }) => gone.push((node_id, "expired (silent)")),
            Received::Loss { session, .. } => {
                error.get_or_insert(format!("lost reports from session {session:x}"));
            }
            _ => {}
        });
        if let Some(e) = error {
            return Err(e);
        }
        let now = Instant::now();
        for (task, &(worker, due)) in &assigned {
            if due <= now {
                gone.push((worker, "missed a task deadline"));
                println!("  task {task}: no report from worker-{worker} within {:?}", s.task_deadline);
            }
        }
        for (worker, why) in gone {
            failed.insert(worker);
            let mut lost: Vec<u64> = assigned.iter().filter(|(_, a)| a.0 == worker).map(|(&t, _)| t).collect();
            lost.sort();
            for task in lost {
                assigned.remove(&task);
                pending.push_front(task);
                reassignments += 1;
                println!("  REASSIGN task {task}: worker-{worker} {why}");
            }
        }

        let Some(task) = pending.pop_front() else {
            done_sub.wait(Duration::from_millis(20));
            continue;
        };
        let g = requester
            .scatter("work.bid", format!("task={task}").as_bytes(), Expect::AllPeers, BID_TIMEOUT)
            .map_err(|e| format!("auction of task {task}: {e}"))?;
        // Least loaded first, then whoever has done least so far, then the lowest node id.
        let bids: Vec<(u64, u64, u64)> = g
            .replies
            .iter()
            .filter(|r| !failed.contains(&r.from))
            .filter_map(|r| {
                let text = String::from_utf8_lossy(&r.payload);
                Some((field(&text, "load=")?, field(&text, "done=")?, r.from))
            })
            .collect();
        let Some(&(load, _, best)) = bids.iter().min() else {
            println!("  task {task}: no bids, will try again");
            pending.push_front(task);
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        publisher
            .send_to(best, "work.assign", format!("task={task} dispatcher={DISPATCHER_ID}").as_bytes())
            .map_err(|e| format!("assigning task {task}: {e}"))?;
        assigned.insert(task, (best, Instant::now() + s.task_deadline));
        println!("  task {task} -> worker-{best} (load {load}; {} bids)", bids.len());
    }
    Ok(reassignments)
}

/// The value of `name=` in a space-separated `key=value` text.
fn field(text: &str, name: &str) -> Option<u64> {
    text.split(' ').find_map(|f| f.strip_prefix(name)).and_then(|v| v.parse().ok())
}

/// A worker node in its own thread (the node lives and dies there). Returns the tasks it did.
fn worker(net: Net, id: u64, faulty: bool, work: Duration, deadline: Instant) -> JoinHandle<Result<Vec<u64>, String>> {
    thread::spawn(move || {
        let name = format!("worker-{id}");
        let mut node = net
            .builder()
            .node_id(id)
            .name(&name)
            .membership(ANNOUNCE, MEMBER_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let mut sub = node.subscribe("work.>").map_err(|e| e.to_string())?;
        let mut publisher = node.publisher().ok_or("node closed")?;
        let mut queue: VecDeque<(u64, u64)> = VecDeque::new();
        // The task in progress, with its dispatcher and when it will be finished. Working by the clock
        // instead of sleeping keeps the worker answering bids while it works.
        let mut current: Option<(u64, u64, Instant)> = None;
        let mut done = Vec::new();
        let mut stopping = false;
        while !(stopping && queue.is_empty() && current.is_none()) {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("still running at the deadline with {} tasks queued", queue.len()));
            }
            let idle = current.map_or(Duration::from_millis(20), |(_, _, at)| at.saturating_duration_since(now));
            sub.wait(idle.min(Duration::from_millis(20)));
            let mut error = None;
            let mut crash_with = None;
            let load = queue.len() + current.is_some() as usize;
            sub.poll(usize::MAX, |r| {
                let Received::Message(m) = r else { return };
                match m.topic {
                    "work.bid" if m.request().is_some() => {
                        let bid = format!("load={load} done={}", done.len());
                        if let Err(e) = publisher.reply(&m, bid.as_bytes()) {
                            error.get_or_insert(format!("bid: {e}"));
                        }
                    }
                    "work.assign" => {
                        let text = String::from_utf8_lossy(m.payload);
                        match (field(&text, "task="), field(&text, "dispatcher=")) {
                            (Some(task), Some(_)) if faulty => crash_with = Some(task),
                            (Some(task), Some(from)) => queue.push_back((task, from)),
                            _ => {
                                error.get_or_insert(format!("malformed assignment {text:?}"));
                            }
                        }
                    }
                    "work.stop" => stopping = true,
                    _ => {}
                }
            });
            if let Some(e) = error {
                return Err(e);
            }
            if let Some(task) = crash_with {
                println!("  worker-{id} FAILS holding task {task}: shuts its node down without doing it");
                node.shutdown();
                return Ok(done);
            }
            if let Some((task, dispatcher, at)) = current
                && Instant::now() >= at
            {
                let report = format!("task={task} worker={id}");
                publisher.send_to(dispatcher, "work.done", report.as_bytes()).map_err(|e| e.to_string())?;
                done.push(task);
                current = None;
            }
            if current.is_none() {
                current = queue.pop_front().map(|(task, dispatcher)| (task, dispatcher, Instant::now() + work));
            }
        }
        node.shutdown();
        Ok(done)
    })
}
