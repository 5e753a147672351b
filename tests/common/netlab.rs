//! Network namespaces for tests that need several hosts or real kernel packet loss. Everything is created
//! by the test and deleted on drop; it needs root and iproute2 (and iptables for drops).
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};

/// Why namespace tests cannot run here, if they cannot.
pub fn skip_reason(need_iptables: bool) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    let has = |tool: &str, arg: &str| Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success());
    if !has("ip", "-V") {
        return Some("iproute2 (`ip`) not installed".into());
    }
    if need_iptables && !has("iptables", "--version") {
        return Some("iptables not installed".into());
    }
    None
}

/// Runs `ip` with these arguments; fails the test with its error output.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

pub fn run(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(out.status.success(), "{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Hosts (namespaces) on one bridge in a hub namespace: host i has device `eth0` with 10.201.<tag>.<i+1>/24
/// and fd43:0:<tag>::<i+1>/64.
pub struct Star {
    pub hub: String,
    pub hosts: Vec<String>,
}

impl Star {
    pub fn new(tag: u32, hosts: usize) -> Star {
        let pid = std::process::id() % 100_000;
        let star = Star {
            hub: format!("blhub{pid}x{tag}"),
            hosts: (0..hosts).map(|i| format!("blh{pid}x{tag}x{i}")).collect(),
        };
        ip(&["netns", "add", &star.hub]);
        ip(&["-n", &star.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        ip(&["-n", &star.hub, "link", "set", "br0", "up"]);
        for (i, ns) in star.hosts.iter().enumerate() {
            ip(&["netns", "add", ns]);
            let port = format!("p{i}");
            ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &star.hub]);
            ip(&["-n", &star.hub, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", &format!("10.201.{tag}.{}/24", i + 1), "dev", "eth0"]);
            ip(&["-n", ns, "-6", "addr", "add", &format!("fd43:0:{tag}::{}/64", i + 1), "dev", "eth0", "nodad"]);
            ip(&["-n", ns, "link", "set", "eth0", "up", "multicast", "on"]);
        }
        star
    }

    /// Drops a random fraction of every packet in and out of host `i` (iptables `statistic`, in the kernel).
    pub fn drop_fraction(&self, i: usize, p: f64) {
        let p = p.to_string();
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            #[rustfmt::skip]
            run("ip", &["netns", "exec", &self.hosts[i], "iptables", "-A", chain, dir, "eth0",
                        "-m", "statistic", "--mode", "random", "--probability", &p, "-j", "DROP"]);
        }
    }

    /// Cuts host `i` off entirely (`on`), or restores it: an iptables DROP rule first in both directions.
    pub fn blackout(&self, i: usize, on: bool) {
        let op = if on { "-I" } else { "-D" };
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            run("ip", &["netns", "exec", &self.hosts[i], "iptables", op, chain, dir, "eth0", "-j", "DROP"]);
        }
    }

    /// Starts this test binary inside host `i`, running the test `entry` with `env` set.
    pub fn spawn(&self, i: usize, entry: &str, env: (&str, String)) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[i]])
            .arg(std::env::current_exe().unwrap())
            .args([entry, "--exact", "--nocapture", "--test-threads=1"])
            .env(env.0, env.1)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn in namespace")
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
