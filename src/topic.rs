//! Topic names and subscription filters.
//!
//! A *topic* names what a message is about: one or more dot-separated segments, such as `logs.web.error`.
//! A *filter* selects topics for a subscriber, segment by segment:
//!
//! - a literal segment matches exactly that segment;
//! - `*` matches exactly one segment, whatever it is;
//! - `>` matches one or more trailing segments, and may only be the last segment of a filter.
//!
//! | filter          | matches                                  | does not match                   |
//! |-----------------|------------------------------------------|----------------------------------|
//! | `logs.web`      | `logs.web`                               | `logs`, `logs.web.error`         |
//! | `logs.*`        | `logs.web`, `logs.db`                    | `logs`, `logs.web.error`         |
//! | `logs.*.error`  | `logs.web.error`                         | `logs.web.warn`, `logs.error`    |
//! | `logs.>`        | `logs.web`, `logs.web.error`             | `logs`, `metrics.cpu`            |
//! | `>`             | every public topic                       | `_private.…` topics (see below)  |
//! | `*.*`           | `a.b`, `logs.web`                        | `a`, `a.b.c`                     |
//!
//! Rules for names: a topic is 1 to [`MAX_TOPIC_LEN`] bytes of UTF-8; segments are non-empty and contain
//! neither `.` nor whitespace, and topics contain no `*` or `>` (those are for filters). Matching is exact,
//! byte for byte (case-sensitive).
//!
//! *Private topics* belong to one node: `_private.<node id as 16 hex digits>.<rest>`, built with
//! [`private_topic`]. Wildcards in the first segment never match a topic whose first segment is `_private`,
//! so `>` or `*.x` do not see them, and a node refuses a subscription that names another node's private
//! topic ([`FilterError::Private`]). Messages to a private topic are also addressed to their owner on the
//! wire, so other nodes' engines drop them before any delivery. (This keeps honest nodes apart; it is not
//! a security boundary: anyone on the group can read the packets unless the group is encrypted.)

use std::fmt;

/// Longest topic name, in bytes (it travels in a one-byte length field).
pub const MAX_TOPIC_LEN: usize = 255;
/// First segment of every private topic.
pub const PRIVATE_PREFIX: &str = "_private";

/// Why a topic name or a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// The topic or filter is empty or longer than [`MAX_TOPIC_LEN`] bytes.
    #[error("topic must be 1..={MAX_TOPIC_LEN} bytes, got {0}")]
    Length(usize),
    /// A segment is empty (two dots in a row, or a dot at either end).
    #[error("empty segment in {0:?}")]
    EmptySegment(String),
    /// A segment holds whitespace, or a wildcard mixed with other characters.
    #[error("bad segment {segment:?} in {name:?}: segments hold no whitespace, and * or > only alone")]
    BadSegment {
        /// The whole name.
        name: String,
        /// The offending segment.
        segment: String,
    },
    /// A topic name (not a filter) contains `*` or `>`.
    #[error("topic {0:?} contains a wildcard; wildcards are for filters")]
    WildcardInTopic(String),
    /// `>` appears before the last segment of a filter.
    #[error("filter {0:?}: > may only be the last segment")]
    TailNotLast(String),
    /// The filter names a private topic of another node.
    #[error("filter {0:?} names another node's private topic")]
    Private(String),
}

/// Checks a topic name against the rules in the [module docs](self).
pub fn validate_topic(topic: &str) -> Result<(), FilterError> {
    check_segments(topic, false)
}

/// The private topic `name` of node `node_id`: `_private.<16 hex digits>.<name>`.
pub fn private_topic(node_id: u64, name: &str) -> Result<String, FilterError> {
    let topic = format!("{PRIVATE_PREFIX}.{node_id:016x}.{name}");
    validate_topic(&topic)?;
    Ok(topic)
}

/// The node owning `topic`, if it is a private topic.
pub fn private_owner(topic: &str) -> Option<u64> {
    let rest = topic.strip_prefix(PRIVATE_PREFIX)?.strip_prefix('.')?;
    let id = rest.get(..16)?;
    if !rest[16..].is_empty() && !rest[16..].starts_with('.') {
        return None;
    }
    u64::from_str_radix(id, 16).ok()
}

fn check_segments(name: &str, filter: bool) -> Result<(), FilterError> {
    if name.is_empty() || name.len() > MAX_TOPIC_LEN {
        return Err(FilterError::Length(name.len()));
    }
    let count = name.split('.').count();
    for (i, seg) in name.split('.').enumerate() {
        if seg.is_empty() {
            return Err(FilterError::EmptySegment(name.to_owned()));
        }
        let wild = seg.contains(['*', '>']);
        if wild && !filter {
            return Err(FilterError::WildcardInTopic(name.to_owned()));
        }
        if seg.chars().any(char::is_whitespace) || (wild && seg.len() != 1) {
            return Err(FilterError::BadSegment { name: name.to_owned(), segment: seg.to_owned() });
        }
        if seg == ">" && i + 1 != count {
            return Err(FilterError::TailNotLast(name.to_owned()));
        }
    }
    Ok(())
}

/// A parsed subscription filter. See the [module docs](self) for the rules.
#[derive(Clone, PartialEq, Eq)]
pub struct Filter {
    pattern: String,
}

