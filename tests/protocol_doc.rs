//! docs/PROTOCOL.md must match the code: every constant in its table exists here with the same value, and
//! every protocol constant of the code is in the table.

use std::collections::HashMap;
use std::time::Duration;

use blip::proto::{self, HOUSEKEEPING_INTERVAL};
use blip::wire;

#[derive(Debug, PartialEq)]
enum Value {
    Int(u64),
    Time(Duration),
}

fn code_constants() -> HashMap<&'static str, Value> {
    use Value::*;
    let mut m = HashMap::new();
    for (name, v) in [
        ("VERSION", wire::VERSION as u64),
        ("HEADER_LEN", wire::HEADER_LEN as u64),
        ("FLAG_RETRANSMIT", wire::FLAG_RETRANSMIT as u64),
        ("FLAG_SEALED", wire::FLAG_SEALED as u64),
        ("SEAL_TAG_LEN", wire::SEAL_TAG_LEN as u64),
        ("SEAL_OVERHEAD", wire::SEAL_OVERHEAD as u64),
        ("KEY_LEN", proto::KEY_LEN as u64),
        ("MAX_KEYS", proto::MAX_KEYS as u64),
        ("REPLAY_WINDOW", proto::REPLAY_WINDOW),
        ("MAX_SEQ", wire::MAX_SEQ),
        ("DATA_HEADER_LEN", wire::DATA_HEADER_LEN as u64),
        ("FRAME_HEADER_LEN", wire::FRAME_HEADER_LEN as u64),
        ("FRAME_FIRST", wire::FRAME_FIRST as u64),
        ("FRAME_LAST", wire::FRAME_LAST as u64),
        ("HEARTBEAT_LEN", wire::HEARTBEAT_LEN as u64),
        ("NAK_HEADER_LEN", wire::NAK_HEADER_LEN as u64),
        ("NAK_RANGE_LEN", wire::NAK_RANGE_LEN as u64),
        ("MAX_NAK_RANGES", wire::MAX_NAK_RANGES as u64),
        ("STATUS_LEN", wire::STATUS_LEN as u64),
        ("MEMBER_HEADER_LEN", wire::MEMBER_HEADER_LEN as u64),
        ("MAX_NAME_LEN", wire::MAX_NAME_LEN as u64),
        ("MIN_DATAGRAM", proto::MIN_DATAGRAM as u64),
        ("MAX_UDP_PAYLOAD", proto::MAX_UDP_PAYLOAD as u64),
        ("DEFAULT_MAX_DATAGRAM", proto::DEFAULT_MAX_DATAGRAM as u64),
        ("DEFAULT_WINDOW", proto::DEFAULT_WINDOW as u64),
        ("DEFAULT_MAX_MESSAGE", proto::DEFAULT_MAX_MESSAGE as u64),
        ("DEFAULT_MAX_REASSEMBLY", proto::DEFAULT_MAX_REASSEMBLY as u64),
        ("DEFAULT_MAX_SENDERS", proto::DEFAULT_MAX_SENDERS as u64),
        ("DEFAULT_MAX_RECEIVERS", proto::DEFAULT_MAX_RECEIVERS as u64),
        ("DEFAULT_MAX_MEMBERS", proto::DEFAULT_MAX_MEMBERS as u64),
        ("DEFAULT_RETRANSMIT_QUEUE", proto::DEFAULT_RETRANSMIT_QUEUE as u64),
        ("DEFAULT_RETRANSMIT_RATE", proto::DEFAULT_RETRANSMIT_RATE),
        ("DEFAULT_RETRANSMIT_BURST", proto::DEFAULT_RETRANSMIT_BURST),
        ("STRANGER_SHARE", proto::STRANGER_SHARE),
    ] {
        m.insert(name, Int(v));
    }
    for (name, d) in [
        ("DEFAULT_NAK_BACKOFF", proto::DEFAULT_NAK_BACKOFF),
        ("DEFAULT_NAK_RETRY", proto::DEFAULT_NAK_RETRY),
        ("DEFAULT_RETRANSMIT_LINGER", proto::DEFAULT_RETRANSMIT_LINGER),
        ("DEFAULT_HEARTBEAT_MIN", proto::DEFAULT_HEARTBEAT_MIN),
        ("DEFAULT_HEARTBEAT_MAX", proto::DEFAULT_HEARTBEAT_MAX),
        ("DEFAULT_STATUS_INTERVAL", proto::DEFAULT_STATUS_INTERVAL),
        ("DEFAULT_SENDER_TIMEOUT", proto::DEFAULT_SENDER_TIMEOUT),
        ("DEFAULT_RECEIVER_TIMEOUT", proto::DEFAULT_RECEIVER_TIMEOUT),
        ("DEFAULT_ANNOUNCE_INTERVAL", proto::DEFAULT_ANNOUNCE_INTERVAL),
        ("DEFAULT_MEMBER_TIMEOUT", proto::DEFAULT_MEMBER_TIMEOUT),
        ("HOUSEKEEPING_INTERVAL", HOUSEKEEPING_INTERVAL),
    ] {
        m.insert(name, Time(d));
    }
    m
}

fn parse_value(cell: &str) -> Option<Value> {
    let cell = cell.trim().trim_matches('`').replace(['_', ','], "");
    let (num, unit) = match cell.find(|c: char| !c.is_ascii_hexdigit() && c != 'x') {
        Some(i) => (cell[..i].trim(), cell[i..].trim()),
        None => (cell.as_str(), ""),
    };
    let n: u64 =
        if let Some(hex) = num.strip_prefix("0x") { u64::from_str_radix(hex, 16).ok()? } else { num.parse().ok()? };
    Some(match unit {
        "" | "B" | "bytes" | "datagrams" => Value::Int(n),
        "µs" | "us" => Value::Time(Duration::from_micros(n)),
        "ms" => Value::Time(Duration::from_millis(n)),
        "s" => Value::Time(Duration::from_secs(n)),
        _ => return None,
    })
}

#[test]
fn protocol_md_constants_match_the_code() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).expect("docs/PROTOCOL.md");
    let code = code_constants();
    let mut documented = HashMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`');
        if !name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
            continue;
        }
        let value = parse_value(cells[2]).unwrap_or_else(|| panic!("cannot read the value of {name}: {:?}", cells[2]));
        documented.insert(name.to_owned(), value);
    }
    for (name, value) in &documented {
        let Some(actual) = code.get(name.as_str()) else {
            panic!("PROTOCOL.md documents {name}, which the code lacks")
        };
        assert_eq!(actual, value, "{name}: code and PROTOCOL.md differ");
    }
    for name in code.keys() {
        assert!(documented.contains_key(*name), "{name} is missing from PROTOCOL.md's constants table");
    }
}
