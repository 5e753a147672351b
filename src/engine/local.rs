//! The backend of an in-process node: no sockets. Nothing is sent and nothing arrives; the engine still
//! runs, so publishers and subscribers work exactly as on a networked node, with local delivery.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::backend::{Backend, BackendKind, BackendStats, Wake};

/// Waits on a condition variable instead of a socket.
pub(crate) struct LocalBackend {
    wake: Arc<LocalWake>,
    /// What `send_buffer` lends (the datagrams written there go nowhere).
    scratch: Vec<u8>,
    lent: usize,
}

#[derive(Default)]
struct LocalWake {
    woken: Mutex<bool>,
    cond: Condvar,
}

impl Wake for LocalWake {
    fn wake(&self) {
        *self.woken.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cond.notify_one();
    }
}

impl LocalBackend {
    pub(crate) fn new() -> LocalBackend {
        LocalBackend { wake: Arc::new(LocalWake::default()), scratch: Vec::new(), lent: 0 }
    }
}

impl Backend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn queue_send(&mut self, _dest: SocketAddr, _bytes: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn send_buffer(&mut self, max_len: usize) -> &mut [u8] {
        if self.scratch.len() < max_len {
            self.scratch.resize(max_len, 0);
        }
        self.lent = self.scratch.len();
        &mut self.scratch
    }

    fn commit_send(&mut self, _dest: SocketAddr, len: usize) -> io::Result<()> {
        if len > std::mem::take(&mut self.lent) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "commit_send beyond the lent buffer"));
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn receive(
        &mut self,
        timeout: Option<Duration>,
        _sink: &mut dyn FnMut(SocketAddr, &mut [u8]),
    ) -> io::Result<usize> {
        if timeout == Some(Duration::ZERO) {
            return Ok(0);
        }
        let mut woken = self.wake.woken.lock().unwrap_or_else(|e| e.into_inner());
        if !*woken {
            woken = match timeout {
                Some(t) => self.wake.cond.wait_timeout(woken, t).unwrap_or_else(|e| e.into_inner()).0,
                None => self.wake.cond.wait(woken).unwrap_or_else(|e| e.into_inner()),
            };
        }
        *woken = false;
        Ok(0)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.wake.clone()
    }

    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }
}
