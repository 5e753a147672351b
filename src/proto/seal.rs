//! Sealing: authenticated encryption of every packet under a pre-shared group key (docs/PROTOCOL.md,
//! section 10).
//!
//! A sealed packet is `[16-byte header in clear, the AAD][body, encrypted][key id u8][counter u64][tag 16]`.
//! Each sender session seals under its own subkey, HKDF-SHA256(secret, salt "blip v1", info = session as
//! u64 big-endian, then the cipher's label), with a nonce of zeros followed by the 64-bit counter, where the
//! counter counts every packet the session seals. A (subkey, nonce) pair therefore never repeats as long as
//! sessions are unique per key: no coordination between senders is needed, and a retransmission (whose
//! header differs by FLAG_RETRANSMIT) takes a fresh counter like any packet. Receivers keep, per peer
//! session, a sliding window over the counters they accepted and reject what they saw before or what fell
//! behind the window.
//!
//! The cipher is a property of the group ([`Cipher`]): AEGIS-128L by default, AES-256-GCM on request.
//!
//! Sans-IO like the rest of `proto`: no clock, no socket, no randomness (the key comes from the caller).

use std::collections::HashMap;
use std::fmt;

use aegis::aegis128l::Aegis128L;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use ring::hkdf;
use zeroize::Zeroize;

use crate::wire::{FLAG_SEALED, HEADER_LEN, SEAL_OVERHEAD, SEAL_TAG_LEN};

/// Length of a group key's secret, in bytes.
pub const KEY_LEN: usize = 32;
/// Counters a receiver's replay window spans behind the highest one accepted from a peer session: a packet
/// further behind is rejected as a replay, so reordering deeper than this loses the packet (NAK repairs DATA).
pub const REPLAY_WINDOW: u64 = 1024;
/// Most keys a [`Keyring`] holds: the one in use and one more during a change-over.
pub const MAX_KEYS: usize = 2;

/// The AEAD cipher a group seals with. Every node of a group must use the same one: a packet sealed with
/// another cipher fails authentication like a packet under a wrong key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Cipher {
    /// AEGIS-128L (draft-irtf-cfrg-aegis-aead, in libsodium and the Linux kernel) with a 128-bit key and
    /// tag: built on the AES round instruction like AES-GCM but needs no carry-less multiplication, and
    /// seals a kilobyte in well under half the time of AES-256-GCM on this project's machines
    /// (docs/PROTOCOL.md, section 10.5). The default.
    #[default]
    Aegis128L,
    /// AES-256-GCM (NIST SP 800-38D) with a 256-bit key: for deployments that require a NIST cipher.
    Aes256Gcm,
}

impl Cipher {
    /// Appended to the HKDF info, so that the two ciphers never share a subkey.
    fn label(self) -> &'static [u8] {
        match self {
            Cipher::Aegis128L => b"aegis128l",
            Cipher::Aes256Gcm => b"",
        }
    }

    fn key_len(self) -> usize {
        match self {
            Cipher::Aegis128L => 16,
            Cipher::Aes256Gcm => 32,
        }
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cipher::Aegis128L => "AEGIS-128L",
            Cipher::Aes256Gcm => "AES-256-GCM",
        })
    }
}

/// HKDF salt of the per-session subkeys; a new wire version would change it.
const SUBKEY_SALT: &[u8] = b"blip v1";
const WINDOW_WORDS: usize = (REPLAY_WINDOW / 64) as usize + 1;
/// Offsets in the trailer that follows the ciphertext.
const TRAILER_KEY_ID: usize = 0;
const TRAILER_COUNTER: usize = 1;
const TRAILER_TAG: usize = 9;
const _: () = assert!(TRAILER_TAG + SEAL_TAG_LEN == SEAL_OVERHEAD);

/// Why a key operation on a [`Keyring`] (or an endpoint's or node's keys) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Two keys are held already; remove one first.
    #[error("the keyring already holds {MAX_KEYS} keys; remove one before adding another")]
    Full,
    /// A key with this id is held already.
    #[error("key id {0} is already in the keyring")]
    DuplicateId(u8),
    /// No key with this id is held.
    #[error("no key with id {0} in the keyring")]
    UnknownId(u8),
    /// The key is the one packets are sealed with; switch to the other key first.
    #[error("key id {0} is the sending key; switch to another key before removing it")]
    SendingKey(u8),
    /// Encryption is off for this endpoint (it was created without a keyring).
    #[error("encryption is not enabled (no keyring was configured)")]
    NotEnabled,
}

/// Why a packet could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The buffer has no room for the trailer, or the packet is shorter than a header.
    #[error("buffer too small for the seal trailer")]
    BufferTooSmall,
    /// The session has sealed 2^64 − 1 packets; its nonces are used up (start a new session).
    #[error("packet counter exhausted for this session")]
    CounterExhausted,
}

