//! [`SharedMap`]: a sorted map whose clones share their unchanged parts, so that the gateway can
//! make each change on a copy of a registry of 250,000 endpoints, and find what the change
//! touched, in time that follows the change, not the registry.
//!
//! The entries are kept in sorted chunks of at most [`MAX_CHUNK`], each behind an `Arc`. A clone
//! copies the list of chunk pointers (one per ~256 entries); a write copies the one chunk it
//! changes if another clone still shares it (`Arc::make_mut`); [`SharedMap::diff_keys`] skips
//! every pair of chunks that are the same allocation, and compares entries only where the two
//! maps' chunks differ. Dropping the old registry after a change frees only the chunks that
//! change copied.
//!
//! Written here rather than taken from a crate (imbl, rpds): the offline crate registry this
//! workspace builds from has none of them, and the operations the registry needs (get, insert,
//! remove, ordered iteration, diff by shared chunks) fit in this file with a property test
//! against `BTreeMap`.

use std::{borrow::Borrow, cmp::Ordering, collections::BTreeSet, fmt, sync::Arc};

/// Entries a chunk holds at most; a chunk that grows past it is split in two halves.
pub const MAX_CHUNK: usize = 512;
/// A chunk left with fewer entries than this by a removal is merged with a neighbour.
pub const MIN_CHUNK: usize = 64;
/// Entries per chunk when a map is built from a list.
const BUILD_CHUNK: usize = MAX_CHUNK / 2;

/// A sorted map (see the module's documentation). Invariants: no chunk is empty; each chunk is
/// sorted by key with no duplicate; every key of a chunk is below every key of the next.
pub struct SharedMap<K, V> {
    chunks: Vec<Arc<Vec<(K, V)>>>,
    len: usize,
}

impl<K, V> Clone for SharedMap<K, V> {
    /// Copies the chunk pointers only: O(len / 256).
    fn clone(&self) -> Self {
        Self {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<K, V> Default for SharedMap<K, V> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<K, V> SharedMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.iter().map(|(k, v)| (k, v)))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }

    /// How many chunks the map holds (tests and benchmarks).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

impl<K: Ord, V> SharedMap<K, V> {
    /// The chunk that holds `k` if any map entry does; for an insert, the chunk it goes in
    /// (the last one for a key above every key). `None` only when the map is empty.
    fn chunk_of<Q>(&self, k: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        if self.chunks.is_empty() {
            return None;
        }
        let i = self
            .chunks
            .partition_point(|c| c.last().is_some_and(|(last, _)| last.borrow() < k));
        Some(i.min(self.chunks.len() - 1))
    }

    /// Where `k` is: its chunk and its place in it (`Err`: where it would go).
    fn find<Q>(&self, k: &Q) -> Option<(usize, Result<usize, usize>)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let c = self.chunk_of(k)?;
        Some((
            c,
            self.chunks[c].binary_search_by(|(x, _)| x.borrow().cmp(k)),
        ))
    }

    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match self.find(k)? {
            (c, Ok(i)) => Some(&self.chunks[c][i].1),
            _ => None,
        }
    }

    pub fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.get(k).is_some()
    }
}

impl<K: Ord + Clone, V: Clone> SharedMap<K, V> {
    /// The value at `k`, to change in place (its chunk is copied first if a clone shares it).
    pub fn get_mut<Q>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match self.find(k)? {
            (c, Ok(i)) => Some(&mut Arc::make_mut(&mut self.chunks[c])[i].1),
            _ => None,
        }
    }

    /// Sets `k` to `v`; the value it replaced, if any.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let Some((c, at)) = self.find(&k) else {
            self.chunks.push(Arc::new(vec![(k, v)]));
            self.len = 1;
            return None;
        };
        let chunk = Arc::make_mut(&mut self.chunks[c]);
        match at {
            Ok(i) => Some(std::mem::replace(&mut chunk[i].1, v)),
            Err(i) => {
                chunk.insert(i, (k, v));
                self.len += 1;
                if chunk.len() > MAX_CHUNK {
                    let tail = chunk.split_off(chunk.len() / 2);
                    self.chunks.insert(c + 1, Arc::new(tail));
                }
                None
            }
        }
    }

    /// Removes `k`; its value, if it was there (nothing is copied when it was not).
    pub fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (c, Ok(i)) = self.find(k)? else {
            return None;
        };
        let (_, v) = Arc::make_mut(&mut self.chunks[c]).remove(i);
        self.len -= 1;
        let left = self.chunks[c].len();
        if left == 0 {
            self.chunks.remove(c);
        } else if left < MIN_CHUNK && self.chunks.len() > 1 {
            // Merge with a neighbour (the right one, or the left for the last chunk), and split
            // the result again if it is too large.
            let first = if c + 1 < self.chunks.len() { c } else { c - 1 };
            let right = self.chunks.remove(first + 1);
            let merged = Arc::make_mut(&mut self.chunks[first]);
            merged.extend(Arc::unwrap_or_clone(right));
            if merged.len() > MAX_CHUNK {
                let tail = merged.split_off(merged.len() / 2);
                self.chunks.insert(first + 1, Arc::new(tail));
            }
        }
        Some(v)
    }

    /// Builds a map from entries already sorted by key with no duplicate.
    fn from_sorted(entries: Vec<(K, V)>) -> Self {
        let len = entries.len();
        let mut chunks = Vec::with_capacity(len.div_ceil(BUILD_CHUNK));
        let mut it = entries.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(Arc::new(it.by_ref().take(BUILD_CHUNK).collect()));
        }
        Self { chunks, len }
    }
}

