package store

import (
	"fmt"
	"sync"

	"github.com/virtblk/virtblk/storage"
)

// Vol is a handle for I/O on one volume. Its methods start the operation
// and call done when it finishes; they are safe for concurrent use.
type Vol struct {
	s *Store
	v *volume
	// io carries data block reads and writes: the store's disk, or a
	// queue's own ring (uringChannel).
	io dataIO
}

// dataIO is the part of a Disk data blocks go through.
type dataIO interface {
	Read(off uint64, buf []byte, done func(error))
	Write(off uint64, buf []byte, done func(error))
}

// Volume returns a handle for the named volume, snapshot or clone.
func (s *Store) Volume(name string) (*Vol, error) {
	v, err := s.lookupName(name)
	if err != nil {
		return nil, err
	}
	return &Vol{s: s, v: v, io: s.disk}, nil
}

func (h *Vol) Name() string   { return h.v.name }
func (h *Vol) Size() uint64   { return h.v.size.Load() }
func (h *Vol) ReadOnly() bool { return h.v.readOnly }

func (h *Vol) check(off, n uint64, write bool) error {
	if err := h.s.failure(); err != nil {
		return err
	}
	if h.v.deleted.Load() {
		return fmt.Errorf("volume %q was deleted: %w", h.v.name, storage.ErrIO)
	}
	if write && h.v.readOnly {
		return fmt.Errorf("%q is a snapshot: %w", h.v.name, storage.ErrReadOnly)
	}
	if off%storage.SectorSize != 0 || n%storage.SectorSize != 0 {
		return fmt.Errorf("offset %d length %d not multiples of %d: %w", off, n, storage.SectorSize, storage.ErrIO)
	}
	if off+n < off || off+n > h.v.size.Load() {
		return fmt.Errorf("offset %d length %d on %q of %d bytes: %w", off, n, h.v.name, h.v.size.Load(), storage.ErrRange)
	}
	return nil
}

// pieces splits [off, off+n) into per-block parts.
func pieces(off, n uint64, fn func(lblock uint32, inBlock, pos, length int)) int {
	count := 0
	pos := 0
	for n > 0 {
		lb := uint32(off / blockSize)
		in := int(off % blockSize)
		l := min(uint64(blockSize-in), n)
		if fn != nil {
			fn(lb, in, pos, int(l))
		}
		count++
		off += l
		n -= l
		pos += int(l)
	}
	return count
}

type piece struct {
	lb           uint32
	in, pos, len int
}

func splitPieces(off, n uint64) []piece {
	var ps []piece
	pieces(off, n, func(lb uint32, in, pos, l int) { ps = append(ps, piece{lb, in, pos, l}) })
	return ps
}

// ReadAt reads len(dst) bytes at off into dst.
func (h *Vol) ReadAt(dst []byte, off uint64, done func(error)) {
	if err := h.check(off, uint64(len(dst)), false); err != nil {
		done(err)
		return
	}
	h.s.stats.reads.Add(1)
	ps := splitPieces(off, uint64(len(dst)))
	if len(ps) == 1 {
		p := ps[0]
		h.readBlock(p.lb, dst[p.pos:p.pos+p.len], p.in, done)
		return
	}
	// Whole blocks that sit next to each other on disk are read with one
	// I/O (sequential writes allocate runs of blocks), each still checked
	// against its own map entry.
	type run struct{ first, n int } // pieces ps[first:first+n]
	var runs []run
	s := h.s
	ep := s.readEnter()
	entries := make([]uint64, len(ps))
	for i, p := range ps {
		entries[i] = h.v.t.lookup(p.lb)
		if i > 0 && p.len == blockSize && entries[i] != 0 {
			r := &runs[len(runs)-1]
			prev := ps[r.first+r.n-1]
			if r.n < maxRunBlocks && prev.len == blockSize && entries[i-1] != 0 && entryBlock(entries[i]) == entryBlock(entries[i-1])+1 {
				r.n++
				continue
			}
		}
		runs = append(runs, run{i, 1})
	}
	all(len(runs), func(i int, d func(error)) {
		r := runs[i]
		if r.n == 1 {
			p := ps[r.first]
			h.readEntry(p.lb, entries[r.first], dst[p.pos:p.pos+p.len], p.in, d)
			return
		}
		h.readRun(ps[r.first:r.first+r.n], entries[r.first:r.first+r.n], dst, d)
	}, func(err error) {
		s.readExit(ep)
		done(err)
	})
}

// maxRunBlocks bounds one coalesced read (256 KiB).
const maxRunBlocks = 64

