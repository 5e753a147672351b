//! The application envelope: what a node puts in front of every message it publishes (topic, addressee,
//! request and reply ids), so the receiving engine can filter before anything reaches the application.
//!
//! The protocol core carries messages as opaque bytes; the envelope lives inside them. Layout (specified
//! in docs/PROTOCOL.md, section 9), all integers big-endian:
//!
//! ```text
//! flags u8          DIRECTED 0x01, REQUEST 0x02, REPLY 0x04; other bits must be zero
//! topic_len u8      0 for a message without topic (Publisher::send)
//! [target u64]      if DIRECTED: the only node id that may deliver it
//! [correlation u64] if REQUEST or REPLY
//! [origin u64]      if REQUEST or REPLY: node id of the requester (REQUEST) or of the replier (REPLY)
//! [reply_len u8, reply_topic]  if REQUEST: where replies go
//! topic             topic_len bytes of UTF-8
//! payload           the rest
//! ```
//!
//! A message whose envelope does not parse is dropped and counted by the receiving engine.

use crate::topic;

/// Flag: the message is addressed to one node.
pub const FLAG_DIRECTED: u8 = 0x01;
/// Flag: the message is a request that expects replies.
pub const FLAG_REQUEST: u8 = 0x02;
/// Flag: the message is a reply to a request.
pub const FLAG_REPLY: u8 = 0x04;
/// Length of an envelope with no topic and no options (`Publisher::send`).
pub const MIN_ENVELOPE_LEN: usize = 2;

/// Why an envelope did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The message ends inside the envelope.
    #[error("message shorter than its envelope")]
    Truncated,
    /// Unknown flag bits, or REQUEST and REPLY together.
    #[error("bad envelope flags {0:#04x}")]
    Flags(u8),
    /// The topic or reply topic is not valid UTF-8 or not a valid topic name.
    #[error("bad topic in envelope")]
    Topic,
}

/// A request's identity, carried by the request and echoed by its replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId {
    /// Chosen by the requester; unique among its outstanding requests.
    pub correlation: u64,
    /// Node id of the requester.
    pub requester: u64,
}

/// What kind of message this is, beyond its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A plain message.
    Plain,
    /// A request: replies go to `reply_topic`, addressed to `id.requester`.
    Request {
        /// Identity of the request.
        id: RequestId,
        /// The topic replies are published on.
        reply_topic: &'a str,
    },
    /// A reply to the request with this correlation id, from node `replier`.
    Reply {
        /// The request's correlation id.
        correlation: u64,
        /// Node id of the replier.
        replier: u64,
    },
}

/// A parsed or to-be-written envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The topic ("" for none).
    pub topic: &'a str,
    /// The only node that may deliver the message, if any.
    pub target: Option<u64>,
    /// Plain, request or reply.
    pub kind: Kind<'a>,
}

impl<'a> Envelope<'a> {
    /// An envelope with no topic, target or request: what `Publisher::send` uses.
    pub const PLAIN: Envelope<'static> = Envelope { topic: "", target: None, kind: Kind::Plain };

    /// Splits a message into its envelope and payload. Total: never panics.
    #[inline]
    pub fn parse(msg: &'a [u8]) -> Result<(Envelope<'a>, &'a [u8]), EnvelopeError> {
        // Most messages carry no topic and no options: two zero bytes, checked before anything else.
        if let [0, 0, payload @ ..] = msg {
            return Ok((Envelope::PLAIN, payload));
        }
        Envelope::parse_full(msg, true)
    }

    /// Like [`parse`](Self::parse) for a message the engine has already parsed and routed: topic names are
    /// not checked against the naming rules again (only as UTF-8), which saves a subscriber repeating the
    /// engine's work on every message.
    #[inline]
    pub(crate) fn parse_routed(msg: &'a [u8]) -> Result<(Envelope<'a>, &'a [u8]), EnvelopeError> {
        if let [0, 0, payload @ ..] = msg {
            return Ok((Envelope::PLAIN, payload));
        }
        Envelope::parse_full(msg, false)
    }

    fn parse_full(msg: &'a [u8], check_names: bool) -> Result<(Envelope<'a>, &'a [u8]), EnvelopeError> {
        let mut r = Reader(msg);
        let flags = r.u8()?;
        if flags & !(FLAG_DIRECTED | FLAG_REQUEST | FLAG_REPLY) != 0
            || flags & (FLAG_REQUEST | FLAG_REPLY) == FLAG_REQUEST | FLAG_REPLY
        {
            return Err(EnvelopeError::Flags(flags));
        }
        let topic_len = r.u8()? as usize;
        let target = if flags & FLAG_DIRECTED != 0 { Some(r.u64()?) } else { None };
        let kind = if flags & (FLAG_REQUEST | FLAG_REPLY) != 0 {
            let correlation = r.u64()?;
            let origin = r.u64()?;
            if flags & FLAG_REQUEST != 0 {
                let len = r.u8()? as usize;
                let reply_topic = topic_str(r.take(len)?, check_names)?;
                Kind::Request { id: RequestId { correlation, requester: origin }, reply_topic }
            } else {
                Kind::Reply { correlation, replier: origin }
            }
        } else {
            Kind::Plain
        };
        let topic = if topic_len == 0 { "" } else { topic_str(r.take(topic_len)?, check_names)? };
        Ok((Envelope { topic, target, kind }, r.0))
    }

    /// Bytes [`emit`](Self::emit) writes.
    pub fn len(&self) -> usize {
        let mut n = MIN_ENVELOPE_LEN + self.topic.len();
        if self.target.is_some() {
            n += 8;
        }
        match self.kind {
            Kind::Plain => {}
            Kind::Request { reply_topic, .. } => n += 17 + reply_topic.len(),
            Kind::Reply { .. } => n += 16,
        }
        n
    }

