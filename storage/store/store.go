package store

import (
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/cpu"
)

// Disk is the storage under a store: byte offsets and lengths are multiples
// of 512 and buffers stay untouched until done runs. done may run on any
// goroutine (real disk) or inside Pump (simulated disk). A completed Write is
// durable only after a later Flush completes.
type Disk interface {
	Size() uint64
	Read(off uint64, buf []byte, done func(error))
	Write(off uint64, buf []byte, done func(error))
	Flush(done func(error))
}

// Options configure Open and Format.
type Options struct {
	Logger *slog.Logger
	// Pump, when set, completes pending disk operations from the calling
	// goroutine (the simulated disk's Step); it reports false when nothing is
	// pending. Blocking helpers call it instead of waiting on a channel, so
	// the whole store can run in one goroutine.
	Pump func() bool
	// CommitRecords starts a commit when this many records are queued
	// (default 4096), bounding how much an unflushed workload can lose.
	CommitRecords int
	// Intent, when set, makes every acknowledged write survive a crash of
	// this process (not of the machine) before it is flushed; see
	// intent.go. Open replays what a crashed predecessor logged there.
	Intent *IntentLog
}

const numStripes = 64

type stripe struct {
	mu    sync.Mutex
	recs  []record
	frees blockSink
	// busy orders writes to one logical block: the first in flight owns it,
	// later ones wait here and run when it completes.
	busy map[uint32][]func()
	_    cpu.CacheLinePad
}

type volume struct {
	id       uint32
	name     string
	readOnly bool   // snapshots
	src      uint32 // snapshot: source volume id; clone: snapshot id
	size     atomic.Uint64
	t        *tree
	deleted  atomic.Bool
	queues   atomic.Int32
	stripes  [numStripes]stripe
}

func (v *volume) stripeOf(lblock uint32) *stripe {
	return &v.stripes[leafIndex(lblock)%numStripes]
}

func (v *volume) lockAll() {
	for i := range v.stripes {
		v.stripes[i].mu.Lock()
	}
}

func (v *volume) unlockAll() {
	for i := range v.stripes {
		v.stripes[i].mu.Unlock()
	}
}

// volTable is immutable; admin operations publish a new one so queues look
// volumes up without locks.
type volTable struct {
	byID   map[uint32]*volume
	byName map[string]*volume
	nextID uint32
}

func (vt *volTable) clone() *volTable {
	n := &volTable{byID: make(map[uint32]*volume, len(vt.byID)+1), byName: make(map[string]*volume, len(vt.byName)+1), nextID: vt.nextID}
	for k, v := range vt.byID {
		n.byID[k] = v
	}
	for k, v := range vt.byName {
		n.byName[k] = v
	}
	return n
}

// Stats are counters since Open.
type Stats struct {
	Reads, Writes, Flushes   uint64
	ChecksumErrors, IOErrors uint64
	Commits, Checkpoints     uint64
	JournalSeq               uint64
	DataBlocks, UsedBlocks   uint64
	Leaves                   int64
}

// FreeBytes is the space left for new data blocks.
func (st Stats) FreeBytes() uint64 { return (st.DataBlocks - st.UsedBlocks) * blockSize }

type paddedCounter struct {
	n atomic.Int64
	_ cpu.CacheLinePad
}

// Store is an open store.
type Store struct {
	disk Disk
	opts Options
	log  *slog.Logger
	geo  Geometry
	uuid [16]byte

	vols atomic.Pointer[volTable]

	refs      refcounts
	free      []atomic.Uint64 // bit set = in use (mapped, pending free or being written)
	freeCur   atomic.Uint64
	freeCount atomic.Int64
	leafCount atomic.Int64
	leafRefs  atomic.Int64

	// Read epochs: a block freed by a commit is reused only after every read
	// that started before the free became visible has finished.
	epoch   atomic.Uint64
	readers [2]paddedCounter
	limbo   struct {
		sync.Mutex
		a, b   []uint32
		bEpoch uint64
	}

	admin struct {
		sync.Mutex
		recs  []record
		frees blockSink
	}
	pending atomic.Int64 // records queued in stripes (approximate)

	c committer

	// in is the intent log (see intent.go); in.mem is nil without one.
	in intentLog

	stats struct {
		reads, writes, flushes, csum, ioerr, commits, ckpts atomic.Uint64
	}
	closed atomic.Bool
	failed atomic.Pointer[error]

	notesMu sync.Mutex
	notes   []string

	tickStop, tickDone chan struct{}
}

