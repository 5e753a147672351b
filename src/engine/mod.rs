//! The engine: drives an [`Endpoint`](crate::proto::Endpoint) over real sockets through a [`Backend`].

mod backend;
#[cfg(target_os = "linux")]
pub mod uring;

pub use backend::{Backend, BackendKind, BackendStats, Wake};
mod driver;
pub(crate) mod keys;
pub(crate) mod local;
pub(crate) mod offload;
pub mod poll;

pub(crate) use driver::*;
pub use driver::{IdleStrategy, NodeStats};
#[cfg(test)]
pub(crate) mod test_support;