/// Why a received packet was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short for a header and a trailer.
    #[error("sealed packet truncated")]
    Truncated,
    /// The trailer names a key id this keyring does not hold.
    #[error("unknown key id {0}")]
    UnknownKey(u8),
    /// The tag does not verify: wrong key, or the packet was altered.
    #[error("authentication failed")]
    Auth,
    /// The counter was accepted before from this session, or is behind its replay window.
    #[error("replayed packet")]
    Replay,
}

/// The pre-shared group keys: at most [`MAX_KEYS`], each a key id (carried in every sealed packet) and a
/// [`KEY_LEN`]-byte secret, one of them the key packets are sealed with, and the group's [`Cipher`]. Every
/// key held is accepted.
///
/// `Debug` shows the key ids and the cipher only, never a secret. Secrets are wiped from memory when the
/// keyring (or a removed key) is dropped; ring's HKDF and AES key schedules derived from them are not.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<(u8, [u8; KEY_LEN])>,
    sending: u8,
    cipher: Cipher,
}

impl Drop for Keyring {
    fn drop(&mut self) {
        for k in &mut self.keys {
            k.1.zeroize();
        }
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u8> = self.keys.iter().map(|k| k.0).collect();
        f.debug_struct("Keyring")
            .field("key_ids", &ids)
            .field("sending", &self.sending)
            .field("cipher", &self.cipher)
            .finish()
    }
}

impl Keyring {
    /// A keyring of one key, which is also the sending key, for the default cipher (AEGIS-128L).
    pub fn new(key_id: u8, secret: [u8; KEY_LEN]) -> Keyring {
        Keyring { keys: vec![(key_id, secret)], sending: key_id, cipher: Cipher::default() }
    }

    /// The same keys for another cipher (every node of the group must choose the same).
    pub fn with_cipher(mut self, cipher: Cipher) -> Keyring {
        self.cipher = cipher;
        self
    }

    /// The cipher packets are sealed with.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Adds a key that will be accepted (not yet used for sending).
    pub fn add(&mut self, key_id: u8, secret: [u8; KEY_LEN]) -> Result<(), KeyError> {
        if self.contains(key_id) {
            return Err(KeyError::DuplicateId(key_id));
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyError::Full);
        }
        self.keys.push((key_id, secret));
        Ok(())
    }

    /// Makes a held key the sending key.
    pub fn use_key(&mut self, key_id: u8) -> Result<(), KeyError> {
        if !self.contains(key_id) {
            return Err(KeyError::UnknownId(key_id));
        }
        self.sending = key_id;
        Ok(())
    }

    /// Removes a key that is not the sending key; packets sealed under it are rejected from now on.
    pub fn remove(&mut self, key_id: u8) -> Result<(), KeyError> {
        if !self.contains(key_id) {
            return Err(KeyError::UnknownId(key_id));
        }
        if key_id == self.sending {
            return Err(KeyError::SendingKey(key_id));
        }
        for k in self.keys.iter_mut().filter(|k| k.0 == key_id) {
            k.1.zeroize();
        }
        self.keys.retain(|k| k.0 != key_id);
        Ok(())
    }

    /// The id of the key packets are sealed with.
    pub fn sending_id(&self) -> u8 {
        self.sending
    }

    /// The ids of the keys held.
    pub fn key_ids(&self) -> impl Iterator<Item = u8> + '_ {
        self.keys.iter().map(|k| k.0)
    }

    /// Whether a key with this id is held.
    pub fn contains(&self, key_id: u8) -> bool {
        self.keys.iter().any(|k| k.0 == key_id)
    }
}

/// A key's HKDF pseudo-random key, extracted once so that deriving a session's subkey costs one expand.
struct Master {
    id: u8,
    prk: hkdf::Prk,
}

impl Master {
    fn new(id: u8, secret: &[u8; KEY_LEN]) -> Master {
        Master { id, prk: hkdf::Salt::new(hkdf::HKDF_SHA256, SUBKEY_SALT).extract(secret) }
    }

    fn subkey(&self, session: u64, cipher: Cipher) -> SubKey {
        let session = session.to_be_bytes();
        let info = [&session[..], cipher.label()];
        let mut bytes = [0u8; 32];
        let okm = &mut bytes[..cipher.key_len()];
        // At most 32 bytes from SHA-256 is within HKDF's limit, so this cannot fail.
        self.prk.expand(&info, OkmLen(okm.len())).and_then(|o| o.fill(okm)).expect("HKDF output length is valid");
        let key = match cipher {
            Cipher::Aegis128L => SubKey::Aegis(okm[..].try_into().expect("16-byte subkey")),
            Cipher::Aes256Gcm => {
                SubKey::Aes(Box::new(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, okm).expect("32-byte subkey"))))
            }
        };
        bytes.zeroize();
        key
    }
}

