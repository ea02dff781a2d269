//! The state file: one file per saved VM, versioned.
//!
//! ```text
//! 0       header: magic "VMLABST\0", format (u32), CRC-32 of the state
//!         (u32), state length (u64), memory offset (u64), guest RAM
//!         bytes (u64), little endian; the rest of the first 4 KiB zero
//! 4096    the state: JSON of `VmState` (vCPUs, platform, devices, spec)
//! M       guest RAM, sparse (see `memory`); M is 2 MiB-aligned
//! ```
//!
//! A file is written whole under a temporary name beside its place, made
//! durable, then renamed into place: a reader sees the old file or the new
//! one, and a VM that maps the old one (after a resume) keeps its pages.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::memory::MemoryStats;
use super::{StateError, VmState};

/// The format this vmlab writes and reads.
pub const STATE_FORMAT: u32 = 1;
const MAGIC: [u8; 8] = *b"VMLABST\0";
const HEADER_LEN: u64 = 4096;
const MEMORY_ALIGN: u64 = 2 << 20;
/// Largest state section read back (vCPU state is ~20 KiB each).
const MAX_STATE_LEN: u64 = 64 << 20;

/// A state file opened for a restore: the state, and the file whose
/// memory part the new VM maps.
pub struct SavedState {
    pub state: VmState,
    pub file: File,
    pub memory_offset: u64,
    pub path: PathBuf,
}

/// What writing a state file cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub memory: MemoryStats,
    /// Bytes the file takes on the host's disk.
    pub file_bytes: u64,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StateError {
    move |source| StateError::Io { what, source }
}

fn header(json: &[u8], memory_offset: u64, ram: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&STATE_FORMAT.to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
    h.extend_from_slice(&(json.len() as u64).to_le_bytes());
    h.extend_from_slice(&memory_offset.to_le_bytes());
    h.extend_from_slice(&ram.to_le_bytes());
    h.resize(HEADER_LEN as usize, 0);
    h
}

