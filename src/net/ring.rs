//! A bounded byte ring that grows on demand up to its limit, so idle flows
//! cost little and busy ones never exceed their share.

/// First allocation; doubled as needed up to the limit.
const INITIAL: usize = 16 * 1024;

#[derive(Debug)]
pub(crate) struct Ring {
    buf: Vec<u8>,
    head: usize,
    len: usize,
    limit: usize,
}

impl Ring {
    pub fn new(limit: usize) -> Self {
        Ring {
            buf: Vec::new(),
            head: 0,
            len: 0,
            limit: limit.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes that may still be added.
    pub fn free(&self) -> usize {
        self.limit - self.len
    }

    /// Grows the allocation (doubling, up to the limit) when less than a
    /// useful amount of room is left, keeping the data in order. Flows that
    /// move little stay small; busy flows reach the limit in a few steps.
    fn reserve(&mut self, want: usize) {
        let room = self.buf.len() - self.len;
        if room >= want.min(INITIAL / 2) || self.buf.len() >= self.limit {
            return;
        }
        let new_cap = (self.buf.len() * 2)
            .max(INITIAL)
            .max(self.len + want.min(INITIAL))
            .min(self.limit);
        let mut next = vec![0u8; new_cap];
        let (a, b) = self.slices(0, self.len);
        next[..a.len()].copy_from_slice(a);
        next[a.len()..a.len() + b.len()].copy_from_slice(b);
        self.buf = next;
        self.head = 0;
    }

    /// The contiguous free space after the data (up to `want` bytes), to
    /// read into directly; follow with [`Ring::commit`].
    pub fn write_space(&mut self, want: usize) -> &mut [u8] {
        let want = want.min(self.free());
        if self.len == 0 {
            self.head = 0;
        }
        self.reserve(want);
        let cap = self.buf.len();
        if self.len == cap {
            return &mut [];
        }
        let tail = (self.head + self.len) % cap;
        let end = if tail >= self.head { cap } else { self.head };
        let n = (end - tail).min(want);
        &mut self.buf[tail..tail + n]
    }

    /// Marks `n` bytes of [`Ring::write_space`] as data.
    pub fn commit(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.buf.len());
        self.len += n;
    }

    /// Appends as much of `data` as fits; returns how much.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            let space = self.write_space(data.len() - done);
            if space.is_empty() {
                break;
            }
            let n = space.len();
            space.copy_from_slice(&data[done..done + n]);
            self.commit(n);
            done += n;
        }
        done
    }

    /// `len` bytes starting `offset` bytes after the head, as two pieces.
    pub fn slices(&self, offset: usize, len: usize) -> (&[u8], &[u8]) {
        assert!(offset + len <= self.len, "ring range out of bounds");
        if len == 0 {
            return (&[], &[]);
        }
        let cap = self.buf.len();
        let start = (self.head + offset) % cap;
        let first = len.min(cap - start);
        (&self.buf[start..start + first], &self.buf[..len - first])
    }

    /// The contiguous data at the head.
    pub fn front(&self) -> &[u8] {
        self.slices(0, self.len).0
    }

    /// Drops `n` bytes from the head.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        if n == 0 {
            return;
        }
        self.head = (self.head + n) % self.buf.len();
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_grows_and_stays_bounded() {
        let mut r = Ring::new(40_000);
        let data: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        assert_eq!(r.push(&data[..30_000]), 30_000);
        r.consume(25_000);
        // Wraps around inside the allocation.
        assert_eq!(r.push(&data[30_000..]), 20_000);
        assert_eq!(r.len(), 25_000);
        assert_eq!(r.push(&data), 15_000);
        assert_eq!(r.free(), 0);
        let (a, b) = r.slices(0, 25_000);
        let joined: Vec<u8> = a.iter().chain(b).copied().collect();
        assert_eq!(
            joined,
            [&data[25_000..30_000], &data[30_000..50_000]].concat()
        );
        assert!(r.buf.len() <= 40_000);
    }

    #[test]
    fn small_users_stay_small() {
        let mut r = Ring::new(512 * 1024);
        assert_eq!(r.push(b"tiny"), 4);
        assert!(r.write_space(256 * 1024).len() < 64 * 1024);
        assert!(r.buf.len() <= INITIAL);
    }

    #[test]
    fn write_space_never_overlaps_data() {
        let mut r = Ring::new(100);
        for round in 0..500usize {
            let want = round % 37 + 1;
            let before = r.len();
            let n = {
                let s = r.write_space(want);
                s.fill(round as u8);
                s.len()
            };
            r.commit(n);
            assert_eq!(r.len(), before + n);
            assert!(r.len() <= 100);
            r.consume(round % 29);
        }
    }
}