var runPool = sync.Pool{New: func() any { b := alignedBuf(maxRunBlocks * blockSize); return &b }}

// readRun reads whole blocks that are consecutive on disk with one I/O.
// The caller holds a read epoch.
func (h *Vol) readRun(ps []piece, entries []uint64, dst []byte, done func(error)) {
	s := h.s
	bp := runPool.Get().(*[]byte)
	buf := (*bp)[:len(ps)*blockSize]
	first := entryBlock(entries[0])
	h.io.Read(s.geo.blockOffset(first), buf, func(err error) {
		defer runPool.Put(bp)
		for i, p := range ps {
			e := entries[i]
			if err == nil {
				err = h.checkBlock(p.lb, e, buf[i*blockSize:(i+1)*blockSize])
			} else if i == 0 {
				s.stats.ioerr.Add(1)
				s.log.Error("data read failed", "volume", h.v.name, "block", p.lb, "physical_block", first, "blocks", len(ps), "err", err)
				err = fmt.Errorf("volume %q blocks %d-%d (physical blocks %d-%d): %w: %w",
					h.v.name, p.lb, p.lb+uint32(len(ps))-1, first, first+uint32(len(ps))-1, storage.ErrIO, err)
			}
			if err != nil {
				done(err)
				return
			}
			copy(dst[p.pos:p.pos+p.len], buf[i*blockSize:])
		}
		done(nil)
	})
}

// checkBlock verifies a block read for map entry e of logical block lb.
func (h *Vol) checkBlock(lb uint32, e uint64, b []byte) error {
	s := h.s
	p := entryBlock(e)
	if dataCRC(p, b) == entryCRC(e) {
		return nil
	}
	s.stats.csum.Add(1)
	s.log.Error("data checksum mismatch", "volume", h.v.name, "block", lb, "physical_block", p,
		"offset", s.geo.blockOffset(p))
	return fmt.Errorf("volume %q block %d (physical block %d at offset %d): %w",
		h.v.name, lb, p, s.geo.blockOffset(p), storage.ErrChecksum)
}

// readBlock reads part of one logical block. The read epoch keeps the
// physical block from being reused until the read has finished.
func (h *Vol) readBlock(lb uint32, dst []byte, in int, done func(error)) {
	s := h.s
	ep := s.readEnter()
	h.readEntry(lb, h.v.t.lookup(lb), dst, in, func(err error) {
		s.readExit(ep)
		done(err)
	})
}

// readEntry reads part of logical block lb, mapped by e (0: unmapped). The
// caller holds a read epoch from before it looked e up.
func (h *Vol) readEntry(lb uint32, e uint64, dst []byte, in int, done func(error)) {
	s := h.s
	if e == 0 {
		clear(dst)
		done(nil)
		return
	}
	buf := getBlock()
	p := entryBlock(e)
	h.io.Read(s.geo.blockOffset(p), buf, func(err error) {
		defer putBlock(buf)
		if err != nil {
			s.stats.ioerr.Add(1)
			s.log.Error("data read failed", "volume", h.v.name, "block", lb, "physical_block", p, "err", err)
			done(fmt.Errorf("volume %q block %d (physical block %d): %w: %w", h.v.name, lb, p, storage.ErrIO, err))
			return
		}
		if err := h.checkBlock(lb, e, buf); err != nil {
			done(err)
			return
		}
		copy(dst, buf[in:])
		done(nil)
	})
}

// WriteAt writes src at off. The data is copied before WriteAt returns.
func (h *Vol) WriteAt(src []byte, off uint64, done func(error)) {
	h.write(src, off, uint64(len(src)), false, done)
}

// WriteZeroes zeroes [off, off+n): whole blocks are unmapped (reads return
// zeroes, space is freed), partial blocks are rewritten. Discard does the
// same, so a discarded sector reads as zeroes.
func (h *Vol) WriteZeroes(off, n uint64, done func(error)) {
	h.write(nil, off, n, true, done)
}

// Flush calls done once every write completed before the call is durable.
func (h *Vol) Flush(done func(error)) { h.s.flush(done) }

