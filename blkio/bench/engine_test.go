package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"testing"
	"time"
)

// fakeTarget is an in-memory Target: requests complete at the next Reap,
// in submission order, and every request is logged for inspection.
type fakeTarget struct {
	size   uint64
	queues []Queue
	fqs    []*fakeQueue
}

type fakeReq struct {
	slot int
	op   Op
	off  uint64
	n    int
}

type fakeQueue struct {
	depth    int
	bufs     [][]byte
	pending  []fakeReq
	ready    []fakeReq
	log      []fakeReq
	busy     []bool
	inflight int
	maxIn    int
	failAt   int // fail the n-th request (1-based); 0 = never
	err      error
}

func newFakeTarget(size uint64, queues, depth, bs int) *fakeTarget {
	t := &fakeTarget{size: size}
	for i := 0; i < queues; i++ {
		q := &fakeQueue{depth: depth, busy: make([]bool, depth)}
		for s := 0; s < depth; s++ {
			q.bufs = append(q.bufs, make([]byte, bs))
		}
		t.fqs = append(t.fqs, q)
		t.queues = append(t.queues, q)
	}
	return t
}

func (t *fakeTarget) Size() uint64    { return t.size }
func (t *fakeTarget) Queues() []Queue { return t.queues }
func (t *fakeTarget) Abort()          {}

func (q *fakeQueue) Depth() int             { return q.depth }
func (q *fakeQueue) Buffer(slot int) []byte { return q.bufs[slot] }
func (q *fakeQueue) Submit(slot int, op Op, off uint64, n int) error {
	if q.busy[slot] {
		q.err = fmt.Errorf("slot %d submitted while busy", slot)
		return q.err
	}
	q.busy[slot] = true
	r := fakeReq{slot, op, off, n}
	q.pending = append(q.pending, r)
	q.log = append(q.log, r)
	q.inflight++
	q.maxIn = max(q.maxIn, q.inflight)
	return nil
}
func (q *fakeQueue) Commit() error {
	q.ready = append(q.ready, q.pending...)
	q.pending = q.pending[:0]
	return nil
}
func (q *fakeQueue) Reap(out []Done, min int) (int, error) {
	if len(q.ready) < min {
		return 0, errors.New("fake: Reap would block forever")
	}
	n := 0
	for n < len(out) && len(q.ready) > 0 {
		r := q.ready[0]
		q.ready = q.ready[1:]
		q.busy[r.slot] = false
		q.inflight--
		out[n] = Done{Slot: r.slot}
		if q.failAt > 0 && len(q.log) >= q.failAt {
			out[n].Err = errors.New("injected failure")
			q.failAt = 0
		}
		n++
	}
	return n, nil
}

