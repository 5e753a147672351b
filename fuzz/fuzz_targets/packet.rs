//! Every wire parser on arbitrary bytes: must return Ok or Err, never panic, and a parsed packet's views
//! (frames, NAK ranges, member name) must stay inside the input.
#![no_main]

use blip::wire::{FRAME_HEADER_LEN, Packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Packet::parse(data) else { return };
    match p {
        Packet::Data(d) => {
            let total: usize = d.frames().map(|f| f.payload.len() + FRAME_HEADER_LEN).sum();
            assert_eq!(total + blip::wire::DATA_HEADER_LEN, data.len());
        }
        Packet::Nak(n) => {
            for r in n.ranges() {
                assert!(r.len >= 1 && r.end() <= blip::wire::MAX_SEQ);
            }
        }
        Packet::Member(m) => assert!(m.repr.name.len() <= blip::wire::MAX_NAME_LEN),
        Packet::Heartbeat(_, hb) => assert!(hb.low <= hb.next_seq),
        Packet::Status(..) => {}
    }
});
