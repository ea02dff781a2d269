//! Loading the guest kernel and initrd into guest memory.
//!
//! The format is decided by content, never by file name: an ELF `vmlinux`
//! (entered through its PVH note when it has one, else at its 64-bit entry)
//! or a `bzImage` (entered at its 64-bit entry, 0x200 past the load address).
//! A vmlinux is mapped into guest RAM copy-on-write by vmlab's own loader
//! (`elf`); a bzImage, whose payload sits at an offset no page boundary
//! matches and is decompressed over itself anyway, is copied by
//! linux-loader.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::elf::{self, ElfError};
use super::gdt::EntryMode;
use super::layout::HIMEM_START;
use crate::vmm::memory::GuestMemoryMmap;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_HDR_OFFSET: u64 = 0x202;
const BZIMAGE_HDR_MAGIC: &[u8; 4] = b"HdrS";
/// The bzImage 64-bit entry point is this far past the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Highest initrd address boot protocols before 2.03 allow.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

/// The kernel image formats vmlab boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux, 64-bit entry.
    Elf,
    /// ELF vmlinux with a PVH entry note.
    ElfPvh,
    BzImage,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "ELF vmlinux (64-bit entry)",
            KernelFormat::ElfPvh => "ELF vmlinux (PVH entry)",
            KernelFormat::BzImage => "bzImage (64-bit boot protocol)",
        })
    }
}

/// Where the kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub mode: EntryMode,
    pub entry_point: u64,
    /// First guest address past the kernel image.
    pub end: u64,
    pub setup_header: Option<setup_header>,
}

/// Why a kernel or initrd could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel '{}' does not exist: give the path of a vmlinux or bzImage, or omit --kernel to boot the default guest", .0.display())]
    KernelMissing(PathBuf),
    #[error("cannot read kernel '{}': {source}", path.display())]
    KernelRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{}' is not a Linux kernel: expected an ELF vmlinux or a bzImage", .0.display())]
    NotAKernel(PathBuf),
    #[error("bzImage '{}' has no 64-bit entry point: build the kernel for x86-64", .0.display())]
    No64BitEntry(PathBuf),
    #[error("kernel '{}' could not be loaded into {mem_mib} MiB of guest memory ({source}): check the image, or raise --mem", path.display())]
    KernelLoad {
        path: PathBuf,
        mem_mib: u64,
        source: linux_loader::loader::Error,
    },
    #[error("kernel '{}' could not be loaded into {mem_mib} MiB of guest memory ({source}): check the image, or raise --mem", path.display())]
    ElfLoad {
        path: PathBuf,
        mem_mib: u64,
        source: ElfError,
    },
    #[error("initrd '{}' does not exist: check the --initrd path", .0.display())]
    InitrdMissing(PathBuf),
    #[error("cannot read initrd '{}': {source}", path.display())]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd '{}' ({size_mib} MiB) does not fit in guest memory next to the kernel: raise --mem", path.display())]
    InitrdTooLarge { path: PathBuf, size_mib: u64 },
}

/// A kernel or initrd to load: a file on the host, or bytes vmlab read from
/// elsewhere (a VM's own disk) and holds in an anonymous memory file.
#[derive(Clone, Debug)]
pub struct BootFile {
    /// The path, or what messages call the bytes in memory.
    name: PathBuf,
    memory: Option<Arc<File>>,
}

impl BootFile {
    /// The file at `path`, opened when loaded.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        BootFile {
            name: path.into(),
            memory: None,
        }
    }

    /// Bytes already in `file` (say a memfd), called `name` in messages.
    pub fn in_memory(name: impl Into<PathBuf>, file: File) -> Self {
        BootFile {
            name: name.into(),
            memory: Some(Arc::new(file)),
        }
    }

    pub fn name(&self) -> &Path {
        &self.name
    }

    /// The whole content (to hand the same kernel to another VMM, or check
    /// it).
    pub fn read_all(&self) -> std::io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open(KernelError::KernelMissing, kernel_read_error)
            .map_err(std::io::Error::other)?
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// A descriptor positioned at the start. A memory file's clones share
    /// one offset: loading is single-threaded and always starts here.
    fn open(
        &self,
        missing: fn(PathBuf) -> KernelError,
        read: fn(PathBuf, std::io::Error) -> KernelError,
    ) -> Result<File, KernelError> {
        let opened = match &self.memory {
            Some(file) => file.try_clone().and_then(|mut f| {
                f.seek(SeekFrom::Start(0))?;
                Ok(f)
            }),
            None => File::open(&self.name),
        };
        opened.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                missing(self.name.clone())
            } else {
                read(self.name.clone(), e)
            }
        })
    }
}

impl From<PathBuf> for BootFile {
    fn from(path: PathBuf) -> Self {
        BootFile::path(path)
    }
}

impl From<&Path> for BootFile {
    fn from(path: &Path) -> Self {
        BootFile::path(path)
    }
}

