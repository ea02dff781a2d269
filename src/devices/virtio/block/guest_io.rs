//! Host views of guest buffers, so that disk reads and writes move data
//! between the image file and guest memory with one preadv/pwritev and no
//! copy through vmlab.

use std::io::{IoSlice, IoSliceMut};

use vm_memory::{GuestMemoryBackend, GuestMemoryError};

use super::request::GuestBuf;
use crate::vmm::memory::GuestMemoryMmap;

/// The guest buffers `bufs` as slices of host memory (a buffer that spans
/// two memory regions becomes two slices).
// Guest RAM is mutable through a shared `GuestMemoryMmap` by design (the
// guest writes it too), which is what this lint objects to.
#[allow(clippy::mut_from_ref)]
fn host_slices<'m>(
    mem: &'m GuestMemoryMmap,
    bufs: &[GuestBuf],
) -> Result<Vec<&'m mut [u8]>, GuestMemoryError> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        for slice in mem.get_slices(b.addr, b.len as usize) {
            let slice = slice?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            // SAFETY: vm-memory checked that the `slice.len()` bytes at `ptr`
            // lie in a mapping of guest RAM that lives as long as `mem`, which
            // the result borrows. Guest RAM is shared with the guest, which
            // may race on or alias its own buffers; that can only garble the
            // guest's own data, as on real hardware doing DMA: vmlab hands
            // these bytes to the kernel or copies them, never trusts them.
            let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, slice.len()) };
            out.push(bytes);
        }
    }
    Ok(out)
}

/// Writable views of the guest buffers `bufs` (for disk reads).
pub fn slices_mut<'m>(
    mem: &'m GuestMemoryMmap,
    bufs: &[GuestBuf],
) -> Result<Vec<IoSliceMut<'m>>, GuestMemoryError> {
    Ok(host_slices(mem, bufs)?
        .into_iter()
        .map(IoSliceMut::new)
        .collect())
}

/// Read-only views of the guest buffers `bufs` (for disk writes).
pub fn slices<'m>(
    mem: &'m GuestMemoryMmap,
    bufs: &[GuestBuf],
) -> Result<Vec<IoSlice<'m>>, GuestMemoryError> {
    Ok(host_slices(mem, bufs)?
        .into_iter()
        .map(|s| IoSlice::new(s))
        .collect())
}
