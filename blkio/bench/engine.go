// Package bench owns the block I/O load generator behind `virtblk bench`:
// job definitions (queues, depth, block size, access pattern, read/write/
// flush mix, duration or op count, region), the per-queue issue/reap loop,
// latency histograms, back-end CPU accounting and the report. What it drives
// is a Target: the Go vhost-user-blk front-end (any back-end) or a
// storage.Volume directly (the io_uring ceiling with no device between).
package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Op is what one request does.
type Op uint8

const (
	OpRead Op = iota + 1
	OpWrite
	OpFlush
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpFlush:
		return "flush"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Target is something block I/O can be driven against, with its queues
// already opened for the job's depth and block size.
type Target interface {
	// Size is the addressable size in bytes.
	Size() uint64
	// Queues are the opened queues; the engine drives each from one goroutine.
	Queues() []Queue
	// Abort makes blocked Reap calls return; safe from any goroutine.
	Abort()
}

// Queue is one independent submission queue with Depth request slots, each
// with a buffer of at least the job's block size.
type Queue interface {
	Depth() int
	Buffer(slot int) []byte
	// Submit queues a request; it may not reach the device before Commit.
	Submit(slot int, op Op, offset uint64, length int) error
	Commit() error
	// Reap blocks until at least min requests have finished.
	Reap(out []Done, min int) (int, error)
}

// Done is one finished request.
type Done struct {
	Slot int
	Err  error
}

// Pattern is the access pattern of a job.
type Pattern string

const (
	RandRead   Pattern = "randread"
	RandWrite  Pattern = "randwrite"
	SeqRead    Pattern = "read"
	SeqWrite   Pattern = "write"
	WriteFlush Pattern = "writeflush" // random writes, each followed by a flush on completion
	Mix        Pattern = "mix"        // random reads and writes, ReadPercent reads
)

// Patterns lists the valid patterns.
var Patterns = []Pattern{RandRead, RandWrite, SeqRead, SeqWrite, WriteFlush, Mix}

// Job describes one benchmark run.
type Job struct {
	Pattern     Pattern       `json:"rw"`
	BlockSize   int           `json:"bs"`
	QueueDepth  int           `json:"qd"`
	ReadPercent int           `json:"rwmixread,omitempty"` // Mix only
	Runtime     time.Duration `json:"runtime_ns,omitempty"`
	Ops         uint64        `json:"ops,omitempty"` // total I/Os over all queues; 0 = run for Runtime
	Offset      uint64        `json:"offset,omitempty"`
	Size        uint64        `json:"size,omitempty"` // region length; 0 = to the end of the target
	Seed        uint64        `json:"seed,omitempty"`
}

// Validate checks j against a target of size bytes and fills defaults.
func (j *Job) Validate(size uint64) error {
	ok := false
	for _, p := range Patterns {
		ok = ok || p == j.Pattern
	}
	if !ok {
		names := make([]string, len(Patterns))
		for i, p := range Patterns {
			names[i] = string(p)
		}
		return fmt.Errorf("unknown pattern %q: want one of %s", j.Pattern, strings.Join(names, ", "))
	}
	if j.BlockSize < 512 || j.BlockSize%512 != 0 {
		return fmt.Errorf("block size %d is not a positive multiple of 512", j.BlockSize)
	}
	if j.QueueDepth < 1 {
		return fmt.Errorf("queue depth %d must be at least 1", j.QueueDepth)
	}
	if j.Pattern == Mix {
		if j.ReadPercent < 0 || j.ReadPercent > 100 {
			return fmt.Errorf("read percentage %d out of range 0..100", j.ReadPercent)
		}
	} else {
		j.ReadPercent = 0
	}
	if j.Runtime <= 0 && j.Ops == 0 {
		return errors.New("job needs a runtime or an op count")
	}
	if j.Offset%512 != 0 || j.Size%512 != 0 {
		return fmt.Errorf("region offset %d and size %d must be multiples of 512", j.Offset, j.Size)
	}
	if j.Offset >= size {
		return fmt.Errorf("region offset %d is beyond the target's %d bytes", j.Offset, size)
	}
	if j.Size == 0 || j.Offset+j.Size > size {
		j.Size = size - j.Offset
	}
	if j.Size < uint64(j.BlockSize) {
		return fmt.Errorf("region of %d bytes is smaller than the block size %d", j.Size, j.BlockSize)
	}
	return nil
}

// generator picks the next op and offset for one queue. It is pure (no I/O,
// no clock) so the op mix and offsets can be tested directly.
type generator struct {
	pattern Pattern
	bs      uint64
	readPct int
	rng     *rand.Rand
	base    uint64 // region start
	blocks  uint64 // region length in blocks
	seqBase uint64 // this queue's share for sequential patterns, in blocks
	seqLen  uint64
	seqNext uint64
}

func newGenerator(j Job, queue, queues int) *generator {
	g := &generator{
		pattern: j.Pattern, bs: uint64(j.BlockSize), readPct: j.ReadPercent,
		rng:    rand.New(rand.NewPCG(j.Seed, uint64(queue)+1)),
		base:   j.Offset,
		blocks: j.Size / uint64(j.BlockSize),
	}
	// Sequential streams get disjoint slices of the region, one per queue,
	// so queues do not read the same blocks at once.
	g.seqLen = g.blocks / uint64(queues)
	if g.seqLen == 0 {
		g.seqLen = g.blocks
	} else {
		g.seqBase = uint64(queue) * g.seqLen
	}
	return g
}

func (g *generator) next() (Op, uint64) {
	switch g.pattern {
	case SeqRead, SeqWrite:
		blk := g.seqBase + g.seqNext
		g.seqNext++
		if g.seqNext == g.seqLen {
			g.seqNext = 0
		}
		op := OpRead
		if g.pattern == SeqWrite {
			op = OpWrite
		}
		return op, g.base + blk*g.bs
	}
	off := g.base + g.rng.Uint64N(g.blocks)*g.bs
	switch g.pattern {
	case RandRead:
		return OpRead, off
	case Mix:
		if g.rng.IntN(100) < g.readPct {
			return OpRead, off
		}
	}
	return OpWrite, off
}

// queueStats are one queue's counters; merged after the run.
type queueStats struct {
	hist    Histogram
	ios     uint64
	bytes   uint64
	reads   uint64
	writes  uint64
	flushes uint64
	errs    uint64
	first   error
}

// slot states
const (
	slotIdle = iota
	slotIO
	slotFlush // the write is done, its flush is in flight
)

// Clock returns monotonic nanoseconds; tests may substitute their own.
type Clock func() int64

func monotonic() Clock {
	start := time.Now()
	return func() int64 { return int64(time.Since(start)) }
}

// Run drives j against t until the runtime elapses or the op count is
// reached, then waits for every in-flight request. cpu, if not nil, is
// sampled before and after to charge CPU time to the back-end.
func Run(ctx context.Context, t Target, j Job, cpu CPUSampler) (*Result, error) {
	if err := j.Validate(t.Size()); err != nil {
		return nil, err
	}
	qs := t.Queues()
	if len(qs) == 0 {
		return nil, errors.New("target has no queues")
	}
	for i, q := range qs {
		if q.Depth() < j.QueueDepth {
			return nil, fmt.Errorf("queue %d has %d slots, job needs %d", i, q.Depth(), j.QueueDepth)
		}
		if len(q.Buffer(0)) < j.BlockSize {
			return nil, fmt.Errorf("queue %d buffers hold %d bytes, block size is %d", i, len(q.Buffer(0)), j.BlockSize)
		}
	}
	// Incompressible, non-zero data for writes.
	fill := rand.New(rand.NewPCG(j.Seed, 0xfeed))
	for _, q := range qs {
		for s := 0; s < j.QueueDepth; s++ {
			b := q.Buffer(s)[:j.BlockSize]
			for i := 0; i+8 <= len(b); i += 8 {
				v := fill.Uint64() | 1
				for k := 0; k < 8; k++ {
					b[i+k] = byte(v >> (8 * k))
				}
			}
		}
	}
	var stop atomic.Bool
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A wedged target must not hang the run: if the caller gives up, or the
	// drain after the deadline takes far longer than the run itself, abort.
	watchdogDone := make(chan struct{})
	go func() {
		defer close(watchdogDone)
		var grace <-chan time.Time
		if j.Runtime > 0 {
			tm := time.NewTimer(j.Runtime + 30*time.Second)
			defer tm.Stop()
			grace = tm.C
		}
		select {
		case <-runCtx.Done():
			if ctx.Err() != nil {
				stop.Store(true)
				t.Abort()
			}
		case <-grace:
			stop.Store(true)
			t.Abort()
		}
	}()

	stats := make([]queueStats, len(qs))
	var before, after CPUSample
	if cpu != nil {
		var err error
		if before, err = cpu.Sample(); err != nil {
			return nil, err
		}
	}
	clock := monotonic()
	start := clock()
	var wg sync.WaitGroup
	for i, q := range qs {
		limit := uint64(0)
		if j.Ops > 0 {
			limit = j.Ops / uint64(len(qs))
			if uint64(i) < j.Ops%uint64(len(qs)) {
				limit++
			}
			if limit == 0 {
				continue
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			runQueue(q, newGenerator(j, i, len(qs)), j, limit, start, clock, &stop, &stats[i])
		}()
	}
	wg.Wait()
	elapsed := clock() - start
	if cpu != nil {
		var err error
		if after, err = cpu.Sample(); err != nil {
			return nil, err
		}
	}
	cancel()
	<-watchdogDone
	res := summarize(j, stats, time.Duration(elapsed))
	if cpu != nil {
		res.addCPU(before, after)
	}
	if ctx.Err() != nil {
		return res, fmt.Errorf("benchmark interrupted: %w", ctx.Err())
	}
	for _, s := range stats {
		if s.first != nil {
			return res, fmt.Errorf("%d of %d I/Os failed; first: %w", res.Errors, res.IOs+res.Errors, s.first)
		}
	}
	return res, nil
}

// runQueue keeps QueueDepth requests in flight on q until the deadline or
// limit, then drains. Latency is measured per I/O from submission to the
// completion batch it is reaped in; for WriteFlush an I/O is the write and
// its flush together (the time until the write is durable).
func runQueue(q Queue, g *generator, j Job, limit uint64, start int64, clock Clock, stop *atomic.Bool, st *queueStats) {
	depth := j.QueueDepth
	state := make([]uint8, depth)
	began := make([]int64, depth)
	ops := make([]Op, depth)
	done := make([]Done, depth)
	deadline := int64(-1)
	if j.Runtime > 0 {
		deadline = start + int64(j.Runtime)
	}
	issued := uint64(0)
	inflight := 0
	stopping := false
	fail := func(err error) {
		st.errs++
		if st.first == nil {
			st.first = err
		}
	}
	issue := func(slot int, now int64) {
		op, off := g.next()
		if err := q.Submit(slot, op, off, j.BlockSize); err != nil {
			fail(err)
			stopping = true
			return
		}
		ops[slot] = op
		state[slot] = slotIO
		began[slot] = now
		issued++
		inflight++
	}
	now := clock()
	for s := 0; s < depth && (limit == 0 || issued < limit); s++ {
		issue(s, now)
	}
	if err := q.Commit(); err != nil {
		fail(err)
		return
	}
	for inflight > 0 {
		n, err := q.Reap(done, 1)
		now = clock()
		if !stopping && (stop.Load() || (deadline >= 0 && now >= deadline)) {
			stopping = true
		}
		for _, d := range done[:n] {
			s := d.Slot
			inflight--
			if d.Err != nil {
				fail(fmt.Errorf("%v at slot %d: %w", ops[s], s, d.Err))
				state[s] = slotIdle
				stopping = true
				continue
			}
			if state[s] == slotIO && ops[s] == OpWrite && j.Pattern == WriteFlush {
				if err := q.Submit(s, OpFlush, 0, 0); err != nil {
					fail(err)
					stopping = true
					continue
				}
				state[s] = slotFlush
				inflight++
				continue
			}
			st.hist.Record(uint64(now - began[s]))
			st.ios++
			st.bytes += uint64(j.BlockSize)
			switch ops[s] {
			case OpRead:
				st.reads++
			case OpWrite:
				st.writes++
			}
			if state[s] == slotFlush {
				st.flushes++
			}
			state[s] = slotIdle
			if !stopping && (limit == 0 || issued < limit) {
				issue(s, now)
			}
		}
		if err != nil {
			fail(err)
			return
		}
		if err := q.Commit(); err != nil {
			fail(err)
			return
		}
	}
}
