//! An owned shared mapping of a ghOSt file (`cpu_data`, status-word regions, queues): the
//! agent's side, and the kernel model's.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

/// An owned shared mapping; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through atomics or volatile /
// unaligned reads that tolerate concurrent writers, as the ghOSt protocol requires.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` from offset 0, shared; writable when `write`.
    pub fn new(file: &File, len: usize, write: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of a file we hold open; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }

    /// The mapping's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings are created non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A pointer `offset` bytes in, if `size` bytes fit there.
    pub(super) fn at(&self, offset: usize, size: usize) -> Option<*mut u8> {
        // SAFETY: checked to stay within the mapping.
        (offset.checked_add(size)? <= self.len).then(|| unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// An atomic u32 at `offset` (4-byte aligned, within the mapping).
    pub(super) fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        let p = self.at(offset, 4).expect("offset within the mapping");
        assert_eq!(p as usize % 4, 0, "atomic at an unaligned offset");
        // SAFETY: in bounds, aligned, and the mapping outlives the reference; shared memory
        // written by the kernel is accessed only atomically here.
        unsafe { &*(p as *const AtomicU32) }
    }

    /// Reads a `T` at `offset` without assuming alignment.
    pub(super) fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let p = self.at(offset, size_of::<T>())?;
        // SAFETY: in bounds; read_unaligned needs no alignment; T is plain data (Copy, repr(C)
        // ABI structs with no invalid bit patterns).
        Some(unsafe { std::ptr::read_unaligned(p as *const T) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing refers to it past its owner's life.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