fn kernel_read_error(path: PathBuf, source: std::io::Error) -> KernelError {
    KernelError::KernelRead { path, source }
}

fn initrd_read_error(path: PathBuf, source: std::io::Error) -> KernelError {
    KernelError::InitrdRead { path, source }
}

/// Reads `N` bytes at `offset`, or `None` if the file is too short.
fn peek<const N: usize>(file: &mut File, offset: u64) -> std::io::Result<Option<[u8; N]>> {
    let mut buf = [0u8; N];
    file.seek(SeekFrom::Start(offset))?;
    match file.read_exact(&mut buf) {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Identifies the kernel format from the file's first bytes.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, KernelError> {
    let read_err = |e| kernel_read_error(path.to_path_buf(), e);
    if peek::<4>(file, 0).map_err(read_err)?.as_ref() == Some(ELF_MAGIC) {
        // PVH or not is only known once the notes are parsed.
        return Ok(KernelFormat::Elf);
    }
    if peek::<4>(file, BZIMAGE_HDR_OFFSET)
        .map_err(read_err)?
        .as_ref()
        == Some(BZIMAGE_HDR_MAGIC)
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(KernelError::NotAKernel(path.to_path_buf()))
}

/// Checks that the kernel is a kernel and the initrd is readable, before
/// anything is created: a bad path fails at once, with nothing to undo.
pub fn check_images(
    kernel: &BootFile,
    initrd: Option<&BootFile>,
) -> Result<KernelFormat, KernelError> {
    let mut file = kernel.open(KernelError::KernelMissing, kernel_read_error)?;
    let format = detect_format(&mut file, kernel.name())?;
    if let Some(initrd) = initrd {
        initrd.open(KernelError::InitrdMissing, initrd_read_error)?;
    }
    Ok(format)
}

/// Loads `kernel` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &BootFile) -> Result<LoadedKernel, KernelError> {
    let path = kernel.name();
    let mut file = kernel.open(KernelError::KernelMissing, kernel_read_error)?;
    let format = detect_format(&mut file, path)?;
    let mem_mib = mem
        .iter()
        .map(vm_memory::GuestMemoryRegion::len)
        .sum::<u64>()
        >> 20;
    match format {
        KernelFormat::Elf | KernelFormat::ElfPvh => {
            let kernel =
                elf::load(mem, &mut file, HIMEM_START).map_err(|source| KernelError::ElfLoad {
                    path: path.to_path_buf(),
                    mem_mib,
                    source,
                })?;
            log::debug!(
                "kernel: {} KiB of segments mapped copy-on-write",
                kernel.mapped_bytes >> 10
            );
            let (format, mode, entry_point) = match kernel.pvh_entry {
                Some(entry) => (KernelFormat::ElfPvh, EntryMode::Protected32, entry),
                None => (KernelFormat::Elf, EntryMode::Long, kernel.entry),
            };
            Ok(LoadedKernel {
                format,
                mode,
                entry_point,
                end: kernel.end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let himem = Some(GuestAddress(HIMEM_START));
            let result = BzImage::load(mem, None, &mut file, himem).map_err(|source| {
                KernelError::KernelLoad {
                    path: path.to_path_buf(),
                    mem_mib,
                    source,
                }
            })?;
            let header = result
                .setup_header
                .ok_or_else(|| KernelError::NotAKernel(path.to_path_buf()))?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(KernelError::No64BitEntry(path.to_path_buf()));
            }
            // The decompressor needs `init_size` bytes from the load address.
            let end = result
                .kernel_end
                .max(result.kernel_load.0 + u64::from(header.init_size));
            Ok(LoadedKernel {
                format,
                mode: EntryMode::Long,
                entry_point: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end,
                setup_header: Some(header),
            })
        }
    }
}

/// Highest address the kernel accepts for the initrd's last byte.
pub fn initrd_addr_max(kernel: &LoadedKernel) -> u64 {
    match kernel.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        Some(_) => DEFAULT_INITRD_ADDR_MAX,
        // ELF and PVH kernels take the initrd anywhere in the low 4 GiB.
        None => u32::MAX as u64,
    }
}

/// Where an initrd of `size` bytes goes: as high as allowed, page aligned,
/// above the kernel. `low_ram_end` is the end of RAM below the MMIO hole.
pub fn initrd_placement(
    size: u64,
    kernel_end: u64,
    addr_max: u64,
    low_ram_end: u64,
) -> Option<u64> {
    let top = low_ram_end.min(addr_max.saturating_add(1));
    let start = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end).then_some(start)
}

