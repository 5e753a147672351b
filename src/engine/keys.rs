//! Key rotation requests from the application to the engine thread.
//!
//! The application side keeps a copy of the keyring and applies each request to it first, so that an
//! impossible request (a third key, an unknown id, removing the sending key) is refused at once, with the
//! reason, without a round trip to the engine. Accepted requests travel on the engine's command channel and
//! are applied to its endpoint at its next pass; they cannot fail there, the copy and the endpoint's
//! keyring being equal.

use std::sync::Mutex;

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

    /// Engine side: applies an operation the copy accepted. It cannot fail there, the copy and the
    /// endpoint's keyring being equal; if it does, that is a bug, logged rather than returned.
    pub(crate) fn apply_to_endpoint(self, ep: &mut Endpoint) {
        let r = match self {
            KeyOp::Add(id, secret) => ep.add_key(id, secret),
            KeyOp::Use(id) => ep.use_key(id),
            KeyOp::Remove(id) => ep.remove_key(id),
        };
        if let Err(e) = r {
            log::error!("key operation refused by the engine after the node accepted it: {e}");
        }
    }
}

/// The application's copy of the keyring (`None`: encryption off), shared by the node's handles.
#[derive(Default)]
pub(crate) struct KeyCopy {
    keys: Mutex<Option<Keyring>>,
}

impl KeyCopy {
    pub(crate) fn init(&self, keys: Option<Keyring>) {
        *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    /// Checks `op` against the copy and, if it is possible, applies it there and calls `send` (which hands
    /// it to the engine) under the same lock, so that concurrent requests reach the engine in the order
    /// they were checked.
    pub(crate) fn request(&self, op: KeyOp, send: impl FnOnce(KeyOp)) -> Result<(), KeyError> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        op.apply_to_keyring(keys.as_mut().ok_or(KeyError::NotEnabled)?)?;
        send(op);
        Ok(())
    }
}