impl<K: Ord + Clone, V: PartialEq> SharedMap<K, V> {
    /// Adds to `out` the keys whose entries differ between `old` and `new` (added, changed or
    /// removed). Chunks the two maps share are skipped whole: after a change made on a clone,
    /// this costs the chunks the change copied, not the map.
    pub fn diff_keys(old: &Self, new: &Self, out: &mut BTreeSet<K>) {
        let mut a = Cursor::new(old);
        let mut b = Cursor::new(new);
        loop {
            if a.at_chunk_start()
                && b.at_chunk_start()
                && let (Some(x), Some(y)) = (a.chunk(), b.chunk())
                && Arc::ptr_eq(x, y)
            {
                a.skip_chunk();
                b.skip_chunk();
                continue;
            }
            match (a.peek(), b.peek()) {
                (None, None) => return,
                (Some((k, _)), None) => {
                    out.insert(k.clone());
                    a.next();
                }
                (None, Some((k, _))) => {
                    out.insert(k.clone());
                    b.next();
                }
                (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                    Ordering::Less => {
                        out.insert(ka.clone());
                        a.next();
                    }
                    Ordering::Greater => {
                        out.insert(kb.clone());
                        b.next();
                    }
                    Ordering::Equal => {
                        if va != vb {
                            out.insert(ka.clone());
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
    }
}

/// A position in a map: a chunk and an entry in it.
struct Cursor<'a, K, V> {
    map: &'a SharedMap<K, V>,
    chunk: usize,
    entry: usize,
}

impl<'a, K, V> Cursor<'a, K, V> {
    fn new(map: &'a SharedMap<K, V>) -> Self {
        Self {
            map,
            chunk: 0,
            entry: 0,
        }
    }
    fn at_chunk_start(&self) -> bool {
        self.entry == 0
    }
    fn chunk(&self) -> Option<&'a Arc<Vec<(K, V)>>> {
        self.map.chunks.get(self.chunk)
    }
    fn skip_chunk(&mut self) {
        self.chunk += 1;
        self.entry = 0;
    }
    fn peek(&self) -> Option<&'a (K, V)> {
        self.chunk().map(|c| &c[self.entry])
    }
    fn next(&mut self) {
        self.entry += 1;
        if self.chunk().is_some_and(|c| self.entry == c.len()) {
            self.skip_chunk();
        }
    }
}

impl<K: Ord + Clone, V: Clone> FromIterator<(K, V)> for SharedMap<K, V> {
    /// Later entries win over earlier ones with the same key (as `BTreeMap`'s).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        // A stable sort keeps equal keys in their order: keep the last of each run.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(K, V)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        Self::from_sorted(out)
    }
}

impl<K: Ord + Clone, V: Clone> Extend<(K, V)> for SharedMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for SharedMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .chunks
                .iter()
                .flat_map(|c| c.iter())
                .eq(other.chunks.iter().flat_map(|c| c.iter()))
    }
}

