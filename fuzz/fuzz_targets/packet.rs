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
            // The shape validation recorded is what the frames say (receivers trust it to end runs).
            let frames: Vec<_> = d.frames().collect();
            let last = frames.last().expect("DATA has a frame");
            let whole = blip::wire::FRAME_FIRST | blip::wire::FRAME_LAST;
            let shape = d.shape();
            assert_eq!(shape.count, frames.len());
            assert_eq!(shape.last_at, data.len() - last.payload.len() - FRAME_HEADER_LEN);
            assert_eq!(shape.last_whole, last.flags & whole == whole);
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