func runFake(t *testing.T, tgt *fakeTarget, j Job) *Result {
	t.Helper()
	res, err := Run(context.Background(), tgt, j, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, q := range tgt.fqs {
		if q.err != nil {
			t.Fatalf("queue %d: %v", i, q.err)
		}
		if q.inflight != 0 {
			t.Fatalf("queue %d: %d requests left in flight", i, q.inflight)
		}
	}
	return res
}

func TestOpCountAndDepth(t *testing.T) {
	tgt := newFakeTarget(1<<30, 3, 8, 4096)
	res := runFake(t, tgt, Job{Pattern: RandRead, BlockSize: 4096, QueueDepth: 8, Ops: 1000})
	if res.IOs != 1000 || res.Reads != 1000 || res.Bytes != 1000*4096 {
		t.Fatalf("ios %d reads %d bytes %d, want 1000/1000/%d", res.IOs, res.Reads, res.Bytes, 1000*4096)
	}
	total := 0
	for i, q := range tgt.fqs {
		total += len(q.log)
		if q.maxIn > 8 {
			t.Fatalf("queue %d had %d in flight, depth 8", i, q.maxIn)
		}
		for _, r := range q.log {
			if r.off%4096 != 0 || r.off+4096 > 1<<30 || r.n != 4096 || r.op != OpRead {
				t.Fatalf("bad request %+v", r)
			}
		}
	}
	if total != 1000 {
		t.Fatalf("%d requests issued, want 1000", total)
	}
	if res.Histogram().Count() != 1000 {
		t.Fatalf("histogram has %d values", res.Histogram().Count())
	}
}

func TestMixRatio(t *testing.T) {
	for _, pct := range []int{0, 30, 70, 100} {
		tgt := newFakeTarget(1<<30, 2, 4, 4096)
		res := runFake(t, tgt, Job{Pattern: Mix, ReadPercent: pct, BlockSize: 4096, QueueDepth: 4, Ops: 20000, Seed: 7})
		got := float64(res.Reads) / float64(res.IOs) * 100
		if math.Abs(got-float64(pct)) > 2 {
			t.Fatalf("rwmix %d: %.1f%% reads", pct, got)
		}
		if res.Reads+res.Writes != res.IOs {
			t.Fatalf("reads %d + writes %d != ios %d", res.Reads, res.Writes, res.IOs)
		}
	}
}

func TestWriteFlushPairs(t *testing.T) {
	tgt := newFakeTarget(1<<20, 1, 2, 4096)
	res := runFake(t, tgt, Job{Pattern: WriteFlush, BlockSize: 4096, QueueDepth: 2, Ops: 50})
	if res.IOs != 50 || res.Writes != 50 || res.Flushes != 50 {
		t.Fatalf("ios %d writes %d flushes %d, want 50 each", res.IOs, res.Writes, res.Flushes)
	}
	// Per slot the log must alternate write, flush, write, flush...
	last := map[int]Op{}
	for _, r := range tgt.fqs[0].log {
		prev, seen := last[r.slot]
		if r.op == OpFlush && (!seen || prev != OpWrite) {
			t.Fatalf("flush on slot %d not preceded by a write", r.slot)
		}
		if r.op == OpWrite && seen && prev != OpFlush {
			t.Fatalf("write on slot %d before the previous write was flushed", r.slot)
		}
		last[r.slot] = r.op
	}
}

func TestSequentialStreams(t *testing.T) {
	const bs, size = 8192, 1 << 20
	tgt := newFakeTarget(4<<20, 2, 4, bs)
	runFake(t, tgt, Job{Pattern: SeqWrite, BlockSize: bs, QueueDepth: 4, Ops: size / bs, Offset: 1 << 20, Size: size})
	// Each queue covers its own half of the region exactly once, in order.
	for i, q := range tgt.fqs {
		base := uint64(1<<20 + i*size/2)
		if len(q.log) != size/2/bs {
			t.Fatalf("queue %d issued %d requests", i, len(q.log))
		}
		for k, r := range q.log {
			if want := base + uint64(k*bs); r.off != want || r.op != OpWrite {
				t.Fatalf("queue %d request %d: %v at %d, want write at %d", i, k, r.op, r.off, want)
			}
		}
	}
}

func TestFailureIsReported(t *testing.T) {
	tgt := newFakeTarget(1<<20, 1, 4, 4096)
	tgt.fqs[0].failAt = 10
	_, err := Run(context.Background(), tgt, Job{Pattern: RandWrite, BlockSize: 4096, QueueDepth: 4, Ops: 100}, nil)
	if err == nil {
		t.Fatal("injected failure not reported")
	}
	if tgt.fqs[0].inflight != 0 {
		t.Fatalf("%d requests abandoned in flight after a failure", tgt.fqs[0].inflight)
	}
}

func TestValidate(t *testing.T) {
	bad := []Job{
		{Pattern: "randrw", BlockSize: 4096, QueueDepth: 1, Ops: 1},
		{Pattern: RandRead, BlockSize: 1000, QueueDepth: 1, Ops: 1},
		{Pattern: RandRead, BlockSize: 4096, QueueDepth: 0, Ops: 1},
		{Pattern: RandRead, BlockSize: 4096, QueueDepth: 1},
		{Pattern: Mix, ReadPercent: 101, BlockSize: 4096, QueueDepth: 1, Ops: 1},
		{Pattern: RandRead, BlockSize: 4096, QueueDepth: 1, Ops: 1, Offset: 1 << 20},
		{Pattern: RandRead, BlockSize: 1 << 20, QueueDepth: 1, Ops: 1, Size: 4096},
	}
	for _, j := range bad {
		if err := j.Validate(1 << 20); err == nil {
			t.Errorf("job %+v accepted", j)
		}
	}
	j := Job{Pattern: RandRead, BlockSize: 4096, QueueDepth: 1, Runtime: time.Second, Offset: 4096}
	if err := j.Validate(1 << 20); err != nil || j.Size != 1<<20-4096 {
		t.Fatalf("valid job: %v, size %d", err, j.Size)
	}
}

// blockingQueue never completes anything until aborted, to check that a
// wedged target cannot hang Run once the caller cancels.
type blockingTarget struct {
	fakeTarget
	once  sync.Once
	abort chan struct{}
}

type blockingQueue struct {
	*fakeQueue
	abort chan struct{}
}

func (q blockingQueue) Reap(out []Done, min int) (int, error) {
	<-q.abort
	return 0, errors.New("aborted")
}

func (t *blockingTarget) Abort() { t.once.Do(func() { close(t.abort) }) }

func TestCancelUnblocksWedgedTarget(t *testing.T) {
	ft := newFakeTarget(1<<20, 2, 2, 4096)
	bt := &blockingTarget{fakeTarget: *ft, abort: make(chan struct{})}
	bt.queues = nil
	for _, q := range ft.fqs {
		bt.queues = append(bt.queues, blockingQueue{q, bt.abort})
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error)
	go func() {
		_, err := Run(ctx, bt, Job{Pattern: RandRead, BlockSize: 4096, QueueDepth: 2, Runtime: time.Hour}, nil)
		errc <- err
	}()
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("cancelled run reported success")
	}
}

func TestParseStatCPU(t *testing.T) {
	line := "4242 (qemu storage) d) S 1 4242 4242 0 -1 4194560 1000 0 0 0 123 45 0 0 20 0 3 0 100 1000 100 18446744073709551615\n"
	got, err := ParseStatCPU([]byte(line))
	if err != nil || got != 168 {
		t.Fatalf("got %d, %v; want 168", got, err)
	}
	for _, bad := range []string{"", "1 (x S 1 2", "1 (x) S 1 2 3", "1 (x) S 1 2 3 4 5 6 7 8 9 10 x 1"} {
		if _, err := ParseStatCPU([]byte(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func FuzzParseStatCPU(f *testing.F) {
	f.Add([]byte("1 (init) S 0 1 1 0 -1 4194560 1 0 0 0 5 7 0 0 20 0 1 0 1 1 1"))
	f.Add([]byte("1 ((a b)) R 0 1 1 0 -1 0 0 0 0 0 18446744073709551615 1 0"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ParseStatCPU(b)
	})
}
