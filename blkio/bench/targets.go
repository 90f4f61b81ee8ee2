package bench

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/blkio/frontend"
	"github.com/virtblk/virtblk/storage"
)

// VhostUser is a Target that drives a vhost-user-blk back-end through the
// Go front-end.
type VhostUser struct {
	dev    *frontend.Device
	queues []Queue
}

// DialVhostUser connects to socket and starts queues queues of depth slots
// with maxIO-byte buffers.
func DialVhostUser(ctx context.Context, socket string, queues, depth, maxIO int) (*VhostUser, error) {
	dev, err := frontend.Dial(ctx, socket, frontend.Options{Queues: queues, QueueDepth: depth, MaxIO: maxIO})
	if err != nil {
		return nil, err
	}
	t := &VhostUser{dev: dev}
	for _, q := range dev.Queues() {
		t.queues = append(t.queues, &vuQueue{q: q, comps: make([]frontend.Completion, q.Depth())})
	}
	return t, nil
}

func (t *VhostUser) Size() uint64        { return t.dev.Info().Capacity }
func (t *VhostUser) Queues() []Queue     { return t.queues }
func (t *VhostUser) Abort()              { t.dev.Abort() }
func (t *VhostUser) Info() frontend.Info { return t.dev.Info() }
func (t *VhostUser) Close() error        { return t.dev.Close() }

type vuQueue struct {
	q     *frontend.Queue
	comps []frontend.Completion
}

func (q *vuQueue) Depth() int             { return q.q.Depth() }
func (q *vuQueue) Buffer(slot int) []byte { return q.q.Buffer(slot) }
func (q *vuQueue) Commit() error          { return q.q.Kick() }

func (q *vuQueue) Submit(slot int, op Op, off uint64, n int) error {
	switch op {
	case OpRead:
		return q.q.Submit(slot, frontend.TypeIn, off/frontend.SectorSize, n)
	case OpWrite:
		return q.q.Submit(slot, frontend.TypeOut, off/frontend.SectorSize, n)
	case OpFlush:
		return q.q.Submit(slot, frontend.TypeFlush, 0, 0)
	}
	return fmt.Errorf("vhost-user target: unsupported op %v", op)
}

func (q *vuQueue) Reap(out []Done, min int) (int, error) {
	c := q.comps
	if len(out) < len(c) {
		c = c[:len(out)]
	}
	n, err := q.q.Reap(c, min)
	for i, x := range c[:n] {
		out[i] = Done{Slot: x.Slot}
		if x.Status != frontend.StatusOK {
			out[i].Err = fmt.Errorf("virtio-blk status %d", x.Status)
		}
	}
	return n, err
}

// Volume is a Target that drives a storage.Volume directly: with the raw
// io_uring volume it is the ceiling that no device in between can beat.
// Buffers come from an anonymous mmap, never the Go heap, because the
// kernel reads and writes them asynchronously.
type Volume struct {
	vol    storage.Volume
	queues []Queue
	qs     []*volQueue
}

// NewVolume opens queues queues of depth slots with maxIO-byte buffers.
func NewVolume(vol storage.Volume, queues, depth, maxIO int) (*Volume, error) {
	t := &Volume{vol: vol}
	maxIO = (maxIO + 4095) &^ 4095
	for i := 0; i < queues; i++ {
		sq, err := vol.OpenQueue(depth)
		if err != nil {
			t.Close()
			return nil, fmt.Errorf("open volume queue %d: %w", i, err)
		}
		mem, err := unix.Mmap(-1, 0, depth*maxIO, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
		if err != nil {
			sq.Close()
			t.Close()
			return nil, fmt.Errorf("mmap buffers for volume queue %d: %w", i, err)
		}
		q := &volQueue{q: sq, mem: mem, maxIO: maxIO, depth: depth, comps: make([]storage.Completion, depth), bufs: make([][1][]byte, depth)}
		t.qs = append(t.qs, q)
		t.queues = append(t.queues, q)
	}
	return t, nil
}

func (t *Volume) Size() uint64    { return t.vol.Size() }
func (t *Volume) Queues() []Queue { return t.queues }

// Abort is a no-op: a volume queue's Reap cannot wait on a peer that died,
// only on the kernel, which always completes.
func (t *Volume) Abort() {}

// Close closes the queues (not the volume) and frees the buffers.
func (t *Volume) Close() error {
	var first error
	for _, q := range t.qs {
		if err := q.q.Close(); err != nil && first == nil {
			first = err
		}
		unix.Munmap(q.mem)
	}
	t.qs, t.queues = nil, nil
	return first
}

type volQueue struct {
	q       storage.Queue
	mem     []byte
	maxIO   int
	depth   int
	pending []storage.Request
	comps   []storage.Completion
	bufs    [][1][]byte
}

func (q *volQueue) Depth() int { return q.depth }
func (q *volQueue) Buffer(slot int) []byte {
	return q.mem[slot*q.maxIO : (slot+1)*q.maxIO : (slot+1)*q.maxIO]
}

func (q *volQueue) Submit(slot int, op Op, off uint64, n int) error {
	r := storage.Request{Offset: off, Tag: uint64(slot)}
	switch op {
	case OpRead, OpWrite:
		r.Op = storage.OpRead
		if op == OpWrite {
			r.Op = storage.OpWrite
		}
		q.bufs[slot][0] = q.Buffer(slot)[:n]
		r.Bufs = q.bufs[slot][:]
	case OpFlush:
		r.Op = storage.OpFlush
	default:
		return fmt.Errorf("volume target: unsupported op %v", op)
	}
	q.pending = append(q.pending, r)
	return nil
}

func (q *volQueue) Commit() error {
	if len(q.pending) == 0 {
		return nil
	}
	err := q.q.Submit(q.pending)
	q.pending = q.pending[:0]
	return err
}

func (q *volQueue) Reap(out []Done, min int) (int, error) {
	c := q.comps
	if len(out) < len(c) {
		c = c[:len(out)]
	}
	n, err := q.q.Reap(c, min)
	for i, x := range c[:n] {
		out[i] = Done{Slot: int(x.Tag), Err: x.Err}
	}
	return n, err
}
