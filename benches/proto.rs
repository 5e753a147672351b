//! Benchmarks of the packet codecs and of the protocol core alone (no sockets, no clock).
//!
//! Run with `cargo bench --bench proto`; `-- --test` runs every benchmark once as a smoke test.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blip::proto::{Batch, Config, Delivery, Endpoint, SendError};
use blip::wire::{
    DATA_HEADER_LEN, DataWriter, FRAME_FIRST, FRAME_HEADER_LEN, FRAME_LAST, Header, HeartbeatRepr, Kind, NakRepr,
    Packet, SeqRange,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Default datagram size (Ethernet MTU less IPv4 and UDP headers).
const DATAGRAM: usize = blip::proto::DEFAULT_MAX_DATAGRAM;
/// Message size packed into the DATA datagrams of the wire benchmarks.
const SMALL_MESSAGE: usize = 64;
/// Frames of `SMALL_MESSAGE` bytes that fit one datagram.
const FRAMES_PER_DATAGRAM: usize = (DATAGRAM - DATA_HEADER_LEN) / (FRAME_HEADER_LEN + SMALL_MESSAGE);
/// Ranges in the benchmarked NAK.
const NAK_RANGES: usize = 8;
/// Messages moved from sender to receiver per measured iteration of the pipe benchmarks.
const PIPE_MESSAGES: usize = 10_000;

fn header(kind: Kind) -> Header {
    Header { kind, flags: 0, stream: 0, session: 0x5EED_0001 }
}

/// Builds a DATA datagram of `FRAMES_PER_DATAGRAM` small messages into `buf`; returns its length.
fn build_data(buf: &mut [u8], payload: &[u8]) -> usize {
    let mut len = DataWriter::begin(buf, &header(Kind::Data), 1_000, 21_000, 0).expect("buffer holds the header");
    for _ in 0..FRAMES_PER_DATAGRAM {
        len = DataWriter::push_frame(buf, len, FRAME_FIRST | FRAME_LAST, payload).expect("frame fits the datagram");
    }
    len
}

fn wire(c: &mut Criterion) {
    let payload = [0xA5u8; SMALL_MESSAGE];
    let mut group = c.benchmark_group("wire");

    let mut datagram = vec![0u8; DATAGRAM];
    let len = build_data(&mut datagram, &payload);
    datagram.truncate(len);
    group.throughput(Throughput::Elements(FRAMES_PER_DATAGRAM as u64));
    group.bench_function("parse_data", |b| {
        b.iter(|| {
            let Ok(Packet::Data(data)) = Packet::parse(black_box(&datagram)) else {
                panic!("benchmark datagram does not parse as DATA");
            };
            for frame in data.frames() {
                black_box(frame.payload.len());
            }
        })
    });

    let mut out = vec![0u8; DATAGRAM];
    group.bench_function("emit_data", |b| b.iter(|| black_box(build_data(black_box(&mut out), black_box(&payload)))));

    let ranges: Vec<SeqRange> = (0..NAK_RANGES as u64).map(|i| SeqRange { start: 100 + 10 * i, len: 3 }).collect();
    let mut nak = vec![0u8; DATAGRAM];
    let len = NakRepr { target_session: 0x5EED_0002, ranges: &ranges }
        .emit(&header(Kind::Nak), &mut nak)
        .expect("buffer holds the NAK");
    nak.truncate(len);
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_nak", |b| {
        b.iter(|| {
            let Ok(Packet::Nak(nak)) = Packet::parse(black_box(&nak)) else {
                panic!("benchmark datagram does not parse as NAK");
            };
            for range in nak.ranges() {
                black_box(range);
            }
        })
    });

    let heartbeat = HeartbeatRepr { next_seq: 1_000, low: 0, next_msg: 21_000, receivers: 3 };
    let hb_header = header(Kind::Heartbeat);
    group.bench_function("emit_heartbeat", |b| {
        b.iter(|| black_box(black_box(&heartbeat).emit(&hb_header, black_box(&mut out)).expect("buffer holds it")))
    });

    group.finish();
}

