//! A small write-back cache of metadata clusters (L2 tables, refcount
//! blocks) with least-recently-used eviction. It only keeps bytes and dirty
//! flags; the image decides in which order dirty tables reach the disk.

use std::collections::HashMap;

pub struct Table {
    pub offset: u64,
    pub data: Vec<u8>,
    pub dirty: bool,
    used: u64,
}

pub struct TableCache {
    tables: Vec<Table>,
    index: HashMap<u64, usize>,
    capacity: usize,
    clock: u64,
}

impl TableCache {
    pub fn new(capacity: usize) -> Self {
        TableCache {
            tables: Vec::new(),
            index: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    /// The slot holding the table at `offset`, marked as just used.
    pub fn find(&mut self, offset: u64) -> Option<usize> {
        let slot = *self.index.get(&offset)?;
        self.clock += 1;
        self.tables[slot].used = self.clock;
        Some(slot)
    }

    /// The slot the next `insert` will replace, when the cache is full.
    pub fn victim(&self) -> Option<usize> {
        if self.tables.len() < self.capacity {
            return None;
        }
        self.tables
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| t.used)
            .map(|(i, _)| i)
    }

    /// Adds a table, replacing the victim (which the caller has written back
    /// if it was dirty). Returns its slot.
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) -> usize {
        self.clock += 1;
        let table = Table {
            offset,
            data,
            dirty,
            used: self.clock,
        };
        let slot = match self.victim() {
            Some(v) => {
                self.index.remove(&self.tables[v].offset);
                self.tables[v] = table;
                v
            }
            None => {
                self.tables.push(table);
                self.tables.len() - 1
            }
        };
        self.index.insert(offset, slot);
        slot
    }

    pub fn get(&self, slot: usize) -> &Table {
        &self.tables[slot]
    }

    pub fn get_mut(&mut self, slot: usize) -> &mut Table {
        &mut self.tables[slot]
    }

    /// Slots of dirty tables, in file order (kinder to the disk).
    pub fn dirty_slots(&self) -> Vec<usize> {
        let mut slots: Vec<usize> = (0..self.tables.len())
            .filter(|&i| self.tables[i].dirty)
            .collect();
        slots.sort_by_key(|&i| self.tables[i].offset);
        slots
    }

    /// Writes the table in `slot` to its place in `file` and marks it clean.
    pub fn write_back(&mut self, slot: usize, file: &std::fs::File) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let t = &mut self.tables[slot];
        file.write_all_at(&t.data, t.offset)?;
        t.dirty = false;
        Ok(())
    }

    pub fn any_dirty(&self) -> bool {
        self.tables.iter().any(|t| t.dirty)
    }
}

pub fn get_be64(data: &[u8], index: usize) -> u64 {
    u64::from_be_bytes(data[index * 8..index * 8 + 8].try_into().expect("8 bytes"))
}

pub fn set_be64(data: &mut [u8], index: usize, value: u64) {
    data[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
}

/// Reads refcount `index` from a block with `1 << order`-bit entries
/// (sub-byte entries are packed from the least significant bit, as QEMU does).
pub fn get_refcount(data: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = data[index / per_byte];
            ((byte >> ((index % per_byte) * bits)) & ((1u16 << bits) - 1) as u8) as u64
        }
        3 => data[index] as u64,
        4 => u16::from_be_bytes([data[index * 2], data[index * 2 + 1]]) as u64,
        5 => u32::from_be_bytes(data[index * 4..index * 4 + 4].try_into().expect("4 bytes")) as u64,
        _ => get_be64(data, index),
    }
}

/// Writes refcount `index`; `value` must fit in `1 << order` bits.
pub fn set_refcount(data: &mut [u8], index: usize, order: u32, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut data[index / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => data[index] = value as u8,
        4 => data[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => data[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => set_be64(data, index, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_round_trip_at_every_width() {
        for order in 0..=6u32 {
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let mut block = vec![0u8; 64];
            let entries = (64 * 8) >> order;
            for i in 0..entries {
                set_refcount(&mut block, i, order, (i as u64 * 7) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get_refcount(&block, i, order),
                    (i as u64 * 7) & max,
                    "order {order} index {i}"
                );
            }
        }
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut cache = TableCache::new(2);
        let a = cache.insert(0x1000, vec![1], false);
        cache.insert(0x2000, vec![2], false);
        assert_eq!(cache.find(0x1000), Some(a));
        let victim = cache.victim().expect("full");
        assert_eq!(cache.get(victim).offset, 0x2000);
        cache.insert(0x3000, vec![3], false);
        assert!(cache.find(0x2000).is_none());
        assert!(cache.find(0x1000).is_some());
    }
}
