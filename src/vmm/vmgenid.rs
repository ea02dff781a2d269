//! The VM Generation ID (Microsoft's "Virtual Machine Generation ID", as
//! QEMU, Firecracker and Cloud Hypervisor offer it): 16 random bytes in a
//! reserved guest page that the DSDT's `VGEN` device points to (`ADDR`),
//! and an interrupt on the GED that makes it `Notify` the guest when they
//! change. Linux's vmgenid driver reads them at boot and, notified, reads
//! the new ones and reseeds its random number generator at once (from 6.5
//! it also sends a `NEW_VMGENID=1` uevent). vmlab writes new ones when a
//! VM resumes from a full snapshot (`run --from`, or a restored one): a
//! fork or a step back in time, whose RNG state must not repeat.
//!
//! Beside the ID, at `VMGENID_NOTE_OFFSET`, vmlab keeps an identity note
//! for the guest: `VMLABID1`, a 16-bit length, then `key=value` lines (the
//! VM's `hostname`, `instance` id and `mac`). The kernel command line is
//! not read again on resume, so the guest's hook reads the note (root
//! reads reserved pages below 1 MiB through /dev/mem) when the ID changes.

use std::io::Read;

use vm_memory::{Bytes, GuestAddress};

use super::error::VmmError;
use super::memory::GuestMemoryMmap;
use crate::arch::x86_64::layout::{
    RESET_VECTOR_ADDR, VMGENID_ADDR, VMGENID_GSI, VMGENID_NOTE_OFFSET,
};

/// The note's magic.
pub const NOTE_MAGIC: &[u8; 8] = b"VMLABID1";
/// Longest note text: the page's room after the magic and length, up to
/// the reset entry's code at the page's end.
pub const NOTE_MAX: usize = (RESET_VECTOR_ADDR - VMGENID_ADDR - VMGENID_NOTE_OFFSET) as usize - 10;

/// A VM's generation ID device: where its interrupt goes.
pub struct VmGenId {
    irq: vmm_sys_util::eventfd::EventFd,
}

/// 16 fresh random bytes.
pub fn random_id() -> Result<[u8; 16], VmmError> {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(VmmError::io("read /dev/urandom for the VM generation ID"))?;
    Ok(id)
}

/// The note's bytes for `text` (cut to `NOTE_MAX`).
pub fn note_bytes(text: &str) -> Vec<u8> {
    let text = &text.as_bytes()[..text.len().min(NOTE_MAX)];
    let mut note = NOTE_MAGIC.to_vec();
    note.extend_from_slice(&(text.len() as u16).to_le_bytes());
    note.extend_from_slice(text);
    note
}

/// Writes the generation `id` and the identity `note` into guest memory.
pub fn write(mem: &GuestMemoryMmap, id: &[u8; 16], note: &str) -> Result<(), VmmError> {
    let bad = |e: vm_memory::GuestMemoryError| {
        VmmError::device("vmgenid")(format!("cannot write the generation ID page: {e}"))
    };
    mem.write_slice(id, GuestAddress(VMGENID_ADDR))
        .map_err(bad)?;
    mem.write_slice(
        &note_bytes(note),
        GuestAddress(VMGENID_ADDR + VMGENID_NOTE_OFFSET),
    )
    .map_err(bad)
}

impl VmGenId {
    /// Routes the device's interrupt to the GED's second GSI.
    pub fn new(vm: &kvm_ioctls::VmFd) -> Result<VmGenId, VmmError> {
        use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
        let irq = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
            .map_err(VmmError::io("create the VM generation ID interrupt"))?;
        vm.register_irqfd(&irq, VMGENID_GSI)
            .map_err(VmmError::kvm("route the VM generation ID interrupt"))?;
        Ok(VmGenId { irq })
    }

    /// Tells the guest the ID changed (the GED's `_EVT` notifies `VGEN`).
    pub fn notify(&self) -> Result<(), VmmError> {
        self.irq
            .write(1)
            .map_err(VmmError::io("raise the VM generation ID interrupt"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_holds_the_id_then_the_note_and_a_long_note_is_cut() {
        let mem = crate::vmm::memory::create(2 << 20).unwrap();
        let id = random_id().unwrap();
        assert_ne!(id, random_id().unwrap(), "fresh each time");
        write(&mem, &id, "hostname=vm2\ninstance=vm2\n").unwrap();
        let mut back = [0u8; 16];
        mem.read_slice(&mut back, GuestAddress(VMGENID_ADDR))
            .unwrap();
        assert_eq!(back, id);
        let mut note = [0u8; 36];
        mem.read_slice(&mut note, GuestAddress(VMGENID_ADDR + VMGENID_NOTE_OFFSET))
            .unwrap();
        assert_eq!(&note[..8], NOTE_MAGIC);
        assert_eq!(u16::from_le_bytes([note[8], note[9]]), 26);
        assert_eq!(&note[10..], b"hostname=vm2\ninstance=vm2\n");

        let long = note_bytes(&"x".repeat(8000));
        assert_eq!(long.len(), 10 + NOTE_MAX);
        assert!(
            VMGENID_ADDR + VMGENID_NOTE_OFFSET + long.len() as u64 <= RESET_VECTOR_ADDR,
            "stops before the reset entry at the page's end"
        );
    }
}