/// An HKDF output length (ring wants it as a type).
struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// One session's subkey, ready to seal or open. ring's expanded AES key (544 bytes) is boxed so that the
/// peer table does not reserve that much for every AEGIS key; it is allocated once per session and key.
enum SubKey {
    Aegis([u8; 16]),
    Aes(Box<LessSafeKey>),
}

impl Drop for SubKey {
    fn drop(&mut self) {
        if let SubKey::Aegis(key) = self {
            key.zeroize();
        }
    }
}

/// The tag did not verify.
struct BadTag;

impl SubKey {
    fn seal(&self, counter: u64, aad: &[u8], body: &mut [u8]) -> [u8; SEAL_TAG_LEN] {
        match self {
            SubKey::Aegis(key) => {
                Aegis128L::<SEAL_TAG_LEN>::new(key, &aegis_nonce(counter)).encrypt_in_place(body, aad)
            }
            SubKey::Aes(key) => {
                let tag = key
                    .seal_in_place_separate_tag(aes_nonce(counter), Aad::from(aad), body)
                    // ring refuses only inputs over 64 GiB, far beyond any datagram.
                    .expect("datagram within AES-GCM's length limit");
                tag.as_ref().try_into().expect("16-byte tag")
            }
        }
    }

    fn open(&self, counter: u64, aad: &[u8], body: &mut [u8], tag: [u8; SEAL_TAG_LEN]) -> Result<(), BadTag> {
        match self {
            SubKey::Aegis(key) => Aegis128L::<SEAL_TAG_LEN>::new(key, &aegis_nonce(counter))
                .decrypt_in_place(body, &tag, aad)
                .map_err(|_| BadTag),
            SubKey::Aes(key) => key
                .open_in_place_separate_tag(aes_nonce(counter), Aad::from(aad), Tag::from(tag), body, 0..)
                .map(|_| ())
                .map_err(|_| BadTag),
        }
    }
}

/// Counters accepted from one peer session: the highest, and a bitmap of the [`REPLAY_WINDOW`] below it.
#[derive(Clone, Debug)]
struct ReplayWindow {
    top: u64,
    /// A circular bitmap: the bit of counter `c` is bit `c % 64` of word `(c / 64) % WINDOW_WORDS`. One word
    /// more than the window covers, so advancing only ever clears whole words (RFC 6479): O(1) per packet.
    bits: [u64; WINDOW_WORDS],
}

impl ReplayWindow {
    fn starting_at(counter: u64) -> ReplayWindow {
        let mut w = ReplayWindow { top: counter, bits: [0; WINDOW_WORDS] };
        w.set(counter);
        w
    }

    fn word(counter: u64) -> usize {
        ((counter / 64) % WINDOW_WORDS as u64) as usize
    }

    fn set(&mut self, counter: u64) {
        self.bits[Self::word(counter)] |= 1 << (counter % 64);
    }

    fn accepts(&self, counter: u64) -> bool {
        if counter > self.top {
            return true;
        }
        self.top - counter < REPLAY_WINDOW && self.bits[Self::word(counter)] & (1 << (counter % 64)) == 0
    }

    /// Records an accepted counter (`accepts` returned true for it).
    fn mark(&mut self, counter: u64) {
        if counter > self.top {
            let (from, to) = (self.top / 64, counter / 64);
            if to - from >= WINDOW_WORDS as u64 {
                self.bits = [0; WINDOW_WORDS];
            } else {
                // The words entered now held counters a whole bitmap older: stale.
                for w in from + 1..=to {
                    self.bits[Self::word(w * 64)] = 0;
                }
            }
            self.top = counter;
        }
        self.set(counter);
    }
}

/// What is kept about one peer session: its subkeys (derived once per key) and its replay window.
struct Peer {
    session: u64,
    subkeys: [Option<(u8, SubKey)>; MAX_KEYS],
    window: ReplayWindow,
    /// Value of `Sealer::clock` when this peer was last accepted (for eviction).
    last_heard: u64,
}

/// The sealing state of one endpoint: its keys, its own sending subkey and counter, and the peers' subkeys
/// and replay windows.
pub(crate) struct Sealer {
    keyring: Keyring,
    masters: Vec<Master>,
    session: u64,
    send_id: u8,
    send_key: SubKey,
    counter: u64,
    peers: Vec<Peer>,
    index: HashMap<u64, usize>,
    /// Peer that opened last: consecutive packets usually come from the same session.
    last: usize,
    max_peers: usize,
    /// Counts accepted packets; orders peers by recency.
    clock: u64,
}