const SENDER_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4000);
const RECEIVER_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4001);

/// A sender and a receiver endpoint wired back to back in memory, on a virtual clock.
struct Pipe {
    sender: Endpoint,
    receiver: Endpoint,
    now: Instant,
    buf: Vec<u8>,
    /// The receiver reads with `recv_batch` (runs of whole messages) instead of `recv`.
    batched: bool,
}

impl Pipe {
    fn new(batched: bool) -> Pipe {
        let now = Instant::now();
        let config = Config::default();
        let buf = vec![0u8; config.max_datagram];
        Pipe {
            sender: Endpoint::new(config.clone(), 0x5E4D, 1, now).expect("default config is valid"),
            receiver: Endpoint::new(config, 0x4ECF, 2, now).expect("default config is valid"),
            now,
            buf,
            batched,
        }
    }

    /// Sends `count` copies of `msg` and moves every datagram across until all are delivered; returns how many
    /// messages the receiver delivered.
    fn run(&mut self, count: usize, msg: &[u8]) -> usize {
        self.now += Duration::from_millis(1);
        self.sender.handle_timeout(self.now);
        self.receiver.handle_timeout(self.now);
        let mut delivered = 0;
        let mut sent = 0;
        while sent < count {
            match self.sender.send(self.now, msg) {
                Ok(()) => sent += 1,
                Err(SendError::WouldBlock) => {
                    let (moved, got) = self.pump();
                    assert!(moved > 0, "sender blocked with nothing to move");
                    delivered += got;
                }
                Err(e) => panic!("send failed: {e}"),
            }
        }
        delivered + self.pump().1
    }

    /// One pass of the driving loop on both sides: every datagram the sender has goes to the receiver (which
    /// delivers as it goes), then the receiver's STATUS goes back. Returns (packets moved, messages delivered).
    fn pump(&mut self) -> (usize, usize) {
        let Pipe { sender, receiver, now, buf, batched } = self;
        let now = *now;
        let mut moved = 0;
        let mut delivered = 0;
        while let Some(t) = sender.poll_transmit(now, buf) {
            receiver.handle_datagram(now, SENDER_ADDR, &buf[..t.len]);
            moved += 1;
            loop {
                let next = if *batched { receiver.recv_batch() } else { receiver.recv().map(Batch::One) };
                match next {
                    Some(Batch::Run(run)) => {
                        for m in run.messages() {
                            black_box(m.payload.len());
                        }
                        delivered += run.count as usize;
                    }
                    Some(Batch::One(Delivery::Message(m))) => {
                        black_box(m.payload.len());
                        delivered += 1;
                    }
                    Some(Batch::One(Delivery::Loss { datagrams, .. })) => {
                        panic!("loss on a lossless pipe: datagrams {datagrams:?}")
                    }
                    None => break,
                }
            }
        }
        while let Some(t) = receiver.poll_transmit(now, buf) {
            sender.handle_datagram(now, RECEIVER_ADDR, &buf[..t.len]);
            moved += 1;
        }
        while sender.poll_event().is_some() {}
        while receiver.poll_event().is_some() {}
        (moved, delivered)
    }
}

fn proto(c: &mut Criterion) {
    let mut group = c.benchmark_group("proto");
    group.throughput(Throughput::Elements(PIPE_MESSAGES as u64));
    for (size, batched) in [(64usize, false), (64, true), (1024, false)] {
        let msg = vec![0x5Au8; size];
        let mut pipe = Pipe::new(batched);
        let name = if batched { format!("pipe_{size}_batched") } else { format!("pipe_{size}") };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let delivered = pipe.run(PIPE_MESSAGES, &msg);
                    elapsed += start.elapsed();
                    assert_eq!(delivered, PIPE_MESSAGES, "not every message was delivered");
                }
                elapsed
            })
        });
        let stats = pipe.receiver.stats();
        assert_eq!(stats.duplicates + stats.beyond_buffer + stats.malformed + stats.loss_events, 0, "{stats:?}");
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = wire, proto
}
criterion_main!(benches);
