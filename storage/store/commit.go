package store

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

// committer runs one commit at a time (group commit): every record queued
// before a commit starts is journaled by it, and every FLUSH registered
// before it starts completes when it is durable.
type committer struct {
	mu      sync.Mutex
	running bool
	again   bool
	waiters []func(error)
	// idle run when the commit running at the time they were added has
	// finished: a FLUSH completes before its commit's checkpoint is
	// written, Sync and Close wait for that too.
	idle []func(error)

	// Owned by the running commit.
	nextSeq uint64
	sb      superblock

	durableSeq atomic.Uint64
	// held are the blocks freed by the newest journal entry. They are
	// released only when the next entry commits: until then Open may have
	// to check the data of that entry (see replay), which must not have
	// been overwritten.
	held      blockSink
	heldCount atomic.Int64
	// forceCkpt makes the next commit take a checkpoint (tests, benchmarks).
	forceCkpt atomic.Bool
}

// capturedVol is a volume's state frozen at a cut for a checkpoint.
type capturedVol struct {
	id       uint32
	name     string
	readOnly bool
	src      uint32
	size     uint64
	t        *tree
}

type cutResult struct {
	recs     []record
	frees    blockSink
	captured []capturedVol
	nextID   uint32
}

// cut takes every queued record in an order consistent with how they were
// applied in memory, and with capture also freezes the state they lead to.
// Holding the admin lock keeps admin operations (which drain stripes into the
// admin list before adding their own record) from interleaving.
func (s *Store) cut(capture bool) cutResult {
	s.admin.Lock()
	defer s.admin.Unlock()
	res := cutResult{recs: s.admin.recs, frees: s.admin.frees}
	s.admin.recs, s.admin.frees = nil, nil
	vt := s.table()
	res.nextID = vt.nextID
	ids := make([]uint32, 0, len(vt.byID))
	for id := range vt.byID {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var taken int64
	for _, id := range ids {
		v := vt.byID[id]
		if capture {
			v.lockAll()
		}
		for i := range v.stripes {
			st := &v.stripes[i]
			if !capture {
				st.mu.Lock()
			}
			res.recs = append(res.recs, st.recs...)
			res.frees = append(res.frees, st.frees...)
			taken += int64(len(st.recs))
			st.recs, st.frees = st.recs[:0:0], st.frees[:0:0]
			if !capture {
				st.mu.Unlock()
			}
		}
		if capture {
			t, _ := v.t.share()
			res.captured = append(res.captured, capturedVol{id: v.id, name: v.name, readOnly: v.readOnly, src: v.src, size: v.size.Load(), t: t})
			v.unlockAll()
		}
	}
	s.pending.Add(-taken)
	return res
}

// Flush calls done when every write completed before the call is durable.
func (s *Store) flush(done func(error)) {
	if err := s.failure(); err != nil {
		done(err)
		return
	}
	s.stats.flushes.Add(1)
	s.c.mu.Lock()
	s.c.waiters = append(s.c.waiters, done)
	s.c.mu.Unlock()
	s.kick()
}

// Tick is the store's clock input: it reclaims freed blocks and starts a
// commit when records are waiting. The simulator calls it every few steps;
// on a real disk a goroutine calls it periodically.
func (s *Store) Tick() {
	s.reclaim()
	if s.pending.Load() > 0 || s.c.heldCount.Load() > 0 {
		s.kick()
	}
}

func (s *Store) kick() {
	s.c.mu.Lock()
	if s.c.running {
		s.c.again = true
		s.c.mu.Unlock()
		return
	}
	s.c.running, s.c.again = true, false
	w := s.c.waiters
	s.c.waiters = nil
	s.c.mu.Unlock()
	s.commit(w)
}

func (s *Store) commitDone(w []func(error), err error) {
	if err != nil {
		s.fail(err)
		err = s.failure()
	}
	for _, f := range w {
		f(err)
	}
	s.c.mu.Lock()
	s.c.running = false
	more := s.c.again || len(s.c.waiters) > 0
	// Waiters for the end of the running commit, not for a quiet store:
	// under steady writes commits follow each other without a gap.
	idle := s.c.idle
	s.c.idle = nil
	s.c.mu.Unlock()
	s.reclaim()
	for _, f := range idle {
		f(s.failure())
	}
	if more && s.failure() == nil {
		s.kick()
	}
}

// whenIdle calls done once the commit running now (if any) has finished.
func (s *Store) whenIdle(done func(error)) {
	s.c.mu.Lock()
	if s.c.running {
		s.c.idle = append(s.c.idle, done)
		s.c.mu.Unlock()
		return
	}
	s.c.mu.Unlock()
	done(nil)
}

// retainFrom is the newest sequence the journal must still hold entries
// after: the fallback checkpoint, unless fallback is disabled.
func (c *committer) retainFrom() uint64 {
	if c.sb.Current.Flags&ckptNoFallback != 0 {
		return c.sb.Current.Seq
	}
	return c.sb.Previous.Seq
}

func (s *Store) journalRoom() uint64 {
	last := s.c.nextSeq - 1
	limit := s.c.retainFrom() + uint64(s.geo.JournalSlots)
	if last >= limit {
		return 0
	}
	return limit - last
}

func (s *Store) commit(w []func(error)) {
	if err := s.failure(); err != nil {
		s.commitDone(w, err)
		return
	}
	n := uint64(s.geo.JournalSlots)
	capture := s.c.nextSeq-1-s.c.sb.Current.Seq >= n/4 || s.journalRoom() < n/2 || s.c.forceCkpt.Swap(false)
	// Records logged from here on go to a new intent epoch; every one of
	// the old epoch is in the cut below. No commit writes more journal
	// entries than the ring holds.
	var epoch uint64
	if s.in.mem != nil {
		epoch = s.in.switchEpoch(s.c.nextSeq - 1 + n)
	}
	durable := func() {
		if s.in.mem != nil {
			s.in.covered(epoch, s.c.nextSeq-1)
		}
	}
	cut := s.cut(capture)
	if len(cut.recs) == 0 && !capture && len(cut.frees) == 0 && len(s.c.held) == 0 {
		durable()
		s.commitDone(w, nil)
		return
	}
	chunks := s.encodeChunks(cut.recs)
	s.log.Debug("commit", "first_seq", s.c.nextSeq, "chunks", len(chunks), "records", len(cut.recs),
		"frees", len(cut.frees), "checkpoint", capture, "room", s.journalRoom())
	if uint64(len(chunks)) > s.journalRoom() {
		// The ring would overwrite entries a fallback needs: commit this
		// cut through a checkpoint that disallows fallback instead.
		if !capture {
			more := s.cut(true)
			cut.frees = append(cut.frees, more.frees...)
			cut.captured, cut.nextID = more.captured, more.nextID
		}
		s.stats.commits.Add(1)
		s.disk.Flush(func(err error) {
			if err != nil {
				s.dropCaptured(cut.captured)
				s.commitDone(w, fmt.Errorf("flush data before checkpoint: %w", err))
				return
			}
			s.writeCheckpoint(cut, ckptNoFallback, func(err error) {
				if err == nil {
					durable()
					// Held like a journal entry's frees: until the next
					// commit covers the intent epoch that may still
					// replay records pointing at them.
					s.releaseHeld(cut.frees)
				}
				s.commitDone(w, err)
			})
		})
		return
	}
	// Every data write the records point at completed before the cut, so
	// the flush after the body writes makes data and bodies durable
	// together; the header that commits them is written after it.
	s.appendJournal(chunks, func(err error) {
		if err != nil {
			s.dropCaptured(cut.captured)
			s.commitDone(w, err)
			return
		}
		s.stats.commits.Add(1)
		durable()
		s.releaseHeld(cut.frees)
		if !capture {
			s.commitDone(w, nil)
			return
		}
		// The journal already holds everything the waiters asked for; the
		// checkpoint only bounds replay, so they need not wait for it (it
		// was most of a FLUSH's tail latency). Later commits still do.
		for _, f := range w {
			f(nil)
		}
		s.writeCheckpoint(cut, 0, func(err error) { s.commitDone(nil, err) })
	})
}

// releaseHeld retires the blocks the previous entry freed, now that a
// later entry has committed, and holds next in their place.
func (s *Store) releaseHeld(next blockSink) {
	s.retire(s.c.held)
	s.c.held = next
	s.c.heldCount.Store(int64(len(next)))
}

func (s *Store) encodeChunks(recs []record) [][]byte {
	max := int(s.geo.SlotSize) - bodyHeaderSize
	var chunks [][]byte
	var cur []byte
	for _, r := range recs {
		n := len(cur)
		cur = r.appendTo(cur)
		if len(cur) > max {
			chunks = append(chunks, cur[:n:n])
			cur = r.appendTo(nil)
		}
	}
	if len(cur) > 0 || len(chunks) == 0 {
		chunks = append(chunks, cur)
	}
	return chunks
}

// appendJournal writes both copies of the bodies, flushes (which also
// covers the data the records map), writes the redundant headers and
// flushes again, so a header exists only for a durable body and data.
func (s *Store) appendJournal(chunks [][]byte, done func(error)) {
	first := s.c.nextSeq
	bodies := make([][]byte, len(chunks))
	for i, p := range chunks {
		bodies[i] = encodeBody(first+uint64(i), s.geo.JournalSlots, p, s.geo.SlotSize)
	}
	all(2*len(bodies), func(i int, d func(error)) {
		s.disk.Write(s.geo.bodyOffset(i%2, first+uint64(i/2)), bodies[i/2], d)
	}, func(err error) {
		if err != nil {
			done(fmt.Errorf("write journal body: %w", err))
			return
		}
		s.disk.Flush(func(err error) {
			if err != nil {
				done(fmt.Errorf("flush journal body: %w", err))
				return
			}
			all(len(bodies), func(i int, d func(error)) {
				seq := first + uint64(i)
				h := ringHeader{Seq: seq, Size: uint32(len(chunks[i])), BodySum: checksum(bodies[i][:bodyHeaderSize+len(chunks[i])])}
				s.disk.Write(s.geo.headerOffset(seq), h.encode(), d)
			}, func(err error) {
				if err != nil {
					done(fmt.Errorf("write journal header: %w", err))
					return
				}
				s.disk.Flush(func(err error) {
					if err != nil {
						done(fmt.Errorf("flush journal header: %w", err))
						return
					}
					s.c.nextSeq = first + uint64(len(bodies))
					s.c.durableSeq.Store(s.c.nextSeq - 1)
					done(nil)
				})
			})
		})
	})
}

// all starts n operations and calls done once with the first error after
// every one finished.
func all(n int, start func(i int, done func(error)), done func(error)) {
	if n == 0 {
		done(nil)
		return
	}
	var mu sync.Mutex
	left := n
	var first error
	for i := range n {
		start(i, func(err error) {
			mu.Lock()
			if err != nil && first == nil {
				first = err
			}
			left--
			fin := left == 0
			mu.Unlock()
			if fin {
				done(first)
			}
		})
	}
}

func (s *Store) dropCaptured(cv []capturedVol) {
	var sink blockSink
	for _, c := range cv {
		c.t.forEachLeaf(func(_ uint32, l *leaf) { s.releaseLeaf(l, &sink) })
	}
	if len(sink) > 0 {
		s.admin.Lock()
		s.admin.frees = append(s.admin.frees, sink...)
		s.admin.Unlock()
	}
}

// writeCheckpoint writes the captured state to the area the durable
// superblock does not call current, then a superblock that does.
func (s *Store) writeCheckpoint(cut cutResult, flags uint8, done func(error)) {
	seq := s.c.nextSeq - 1
	blob := encodeCheckpoint(seq, cut.nextID, cut.captured)
	s.dropCaptured(cut.captured)
	if uint64(len(blob)) > s.geo.CkptSize {
		done(fmt.Errorf("checkpoint of %d bytes exceeds the %d-byte area: %w", len(blob), s.geo.CkptSize, ErrNoSpace))
		return
	}
	area := s.c.sb.Current.Area
	for area == s.c.sb.Current.Area || area == s.c.sb.Previous.Area {
		area = (area + 1) % ckptAreas
	}
	buf := alignedBuf(int(roundUp(uint64(len(blob)), blockSize)))
	copy(buf, blob)
	ref := ckptRef{Area: area, Flags: flags, Seq: seq, Size: uint64(len(blob)), Sum: checksum(blob)}
	s.disk.Write(s.geo.CkptOff[area], buf, func(err error) {
		if err != nil {
			done(fmt.Errorf("write checkpoint: %w", err))
			return
		}
		s.disk.Flush(func(err error) {
			if err != nil {
				done(fmt.Errorf("flush checkpoint: %w", err))
				return
			}
			nsb := s.c.sb
			nsb.Sequence++
			nsb.Parent = s.c.sb.sum()
			nsb.Previous, nsb.Current = s.c.sb.Current, ref
			s.log.Debug("checkpoint written", "seq", seq, "area", area, "size", len(blob), "flags", flags)
			s.writeSuperblock(nsb, func(err error) {
				if err == nil {
					s.c.sb = nsb
					s.stats.ckpts.Add(1)
				}
				done(err)
			})
		})
	})
}

// writeSuperblock writes the copies one after another, so a crash can tear
// at most the one copy in flight, then flushes. Copies written before it
// are new, the ones after it old, and either the new or the old sequence
// keeps its open quorum (see docs/on-disk-format.md).
func (s *Store) writeSuperblock(sb superblock, done func(error)) {
	var write func(i int)
	write = func(i int) {
		if i == superCopies {
			s.disk.Flush(func(err error) {
				if err != nil {
					err = fmt.Errorf("flush superblock: %w", err)
				}
				done(err)
			})
			return
		}
		c := sb
		c.Copy = uint16(i)
		b := alignedBuf(blockSize)
		copy(b, c.encode())
		s.disk.Write(uint64(i)*blockSize, b, func(err error) {
			if err != nil {
				done(fmt.Errorf("write superblock copy %d: %w", i, err))
				return
			}
			write(i + 1)
		})
	}
	write(0)
}
