//! Memory the kernel reads or writes behind Rust's back: raw allocations at stable addresses, and the
//! provided-buffer ring.
//!
//! Nothing here is reached through a Rust reference while the kernel may touch it: the backend hands out raw
//! pointers when it arms an operation and builds a slice only over a buffer the kernel has returned to it.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

/// The system page size (4096 if `sysconf` cannot tell).
pub(super) fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant; _SC_PAGESIZE is a valid name on every Linux.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

/// A zeroed heap allocation at a stable address, freed on drop unless [`leak`](Region::leak)ed.
pub(super) struct Region {
    ptr: NonNull<u8>,
    layout: Layout,
    leaked: bool,
}

// SAFETY: a Region is plain owned memory (like a Box<[u8]>); the raw pointer carries no thread affinity.
unsafe impl Send for Region {}

impl Region {
    /// Allocates `size` zeroed bytes (at least one) aligned to `align` (a power of two).
    pub(super) fn new(size: usize, align: usize) -> io::Result<Region> {
        let layout = Layout::from_size_align(size.max(1), align)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "allocation size overflows"))?;
        // SAFETY: the layout has a non-zero size (max(1) above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Region { ptr, layout, leaked: false })
    }

    /// The first byte.
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Never free this memory: used when the kernel might still write into it.
    pub(super) fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed only here, once.
            // The backend frees its regions only after every operation that could use them has completed
            // (otherwise it leaks them), see UringBackend's Drop.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

/// One entry of a provided-buffer ring, laid out as the kernel's `struct io_uring_buf`. In entry 0, `resv`
/// is the ring's tail, written by us only, atomically.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// A provided-buffer ring in page-aligned memory: we add buffers at the tail; the kernel takes them from
/// the head (which only it knows) as datagrams arrive.
pub(super) struct BufRing {
    mem: Region,
    entries: u16,
    /// Our tail: entries written below it are published to the kernel by [`publish`](BufRing::publish).
    tail: u16,
}

impl BufRing {
    /// Zeroed ring memory for `entries` buffers (a power of two, at most 32768): page aligned, as the kernel
    /// requires.
    pub(super) fn new(entries: u16) -> io::Result<BufRing> {
        debug_assert!(entries.is_power_of_two() && entries <= 32768);
        let page = page_size();
        let size = (usize::from(entries) * size_of::<RawBuf>()).next_multiple_of(page);
        Ok(BufRing { mem: Region::new(size, page)?, entries, tail: 0 })
    }

    /// The ring's address, for registration.
    pub(super) fn addr(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    /// Writes one buffer at our (unpublished) tail.
    ///
    /// The caller must own buffer `bid` (the kernel returned it, or it was never provided), so that the ring
    /// holds at most `entries - 1` buffers before this call and the slot written is not one the kernel may
    /// still read.
    pub(super) fn push(&mut self, addr: u64, len: u32, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        // SAFETY: index < entries and the region holds `entries` RawBufs, 8-byte aligned (page aligned base,
        // 16-byte entries). The kernel reads only the entries between its head and the published tail; as
        // the caller owns buffer `bid`, at most entries - 1 buffers are in the ring, so this slot is outside
        // that range. We write addr, len and bid field by field, never `resv`, which in entry 0 is the tail
        // the kernel reads atomically.
        unsafe {
            let entry = self.mem.as_ptr().cast::<RawBuf>().add(index);
            ptr::addr_of_mut!((*entry).addr).write(addr);
            ptr::addr_of_mut!((*entry).len).write(len);
            ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every pushed buffer visible to the kernel.
    pub(super) fn publish(&self) {
        // SAFETY: the tail is entry 0's `resv` field: inside the region, 2-byte aligned (offset 14 from a
        // page-aligned base), valid for the region's life. It is only ever accessed atomically: by this
        // store and by the kernel's acquire load; `push` never writes it. The Release ordering makes the
        // entries written by `push` visible before the kernel can observe the new tail.
        unsafe {
            let tail = ptr::addr_of_mut!((*self.mem.as_ptr().cast::<RawBuf>()).resv);
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// Never free the ring memory (the kernel may still hold it).
    pub(super) fn leak(&mut self) {
        self.mem.leak();
    }
}
