//! Key rotation requests from the application to the engine thread.
//!
//! The application side keeps a copy of the keyring and applies each request to it first, so that an
//! impossible request (a third key, an unknown id, removing the sending key) is refused at once, with the
//! reason, without a round trip to the engine. Accepted requests queue here and the engine applies them to
//! its endpoint at its next pass; they cannot fail there, the copy and the endpoint's keyring being equal.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::proto::{Endpoint, KEY_LEN, KeyError, Keyring};

/// One key operation.
#[derive(Clone, Copy)]
pub(crate) enum KeyOp {
    Add(u8, [u8; KEY_LEN]),
    Use(u8),
    Remove(u8),
}

impl KeyOp {
    fn apply_to_keyring(self, keys: &mut Keyring) -> Result<(), KeyError> {
        match self {
            KeyOp::Add(id, secret) => keys.add(id, secret),
            KeyOp::Use(id) => keys.use_key(id),
            KeyOp::Remove(id) => keys.remove(id),
        }
    }

    fn apply_to_endpoint(self, ep: &mut Endpoint) -> Result<(), KeyError> {
        match self {
            KeyOp::Add(id, secret) => ep.add_key(id, secret),
            KeyOp::Use(id) => ep.use_key(id),
            KeyOp::Remove(id) => ep.remove_key(id),
        }
    }
}

#[derive(Default)]
struct State {
    /// The application's copy of the keyring (`None`: encryption off).
    keys: Option<Keyring>,
    queue: Vec<KeyOp>,
}

/// Shared between the node handle and its engine.
#[derive(Default)]
pub(crate) struct KeyChannel {
    /// Something is queued: the engine checks this flag, not the lock, on every pass.
    pending: AtomicBool,
    state: Mutex<State>,
}

impl KeyChannel {
    pub(crate) fn init(&self, keys: Option<Keyring>) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).keys = keys;
    }

    /// Checks `op` against the copy and queues it for the engine; the caller wakes the engine.
    pub(crate) fn request(&self, op: KeyOp) -> Result<(), KeyError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        op.apply_to_keyring(s.keys.as_mut().ok_or(KeyError::NotEnabled)?)?;
        s.queue.push(op);
        self.pending.store(true, Ordering::Release);
        Ok(())
    }

    /// Engine side: applies what is queued. Returns how many operations were applied.
    pub(crate) fn apply(&self, ep: &mut Endpoint) -> usize {
        if !self.pending.load(Ordering::Acquire) {
            return 0;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(false, Ordering::Relaxed);
        let n = s.queue.len();
        for op in s.queue.drain(..) {
            if let Err(e) = op.apply_to_endpoint(ep) {
                // The copy accepted it, so the endpoint's keyring has drifted from it: a bug, not an input.
                log::error!("key operation refused by the engine after the node accepted it: {e}");
            }
        }
        n
    }
}
