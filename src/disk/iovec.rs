//! Helpers over lists of I/O buffers: slicing a byte range out of a request's
//! buffers, and positioned vectored I/O that survives short transfers.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;

use nix::sys::uio::{preadv, pwritev};

/// Linux refuses more than IOV_MAX (1024) buffers in one call.
const IOV_MAX: usize = 1024;

/// Total length of a buffer list.
pub fn total_len<T: std::ops::Deref<Target = [u8]>>(bufs: &[T]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// For buffers of lengths `lens`, which part of each (index, from, to)
/// covers bytes `[start, start + len)` of their concatenation.
fn pieces(lens: impl Iterator<Item = usize>, start: u64, len: u64) -> Vec<(usize, usize, usize)> {
    let end = start + len;
    let mut out = Vec::new();
    let mut pos = 0u64;
    for (i, blen) in lens.enumerate() {
        let (b_start, b_end) = (pos, pos + blen as u64);
        pos = b_end;
        if b_end <= start || blen == 0 {
            continue;
        }
        if b_start >= end {
            break;
        }
        let lo = start.max(b_start) - b_start;
        let hi = end.min(b_end) - b_start;
        out.push((i, lo as usize, hi as usize));
    }
    out
}

/// The buffers covering bytes `[start, start + len)` of the list, re-borrowed.
pub fn sub_mut<'a>(bufs: &'a mut [IoSliceMut<'_>], start: u64, len: u64) -> Vec<IoSliceMut<'a>> {
    let wanted = pieces(bufs.iter().map(|b| b.len()), start, len);
    let mut out = Vec::with_capacity(wanted.len());
    let mut rest: &mut [IoSliceMut<'_>] = bufs;
    let mut base = 0;
    for (i, lo, hi) in wanted {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
        let (this, tail) = tail.split_first_mut().expect("index from pieces");
        out.push(IoSliceMut::new(&mut this[lo..hi]));
        rest = tail;
        base = i + 1;
    }
    out
}

/// The buffers covering bytes `[start, start + len)` of the list.
pub fn sub<'a>(bufs: &'a [IoSlice<'_>], start: u64, len: u64) -> Vec<IoSlice<'a>> {
    pieces(bufs.iter().map(|b| b.len()), start, len)
        .into_iter()
        .map(|(i, lo, hi)| IoSlice::new(&bufs[i][lo..hi]))
        .collect()
}

/// Zeroes bytes `[start, start + len)` of the list.
pub fn fill_zero(bufs: &mut [IoSliceMut<'_>], start: u64, len: u64) {
    for b in sub_mut(bufs, start, len).iter_mut() {
        b.fill(0);
    }
}

/// Copies `src` into the list at byte `start`.
pub fn copy_in(bufs: &mut [IoSliceMut<'_>], start: u64, src: &[u8]) {
    let mut done = 0usize;
    for b in sub_mut(bufs, start, src.len() as u64).iter_mut() {
        let n = b.len();
        b.copy_from_slice(&src[done..done + n]);
        done += n;
    }
}

/// Copies bytes `[start, start + dst.len())` of the list into `dst`.
pub fn copy_out(bufs: &[IoSlice<'_>], start: u64, dst: &mut [u8]) {
    let mut done = 0usize;
    for b in sub(bufs, start, dst.len() as u64).iter() {
        let n = b.len();
        dst[done..done + n].copy_from_slice(b);
        done += n;
    }
}

/// Reads into `bufs` from `offset` until they are full or the file ends;
/// returns how many bytes were read (the caller zero-fills past the end).
pub fn pread_vectored(
    file: &File,
    mut bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> io::Result<u64> {
    if let [single] = bufs {
        return pread_one(file, single, offset);
    }
    let mut done = 0u64;
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        match preadv(file, &mut bufs[..n], (offset + done) as i64) {
            Ok(0) => break,
            Ok(got) => {
                done += got as u64;
                IoSliceMut::advance_slices(&mut bufs, got);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

fn pread_one(file: &File, buf: &mut [u8], offset: u64) -> io::Result<u64> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done as u64)
}

/// Writes all of `bufs` at `offset`.
pub fn pwrite_vectored(file: &File, mut bufs: &mut [IoSlice<'_>], offset: u64) -> io::Result<()> {
    if let [single] = bufs {
        return file.write_all_at(single, offset);
    }
    let mut done = 0u64;
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        match pwritev(file, &bufs[..n], (offset + done) as i64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(put) => {
                done += put as u64;
                IoSlice::advance_slices(&mut bufs, put);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_mut_picks_the_covering_pieces() {
        let mut a = [1u8; 3];
        let mut b = [2u8; 4];
        let mut c = [3u8; 5];
        let mut bufs = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut c),
        ];
        let pieces = sub_mut(&mut bufs, 2, 7);
        let lens: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(lens, vec![1, 4, 2]);
        fill_zero(&mut bufs, 2, 7);
        assert_eq!(a, [1, 1, 0]);
        assert_eq!(b, [0; 4]);
        assert_eq!(c, [0, 0, 3, 3, 3]);
    }

    #[test]
    fn copy_in_and_out_round_trip() {
        let mut a = [0u8; 2];
        let mut b = [0u8; 3];
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        copy_in(&mut bufs, 1, &[7, 8, 9]);
        assert_eq!((a, b), ([0, 7], [8, 9, 0]));
        let src = [IoSlice::new(&[1, 2]), IoSlice::new(&[3, 4, 5])];
        let mut out = [0u8; 3];
        copy_out(&src, 1, &mut out);
        assert_eq!(out, [2, 3, 4]);
    }
}