/// What became of a packet `Sealer::open` accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Length of the plaintext packet (header and body) at the start of the buffer.
    pub len: usize,
    /// A peer session was forgotten to make room for this one.
    pub evicted: bool,
}

impl Sealer {
    /// Seals as `session`, tracking at most `max_peers` peer sessions.
    pub(crate) fn new(keyring: Keyring, session: u64, max_peers: usize) -> Sealer {
        let masters: Vec<Master> = keyring.keys.iter().map(|(id, s)| Master::new(*id, s)).collect();
        let send_id = keyring.sending;
        let send_key =
            masters.iter().find(|m| m.id == send_id).expect("the sending key is held").subkey(session, keyring.cipher);
        Sealer {
            keyring,
            masters,
            session,
            send_id,
            send_key,
            counter: 0,
            peers: Vec::new(),
            index: HashMap::new(),
            last: 0,
            max_peers: max_peers.max(1),
            clock: 0,
        }
    }

    pub(crate) fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    pub(crate) fn add_key(&mut self, key_id: u8, secret: [u8; KEY_LEN]) -> Result<(), KeyError> {
        self.keyring.add(key_id, secret)?;
        self.masters.push(Master::new(key_id, &secret));
        Ok(())
    }

    pub(crate) fn use_key(&mut self, key_id: u8) -> Result<(), KeyError> {
        self.keyring.use_key(key_id)?;
        if key_id != self.send_id {
            let master = self.masters.iter().find(|m| m.id == key_id).expect("keyring and masters agree");
            self.send_key = master.subkey(self.session, self.keyring.cipher);
            self.send_id = key_id;
        }
        Ok(())
    }

    pub(crate) fn remove_key(&mut self, key_id: u8) -> Result<(), KeyError> {
        self.keyring.remove(key_id)?;
        self.masters.retain(|m| m.id != key_id);
        // A later key with the same id must not find this key's subkeys.
        for p in &mut self.peers {
            for slot in &mut p.subkeys {
                if slot.as_ref().is_some_and(|(id, _)| *id == key_id) {
                    *slot = None;
                }
            }
        }
        Ok(())
    }

    /// Seals the packet in `buf[..len]` in place (header in clear, body encrypted, trailer appended) and
    /// returns the sealed length, `len + SEAL_OVERHEAD`.
    pub(crate) fn seal(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SealError> {
        if len < HEADER_LEN || buf.len() < len + SEAL_OVERHEAD {
            return Err(SealError::BufferTooSmall);
        }
        if self.counter == u64::MAX {
            return Err(SealError::CounterExhausted);
        }
        let counter = self.counter;
        self.counter += 1;
        let flags = u16::from_be_bytes([buf[2], buf[3]]) | FLAG_SEALED;
        buf[2..4].copy_from_slice(&flags.to_be_bytes());
        let (packet, trailer) = buf[..len + SEAL_OVERHEAD].split_at_mut(len);
        let (header, body) = packet.split_at_mut(HEADER_LEN);
        let tag = self.send_key.seal(counter, header, body);
        trailer[TRAILER_KEY_ID] = self.send_id;
        trailer[TRAILER_COUNTER..TRAILER_TAG].copy_from_slice(&counter.to_be_bytes());
        trailer[TRAILER_TAG..].copy_from_slice(&tag);
        Ok(len + SEAL_OVERHEAD)
    }

    /// Opens the sealed packet `buf` from peer `session` (the caller read it from the clear header) in place:
    /// authenticates it, checks its counter against the session's replay window, decrypts the body and
    /// clears `FLAG_SEALED`, so that `buf[..len]` is the packet as it was before sealing. State for a new
    /// session is created only after its packet authenticated.
    pub(crate) fn open(&mut self, session: u64, buf: &mut [u8]) -> Result<Opened, OpenError> {
        if buf.len() < HEADER_LEN + SEAL_OVERHEAD {
            return Err(OpenError::Truncated);
        }
        let len = buf.len() - SEAL_OVERHEAD;
        let (packet, trailer) = buf.split_at_mut(len);
        let key_id = trailer[TRAILER_KEY_ID];
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&trailer[TRAILER_COUNTER..TRAILER_TAG]);
        let counter = u64::from_be_bytes(counter);
        let mut tag = [0u8; SEAL_TAG_LEN];
        tag.copy_from_slice(&trailer[TRAILER_TAG..]);
        let (header, body) = packet.split_at_mut(HEADER_LEN);
        let aad = &*header;

        let known = match self.peers.get(self.last) {
            Some(p) if p.session == session => Some(self.last),
            _ => self.index.get(&session).copied(),
        };
        let mut evicted = false;
        match known {
            Some(i) => {
                let slot = self.subkey_slot(i, key_id)?;
                let key = &self.peers[i].subkeys[slot].as_ref().expect("slot filled by subkey_slot").1;
                key.open(counter, aad, body, tag).map_err(|_| OpenError::Auth)?;
                // Checked after authentication, so that `Replay` counts only genuine packets seen twice
                // (a forged counter is an authentication failure like any other alteration).
                if !self.peers[i].window.accepts(counter) {
                    return Err(OpenError::Replay);
                }
                self.peers[i].window.mark(counter);
                self.touch(i);
            }
            None => {
                let master = self.masters.iter().find(|m| m.id == key_id).ok_or(OpenError::UnknownKey(key_id))?;
                let key = master.subkey(session, self.keyring.cipher);
                key.open(counter, aad, body, tag).map_err(|_| OpenError::Auth)?;
                // Authentic: only now is there anything to remember about this session.
                let peer = Peer {
                    session,
                    subkeys: [Some((key_id, key)), None],
                    window: ReplayWindow::starting_at(counter),
                    last_heard: 0,
                };
                let i = if self.peers.len() < self.max_peers {
                    self.peers.push(peer);
                    self.peers.len() - 1
                } else {
                    let (i, _) =
                        self.peers.iter().enumerate().min_by_key(|(_, p)| p.last_heard).expect("table is full");
                    self.index.remove(&self.peers[i].session);
                    self.peers[i] = peer;
                    evicted = true;
                    i
                };
                self.index.insert(session, i);
                self.touch(i);
            }
        }
        let flags = u16::from_be_bytes([packet[2], packet[3]]) & !FLAG_SEALED;
        packet[2..4].copy_from_slice(&flags.to_be_bytes());
        Ok(Opened { len, evicted })
    }