func (s *Store) table() *volTable { return s.vols.Load() }

// Geometry returns the store's layout.
func (s *Store) Geometry() Geometry { return s.geo }

// Stats returns counters.
func (s *Store) Stats() Stats {
	return Stats{
		Reads: s.stats.reads.Load(), Writes: s.stats.writes.Load(), Flushes: s.stats.flushes.Load(),
		ChecksumErrors: s.stats.csum.Load(), IOErrors: s.stats.ioerr.Load(),
		Commits: s.stats.commits.Load(), Checkpoints: s.stats.ckpts.Load(),
		JournalSeq: s.c.durableSeq.Load(),
		DataBlocks: uint64(s.geo.DataBlocks - 1), UsedBlocks: uint64(int64(s.geo.DataBlocks-1) - s.freeCount.Load()),
		Leaves: s.leafCount.Load(),
	}
}

func newStore(d Disk, o Options, geo Geometry) *Store {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.CommitRecords <= 0 {
		o.CommitRecords = 4096
	}
	s := &Store{disk: d, opts: o, log: o.Logger.With("component", "store"), geo: geo}
	s.refs.n = make([]atomic.Uint32, geo.DataBlocks)
	s.free = make([]atomic.Uint64, (uint64(geo.DataBlocks)+63)/64)
	s.vols.Store(&volTable{byID: map[uint32]*volume{}, byName: map[string]*volume{}, nextID: 1})
	return s
}

// initFree derives the free bitmap from the reference counts (after
// recovery): a block is free if no leaf references it.
func (s *Store) initFree() {
	var used int64
	for i := range s.free {
		s.free[i].Store(0)
	}
	for p := range s.geo.DataBlocks {
		if p == 0 || s.refs.n[p].Load() != 0 || p >= s.geo.DataBlocks {
			s.free[p/64].Or(1 << (p % 64))
			if p != 0 {
				used++
			}
		}
	}
	// Bits beyond the last block are permanently in use.
	for p := uint64(s.geo.DataBlocks); p < uint64(len(s.free))*64; p++ {
		s.free[p/64].Or(1 << (p % 64))
	}
	s.freeCount.Store(int64(s.geo.DataBlocks-1) - used)
}

// alloc takes a free data block. Lock-free: a CAS on one bitmap word.
func (s *Store) alloc() (uint32, error) {
	n := uint64(len(s.free))
	start := s.freeCur.Load() % n
	for i := range n {
		w := (start + i) % n
		for {
			v := s.free[w].Load()
			if v == ^uint64(0) {
				break
			}
			b := uint64(bits.TrailingZeros64(^v))
			if s.free[w].CompareAndSwap(v, v|1<<b) {
				s.freeCur.Store(w)
				s.freeCount.Add(-1)
				return uint32(w*64 + b), nil
			}
		}
	}
	return 0, ErrNoSpace
}

// release returns blocks to the allocator.
func (s *Store) release(ps []uint32) {
	for _, p := range ps {
		if s.refs.n[p].Load() != 0 {
			panic(fmt.Sprintf("store: releasing block %d with %d references", p, s.refs.n[p].Load()))
		}
		s.free[p/64].And(^(uint64(1) << (p % 64)))
	}
	s.freeCount.Add(int64(len(ps)))
}

