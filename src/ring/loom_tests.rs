//! Model checks of both rings under loom: `RUSTFLAGS="--cfg blip_loom -C debug-assertions" cargo test
//! --release --lib ring::loom_tests` (`.ci/run` does). Every interleaving of a producer and a consumer thread, within a
//! preemption bound of 3, must deliver each record once, in order and intact, through waits for room and a
//! wrap with padding; and the two threads must never touch the same bytes without a happens-before edge
//! between them (loom's race detector sees every byte read or written, through `Shared::touch`).
//!
//! What is not modelled: the publisher's wake check. Loom 0.7 treats SeqCst loads, stores and exchanges as
//! AcqRel (only `fence(SeqCst)` is exact), so it would report a lost wake-up that the C++20 model rules out;
//! the argument is written at [`Fenced`](super::Fenced).

use loom::thread;

use super::frames::{MARKER, frame_ring};
use super::ring;
use crate::wire::{FRAME_FIRST, FRAME_HEADER_LEN, FRAME_LAST};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// Tries `step` until it succeeds, letting the other thread run in between (loom needs spin loops to yield).
fn retry<T>(mut step: impl FnMut() -> Option<T>) -> T {
    loop {
        if let Some(t) = step() {
            return t;
        }
        thread::yield_now();
    }
}

/// Payload lengths: in a 64-byte ring, records of 32, 16 and 32 bytes (headers and padding included), so the
/// producer waits for room and the third record wraps after a padding record.
const LENS: [usize; 3] = [20, 4, 24];

#[test]
fn records_arrive_once_in_order_and_intact() {
    model(|| {
        let (mut p, mut c) = ring(64);
        let producer = thread::spawn(move || {
            for (i, &len) in LENS.iter().enumerate() {
                // The last record written in place, the others copied in.
                retry(|| {
                    if i == LENS.len() - 1 {
                        p.claim(len).map(|mut claim| {
                            claim.fill(i as u8);
                            claim.commit(i as u32 + 1);
                        })
                    } else {
                        p.push(i as u32 + 1, &vec![i as u8; len]).then_some(())
                    }
                });
            }
        });
        for (i, &len) in LENS.iter().enumerate() {
            retry(|| {
                let r = c.peek()?;
                assert_eq!(r.tag(), i as u32 + 1, "record {i} out of order");
                assert_eq!(&r[..], &vec![i as u8; len][..], "record {i} not intact");
                r.release();
                Some(())
            });
        }
        producer.join().unwrap();
        assert!(c.peek().is_none(), "a record arrived twice");
    });
}

/// Frame payload lengths: in a 64-byte frame ring, frames of 24, 13, 25 and 14 bytes. The first three leave
/// 2 bytes before the end, too few for a header, which both ends skip; the fourth waits for room at index
/// 0. A marker frame follows.
const FRAME_LENS: [usize; 4] = [20, 9, 21, 10];
/// Each frame's flags byte, to tell them apart.
const FRAME_FLAGS: [u8; 4] = [FRAME_FIRST | FRAME_LAST, FRAME_FIRST, 0, FRAME_LAST];

#[test]
fn frames_arrive_once_in_order_and_intact() {
    model(|| {
        let (mut p, mut c) = frame_ring(64);
        let producer = thread::spawn(move || {
            for (i, &len) in FRAME_LENS.iter().enumerate() {
                // The first copied in from two parts, the others written in place. (No consumer sleeps in this
                // model, so the publish's fence proof goes unused.)
                let _ = retry(|| {
                    if i == 0 {
                        p.push_parts(FRAME_FLAGS[0], &[0], &vec![0; len - 1])
                    } else {
                        p.claim(len).map(|mut claim| {
                            claim.fill(i as u8);
                            claim.commit(FRAME_FLAGS[i])
                        })
                    }
                });
            }
            // A marker frame after the last wrap.
            let _ = retry(|| p.push_marker());
        });
        for next in 0..=FRAME_LENS.len() {
            let frames = retry(|| c.peek().map(<[u8]>::to_vec));
            // Take the first frame of what is ready; the rest comes with the next peek.
            let len = usize::from(u16::from_be_bytes([frames[0], frames[1]]));
            if next == FRAME_LENS.len() {
                assert_eq!((len, frames[3]), (0, MARKER), "the marker");
            } else {
                assert_eq!(len, FRAME_LENS[next], "frame {next}'s length");
                assert_eq!((frames[2], frames[3]), (FRAME_FLAGS[next], 0), "frame {next}'s header");
                let payload = &frames[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
                assert!(payload.iter().all(|&b| b == next as u8), "frame {next} not intact");
            }
            c.advance(FRAME_HEADER_LEN + len);
        }
        producer.join().unwrap();
        assert!(c.peek().is_none(), "a frame arrived twice");
    });
}