impl<K: Eq, V: Eq> Eq for SharedMap<K, V> {}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for SharedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// The invariants of the module's documentation, and `len`.
    fn check<K: Ord + fmt::Debug, V>(m: &SharedMap<K, V>) {
        assert_eq!(m.len, m.chunks.iter().map(|c| c.len()).sum::<usize>());
        for c in &m.chunks {
            assert!(
                !c.is_empty() && c.len() <= MAX_CHUNK,
                "chunk of {}",
                c.len()
            );
            assert!(c.windows(2).all(|w| w[0].0 < w[1].0));
        }
        for w in m.chunks.windows(2) {
            assert!(w[0].last().unwrap().0 < w[1][0].0);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Remove(u16),
        Set(u16, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Keys from a range small enough that removals and replacements hit.
        prop_oneof![
            4 => (0u16..3000, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            3 => (0u16..3000).prop_map(Op::Remove),
            1 => (0u16..3000, any::<u32>()).prop_map(|(k, v)| Op::Set(k, v)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Every operation answers as `BTreeMap`'s does, the map iterates as it does, and a
        /// clone taken before the operations is left as it was.
        #[test]
        fn the_map_behaves_as_a_btreemap(
            start in proptest::collection::vec((0u16..3000, any::<u32>()), 0..2000),
            ops in proptest::collection::vec(op(), 0..1500),
        ) {
            let mut want: BTreeMap<u16, u32> = start.iter().copied().collect();
            let mut have: SharedMap<u16, u32> = start.iter().copied().collect();
            check(&have);
            prop_assert!(have.iter().eq(want.iter()));
            let before = have.clone();
            let before_want = want.clone();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(have.insert(k, v), want.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(have.remove(&k), want.remove(&k)),
                    Op::Set(k, v) => {
                        if let Some(x) = have.get_mut(&k) {
                            *x = v;
                        }
                        if let Some(x) = want.get_mut(&k) {
                            *x = v;
                        }
                    }
                }
                prop_assert_eq!(have.len(), want.len());
            }
            check(&have);
            prop_assert!(have.iter().eq(want.iter()));
            prop_assert!(have.iter().rev().eq(want.iter().rev()));
            for k in (0u16..3000).step_by(7) {
                prop_assert_eq!(have.get(&k), want.get(&k));
                prop_assert_eq!(have.contains_key(&k), want.contains_key(&k));
            }
            prop_assert!(before.iter().eq(before_want.iter()));
            prop_assert_eq!(before == have, before_want == want);
        }

        /// The diff of a map and a changed clone is exactly the keys whose entries differ, in
        /// both directions.
        #[test]
        fn the_diff_is_the_keys_that_differ(
            start in proptest::collection::vec((0u16..3000, any::<u32>()), 0..3000),
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let old: SharedMap<u16, u32> = start.iter().copied().collect();
            let mut new = old.clone();
            for op in ops {
                match op {
                    Op::Insert(k, v) | Op::Set(k, v) => {
                        new.insert(k, v);
                    }
                    Op::Remove(k) => {
                        new.remove(&k);
                    }
                }
            }
            let (a, b): (BTreeMap<u16, u32>, BTreeMap<u16, u32>) = (
                old.iter().map(|(k, v)| (*k, *v)).collect(),
                new.iter().map(|(k, v)| (*k, *v)).collect(),
            );
            let want: BTreeSet<u16> = a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(k) != b.get(k))
                .copied()
                .collect();
            for (x, y) in [(&old, &new), (&new, &old)] {
                let mut got = BTreeSet::new();
                SharedMap::diff_keys(x, y, &mut got);
                prop_assert_eq!(&got, &want);
            }
        }
    }

    /// Two maps built apart (no shared chunk) are compared entry by entry, and equal ones give
    /// no key.
    #[test]
    fn maps_built_apart_diff_by_their_entries() {
        let a: SharedMap<u32, u32> = (0..5000).map(|k| (k, k)).collect();
        let b: SharedMap<u32, u32> = (0..5000)
            .map(|k| (k, if k == 4321 { 0 } else { k }))
            .collect();
        let mut out = BTreeSet::new();
        SharedMap::diff_keys(&a, &a.clone(), &mut out);
        assert!(out.is_empty());
        SharedMap::diff_keys(&a, &b, &mut out);
        assert_eq!(out.into_iter().collect::<Vec<_>>(), [4321]);
    }

    /// A change on a clone of a large map copies one chunk and shares the rest.
    #[test]
    fn a_change_on_a_clone_copies_one_chunk() {
        let old: SharedMap<u32, u32> = (0..250_000).map(|k| (k, k)).collect();
        let mut new = old.clone();
        new.insert(125_000, 7);
        new.remove(&3);
        let shared = old
            .chunks
            .iter()
            .zip(&new.chunks)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(old.chunk_count(), new.chunk_count());
        assert_eq!(shared, old.chunk_count() - 2);
        let mut out = BTreeSet::new();
        SharedMap::diff_keys(&old, &new, &mut out);
        assert_eq!(out.into_iter().collect::<Vec<_>>(), [3, 125_000]);
    }
}