func (h *Vol) write(src []byte, off, n uint64, zero bool, done func(error)) {
	if err := h.check(off, n, true); err != nil {
		done(err)
		return
	}
	h.s.stats.writes.Add(1)
	ps := splitPieces(off, n)
	if !zero && len(ps) > 1 {
		h.writeRuns(src, ps, done)
		return
	}
	bufs := make([][]byte, len(ps))
	for i, p := range ps {
		if zero {
			continue
		}
		if p.len == blockSize {
			b := getBlock()
			copy(b, src[p.pos:p.pos+p.len])
			bufs[i] = b
		} else {
			bufs[i] = append([]byte(nil), src[p.pos:p.pos+p.len]...)
		}
	}
	all(len(ps), func(i int, d func(error)) {
		p := ps[i]
		data := bufs[i]
		if zero && p.len != blockSize {
			data = make([]byte, p.len)
		}
		h.writeBlock(p.lb, data, p.in, d)
	}, done)
}

// writeBlock writes one block's part. data == nil unmaps the whole block.
// Writes to one logical block run one at a time in submission order, so a
// read-modify-write never loses a concurrent write's sectors.
func (h *Vol) writeBlock(lb uint32, data []byte, in int, done func(error)) {
	st := h.v.stripeOf(lb)
	st.mu.Lock()
	if st.busy == nil {
		st.busy = map[uint32][]func(){}
	}
	run := func() { h.runWrite(lb, data, in, done) }
	if q, ok := st.busy[lb]; ok {
		st.busy[lb] = append(q, run)
		st.mu.Unlock()
		return
	}
	st.busy[lb] = nil
	st.mu.Unlock()
	run()
}

// finishLocked ends the write owning lb and returns the next one to run.
func (st *stripe) finishLocked(lb uint32) func() {
	q := st.busy[lb]
	if len(q) == 0 {
		delete(st.busy, lb)
		return nil
	}
	st.busy[lb] = q[1:]
	return q[0]
}

func (h *Vol) complete(st *stripe, lb uint32, err error, done func(error)) {
	st.mu.Lock()
	next := st.finishLocked(lb)
	st.mu.Unlock()
	done(err)
	if next != nil {
		next()
	}
}

func (h *Vol) runWrite(lb uint32, data []byte, in int, done func(error)) {
	s := h.s
	st := h.v.stripeOf(lb)
	if data == nil {
		st.mu.Lock()
		var err error
		logged := true
		if h.v.deleted.Load() {
			err = fmt.Errorf("volume %q was deleted: %w", h.v.name, storage.ErrIO)
		} else if h.v.t.lookup(lb) != 0 {
			if _, err = s.setEntry(h.v.t, lb, 0, &st.frees); err == nil {
				r := record{kind: recSet, vol: h.v.id, lblock: lb}
				st.recs = append(st.recs, r)
				s.pending.Add(1)
				logged = s.in.add(r)
			}
		}
		next := st.finishLocked(lb)
		st.mu.Unlock()
		s.ack(logged, err, done)
		if next != nil {
			next()
		}
		s.maybeCommit()
		return
	}
	if len(data) == blockSize {
		h.writeNew(lb, data, done)
		return
	}
	// Read-modify-write of a partial block.
	buf := getBlock()
	h.readBlock(lb, buf, 0, func(err error) {
		if err != nil {
			putBlock(buf)
			h.complete(st, lb, fmt.Errorf("read for partial write: %w", err), done)
			return
		}
		copy(buf[in:], data)
		h.writeNew(lb, buf, done)
	})
}

// writeNew writes a full block to a fresh physical block and installs it.
func (h *Vol) writeNew(lb uint32, buf []byte, done func(error)) {
	s := h.s
	st := h.v.stripeOf(lb)
	p, err := s.alloc()
	if err != nil {
		putBlock(buf)
		h.complete(st, lb, fmt.Errorf("volume %q block %d: %w: %w", h.v.name, lb, storage.ErrIO, err), done)
		return
	}
	crc := dataCRC(p, buf)
	h.io.Write(s.geo.blockOffset(p), buf, func(err error) {
		putBlock(buf)
		h.install(lb, p, crc, err, done)
	})
}

// install maps logical block lb to the freshly written physical block p
// (werr: how its write ended), ends the write owning lb and starts the next.
func (h *Vol) install(lb, p, crc uint32, werr error, done func(error)) {
	s := h.s
	st := h.v.stripeOf(lb)
	if werr != nil {
		s.stats.ioerr.Add(1)
		s.release([]uint32{p})
		h.complete(st, lb, fmt.Errorf("volume %q block %d: write physical block %d: %w: %w", h.v.name, lb, p, storage.ErrIO, werr), done)
		return
	}
	st.mu.Lock()
	var err error
	logged := true
	if h.v.deleted.Load() {
		err = fmt.Errorf("volume %q was deleted: %w", h.v.name, storage.ErrIO)
	} else if _, err = s.setEntry(h.v.t, lb, makeEntry(p, crc), &st.frees); err == nil {
		r := record{kind: recSet, vol: h.v.id, lblock: lb, entry: makeEntry(p, crc)}
		st.recs = append(st.recs, r)
		s.pending.Add(1)
		logged = s.in.add(r)
	}
	if err != nil {
		s.release([]uint32{p})
		err = fmt.Errorf("volume %q block %d: %w: %w", h.v.name, lb, storage.ErrIO, err)
	}
	next := st.finishLocked(lb)
	st.mu.Unlock()
	s.ack(logged, err, done)
	if next != nil {
		next()
	}
	s.maybeCommit()
}