/// Writes `state` and guest RAM (through `write_memory(file, offset)`) to
/// `path`, replacing what is there only once all of it is durable.
pub fn write(
    path: &Path,
    state: &VmState,
    write_memory: impl FnOnce(&File, u64) -> Result<MemoryStats, StateError>,
) -> Result<Written, StateError> {
    let json = serde_json::to_vec(state).expect("the state always serializes");
    let memory_offset = (HEADER_LEN + json.len() as u64).div_ceil(MEMORY_ALIGN) * MEMORY_ALIGN;
    let dir = path.parent().unwrap_or(Path::new("."));
    // Owner-only, like the rest of a VM's directory: it holds guest RAM.
    let (tmp, file) =
        crate::fsutil::create_temporary_beside(path, crate::fsutil::PRIVATE_FILE_MODE)
            .map_err(io("create the state file"))?;
    let result = (|| {
        let memory = write_memory(&file, memory_offset)?;
        file.write_all_at(&json, HEADER_LEN)
            .map_err(io("write the state file"))?;
        file.write_all_at(&header(&json, memory_offset, memory.ram), 0)
            .map_err(io("write the state file"))?;
        file.sync_all().map_err(io("write the state file"))?;
        let blocks = std::os::unix::fs::MetadataExt::blocks(
            &file.metadata().map_err(io("write the state file"))?,
        );
        std::fs::rename(&tmp, path).map_err(io("put the state file in place"))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(Written {
            memory,
            file_bytes: blocks * 512,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl SavedState {
    /// Opens and checks a state file (the memory is not read).
    pub fn open(path: &Path) -> Result<SavedState, StateError> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(io("cannot open the saved state"))?;
        let damaged = |what: String| StateError::DamagedFile {
            path: shown.clone(),
            what,
        };
        let mut h = [0u8; 40];
        if file.read_exact_at(&mut h, 0).is_err() || h[..8] != MAGIC {
            return Err(StateError::NotAStateFile { path: shown });
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
        let format = u32_at(8);
        if format != STATE_FORMAT {
            return Err(StateError::Format { found: format });
        }
        let (crc, json_len, memory_offset, ram) = (u32_at(12), u64_at(16), u64_at(24), u64_at(32));
        if json_len > MAX_STATE_LEN || memory_offset < HEADER_LEN + json_len {
            return Err(damaged(format!(
                "its header is inconsistent (state {json_len} bytes, memory at {memory_offset})"
            )));
        }
        let mut json = vec![0u8; json_len as usize];
        file.read_exact_at(&mut json, HEADER_LEN)
            .map_err(|_| damaged("it is cut short".into()))?;
        if crc32fast::hash(&json) != crc {
            return Err(damaged("its checksum does not match".into()));
        }
        let state: VmState =
            serde_json::from_slice(&json).map_err(|e| damaged(format!("unreadable state: {e}")))?;
        if state.spec.mem_size != ram {
            return Err(damaged(format!(
                "its header says {ram} bytes of memory, its state {}",
                state.spec.mem_size
            )));
        }
        let len = file
            .metadata()
            .map_err(io("cannot inspect the saved state"))?
            .len();
        if len < memory_offset + ram {
            return Err(damaged("it is cut short".into()));
        }
        Ok(SavedState {
            state,
            file,
            memory_offset,
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::SerialSnapshot;
    use crate::vmstate::{MachineSpec, PlatformState};

    fn sample(mem_size: u64) -> VmState {
        VmState {
            spec: MachineSpec {
                vmlab_version: "test".into(),
                cpus: 1,
                mem_size,
                devices: vec!["virtio-rng".into()],
            },
            saved_at_ns: 42,
            vcpus: Vec::new(),
            platform: PlatformState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            serial: SerialSnapshot {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"in fifo".to_vec(),
            },
            virtio: Vec::new(),
            nat_flows: Default::default(),
        }
    }

    fn written(dir: &Path) -> PathBuf {
        let path = dir.join("vm.state");
        let ram = 4u64 << 20;
        write(&path, &sample(ram), |file, offset| {
            file.write_all_at(b"memory", offset).unwrap();
            file.set_len(offset + ram).unwrap();
            Ok(MemoryStats { ram, written: 4096 })
        })
        .unwrap();
        path
    }

    #[test]
    fn a_written_state_reads_back_private_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path());
        let saved = SavedState::open(&path).unwrap();
        assert_eq!(saved.state.saved_at_ns, 42);
        assert_eq!(saved.state.serial.in_buffer, b"in fifo");
        assert_eq!(saved.memory_offset % MEMORY_ALIGN, 0);
        let mut memory = [0u8; 6];
        saved
            .file
            .read_exact_at(&mut memory, saved.memory_offset)
            .unwrap();
        assert_eq!(&memory, b"memory");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "guest RAM is its owner's only");
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path());
        let err = write(&path, &sample(1 << 20), |_, _| {
            Err(StateError::Memory("disk full".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        SavedState::open(&path).unwrap();
    }

    #[test]
    fn damaged_foreign_and_future_files_are_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path());
        let poke = |offset: u64, bytes: &[u8]| {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.write_all_at(bytes, offset).unwrap();
        };
        poke(HEADER_LEN + 2, b"#");
        let err = SavedState::open(&path).err().unwrap().to_string();
        assert!(err.contains("checksum does not match"), "{err}");

        let path = written(dir.path());
        poke(8, &9u32.to_le_bytes());
        let err = SavedState::open(&path).err().unwrap().to_string();
        assert!(err.contains("format 9, this vmlab reads format 1"), "{err}");

        let path = written(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 4096)
            .unwrap();
        let err = SavedState::open(&path).err().unwrap().to_string();
        assert!(err.contains("cut short"), "{err}");

        let other = dir.path().join("other");
        std::fs::write(&other, b"#!/bin/sh\n").unwrap();
        let err = SavedState::open(&other).err().unwrap().to_string();
        assert!(err.contains("is not a vmlab state file"), "{err}");
    }
}
