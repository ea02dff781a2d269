//! The qcow2 header (versions 2 and 3) and its extensions, parsed with every
//! field checked against the file before anything is allocated from it.

use std::path::Path;

use crate::disk::error::{DiskError, Result};

pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Field offsets, for in-place updates of single fields.
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_REFTABLE_OFFSET: u64 = 48;
pub const OFF_INCOMPATIBLE: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

const V2_HEADER_LEN: u32 = 72;
const V3_HEADER_LEN: u32 = 104;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
const EXT_ENCRYPTION: u32 = 0x0537_be77;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

/// Cluster sizes QEMU accepts: 512 bytes to 2 MiB.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits on the L1 and refcount tables; they bound what a hostile
/// header can make us allocate.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The largest virtual size we accept (QEMU's limit is about the same).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

/// A parsed header.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// How many L1 entries a disk of `size` bytes needs.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
        size.div_ceil(per_l2)
    }

    /// Reads the fixed fields from the first bytes of the file (`head` holds
    /// the whole first cluster, or the whole file if shorter).
    pub fn parse(head: &[u8], file_len: u64, path: &Path) -> Result<Header> {
        let bad = |why: String| DiskError::corrupt(path, why);
        if head.len() < V2_HEADER_LEN as usize || head[..4] != QCOW2_MAGIC {
            return Err(bad("header is truncated or has no qcow2 magic".into()));
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(DiskError::unsupported(
                path,
                format!("qcow2 version {version} (only 2 and 3 are known)"),
            ));
        }
        let cluster_bits = be32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster size 2^{cluster_bits} is outside 512 bytes..2 MiB"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let crypt = be32(head, 32);
        if crypt != 0 {
            return Err(DiskError::unsupported(path, "encrypted qcow2 images"));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(head, 24),
            l1_size: be32(head, 36),
            l1_table_offset: be64(head, 40),
            refcount_table_offset: be64(head, 48),
            refcount_table_clusters: be32(head, 56),
            nb_snapshots: be32(head, 60),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file: None,
            backing_format: None,
        };
        let mut compression_type = 0u8;
        if version == 3 {
            if head.len() < V3_HEADER_LEN as usize {
                return Err(bad("version 3 header is truncated".into()));
            }
            h.incompatible_features = be64(head, 72);
            h.compatible_features = be64(head, 80);
            h.autoclear_features = be64(head, 88);
            h.refcount_order = be32(head, 96);
            h.header_length = be32(head, 100);
            if h.header_length < V3_HEADER_LEN || h.header_length as u64 > cs.min(head.len() as u64)
            {
                return Err(bad(format!("header length {} is invalid", h.header_length)));
            }
            if h.header_length > V3_HEADER_LEN {
                compression_type = head[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!(
                "refcount order {} is above 6",
                h.refcount_order
            )));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(bad(format!("virtual size {} is too large", h.size)));
        }
        let l1_needed = Self::l1_entries_for(h.size, cluster_bits);
        if (h.l1_size as u64) < l1_needed {
            return Err(bad("L1 table is too small for the virtual size".into()));
        }
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(bad("L1 table is larger than 32 MiB".into()));
        }
        check_table(h.l1_table_offset, h.l1_size as u64 * 8, cs, file_len)
            .map_err(|why| bad(format!("L1 table {why}")))?;
        let reftable_bytes = h.refcount_table_clusters as u64 * cs;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(bad("refcount table is larger than 8 MiB".into()));
        }
        check_table(h.refcount_table_offset, reftable_bytes, cs, file_len)
            .map_err(|why| bad(format!("refcount table {why}")))?;

        // Incompatible features: known ones we cannot honour are refused by
        // name, unknown ones by the image's own feature name table.
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        let ext = parse_extensions(head, &h, cs, path)?;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|bit| unknown & (1u64 << bit) != 0)
                .map(|bit| {
                    ext.feature_names
                        .iter()
                        .find(|(kind, b, _)| *kind == 0 && *b as u32 == bit)
                        .map(|(_, _, name)| name.clone())
                        .unwrap_or_else(|| format!("bit {bit}"))
                })
                .collect();
            return Err(DiskError::unsupported(
                path,
                format!("image uses incompatible feature(s): {}", names.join(", ")),
            ));
        }
        if h.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0 || ext.external_data {
            return Err(DiskError::unsupported(
                path,
                "images with an external data file",
            ));
        }
        if ext.encrypted {
            return Err(DiskError::unsupported(path, "encrypted qcow2 images"));
        }
        if h.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(DiskError::unsupported(
                path,
                "extended L2 entries (subclusters)",
            ));
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION_TYPE != 0 {
            if compression_type != 0 {
                return Err(DiskError::unsupported(
                    path,
                    "compression types other than zlib (zstd)",
                ));
            }
        } else if compression_type != 0 {
            return Err(bad("compression type set without its feature bit".into()));
        }
        h.backing_format = ext.backing_format;

        let backing_offset = be64(head, 8);
        let backing_len = be32(head, 16) as u64;
        if backing_offset != 0 && backing_len != 0 {
            if backing_len > 1023
                || backing_offset.saturating_add(backing_len) > cs.min(head.len() as u64)
            {
                return Err(bad(
                    "backing file name lies outside the first cluster or is too long".into(),
                ));
            }
            let raw = &head[backing_offset as usize..(backing_offset + backing_len) as usize];
            let name = String::from_utf8(raw.to_vec())
                .map_err(|_| bad("backing file name is not UTF-8".into()))?;
            if name.contains('\0') {
                return Err(bad("backing file name contains a NUL byte".into()));
            }
            h.backing_file = Some(name);
        }
        Ok(h)
    }
}

