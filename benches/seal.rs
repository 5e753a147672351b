//! Benchmarks of packet sealing: the raw AEAD candidates (ring's AES-128-GCM, AES-256-GCM and
//! ChaCha20-Poly1305, and the aegis crate's AEGIS-128L) on 64- and 1024-byte packets, seal then open, and
//! Blip's endpoint-to-endpoint path in clear and sealed with each of Blip's ciphers.
//!
//! Run with `cargo bench --bench seal`; `-- --test` runs every benchmark once as a smoke test.

use std::hint::black_box;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aegis::aegis128l::Aegis128L;
use blip::proto::{Cipher, Config, Delivery, Endpoint, KEY_LEN, Keyring};
use blip::wire::HEADER_LEN;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

const SIZES: [usize; 2] = [64, 1024];

fn raw(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead_seal_open");
    let algorithms: [(&str, &'static Algorithm); 3] =
        [("aes128gcm", &AES_128_GCM), ("aes256gcm", &AES_256_GCM), ("chacha20poly1305", &CHACHA20_POLY1305)];
    for (name, alg) in algorithms {
        let key = LessSafeKey::new(UnboundKey::new(alg, &[7u8; 32][..alg.key_len()]).expect("key length"));
        for size in SIZES {
            g.throughput(Throughput::Bytes(size as u64));
            let mut buf = vec![0x5au8; size];
            let mut counter = 0u64;
            g.bench_function(format!("{name}/{size}"), |b| {
                b.iter(|| {
                    counter += 1;
                    let mut n = [0u8; 12];
                    n[4..].copy_from_slice(&counter.to_be_bytes());
                    let (aad, body) = buf.split_at_mut(HEADER_LEN);
                    let tag = key
                        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(&*aad), body)
                        .expect("seal");
                    let mut sealed = [0u8; 16];
                    sealed.copy_from_slice(tag.as_ref());
                    let (aad, body) = buf.split_at_mut(HEADER_LEN);
                    key.open_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(&*aad),
                        ring::aead::Tag::from(sealed),
                        body,
                        0..,
                    )
                    .expect("open");
                    black_box(&buf);
                })
            });
        }
    }
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0x5au8; size];
        let mut counter = 0u64;
        g.bench_function(format!("aegis128l/{size}"), |b| {
            b.iter(|| {
                counter += 1;
                let mut n = [0u8; 16];
                n[8..].copy_from_slice(&counter.to_be_bytes());
                let (aad, body) = buf.split_at_mut(HEADER_LEN);
                let tag = Aegis128L::<16>::new(&[7u8; 16], &n).encrypt_in_place(body, aad);
                let (aad, body) = buf.split_at_mut(HEADER_LEN);
                Aegis128L::<16>::new(&[7u8; 16], &n).decrypt_in_place(body, &tag, aad).expect("open");
                black_box(&buf);
            })
        });
    }
    g.finish();
}

/// Blip's whole path: a sender endpoint packs, seals (when `sealed`) and hands out datagrams; a receiver
/// endpoint opens, parses and delivers them; STATUS goes back. 1024-byte messages, one per datagram.
fn endpoint_pipe(c: &mut Criterion) {
    const MESSAGES: usize = 10_000;
    const SIZE: usize = 1024;
    let mut g = c.benchmark_group("endpoint_pipe");
    g.throughput(Throughput::Bytes((MESSAGES * SIZE) as u64));
    for (name, cipher) in
        [("clear_1024", None), ("aegis128l_1024", Some(Cipher::Aegis128L)), ("aes256gcm_1024", Some(Cipher::Aes256Gcm))]
    {
        let mut now = Instant::now();
        let config =
            Config { encryption: cipher.map(|c| Keyring::new(1, [9u8; KEY_LEN]).with_cipher(c)), ..Config::default() };
        let mut tx = Endpoint::new(config.clone(), 0x5E4D, 1, now).expect("valid config");
        let mut rx = Endpoint::new(config.clone(), 0x4ECF, 2, now).expect("valid config");
        let mut buf = vec![0u8; config.max_datagram];
        let msg = vec![0x5au8; SIZE];
        let from_tx: SocketAddr = "127.0.0.1:1000".parse().expect("address");
        let from_rx: SocketAddr = "127.0.0.1:2000".parse().expect("address");
        g.bench_function(name, |b| {
            b.iter(|| {
                let (mut sent, mut delivered) = (0, 0);
                while delivered < MESSAGES {
                    // STATUS (which reopens the sender's window) goes out once per status interval.
                    now += config.status_interval;
                    tx.handle_timeout(now);
                    rx.handle_timeout(now);
                    while sent < MESSAGES && tx.send(now, &msg).is_ok() {
                        sent += 1;
                    }
                    while let Some(t) = tx.poll_transmit(now, &mut buf) {
                        rx.handle_datagram(now, from_tx, &buf[..t.len]);
                        while let Some(d) = rx.recv() {
                            if let Delivery::Message(m) = d {
                                black_box(m.payload);
                                delivered += 1;
                            }
                        }
                    }
                    while let Some(t) = rx.poll_transmit(now, &mut buf) {
                        tx.handle_datagram(now, from_rx, &buf[..t.len]);
                    }
                }
            })
        });
        assert_eq!(rx.stats().auth_failed + rx.stats().replayed + rx.stats().loss_events, 0, "{:?}", rx.stats());
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = raw, endpoint_pipe
}
criterion_main!(benches);