    /// Always false: an envelope is at least two bytes (present for `clippy::len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Checks the topics (valid names, or "" for no topic) so that `emit` produces a parseable envelope.
    pub fn validate(&self) -> Result<(), topic::FilterError> {
        if !self.topic.is_empty() {
            topic::validate_topic(self.topic)?;
        }
        if let Kind::Request { reply_topic, .. } = self.kind {
            topic::validate_topic(reply_topic)?;
        }
        Ok(())
    }

    /// Writes the envelope at the start of `buf` (at least [`len`](Self::len) bytes); returns its length.
    /// The topics must have passed [`validate`](Self::validate).
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let mut flags = 0;
        if self.target.is_some() {
            flags |= FLAG_DIRECTED;
        }
        match self.kind {
            Kind::Plain => {}
            Kind::Request { .. } => flags |= FLAG_REQUEST,
            Kind::Reply { .. } => flags |= FLAG_REPLY,
        }
        buf[0] = flags;
        buf[1] = self.topic.len() as u8;
        let mut at = 2;
        let mut put = |bytes: &[u8]| {
            buf[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        if let Some(t) = self.target {
            put(&t.to_be_bytes());
        }
        match self.kind {
            Kind::Plain => {}
            Kind::Request { id, reply_topic } => {
                put(&id.correlation.to_be_bytes());
                put(&id.requester.to_be_bytes());
                put(&[reply_topic.len() as u8]);
                put(reply_topic.as_bytes());
            }
            Kind::Reply { correlation, replier } => {
                put(&correlation.to_be_bytes());
                put(&replier.to_be_bytes());
            }
        }
        put(self.topic.as_bytes());
        at
    }
}

fn topic_str(bytes: &[u8], check_name: bool) -> Result<&str, EnvelopeError> {
    let s = std::str::from_utf8(bytes).map_err(|_| EnvelopeError::Topic)?;
    if check_name {
        topic::validate_topic(s).map_err(|_| EnvelopeError::Topic)?;
    }
    Ok(s)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EnvelopeError> {
        if self.0.len() < n {
            return Err(EnvelopeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, EnvelopeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, EnvelopeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("eight bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(e: Envelope<'_>, payload: &[u8]) {
        e.validate().unwrap();
        let mut buf = vec![0u8; e.len() + payload.len()];
        let n = e.emit(&mut buf);
        assert_eq!(n, e.len());
        buf[n..].copy_from_slice(payload);
        let (parsed, rest) = Envelope::parse(&buf).unwrap();
        assert_eq!(parsed, e);
        assert_eq!(rest, payload);
        assert_eq!(Envelope::parse_routed(&buf), Ok((e, payload)));
    }

    #[test]
    fn every_shape_round_trips() {
        round_trip(Envelope::PLAIN, b"x");
        round_trip(Envelope::PLAIN, b"");
        round_trip(Envelope { topic: "logs.web", target: None, kind: Kind::Plain }, b"hello");
        round_trip(Envelope { topic: "a", target: Some(u64::MAX), kind: Kind::Plain }, b"");
        let id = RequestId { correlation: 7, requester: 9 };
        round_trip(
            Envelope { topic: "status.query", target: None, kind: Kind::Request { id, reply_topic: "r.x" } },
            b"?",
        );
        round_trip(Envelope { topic: "r.x", target: Some(9), kind: Kind::Reply { correlation: 7, replier: 3 } }, b"ok");
    }

    #[test]
    fn rejects_bad_envelopes() {
        assert_eq!(Envelope::parse(&[]), Err(EnvelopeError::Truncated));
        assert_eq!(Envelope::parse(&[0]), Err(EnvelopeError::Truncated));
        assert_eq!(Envelope::parse(&[0x08, 0]), Err(EnvelopeError::Flags(0x08)));
        assert_eq!(Envelope::parse(&[0x06, 0]), Err(EnvelopeError::Flags(0x06)));
        assert_eq!(Envelope::parse(&[0, 3, b'a']), Err(EnvelopeError::Truncated));
        assert_eq!(Envelope::parse(&[0, 2, b'a', b'*']), Err(EnvelopeError::Topic));
        assert_eq!(Envelope::parse(&[0, 1, 0xff]), Err(EnvelopeError::Topic));
        assert_eq!(Envelope::parse(&[FLAG_DIRECTED, 0, 1, 2, 3]), Err(EnvelopeError::Truncated));
    }

    proptest! {
        #[test]
        fn parse_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok((env, payload)) = Envelope::parse(&bytes) {
                let len = bytes.len() - payload.len();
                prop_assert_eq!(env.len(), len);
                let mut out = vec![0u8; len];
                env.emit(&mut out);
                prop_assert_eq!(&out[..], &bytes[..len]);
            }
        }

        #[test]
        fn parse_inverts_emit(topic in "([a-z]{1,5}(\\.[a-z]{1,5}){0,3})?", target in any::<Option<u64>>(),
                              c in any::<u64>(), o in any::<u64>(), which in 0u8..3,
                              payload in proptest::collection::vec(any::<u8>(), 0..32)) {
            let kind = match which {
                0 => Kind::Plain,
                1 => Kind::Request { id: RequestId { correlation: c, requester: o }, reply_topic: "re.ply" },
                _ => Kind::Reply { correlation: c, replier: o },
            };
            round_trip(Envelope { topic: &topic, target, kind }, &payload);
        }
    }
}