/// Where a table lies must be cluster-aligned and inside the file.
fn check_table(offset: u64, bytes: u64, cs: u64, file_len: u64) -> std::result::Result<(), String> {
    if bytes == 0 {
        return Ok(());
    }
    if offset == 0 || offset % cs != 0 {
        return Err(format!("offset {offset:#x} is not a cluster boundary"));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(format!(
            "at {offset:#x} ({bytes} bytes) extends beyond the end of the file"
        )),
    }
}

struct Extensions {
    backing_format: Option<String>,
    feature_names: Vec<(u8, u8, String)>,
    external_data: bool,
    encrypted: bool,
}

fn parse_extensions(head: &[u8], h: &Header, cs: u64, path: &Path) -> Result<Extensions> {
    let bad = |why: &str| DiskError::corrupt(path, format!("header extension {why}"));
    let mut ext = Extensions {
        backing_format: None,
        feature_names: Vec::new(),
        external_data: false,
        encrypted: false,
    };
    let limit = (cs as usize).min(head.len());
    let mut pos = h.header_length as usize;
    loop {
        if pos + 8 > limit {
            // Version 2 images may end the header without an end marker.
            return Ok(ext);
        }
        let kind = be32(head, pos);
        let len = be32(head, pos + 4) as usize;
        pos += 8;
        if kind == EXT_END {
            return Ok(ext);
        }
        if len > limit - pos {
            return Err(bad("runs past the first cluster"));
        }
        let data = &head[pos..pos + len];
        match kind {
            EXT_BACKING_FORMAT => {
                let name = String::from_utf8(data.to_vec())
                    .map_err(|_| bad("backing format is not UTF-8"))?;
                ext.backing_format = Some(name.trim_end_matches('\0').to_string());
            }
            EXT_FEATURE_NAMES => {
                for entry in data.chunks_exact(48) {
                    let name = entry[2..].split(|&b| b == 0).next().unwrap_or(&[]);
                    ext.feature_names.push((
                        entry[0],
                        entry[1],
                        String::from_utf8_lossy(name).into_owned(),
                    ));
                }
            }
            EXT_EXTERNAL_DATA_FILE => ext.external_data = true,
            EXT_ENCRYPTION => ext.encrypted = true,
            _ => {}
        }
        pos += len.div_ceil(8) * 8;
    }
}

