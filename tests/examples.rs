//! Runs each example program (examples/*.rs) as its own process on its own group and port, with small
//! sizes, and checks its exit status and its success line.
//!
//! `cargo test` builds the examples before it runs integration tests; `cargo test --test examples` alone
//! does not, so run `cargo build --examples` first in that case (a missing or stale binary fails the test
//! and says so).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::unique_group;

/// Generous for a debug build on a loaded machine; the examples themselves finish in a few seconds.
const LIMIT: Duration = Duration::from_secs(60);

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// target/<profile>/deps/examples-<hash> → target/<profile>/examples/<name>.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("test binary in target/<profile>/deps");
    let path = profile_dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let Ok(meta) = path.metadata() else {
        panic!("example binary {} is missing: run `cargo build --examples` (or plain `cargo test`)", path.display());
    };
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples").join(format!("{name}.rs"));
    if let (Ok(built), Ok(written)) = (meta.modified(), source.metadata().and_then(|m| m.modified())) {
        assert!(
            built >= written,
            "example binary {} is older than {}: run `cargo build --examples`",
            path.display(),
            source.display()
        );
    }
    path
}

/// Runs example `name` with `args` on a group and port of its own; kills it (by its handle) past `LIMIT`.
fn run_example(name: &str, args: &[&str]) -> Run {
    let (group, port) = unique_group();
    let started = Instant::now();
    let mut child = Command::new(example_binary(name))
        .args(["--group", &group.to_string(), "--port", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start example {name}: {e}"));
    // Read both pipes while the child runs, so that a chatty child never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
            panic!("example {name} still running after {LIMIT:?}; killed.\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let run = Run { status, stdout: out.join().expect("stdout reader"), stderr: err.join().expect("stderr reader") };
    eprintln!("example {name} on {group}:{port} finished in {:.1} s ({status})", started.elapsed().as_secs_f64());
    run
}

/// Runs example `name`, fails unless it exited with status 0 and printed `<name>: OK` and every line of
/// `expect`; returns its output.
fn run_ok(name: &str, args: &[&str], expect: &[&str]) -> String {
    let r = run_example(name, args);
    let show = || format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.status.success(), "example {name} failed ({}).\n{}", r.status, show());
    assert!(r.stdout.lines().any(|l| l == format!("{name}: OK")), "example {name}: no success line.\n{}", show());
    for e in expect {
        assert!(r.stdout.contains(e), "example {name}: expected {e:?} in its output.\n{}", show());
    }
    r.stdout
}

#[test]
fn log_fanout() {
    let out = run_ok(
        "log_fanout",
        &["--loggers", "3", "--lines", "200", "--all-collectors", "2", "--error-collectors", "1"],
        &["(log.>): 600 lines from 3 loggers", "(log.*.error): 120 lines from 3 loggers"],
    );
    assert_eq!(out.matches("in order, none unselected").count(), 3, "{out}");
}

#[test]
fn status_query() {
    run_ok(
        "status_query",
        &["--responders", "2", "--rounds", "8", "--join-round", "3"],
        &["starting late responder", "the late responder answered from round"],
    );
}

#[test]
fn work_queue() {
    run_ok(
        "work_queue",
        &["--workers", "3", "--tasks", "12", "--work-ms", "5"],
        &["worker-1 FAILS holding task", "REASSIGN task", "12 tasks done exactly once"],
    );
}

#[test]
fn replicated_map() {
    run_ok(
        "replicated_map",
        &["--nodes", "3", "--ops", "150", "--interval-ms", "2"],
        &["late: installed a snapshot", "all 4 maps identical"],
    );
}

#[test]
fn driven_loop() {
    run_ok(
        "driven_loop",
        &["--messages", "50000", "--size", "100", "--burst", "500"],
        &["50000 ticks of 100 bytes in order"],
    );
}

/// The harness sees a failing example as one: its exit status and message come through.
#[test]
fn a_failing_example_is_reported() {
    let r = run_example("log_fanout", &["--lines", "not-a-number"]);
    assert_eq!(r.status.code(), Some(1), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("log_fanout: FAILED: --lines"), "stderr:\n{}", r.stderr);
    assert!(!r.stdout.contains("log_fanout: OK"));
}
