//! [`OrderStats`]: a multiset of positions answering "how many are at or past `p`" in
//! O(log n), with inserts and removals in O(log n) (a treap whose nodes count their
//! subtrees). Read by N of M keeps one per conversation over its members' pointers, so
//! that a read advance or a membership change never scans the members.

/// No node.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node {
    key: i64,
    /// Copies of `key`.
    count: u32,
    /// Copies in this subtree.
    size: u32,
    priority: u32,
    left: u32,
    right: u32,
}

/// A multiset of `i64` with rank queries.
#[derive(Debug, Clone)]
pub struct OrderStats {
    nodes: Vec<Node>,
    free: Vec<u32>,
    root: u32,
    /// xorshift state for node priorities (deterministic: the same inserts build the same
    /// tree).
    rng: u32,
}

impl Default for OrderStats {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            rng: 0x9e37_79b9,
        }
    }
}

impl OrderStats {
    /// Values held, counting copies.
    pub fn len(&self) -> usize {
        self.size(self.root) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.root == NIL
    }

    /// How many values are `>= at`.
    pub fn count_at_or_above(&self, at: i64) -> usize {
        let (mut t, mut n) = (self.root, 0u32);
        while t != NIL {
            let node = &self.nodes[t as usize];
            if node.key >= at {
                n += node.count + self.size(node.right);
                t = node.left;
            } else {
                t = node.right;
            }
        }
        n as usize
    }

    pub fn insert(&mut self, key: i64) {
        if self.find(key).is_some() {
            self.adjust_path(key, true);
            return;
        }
        let node = self.alloc(key);
        let (l, r) = self.split_below(self.root, key);
        let l = self.merge(l, node);
        self.root = self.merge(l, r);
    }

    /// Remove one copy of `key`; whether there was one.
    pub fn remove(&mut self, key: i64) -> bool {
        let Some(i) = self.find(key) else {
            return false;
        };
        if self.nodes[i as usize].count > 1 {
            self.adjust_path(key, false);
            return true;
        }
        let (l, r) = self.split_below(self.root, key);
        // `r` starts with the node of `key`: take it off.
        let (m, r) = match key.checked_add(1) {
            Some(next) => self.split_below(r, next),
            None => (r, NIL),
        };
        debug_assert_eq!(m, i);
        self.free.push(m);
        self.root = self.merge(l, r);
        true
    }

    fn find(&self, key: i64) -> Option<u32> {
        let mut t = self.root;
        while t != NIL {
            let node = &self.nodes[t as usize];
            if key == node.key {
                return Some(t);
            }
            t = if key < node.key {
                node.left
            } else {
                node.right
            };
        }
        None
    }

    /// One copy more (or less) of `key`, which is in the tree: counts along its path.
    fn adjust_path(&mut self, key: i64, up: bool) {
        let mut t = self.root;
        while t != NIL {
            let node = &mut self.nodes[t as usize];
            if up {
                node.size += 1;
            } else {
                node.size -= 1;
            }
            if key == node.key {
                if up {
                    node.count += 1;
                } else {
                    node.count -= 1;
                }
                return;
            }
            t = if key < node.key {
                node.left
            } else {
                node.right
            };
        }
    }

    fn size(&self, t: u32) -> u32 {
        if t == NIL {
            0
        } else {
            self.nodes[t as usize].size
        }
    }

    fn update(&mut self, t: u32) {
        let (l, r) = (self.nodes[t as usize].left, self.nodes[t as usize].right);
        let size = self.nodes[t as usize].count + self.size(l) + self.size(r);
        self.nodes[t as usize].size = size;
    }

    fn alloc(&mut self, key: i64) -> u32 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        let node = Node {
            key,
            count: 1,
            size: 1,
            priority: self.rng,
            left: NIL,
            right: NIL,
        };
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    /// Split `t` into the keys `< key` and the keys `>= key`.
    fn split_below(&mut self, t: u32, key: i64) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.nodes[t as usize].key < key {
            let (l, r) = self.split_below(self.nodes[t as usize].right, key);
            self.nodes[t as usize].right = l;
            self.update(t);
            (t, r)
        } else {
            let (l, r) = self.split_below(self.nodes[t as usize].left, key);
            self.nodes[t as usize].left = r;
            self.update(t);
            (l, t)
        }
    }

    /// Join `a` and `b`, every key of `a` below every key of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].priority > self.nodes[b as usize].priority {
            let r = self.merge(self.nodes[a as usize].right, b);
            self.nodes[a as usize].right = r;
            self.update(a);
            a
        } else {
            let l = self.merge(a, self.nodes[b as usize].left);
            self.nodes[b as usize].left = l;
            self.update(b);
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against a sorted vector: any sequence of inserts and removals (with repeats),
        /// every rank query agrees.
        #[test]
        fn ranks_match_a_sorted_vector(
            ops in proptest::collection::vec((any::<bool>(), -20i64..20), 0..300),
            probes in proptest::collection::vec(-25i64..25, 1..20),
        ) {
            let (mut t, mut naive) = (OrderStats::default(), Vec::<i64>::new());
            for (insert, key) in ops {
                if insert {
                    t.insert(key);
                    naive.push(key);
                } else {
                    let had = naive.iter().position(|k| *k == key);
                    prop_assert_eq!(t.remove(key), had.is_some());
                    if let Some(i) = had {
                        naive.swap_remove(i);
                    }
                }
                prop_assert_eq!(t.len(), naive.len());
            }
            for p in probes {
                let want = naive.iter().filter(|k| **k >= p).count();
                prop_assert_eq!(t.count_at_or_above(p), want);
            }
        }
    }

    #[test]
    fn extremes_and_reuse() {
        let mut t = OrderStats::default();
        for k in [i64::MIN, -1, i64::MAX, i64::MAX, 0] {
            t.insert(k);
        }
        assert_eq!(t.count_at_or_above(i64::MAX), 2);
        assert_eq!(t.count_at_or_above(-1), 4);
        assert!(t.remove(i64::MAX) && t.remove(i64::MAX) && !t.remove(i64::MAX));
        assert!(t.remove(i64::MIN));
        assert_eq!((t.len(), t.count_at_or_above(i64::MIN)), (2, 2));
        t.insert(7);
        assert_eq!(t.nodes.len(), 4, "freed nodes are reused");
    }

    /// A thousand members' pointers moving forward one by one: depth stays logarithmic
    /// (the recursion is bounded), counts exact.
    #[test]
    fn many_members_advancing() {
        let mut t = OrderStats::default();
        let mut pointers: Vec<i64> = vec![-1; 1000];
        for _ in &pointers {
            t.insert(-1);
        }
        for step in 0..20_000usize {
            let m = (step * 7919) % pointers.len();
            assert!(t.remove(pointers[m]));
            pointers[m] += 1 + (step % 3) as i64;
            t.insert(pointers[m]);
        }
        for at in [0, 10, 40, 80] {
            let want = pointers.iter().filter(|p| **p >= at).count();
            assert_eq!(t.count_at_or_above(at), want);
        }
    }
}