    fn touch(&mut self, i: usize) {
        self.clock += 1;
        self.peers[i].last_heard = self.clock;
        self.last = i;
    }

    /// Index in peer `i`'s subkeys of the subkey for `key_id`, deriving it on first use.
    fn subkey_slot(&mut self, i: usize, key_id: u8) -> Result<usize, OpenError> {
        let peer = &mut self.peers[i];
        if let Some(s) = peer.subkeys.iter().position(|k| k.as_ref().is_some_and(|(id, _)| *id == key_id)) {
            return Ok(s);
        }
        let master = self.masters.iter().find(|m| m.id == key_id).ok_or(OpenError::UnknownKey(key_id))?;
        // A slot is free: at most MAX_KEYS keys are held and removing one frees its slots.
        let s = match peer.subkeys.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                // Defensive: a slot still holding a key no longer in the ring.
                peer.subkeys
                    .iter()
                    .position(|k| k.as_ref().is_some_and(|(id, _)| !self.keyring.contains(*id)))
                    .unwrap_or(0)
            }
        };
        peer.subkeys[s] = Some((key_id, master.subkey(peer.session, self.keyring.cipher)));
        Ok(s)
    }
}

/// The clear packet inside a sealed one, without any replay check or state: for observers such as the
/// simulator, which looks at DATA sequence numbers in flight. Derives a subkey per call (slow).
pub(crate) fn peek(keyring: &Keyring, bytes: &[u8]) -> Option<Vec<u8>> {
    let header = crate::wire::Header::parse(bytes).ok()?;
    let mut sealer = Sealer::new(keyring.clone(), !header.session, 1);
    let mut copy = bytes.to_vec();
    let opened = sealer.open(header.session, &mut copy).ok()?;
    copy.truncate(opened.len);
    Some(copy)
}

