//! What the examples share: std-only command-line options and the group every node of an example joins.
//! Each example includes this file with `#[path]`; it is not an example of its own.
#![allow(dead_code)]

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use blip::{BackendChoice, Node, NodeBuilder};

/// Membership announcements every 100 ms (the default is 1 s) and expiry after 1 s: the examples' nodes
/// learn of a joiner within about one round and notice a silent crash quickly.
pub const ANNOUNCE: Duration = Duration::from_millis(100);
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(1);

/// Prints `<example>: OK` or `<example>: FAILED: <why>` and turns the result into the exit code.
pub fn finish(example: &str, result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => {
            println!("{example}: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{example}: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the nodes meet: every node of the example joins this group on loopback with TTL 0.
#[derive(Clone, Copy)]
pub struct Net {
    pub group: IpAddr,
    pub port: u16,
    pub backend: BackendChoice,
}

impl Net {
    pub fn builder(&self) -> NodeBuilder {
        Node::builder().group(self.group).port(self.port).backend(self.backend)
    }
}

/// `--name value` pairs, std only.
pub struct Args(Vec<(String, String)>);

impl Args {
    /// Parses the command line, accepting `--group`, `--port`, `--backend` and the `extra` names.
    pub fn parse(extra: &[&str]) -> Result<Args, String> {
        let mut it = std::env::args().skip(1);
        let mut pairs = Vec::new();
        while let Some(arg) = it.next() {
            if arg == "--help" || arg == "-h" {
                let names: Vec<String> = extra.iter().map(|n| format!("[--{n} N]")).collect();
                println!("options: [--group ADDR] [--port N] [--backend auto|poll|uring] {}", names.join(" "));
                std::process::exit(0);
            }
            let name = arg.strip_prefix("--").ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            if !["group", "port", "backend"].contains(&name) && !extra.contains(&name) {
                return Err(format!("unknown option --{name} (try --help)"));
            }
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            pairs.push((name.to_owned(), value));
        }
        Ok(Args(pairs))
    }

    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.0.iter().rev().find(|(k, _)| k == name) {
            Some((_, v)) => v.parse().map_err(|_| format!("--{name}: cannot parse {v:?}")),
            None => Ok(default),
        }
    }

    pub fn net(&self, group: &str, port: u16) -> Result<Net, String> {
        let group: IpAddr = self.get("group", group.parse().expect("default group"))?;
        // Examples stay in the administratively scoped block; the node defaults keep TTL 0 and loopback.
        if !matches!(group, IpAddr::V4(g) if g.octets()[..2] == [239, 255]) {
            return Err(format!("--group {group}: use an address in 239.255.0.0/16"));
        }
        let backend = match self.get("backend", String::from("auto"))?.as_str() {
            "auto" => BackendChoice::Auto,
            "poll" => BackendChoice::Poll,
            "uring" => BackendChoice::Uring,
            other => return Err(format!("--backend {other}: expected auto, poll or uring")),
        };
        Ok(Net { group, port: self.get("port", port)?, backend })
    }
}