/// Copies the initrd into guest memory; returns its address and size.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    initrd: &BootFile,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<(u64, u64), KernelError> {
    let path = initrd.name();
    let mut file = initrd.open(KernelError::InitrdMissing, initrd_read_error)?;
    let size = file
        .metadata()
        .map_err(|e| initrd_read_error(path.to_path_buf(), e))?
        .len();
    let too_large = || KernelError::InitrdTooLarge {
        path: path.to_path_buf(),
        size_mib: size.div_ceil(1 << 20),
    };
    let addr = initrd_placement(size, kernel.end, initrd_addr_max(kernel), low_ram_end)
        .ok_or_else(too_large)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| initrd_read_error(path.to_path_buf(), std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    type Mem = vm_memory::GuestMemoryMmap<()>;

    fn mem(size: u64) -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmlab-kernel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        path
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let text = temp_file(
            "notes.txt",
            b"just some text, long enough to pass offset 0x202? no",
        );
        let text = BootFile::path(text);
        assert!(matches!(
            load_kernel(&mem(16 << 20), &text),
            Err(KernelError::NotAKernel(_))
        ));
        let empty = BootFile::path(temp_file("empty", b""));
        assert!(matches!(
            load_kernel(&mem(16 << 20), &empty),
            Err(KernelError::NotAKernel(_))
        ));
        let err = load_kernel(&mem(16 << 20), &text).unwrap_err().to_string();
        assert!(err.contains("is not a Linux kernel"), "{err}");
    }

    #[test]
    fn missing_kernel_is_named() {
        let missing = BootFile::path("/nonexistent/vmlinux");
        let err = load_kernel(&mem(16 << 20), &missing).unwrap_err();
        assert!(matches!(err, KernelError::KernelMissing(_)));
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn detects_format_by_content_not_name() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let path = temp_file("vmlinux", &bz);
        let mut file = File::open(&path).unwrap();
        assert_eq!(
            detect_format(&mut file, &path).unwrap(),
            KernelFormat::BzImage
        );
        let path = temp_file("bzImage", b"\x7fELF\x02\x01\x01");
        let mut file = File::open(&path).unwrap();
        assert_eq!(detect_format(&mut file, &path).unwrap(), KernelFormat::Elf);
    }

    #[test]
    fn truncated_elf_is_a_load_error_not_a_panic() {
        let path = BootFile::path(temp_file("truncated", b"\x7fELF\x02\x01\x01\x00"));
        assert!(matches!(
            load_kernel(&mem(16 << 20), &path),
            Err(KernelError::ElfLoad { .. })
        ));
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_above_the_kernel() {
        let addr = initrd_placement(10_000, 0x200_0000, 0x7fff_ffff, 512 << 20).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 10_000 <= 512 << 20);
        assert!(addr >= (512 << 20) - 10_000 - PAGE_SIZE);
        // The kernel's limit wins over the end of RAM.
        let addr = initrd_placement(0x1000, 0, 0x37ff_ffff, 2 << 30).unwrap();
        assert_eq!(addr, 0x3800_0000 - 0x1000);
        // Too big to fit above the kernel.
        assert_eq!(
            initrd_placement(500 << 20, 0x200_0000, 0x7fff_ffff, 512 << 20),
            None
        );
        assert_eq!(initrd_placement(u64::MAX, 0, u64::MAX, 512 << 20), None);
    }

    /// An ELF kernel loaded at 16 MiB, ending at 32 MiB.
    fn elf_at_16m() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            mode: EntryMode::Long,
            entry_point: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        }
    }

    #[test]
    fn loads_an_initrd_into_memory() {
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let path = BootFile::path(temp_file("initrd.cpio", &payload));
        let m = mem(64 << 20);
        let kernel = elf_at_16m();
        let (addr, size) = load_initrd(&m, &path, &kernel, 64 << 20).unwrap();
        assert_eq!(size, 5000);
        let mut back = vec![0u8; 5000];
        m.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, payload);
        let missing = BootFile::path("/nonexistent/rootfs.cpio");
        let err = load_initrd(&m, &missing, &kernel, 64 << 20).unwrap_err();
        assert!(matches!(err, KernelError::InitrdMissing(_)));
    }

    #[test]
    fn a_memory_file_loads_like_a_path_under_its_own_name() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let mut file = File::from(
            nix::sys::memfd::memfd_create("initrd", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap(),
        );
        file.write_all(&payload).unwrap();
        let initrd = BootFile::in_memory("vm1:/boot/initrd.img", file);
        let m = mem(64 << 20);
        let kernel = elf_at_16m();
        // Twice: the second load starts at the beginning again.
        for _ in 0..2 {
            let (addr, size) = load_initrd(&m, &initrd, &kernel, 64 << 20).unwrap();
            assert_eq!(size, 3000);
            let mut back = vec![0u8; 3000];
            m.read_slice(&mut back, GuestAddress(addr)).unwrap();
            assert_eq!(back, payload);
        }
        let err = load_kernel(&m, &initrd).unwrap_err().to_string();
        assert!(
            err.contains("'vm1:/boot/initrd.img' is not a Linux kernel"),
            "{err}"
        );
    }
}