/// Feature names written into new images, as QEMU names them.
pub const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Serialises the header of a fresh version 3 image into `out` (the first
/// cluster): no features, 16-bit refcounts, zlib compression.
pub fn encode_v3(
    out: &mut [u8],
    size: u64,
    cluster_bits: u32,
    l1: (u64, u32),
    reftable: (u64, u32),
    backing: Option<(&str, &str)>,
) -> std::result::Result<(), String> {
    let put32 =
        |out: &mut [u8], at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |out: &mut [u8], at: usize, v: u64| out[at..at + 8].copy_from_slice(&v.to_be_bytes());
    out.fill(0);
    out[..4].copy_from_slice(&QCOW2_MAGIC);
    put32(out, 4, 3);
    put32(out, 20, cluster_bits);
    put64(out, 24, size);
    put32(out, 36, l1.1);
    put64(out, 40, l1.0);
    put64(out, 48, reftable.0);
    put32(out, 56, reftable.1);
    put32(out, 96, 4);
    put32(out, 100, 112);
    let mut pos = 112usize;
    let push_ext = |out: &mut [u8],
                    pos: &mut usize,
                    kind: u32,
                    data: &[u8]|
     -> std::result::Result<(), String> {
        let padded = data.len().div_ceil(8) * 8;
        if *pos + 8 + padded + 8 > out.len() {
            return Err("header extensions do not fit in the first cluster".into());
        }
        put32(out, *pos, kind);
        put32(out, *pos + 4, data.len() as u32);
        out[*pos + 8..*pos + 8 + data.len()].copy_from_slice(data);
        *pos += 8 + padded;
        Ok(())
    };
    if let Some((_, format)) = backing {
        push_ext(out, &mut pos, EXT_BACKING_FORMAT, format.as_bytes())?;
    }
    let mut table = Vec::with_capacity(FEATURE_NAMES.len() * 48);
    for (kind, bit, name) in FEATURE_NAMES {
        let mut entry = [0u8; 48];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        table.extend_from_slice(&entry);
    }
    let name_len = backing.map_or(0, |(name, _)| name.len());
    // Small clusters may not have room for the table; it is optional.
    if pos + 8 + table.len() + 8 + name_len <= out.len() {
        push_ext(out, &mut pos, EXT_FEATURE_NAMES, &table)?;
    }
    pos += 8; // end-of-extensions marker (zeroes)
    if let Some((name, _)) = backing {
        if name.len() > 1023 || pos + name.len() > out.len() {
            return Err("backing file name is too long".into());
        }
        put64(out, 8, pos as u64);
        put32(out, 16, name.len() as u32);
        out[pos..pos + name.len()].copy_from_slice(name.as_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(backing: Option<(&str, &str)>) -> Vec<u8> {
        let mut out = vec![0u8; 65536];
        encode_v3(&mut out, 10 << 30, 16, (0x30000, 20), (0x10000, 1), backing).unwrap();
        out
    }

    #[test]
    fn encoded_header_parses_back() {
        let head = encoded(Some(("base.raw", "raw")));
        let h = Header::parse(&head, 0x40000, Path::new("t")).unwrap();
        assert_eq!((h.version, h.cluster_bits, h.size), (3, 16, 10 << 30));
        assert_eq!((h.l1_table_offset, h.l1_size), (0x30000, 20));
        assert_eq!(
            (h.refcount_table_offset, h.refcount_table_clusters),
            (0x10000, 1)
        );
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!((h.refcount_order, h.header_length), (4, 112));
    }

    #[test]
    fn tables_must_lie_inside_the_file() {
        let head = encoded(None);
        let err = Header::parse(&head, 0x30000, Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("L1 table"), "{err}");
    }

    #[test]
    fn unknown_incompatible_bits_are_named() {
        let mut head = encoded(None);
        head[72..80].copy_from_slice(&(1u64 << 33).to_be_bytes());
        let err = Header::parse(&head, 0x40000, Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("bit 33"), "{err}");
    }

    #[test]
    fn a_backing_name_too_long_for_the_cluster_is_refused() {
        let mut out = vec![0u8; 512];
        let name = "x".repeat(600);
        assert!(encode_v3(
            &mut out,
            1 << 20,
            9,
            (1536, 1),
            (512, 1),
            Some((&name, "raw"))
        )
        .is_err());
    }
}