/// AES-GCM's 96-bit nonce: `0u32 || counter`.
fn aes_nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// AEGIS-128L's 128-bit nonce: `0u64 || counter`.
fn aegis_nonce(counter: u64) -> [u8; 16] {
    let mut n = [0u8; 16];
    n[8..].copy_from_slice(&counter.to_be_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FLAG_RETRANSMIT, Header, Kind};
    use proptest::prelude::*;

    const SENDER: u64 = 0x5E4D_0001;
    const RECEIVER: u64 = 0x4ECF_0002;

    fn packet(body: &[u8], flags: u16) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN + body.len() + SEAL_OVERHEAD];
        Header { kind: Kind::Data, flags, stream: 3, session: SENDER }.emit(&mut b).unwrap();
        b[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(body);
        b
    }

    fn sealed(tx: &mut Sealer, body: &[u8]) -> Vec<u8> {
        let mut b = packet(body, FLAG_RETRANSMIT);
        let n = tx.seal(&mut b, HEADER_LEN + body.len()).unwrap();
        assert_eq!(n, b.len());
        b
    }

    const CIPHERS: [Cipher; 2] = [Cipher::Aegis128L, Cipher::Aes256Gcm];

    fn pair() -> (Sealer, Sealer) {
        pair_with(Cipher::default())
    }

    fn pair_with(cipher: Cipher) -> (Sealer, Sealer) {
        let keys = Keyring::new(1, [0x11; KEY_LEN]).with_cipher(cipher);
        (Sealer::new(keys.clone(), SENDER, 8), Sealer::new(keys, RECEIVER, 8))
    }

    #[test]
    fn round_trip_restores_the_packet() {
        for cipher in CIPHERS {
            let (mut tx, mut rx) = pair_with(cipher);
            let body = b"hello, sealed world";
            let mut b = sealed(&mut tx, body);
            assert_ne!(&b[HEADER_LEN..HEADER_LEN + body.len()], body, "{cipher}: body must be encrypted");
            assert_eq!(u16::from_be_bytes([b[2], b[3]]), FLAG_RETRANSMIT | FLAG_SEALED);
            let opened = rx.open(SENDER, &mut b).unwrap();
            assert_eq!(opened, Opened { len: HEADER_LEN + body.len(), evicted: false });
            assert_eq!(&b[..opened.len], &packet(body, FLAG_RETRANSMIT)[..opened.len], "{cipher}");
        }
    }

    #[test]
    fn every_flipped_bit_fails_to_open() {
        for cipher in CIPHERS {
            let (mut tx, _) = pair_with(cipher);
            let b = sealed(&mut tx, &[0xA5; 40]);
            for bit in 0..b.len() * 8 {
                // A fresh receiver each time, so that a rejection cannot come from the replay window.
                let (_, mut rx) = pair_with(cipher);
                let mut c = b.clone();
                c[bit / 8] ^= 1 << (bit % 8);
                let session = u64::from_be_bytes(c[8..16].try_into().unwrap());
                assert!(rx.open(session, &mut c).is_err(), "{cipher}: bit {bit} flipped but the packet opened");
            }
            let (_, mut rx) = pair_with(cipher);
            assert!(rx.open(SENDER, &mut b.clone()).is_ok(), "{cipher}: the unaltered packet opens");
        }
    }

    #[test]
    fn another_cipher_under_the_same_key_fails_to_open() {
        let (mut aegis, _) = pair_with(Cipher::Aegis128L);
        let (mut aes, _) = pair_with(Cipher::Aes256Gcm);
        let (_, mut rx_aes) = pair_with(Cipher::Aes256Gcm);
        let (_, mut rx_aegis) = pair_with(Cipher::Aegis128L);
        assert_eq!(rx_aes.open(SENDER, &mut sealed(&mut aegis, b"x")), Err(OpenError::Auth));
        assert_eq!(rx_aegis.open(SENDER, &mut sealed(&mut aes, b"x")), Err(OpenError::Auth));
    }

    /// Known-answer check of the AES-256-GCM path: the subkey derivation and nonce layout did not change
    /// when the cipher became a choice, so packets sealed before still open. A sealed body must equal the
    /// AES-256-GCM encryption under HKDF-SHA256(secret, "blip v1", session) with nonce `0u32 || counter`.
    #[test]
    fn aes_subkey_and_nonce_follow_the_documented_scheme() {
        let (mut tx, _) = pair_with(Cipher::Aes256Gcm);
        tx.counter = 7;
        let b = sealed(&mut tx, b"known answer");
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"blip v1").extract(&[0x11; KEY_LEN]);
        let session = SENDER.to_be_bytes();
        let info = [&session[..]];
        let key = LessSafeKey::new(UnboundKey::from(prk.expand(&info, &AES_256_GCM).unwrap()));
        let mut header = b[..HEADER_LEN].to_vec();
        header[2..4].copy_from_slice(&(FLAG_RETRANSMIT | FLAG_SEALED).to_be_bytes());
        let mut body = b"known answer".to_vec();
        let mut n = [0u8; NONCE_LEN];
        n[4..].copy_from_slice(&7u64.to_be_bytes());
        let tag =
            key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(&header), &mut body).unwrap();
        assert_eq!(&b[HEADER_LEN..HEADER_LEN + body.len()], &body[..]);
        assert_eq!(&b[b.len() - SEAL_TAG_LEN..], tag.as_ref());
    }

    #[test]
    fn wrong_key_and_unknown_key_id_fail() {
        let (mut tx, _) = pair();
        let mut wrong = Sealer::new(Keyring::new(1, [0x22; KEY_LEN]), RECEIVER, 8);
        assert_eq!(wrong.open(SENDER, &mut sealed(&mut tx, b"x")), Err(OpenError::Auth));
        let mut other_id = Sealer::new(Keyring::new(2, [0x11; KEY_LEN]), RECEIVER, 8);
        assert_eq!(other_id.open(SENDER, &mut sealed(&mut tx, b"x")), Err(OpenError::UnknownKey(1)));
        assert!(wrong.peers.is_empty() && other_id.peers.is_empty(), "no state for unauthenticated sessions");
    }

    /// The same for AEGIS-128L: a 16-byte subkey from HKDF info `session || "aegis128l"`, nonce
    /// `0u64 || counter`.
    #[test]
    fn aegis_subkey_and_nonce_follow_the_documented_scheme() {
        let (mut tx, _) = pair_with(Cipher::Aegis128L);
        tx.counter = 7;
        let b = sealed(&mut tx, b"known answer");
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"blip v1").extract(&[0x11; KEY_LEN]);
        let session = SENDER.to_be_bytes();
        let info = [&session[..], b"aegis128l"];
        let mut key = [0u8; 16];
        prk.expand(&info, OkmLen(16)).unwrap().fill(&mut key).unwrap();
        let mut header = b[..HEADER_LEN].to_vec();
        header[2..4].copy_from_slice(&(FLAG_RETRANSMIT | FLAG_SEALED).to_be_bytes());
        let mut body = b"known answer".to_vec();
        let mut n = [0u8; 16];
        n[8..].copy_from_slice(&7u64.to_be_bytes());
        let tag = Aegis128L::<16>::new(&key, &n).encrypt_in_place(&mut body, &header);
        assert_eq!(&b[HEADER_LEN..HEADER_LEN + body.len()], &body[..]);
        assert_eq!(&b[b.len() - SEAL_TAG_LEN..], &tag[..]);
    }

    #[test]
    fn replay_is_rejected() {
        for cipher in CIPHERS {
            let (mut tx, mut rx) = pair_with(cipher);
            let b = sealed(&mut tx, b"once");
            assert!(rx.open(SENDER, &mut b.clone()).is_ok());
            assert_eq!(rx.open(SENDER, &mut b.clone()), Err(OpenError::Replay), "{cipher}");
        }
    }

    #[test]
    fn reordering_within_the_window_is_accepted_and_older_is_rejected() {
        let (mut tx, mut rx) = pair();
        let packets: Vec<Vec<u8>> = (0..REPLAY_WINDOW + 2).map(|_| sealed(&mut tx, b"p")).collect();
        let late = REPLAY_WINDOW as usize;
        assert!(rx.open(SENDER, &mut packets[1].clone()).is_ok());
        for p in &packets[2..=late] {
            assert!(rx.open(SENDER, &mut p.clone()).is_ok());
        }
        // Counter 1..=late seen; top = late. Counter 1 is late-1 behind: a replay; 0 is late behind: too old.
        assert_eq!(rx.open(SENDER, &mut packets[1].clone()), Err(OpenError::Replay));
        assert!(rx.open(SENDER, &mut packets[late + 1].clone()).is_ok());
        assert_eq!(rx.open(SENDER, &mut packets[0].clone()), Err(OpenError::Replay));
        // Within the window, out of order: accepted once.
        let (mut tx, mut rx) = pair();
        let ps: Vec<Vec<u8>> = (0..10).map(|_| sealed(&mut tx, b"q")).collect();
        for i in [9, 3, 0, 7, 1, 2, 8, 4, 6, 5] {
            assert!(rx.open(SENDER, &mut ps[i].clone()).is_ok(), "packet {i}");
        }
        for p in &ps {
            assert_eq!(rx.open(SENDER, &mut p.clone()), Err(OpenError::Replay));
        }
    }

    #[test]
    fn identical_plaintexts_seal_differently() {
        let (mut tx, _) = pair();
        let a = sealed(&mut tx, b"same bytes");
        let b = sealed(&mut tx, b"same bytes");
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
        assert_ne!(
            a[a.len() - SEAL_OVERHEAD + 1..a.len() - SEAL_TAG_LEN],
            b[b.len() - SEAL_OVERHEAD + 1..b.len() - SEAL_TAG_LEN]
        );
        // Two sessions under the same key and counter use different subkeys.
        let mut other = Sealer::new(Keyring::new(1, [0x11; KEY_LEN]), SENDER + 1, 8);
        let mut c = packet(b"same bytes", FLAG_RETRANSMIT);
        other.seal(&mut c, HEADER_LEN + 10).unwrap();
        let first = {
            let (mut tx, _) = pair();
            sealed(&mut tx, b"same bytes")
        };
        assert_ne!(c[HEADER_LEN..HEADER_LEN + 10], first[HEADER_LEN..HEADER_LEN + 10]);
    }

    #[test]
    fn rotation_accepts_both_keys_during_the_change_over() {
        let (mut tx, mut rx) = pair();
        assert!(rx.open(SENDER, &mut sealed(&mut tx, b"old")).is_ok());
        rx.add_key(2, [0x33; KEY_LEN]).unwrap();
        tx.add_key(2, [0x33; KEY_LEN]).unwrap();
        assert_eq!(tx.add_key(3, [0x44; KEY_LEN]), Err(KeyError::Full));
        assert_eq!(tx.remove_key(1), Err(KeyError::SendingKey(1)));
        let before = sealed(&mut tx, b"old key, sent late");
        tx.use_key(2).unwrap();
        let after = sealed(&mut tx, b"new");
        assert_eq!(after[after.len() - SEAL_OVERHEAD], 2);
        assert!(rx.open(SENDER, &mut after.clone()).is_ok());
        assert!(rx.open(SENDER, &mut before.clone()).is_ok(), "old key still accepted, out of order");
        tx.remove_key(1).unwrap();
        assert_eq!(rx.remove_key(1), Err(KeyError::SendingKey(1)), "every node switches before removing");
        rx.use_key(2).unwrap();
        rx.remove_key(1).unwrap();
        assert_eq!(rx.open(SENDER, &mut sealed_with(1, b"stale")), Err(OpenError::UnknownKey(1)));
        // Re-adding id 1 with another secret must not reuse the cached subkey of the removed key.
        rx.add_key(1, [0x55; KEY_LEN]).unwrap();
        let mut old = Sealer::new(Keyring::new(1, [0x11; KEY_LEN]), SENDER, 8);
        old.counter = 1 << 20;
        assert_eq!(rx.open(SENDER, &mut sealed(&mut old, b"stale")), Err(OpenError::Auth));
    }

    fn sealed_with(id: u8, body: &[u8]) -> Vec<u8> {
        let mut tx = Sealer::new(Keyring::new(id, [0x11; KEY_LEN]), SENDER, 8);
        tx.counter = 1 << 30;
        sealed(&mut tx, body)
    }

    #[test]
    fn full_table_evicts_the_least_recently_heard() {
        let keys = Keyring::new(1, [0x11; KEY_LEN]);
        let mut rx = Sealer::new(keys.clone(), RECEIVER, 2);
        let seal_from = |session: u64| {
            let mut tx = Sealer::new(keys.clone(), session, 2);
            let mut b = packet(b"hi", 0);
            b[8..16].copy_from_slice(&session.to_be_bytes());
            tx.seal(&mut b, HEADER_LEN + 2).unwrap();
            b
        };
        let (a, b, c) = (seal_from(10), seal_from(11), seal_from(12));
        assert!(!rx.open(10, &mut a.clone()).unwrap().evicted);
        assert!(!rx.open(11, &mut b.clone()).unwrap().evicted);
        assert!(rx.open(12, &mut c.clone()).unwrap().evicted);
        assert!(rx.index.contains_key(&11) && rx.index.contains_key(&12) && !rx.index.contains_key(&10));
        assert_eq!(rx.open(11, &mut b.clone()), Err(OpenError::Replay));
    }

    #[test]
    fn exhausted_counter_refuses_to_seal() {
        let (mut tx, _) = pair();
        tx.counter = u64::MAX;
        let mut b = packet(b"x", 0);
        assert_eq!(tx.seal(&mut b, HEADER_LEN + 1), Err(SealError::CounterExhausted));
    }

    #[test]
    fn keyring_debug_hides_secrets() {
        let k = Keyring::new(7, [0xAB; KEY_LEN]);
        let s = format!("{k:?}");
        assert!(s.contains('7') && !s.contains("171") && !s.to_lowercase().contains("ab,"), "{s}");
    }

    /// A model of the replay window: the set of accepted counters and the highest.
    fn model_accepts(seen: &std::collections::BTreeSet<u64>, c: u64) -> bool {
        match seen.last() {
            None => true,
            Some(&top) => !seen.contains(&c) && (c > top || top - c < REPLAY_WINDOW),
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_open_nor_panic(session: u64, bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (_, mut rx) = pair();
            let mut b = bytes;
            prop_assert!(rx.open(session, &mut b).is_err());
        }

        #[test]
        fn replay_window_matches_its_model(counters in proptest::collection::vec(0u64..5000, 1..400)) {
            let mut w: Option<ReplayWindow> = None;
            let mut seen = std::collections::BTreeSet::new();
            for c in counters {
                let expect = model_accepts(&seen, c);
                let got = w.as_ref().is_none_or(|w| w.accepts(c));
                prop_assert_eq!(got, expect, "counter {}", c);
                if got {
                    match &mut w {
                        None => w = Some(ReplayWindow::starting_at(c)),
                        Some(w) => w.mark(c),
                    }
                    seen.insert(c);
                }
            }
        }
    }
}
