//! A process whose seccomp profile refuses io_uring (as many container runtimes' default profiles do): the
//! probe must see it, `Auto` must fall back to the poll backend and say why, `Uring` must fail with a clear
//! error, and the fallback must carry traffic.
//!
//! The filter cannot be removed once installed, so the checks run in a child process: the parent runs this
//! test binary again with only `blocked_child` selected and the environment variable set.
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use blip::{BackendChoice, BackendKind, Error};
use common::*;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

const CHILD_ENV: &str = "BLIP_TEST_URING_BLOCKED_CHILD";
const CHILD_DONE: &str = "uring-blocked child: all checks passed";

#[test]
fn io_uring_refused_by_seccomp_falls_back_to_poll() {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["blocked_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(CHILD_DONE),
        "child failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// Runs only in the child (the parent sets the variable); in a plain `cargo test` it returns at once.
#[test]
fn blocked_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // io_uring_setup fails with EPERM; every other system call is allowed. Threads started later (the
    // engine's) inherit the filter.
    let rules = BTreeMap::from([(libc::SYS_io_uring_setup, vec![])]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().expect("a seccompiler target architecture"),
    )
    .expect("seccomp filter");
    let program: BpfProgram = filter.try_into().expect("compile the seccomp filter");
    seccompiler::apply_filter(&program).expect("install the seccomp filter");

    let group = unique_group();
    match builder(BackendChoice::Uring, group).build() {
        Err(Error::BackendUnavailable { kind: BackendKind::Uring, reason }) => {
            assert!(!reason.is_empty(), "the error must say why");
            println!("Uring refused as expected: {reason}");
        }
        Err(e) => panic!("Uring must fail with BackendUnavailable, got {e}"),
        Ok(n) => panic!("Uring must fail under the filter, got a node on {}", n.info().backend),
    }

    let mut sub_node = builder(BackendChoice::Auto, group).build().expect("auto falls back");
    let mut pub_node = builder(BackendChoice::Auto, group).build().expect("auto falls back");
    for n in [&sub_node, &pub_node] {
        assert_eq!(n.info().backend, BackendKind::Poll, "{}", n.info().backend_reason);
        assert!(n.info().backend_reason.contains("unavailable"), "reason: {}", n.info().backend_reason);
    }
    println!("Auto: {}", pub_node.info().backend_reason);

    const N: u64 = 2_000;
    let mut sub = sub_node.subscriber().unwrap();
    let collector = std::thread::spawn(move || collect(&mut sub, 1, N, Duration::from_secs(60)));
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 1, 100);
    send_rest(&mut publisher, N, 100);
    assert_perfect(&collector.join().expect("collector thread"), N);
    println!("{CHILD_DONE}");
}