// writeRuns writes a request of several pieces. Whole blocks this request
// can own at once (no earlier write to them in flight) get fresh blocks
// that are written with one I/O per run of consecutive physical blocks;
// the rest (partial blocks, blocks busy with an earlier write) take the
// one-block path, queued behind what owns them.
func (h *Vol) writeRuns(src []byte, ps []piece, done func(error)) {
	s := h.s
	type claim struct {
		i   int    // piece
		p   uint32 // physical block
		crc uint32
	}
	var claims []claim
	var single []int
	for i, pc := range ps {
		if pc.len != blockSize {
			single = append(single, i)
			continue
		}
		st := h.v.stripeOf(pc.lb)
		st.mu.Lock()
		if _, busy := st.busy[pc.lb]; busy {
			st.mu.Unlock()
			single = append(single, i)
			continue
		}
		if st.busy == nil {
			st.busy = map[uint32][]func(){}
		}
		st.busy[pc.lb] = nil
		st.mu.Unlock()
		claims = append(claims, claim{i: i})
	}
	// Runs of claimed pieces with consecutive physical blocks, written
	// from one buffer each.
	type run struct{ first, n int } // claims[first:first+n]
	var runs []run
	var failed []int // claims whose block could not be allocated
	var allocErr error
	kept := claims[:0]
	for _, c := range claims {
		p, err := s.alloc()
		if err != nil {
			failed, allocErr = append(failed, c.i), err
			continue
		}
		c.p = p
		kept = append(kept, c)
		if len(runs) > 0 {
			r := &runs[len(runs)-1]
			last := kept[r.first+r.n-1]
			if r.n < maxRunBlocks && p == last.p+1 && ps[c.i].lb == ps[last.i].lb+1 {
				r.n++
				continue
			}
		}
		runs = append(runs, run{len(kept) - 1, 1})
	}
	claims = kept
	all(len(runs)+len(failed)+len(single), func(k int, d func(error)) {
		switch {
		case k < len(runs):
			r := runs[k]
			cs := claims[r.first : r.first+r.n]
			bp := runPool.Get().(*[]byte)
			buf := (*bp)[:r.n*blockSize]
			for j := range cs {
				pc := ps[cs[j].i]
				b := buf[j*blockSize : (j+1)*blockSize]
				copy(b, src[pc.pos:pc.pos+blockSize])
				cs[j].crc = dataCRC(cs[j].p, b)
			}
			h.io.Write(s.geo.blockOffset(cs[0].p), buf, func(err error) {
				runPool.Put(bp)
				all(len(cs), func(j int, dj func(error)) {
					h.install(ps[cs[j].i].lb, cs[j].p, cs[j].crc, err, dj)
				}, d)
			})
		case k < len(runs)+len(failed):
			lb := ps[failed[k-len(runs)]].lb
			h.complete(h.v.stripeOf(lb), lb, fmt.Errorf("volume %q block %d: %w: %w", h.v.name, lb, storage.ErrIO, allocErr), d)
		default:
			pc := ps[single[k-len(runs)-len(failed)]]
			var data []byte
			if pc.len == blockSize {
				data = getBlock()
				copy(data, src[pc.pos:pc.pos+pc.len])
			} else {
				data = append([]byte(nil), src[pc.pos:pc.pos+pc.len]...)
			}
			h.writeBlock(pc.lb, data, pc.in, d)
		}
	}, done)
}

// ack completes a write whose map change is applied in memory. One the
// intent log could not take (region full) is acknowledged only when a
// commit has made it durable, so no acknowledged write can vanish with the
// process.
func (s *Store) ack(logged bool, err error, done func(error)) {
	if logged || err != nil {
		done(err)
		return
	}
	s.c.mu.Lock()
	s.c.waiters = append(s.c.waiters, done)
	s.c.mu.Unlock()
	s.kick()
}

func (s *Store) maybeCommit() {
	if s.pending.Load() >= int64(s.opts.CommitRecords) {
		s.kick()
	}
}
