//! io_uring backend: placeholder until the implementation lands; the probe reports it unavailable, so
//! `Auto` chooses poll.

use std::net::UdpSocket;

use super::backend::Backend;

/// Options of the io_uring backend.
#[derive(Debug, Clone, Default)]
pub struct UringOptions {
    /// Submission queue size.
    pub entries: u32,
}

/// Why the io_uring backend cannot run.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// Not available in this build.
    #[error("io_uring backend not built yet")]
    Unavailable,
}

/// The io_uring backend.
pub struct UringBackend(std::convert::Infallible);

impl Backend for UringBackend {
    fn kind(&self) -> super::BackendKind {
        match self.0 {}
    }
    fn queue_send(&mut self, _: std::net::SocketAddr, _: &[u8]) -> std::io::Result<()> {
        match self.0 {}
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0 {}
    }
    fn receive(
        &mut self,
        _: Option<std::time::Duration>,
        _: &mut dyn FnMut(std::net::SocketAddr, &[u8]),
    ) -> std::io::Result<usize> {
        match self.0 {}
    }
    fn waker(&self) -> std::sync::Arc<dyn super::Wake> {
        match self.0 {}
    }
    fn send_errors(&self) -> u64 {
        match self.0 {}
    }
}

impl UringBackend {
    /// Always fails in this placeholder.
    pub fn new(_group: UdpSocket, _unicast: UdpSocket, _opts: UringOptions) -> Result<UringBackend, UringError> {
        Err(UringError::Unavailable)
    }
}

/// Always unavailable in this placeholder.
pub fn probe() -> Result<String, String> {
    Err("io_uring backend not built yet".into())
}