// readEnter registers a reader in the current epoch and returns it.
func (s *Store) readEnter() uint64 {
	for {
		e := s.epoch.Load()
		s.readers[e&1].n.Add(1)
		if s.epoch.Load() == e {
			return e
		}
		s.readers[e&1].n.Add(-1)
	}
}

func (s *Store) readExit(e uint64) { s.readers[e&1].n.Add(-1) }

// retire parks blocks freed by a durable commit until no reader can still
// use them.
func (s *Store) retire(ps []uint32) {
	s.limbo.Lock()
	s.limbo.a = append(s.limbo.a, ps...)
	s.limbo.Unlock()
	s.reclaim()
}

// reclaim moves parked blocks through the two read epochs.
func (s *Store) reclaim() {
	s.limbo.Lock()
	defer s.limbo.Unlock()
	for range 2 {
		if len(s.limbo.b) > 0 {
			if s.readers[s.limbo.bEpoch&1].n.Load() != 0 {
				return
			}
			s.release(s.limbo.b)
			s.limbo.b = nil
		}
		if len(s.limbo.a) == 0 {
			return
		}
		e := s.epoch.Load()
		if s.readers[(e+1)&1].n.Load() != 0 {
			return
		}
		s.epoch.Store(e + 1)
		s.limbo.b, s.limbo.a, s.limbo.bEpoch = s.limbo.a, nil, e
	}
}

// wait runs op and blocks until its callback, pumping the simulated disk
// when one is configured.
func (s *Store) wait(op func(done func(error))) error {
	return waitIO(s.opts.Pump, op)
}

func waitIO(pump func() bool, op func(done func(error))) error {
	if pump == nil {
		ch := make(chan error, 1)
		op(func(err error) { ch <- err })
		return <-ch
	}
	var fin bool
	var res error
	op(func(err error) { fin, res = true, err })
	for !fin {
		if !pump() {
			return errors.New("store: simulated disk stalled with an operation outstanding")
		}
	}
	return res
}

func (s *Store) readSync(off uint64, buf []byte) error {
	return s.wait(func(done func(error)) { s.disk.Read(off, buf, done) })
}

func (s *Store) writeSync(off uint64, buf []byte) error {
	return s.wait(func(done func(error)) { s.disk.Write(off, buf, done) })
}

func (s *Store) flushSync() error {
	return s.wait(func(done func(error)) { s.disk.Flush(done) })
}

// fail puts the store into a failed state after an error that leaves the
// in-memory state ahead of what can be made durable; every later operation
// returns it. Reopening recovers.
func (s *Store) fail(err error) {
	err = fmt.Errorf("store failed, reopen to recover: %w", err)
	if s.failed.CompareAndSwap(nil, &err) {
		s.log.Error("store failed", "err", err)
	}
}

func (s *Store) failure() error {
	if p := s.failed.Load(); p != nil {
		return *p
	}
	if s.closed.Load() {
		return errors.New("store is closed")
	}
	return nil
}

// alignedBuf returns a zeroed buffer aligned to 4096 bytes, as O_DIRECT
// needs.
func alignedBuf(n int) []byte {
	b := make([]byte, n+blockSize)
	off := 0
	if r := int(uintptrOf(b) % blockSize); r != 0 {
		off = blockSize - r
	}
	return b[off : off+n : off+n]
}

var blockPool = sync.Pool{New: func() any { b := alignedBuf(blockSize); return &b }}

func getBlock() []byte  { return *(blockPool.Get().(*[]byte)) }
func putBlock(b []byte) { blockPool.Put(&b) }

// note records a repair or finding made while opening, for fsck.
func (s *Store) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	s.log.Warn(msg)
	s.notesMu.Lock()
	s.notes = append(s.notes, msg)
	s.notesMu.Unlock()
}

// Repairs lists what Open found damaged and repaired from redundancy.
func (s *Store) Repairs() []string {
	s.notesMu.Lock()
	defer s.notesMu.Unlock()
	return append([]string(nil), s.notes...)
}