impl Filter {
    /// Parses a filter.
    pub fn new(pattern: &str) -> Result<Filter, FilterError> {
        check_segments(pattern, true)?;
        Ok(Filter { pattern: pattern.to_owned() })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the filter names (literally) the private topics of a node other than `node_id`.
    pub fn names_foreign_private(&self, node_id: u64) -> bool {
        let mut segs = self.pattern.split('.');
        if segs.next() != Some(PRIVATE_PREFIX) {
            return false;
        }
        !matches!(segs.next(), Some(id) if id.len() == 16 && u64::from_str_radix(id, 16) == Ok(node_id))
    }

    /// Whether `topic` (a valid topic name) matches. Allocation-free.
    pub fn matches(&self, topic: &str) -> bool {
        let mut t = topic.split('.');
        let mut first = true;
        for f in self.pattern.split('.') {
            let Some(seg) = t.next() else { return false };
            let wild = f == "*" || f == ">";
            if wild && first && seg == PRIVATE_PREFIX {
                return false;
            }
            if f == ">" {
                return true;
            }
            if !wild && f != seg {
                return false;
            }
            first = false;
        }
        t.next().is_none()
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({:?})", self.pattern)
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (filter, topic, matches)
    const TABLE: &[(&str, &str, bool)] = &[
        ("logs.web", "logs.web", true),
        ("logs.web", "logs", false),
        ("logs.web", "logs.web.error", false),
        ("logs.web", "logs.Web", false),
        ("logs.*", "logs.web", true),
        ("logs.*", "logs.db", true),
        ("logs.*", "logs", false),
        ("logs.*", "logs.web.error", false),
        ("logs.*.error", "logs.web.error", true),
        ("logs.*.error", "logs.web.warn", false),
        ("logs.*.error", "logs.error", false),
        ("logs.>", "logs.web", true),
        ("logs.>", "logs.web.error", true),
        ("logs.>", "logs", false),
        ("logs.>", "metrics.cpu", false),
        (">", "a", true),
        (">", "a.b.c", true),
        ("*", "a", true),
        ("*", "a.b", false),
        ("*.*", "a.b", true),
        ("*.*", "a", false),
        ("*.*", "a.b.c", false),
        ("*.>", "a", false),
        ("*.>", "a.b", true),
        ("a.*.>", "a.b.c.d", true),
        ("a.*.>", "a.b", false),
        ("logs", "logsx", false),
        ("logsx", "logs", false),
        (">", "_private.00000000000000ab.replies", false),
        ("*.00000000000000ab.replies", "_private.00000000000000ab.replies", false),
        ("_private.>", "_private.00000000000000ab.replies", true),
        ("_private.00000000000000ab.*", "_private.00000000000000ab.replies", true),
        ("x.>", "x._private", true),
    ];

    #[test]
    fn matching_table() {
        for &(filter, topic, expected) in TABLE {
            validate_topic(topic).unwrap_or_else(|e| panic!("{topic}: {e}"));
            let f = Filter::new(filter).unwrap_or_else(|e| panic!("{filter}: {e}"));
            assert_eq!(f.matches(topic), expected, "filter {filter:?} on topic {topic:?}");
        }
    }

    #[test]
    fn bad_names() {
        assert_eq!(validate_topic(""), Err(FilterError::Length(0)));
        assert_eq!(validate_topic(&"a".repeat(256)), Err(FilterError::Length(256)));
        assert!(validate_topic(&"a".repeat(255)).is_ok());
        assert!(matches!(validate_topic("a..b"), Err(FilterError::EmptySegment(_))));
        assert!(matches!(validate_topic(".a"), Err(FilterError::EmptySegment(_))));
        assert!(matches!(validate_topic("a."), Err(FilterError::EmptySegment(_))));
        assert!(matches!(validate_topic("a.*"), Err(FilterError::WildcardInTopic(_))));
        assert!(matches!(validate_topic("a b"), Err(FilterError::BadSegment { .. })));
        assert!(matches!(Filter::new("a.>.b"), Err(FilterError::TailNotLast(_))));
        assert!(matches!(Filter::new("a.b*"), Err(FilterError::BadSegment { .. })));
        assert!(matches!(Filter::new("a.>>"), Err(FilterError::BadSegment { .. })));
        assert!(Filter::new("a.*.>").is_ok());
    }

    #[test]
    fn private_topics() {
        let t = private_topic(0xab, "replies").unwrap();
        assert_eq!(t, "_private.00000000000000ab.replies");
        assert_eq!(private_owner(&t), Some(0xab));
        assert_eq!(private_owner("_private.00000000000000ab"), Some(0xab));
        assert_eq!(private_owner("_private.00000000000000abc"), None);
        assert_eq!(private_owner("logs.web"), None);
        assert!(Filter::new("_private.>").unwrap().names_foreign_private(0xab));
        assert!(Filter::new("_private.00000000000000ac.>").unwrap().names_foreign_private(0xab));
        assert!(!Filter::new("_private.00000000000000ab.>").unwrap().names_foreign_private(0xab));
        assert!(!Filter::new(">").unwrap().names_foreign_private(0xab));
    }

    proptest::proptest! {
        #[test]
        fn literal_filter_matches_only_itself(a in "[a-c]{1,2}(\\.[a-c]{1,2}){0,3}", b in "[a-c]{1,2}(\\.[a-c]{1,2}){0,3}") {
            let f = Filter::new(&a).unwrap();
            proptest::prop_assert_eq!(f.matches(&b), a == b);
            let tail = Filter::new(&format!("{a}.>")).unwrap();
            proptest::prop_assert_eq!(tail.matches(&b), b.starts_with(&format!("{a}.")));
        }
    }
}
