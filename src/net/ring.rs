//! A bounded byte ring that grows on demand up to its limit, so idle flows
//! cost little and busy ones never exceed their share. Its memory is drawn
//! from a [`BufferBudget`] shared by every flow of the NAT.

use super::budget::BufferBudget;

/// First allocation; doubled as needed up to the limit.
const INITIAL: usize = 16 * 1024;

#[derive(Debug)]
pub(crate) struct Ring {
    buf: Vec<u8>,
    head: usize,
    len: usize,
    limit: usize,
    budget: BufferBudget,
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.budget.give(self.buf.len());
    }
}

impl Ring {
    pub fn new(limit: usize, budget: &BufferBudget) -> Self {
        Ring {
            buf: Vec::new(),
            head: 0,
            len: 0,
            limit: limit.max(1),
            budget: budget.clone(),
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
        let wanted = (self.buf.len() * 2)
            .max(INITIAL)
            .max(self.len + want.min(INITIAL))
            .min(self.limit);
        let granted = self.budget.take_up_to(wanted - self.buf.len());
        if granted == 0 {
            return;
        }
        let new_cap = self.buf.len() + granted;
        let mut next = vec![0u8; new_cap];
        let (a, b) = self.slices(0, self.len);
        next[..a.len()].copy_from_slice(a);
        next[a.len()..a.len() + b.len()].copy_from_slice(b);
        self.buf = next;
        self.head = 0;
    }

    /// Bytes that may be added now: the free space within the limit that
    /// the allocation or the budget can still hold.
    pub fn available(&self) -> usize {
        self.free()
            .min(self.buf.len() - self.len + self.budget.available())
    }

    /// Gives the allocation back to the budget while the ring is empty, so
    /// that flows starved of memory can grow.
    pub fn release_if_empty(&mut self) {
        if self.len == 0 && !self.buf.is_empty() {
            self.budget.give(self.buf.len());
            self.buf = Vec::new();
            self.head = 0;
        }
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

    fn unlimited() -> BufferBudget {
        BufferBudget::new(usize::MAX)
    }

    #[test]
    fn wraps_grows_and_stays_bounded() {
        let mut r = Ring::new(40_000, &unlimited());
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
        let mut r = Ring::new(512 * 1024, &unlimited());
        assert_eq!(r.push(b"tiny"), 4);
        assert!(r.write_space(256 * 1024).len() < 64 * 1024);
        assert!(r.buf.len() <= INITIAL);
    }

    #[test]
    fn growth_stops_at_the_budget_and_an_empty_ring_gives_it_back() {
        let budget = BufferBudget::new(40_000);
        let mut a = Ring::new(512 * 1024, &budget);
        let mut b = Ring::new(512 * 1024, &budget);
        let data = vec![1u8; 100_000];
        assert_eq!(a.push(&data), 40_000, "a takes what the budget has");
        assert_eq!(b.push(&data), 0, "b cannot grow at all");
        assert_eq!(b.available(), 0);
        assert!(b.write_space(1000).is_empty());
        a.consume(40_000);
        a.release_if_empty();
        assert_eq!(budget.used(), 0);
        assert_eq!(b.push(&data[..1000]), 1000);
        drop(b);
        assert_eq!(budget.used(), 0, "a dropped ring returns its memory");
    }

    #[test]
    fn write_space_never_overlaps_data() {
        let mut r = Ring::new(100, &unlimited());
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
