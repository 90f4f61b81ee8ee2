package store

import (
	"sync/atomic"
)

// leaf maps 256 consecutive logical blocks. Entries are read with atomic
// loads by any number of readers; they are written only under the owning
// volume's stripe lock, and only while refs == 1 (otherwise the writer copies
// the leaf first).
type leaf struct {
	refs atomic.Int32
	e    [leafEntries]atomic.Uint64
}

// inner is one interior node of the fixed 3-level index over leaf numbers
// (24 bits: 8 per level). Interior nodes are never shared between volumes,
// only leaves are, so a writer may fill an empty child slot with a CAS.
type inner struct {
	kids   [256]atomic.Pointer[inner]
	leaves [256]atomic.Pointer[leaf]
}

// tree is one volume's block map.
type tree struct {
	root inner
}

func leafIndex(lblock uint32) uint32 { return lblock >> leafBits }

// lookup returns the entry for lblock without taking any lock.
func (t *tree) lookup(lblock uint32) uint64 {
	li := leafIndex(lblock)
	mid := t.root.kids[li>>16].Load()
	if mid == nil {
		return 0
	}
	bot := mid.kids[(li>>8)&255].Load()
	if bot == nil {
		return 0
	}
	l := bot.leaves[li&255].Load()
	if l == nil {
		return 0
	}
	return l.e[lblock&(leafEntries-1)].Load()
}

// leafSlot returns the slot holding leaf li, creating interior nodes when
// create is set. Two stripes may race to create the same interior node; the
// CAS loser adopts the winner's node, so no update is lost.
func (t *tree) leafSlot(li uint32, create bool) *atomic.Pointer[leaf] {
	p := &t.root.kids[li>>16]
	mid := p.Load()
	if mid == nil {
		if !create {
			return nil
		}
		p.CompareAndSwap(nil, new(inner))
		mid = p.Load()
	}
	p = &mid.kids[(li>>8)&255]
	bot := p.Load()
	if bot == nil {
		if !create {
			return nil
		}
		p.CompareAndSwap(nil, new(inner))
		bot = p.Load()
	}
	return &bot.leaves[li&255]
}

// forEachLeaf calls fn for every present leaf in leaf-number order.
// mapped counts the mapped entries (reads only atomics: safe beside
// writers, a moment's snapshot).
func (t *tree) mapped() uint64 {
	var n uint64
	t.forEachLeaf(func(_ uint32, l *leaf) {
		for i := range l.e {
			if l.e[i].Load() != 0 {
				n++
			}
		}
	})
	return n
}

func (t *tree) forEachLeaf(fn func(li uint32, l *leaf)) {
	for a := range 256 {
		mid := t.root.kids[a].Load()
		if mid == nil {
			continue
		}
		for b := range 256 {
			bot := mid.kids[b].Load()
			if bot == nil {
				continue
			}
			for c := range 256 {
				if l := bot.leaves[c].Load(); l != nil {
					fn(uint32(a)<<16|uint32(b)<<8|uint32(c), l)
				}
			}
		}
	}
}

// share returns a new tree with copies of t's interior nodes pointing at
// the same leaves, whose reference counts it increments. Callers hold every
// stripe of the volume so no entry changes meanwhile.
func (t *tree) share() (*tree, int64) {
	n := new(tree)
	var count int64
	t.forEachLeaf(func(li uint32, l *leaf) {
		l.refs.Add(1)
		n.leafSlot(li, true).Store(l)
		count++
	})
	return n, count
}

// countLeaves returns how many leaf slots t fills.
func (t *tree) countLeaves() int64 {
	var n int64
	t.forEachLeaf(func(uint32, *leaf) { n++ })
	return n
}

// refcounts is the per-physical-block count of leaves referencing it.
type refcounts struct {
	n []atomic.Uint32
}

// blockSink collects blocks whose count reached zero; they are released to
// the allocator only after the commit that records why they became free.
type blockSink = []uint32

func (r *refcounts) ref(p uint32) { r.n[p].Add(1) }

func (r *refcounts) unref(p uint32, sink *blockSink) {
	if r.n[p].Add(^uint32(0)) == 0 {
		*sink = append(*sink, p)
	}
}

// releaseLeaf drops one reference to l and, if it was the last, the leaf's
// references to its data blocks.
func (s *Store) releaseLeaf(l *leaf, sink *blockSink) {
	if l.refs.Add(-1) != 0 {
		return
	}
	s.leafCount.Add(-1)
	for i := range l.e {
		if e := l.e[i].Load(); e != 0 {
			s.refs.unref(entryBlock(e), sink)
		}
	}
}

// releaseTree drops a whole tree (volume delete, snapshot delete).
func (s *Store) releaseTree(t *tree, sink *blockSink) {
	t.forEachLeaf(func(_ uint32, l *leaf) {
		s.leafRefs.Add(-1)
		s.releaseLeaf(l, sink)
	})
}

// setEntry installs e for lblock in t and returns the entry it replaced.
// The caller holds the stripe that owns lblock's leaf.
func (s *Store) setEntry(t *tree, lblock uint32, e uint64, sink *blockSink) (uint64, error) {
	li := leafIndex(lblock)
	slot := t.leafSlot(li, e != 0)
	if slot == nil {
		return 0, nil
	}
	l := slot.Load()
	if l == nil {
		if e == 0 {
			return 0, nil
		}
		if err := s.reserveLeaf(1); err != nil {
			return 0, err
		}
		l = new(leaf)
		l.refs.Store(1)
		slot.Store(l)
	} else if l.refs.Load() > 1 {
		if err := s.reserveLeaf(0); err != nil {
			return 0, err
		}
		c := new(leaf)
		c.refs.Store(1)
		for i := range l.e {
			v := l.e[i].Load()
			if v != 0 {
				s.refs.ref(entryBlock(v))
				c.e[i].Store(v)
			}
		}
		slot.Store(c)
		s.releaseLeaf(l, sink)
		l = c
	}
	old := l.e[lblock&(leafEntries-1)].Swap(e)
	if e != 0 {
		s.refs.ref(entryBlock(e))
	}
	if old != 0 {
		s.refs.unref(entryBlock(old), sink)
	}
	return old, nil
}

// reserveLeaf accounts a new leaf (and newRefs new leaf references)
// against the checkpoint area, so the next checkpoint always fits.
func (s *Store) reserveLeaf(newRefs int64) error {
	n := s.leafCount.Add(1)
	r := s.leafRefs.Add(newRefs)
	if ckptBytes(n, r) > int64(s.geo.CkptSize) {
		s.leafCount.Add(-1)
		s.leafRefs.Add(-newRefs)
		return ErrNoSpace
	}
	return nil
}

// reserveRefs accounts leaf references added by a snapshot or clone.
func (s *Store) reserveRefs(newRefs int64) error {
	r := s.leafRefs.Add(newRefs)
	if ckptBytes(s.leafCount.Load(), r) > int64(s.geo.CkptSize) {
		s.leafRefs.Add(-newRefs)
		return ErrNoSpace
	}
	return nil
}

// ckptBytes bounds the checkpoint size for the given counts; the volume
// table is bounded by maxVolumes entries of at most 512 bytes.
func ckptBytes(leaves, refs int64) int64 {
	return 4096 + maxVolumes*512 + leaves*leafEncodedMax + refs*8
}
