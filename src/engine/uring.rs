//! io_uring backend (being written).
