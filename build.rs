//! Embeds the guest recipes (guest/) into the binary, so `vmlab run` can
//! build the default guest wherever the binary lives, and stamps them with
//! a content hash that keys the cache of built guests.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("guest/ is readable")
        .map(|e| e.expect("guest/ entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// FNV-1a: stable across Rust versions, unlike std's hasher.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = root.join("guest");
    println!("cargo:rerun-if-changed=guest");
    let mut files = Vec::new();
    collect(&guest, &mut files);

    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut table = String::from("pub const RECIPE_FILES: &[(&str, &[u8], u32)] = &[\n");
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let rel = path
            .strip_prefix(&guest)
            .unwrap()
            .to_str()
            .expect("UTF-8 path");
        let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
        fnv1a(&mut hash, rel.as_bytes());
        fnv1a(&mut hash, &mode.to_le_bytes());
        fnv1a(&mut hash, &fs::read(path).unwrap());
        writeln!(
            table,
            "    ({rel:?}, include_bytes!({:?}), {mode:#o}),",
            path.display()
        )
        .unwrap();
    }
    table.push_str("];\n");
    writeln!(table, "pub const RECIPE_HASH: &str = \"{hash:016x}\";").unwrap();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guest_recipe.rs");
    fs::write(out, table).unwrap();
}
