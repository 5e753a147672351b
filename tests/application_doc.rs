//! docs/APPLICATION.md must match the code: the constants table of section 6 lists exactly the envelope and
//! topic constants, with the code's values.

use std::collections::HashMap;

use blip::{envelope, topic};

#[test]
fn constants_table_matches_the_code() {
    let code: HashMap<&str, u64> = [
        ("FLAG_DIRECTED", envelope::FLAG_DIRECTED as u64),
        ("FLAG_REQUEST", envelope::FLAG_REQUEST as u64),
        ("FLAG_REPLY", envelope::FLAG_REPLY as u64),
        ("MIN_ENVELOPE_LEN", envelope::MIN_ENVELOPE_LEN as u64),
        ("MAX_TOPIC_LEN", topic::MAX_TOPIC_LEN as u64),
    ]
    .into_iter()
    .collect();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/APPLICATION.md")).unwrap();
    let mut documented = HashMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // Two-column rows of the constants table: | `NAME` | value |
        if cells.len() == 4 && cells[1].starts_with('`') && cells[1].ends_with('`') {
            let name = cells[1].trim_matches('`');
            let v = cells[2];
            let value = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            if let Ok(value) = value {
                documented.insert(name, value);
            }
        }
    }
    for (name, value) in &code {
        assert_eq!(documented.get(name), Some(value), "docs/APPLICATION.md: {name} should be {value}");
    }
    for name in documented.keys() {
        assert!(code.contains_key(name), "docs/APPLICATION.md documents {name}, which the code does not have");
    }
}
