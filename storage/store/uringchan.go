package store

import (
	"errors"
	"fmt"
	"sync"

	"github.com/virtblk/virtblk/storage/uring"
)

// uringChannel is one store queue's own io_uring for data blocks, so a
// guest request's reads and writes go from the queue worker's thread
// straight to the kernel and complete back on it: no hand-off to the
// shared disk goroutine and no eventfd write per operation. Metadata I/O
// (journal, checkpoints, superblocks) stays on the UringDisk.
//
// The queue's worker is the owner: it submits in batches (begin/end) and
// runs completion callbacks (poll). Other threads may still submit — a
// write completing on one queue starts the next write to the same block,
// which may belong to another queue — so the ring's submission side sits
// behind a mutex, and a submission outside the owner's batch enters the
// kernel at once. The kernel signals the queue's eventfd for every
// completion, which is what wakes the owner.
type uringChannel struct {
	mu       sync.Mutex
	r        *uring.Ring
	fd       int
	ops      map[uint64]uringOp
	next     uint64
	backlog  []taggedOp // pushed while the submission queue was full
	batching bool
	err      error
	out      []uring.CQE
	ready    []uringDone
}

type taggedOp struct {
	tag uint64
	op  uringOp
}

type uringDone struct {
	op  uringOp
	res int32
}

const channelEntries = 256

var errChannelClosed = errors.New("store queue channel is closed")

// openChannel makes a channel on d's file whose completions signal efd.
func (d *UringDisk) openChannel(efd int) (*uringChannel, error) {
	r, err := uring.New(channelEntries, uring.Options{})
	if err != nil {
		return nil, fmt.Errorf("queue io_uring: %w", err)
	}
	if err := r.RegisterEventFD(efd); err != nil {
		r.Close()
		return nil, err
	}
	return &uringChannel{r: r, fd: int(d.f.Fd()), ops: map[uint64]uringOp{}, out: make([]uring.CQE, 64)}, nil
}

func (c *uringChannel) Read(off uint64, buf []byte, done func(error)) {
	c.push(uringOp{'r', off, buf, done})
}

func (c *uringChannel) Write(off uint64, buf []byte, done func(error)) {
	c.push(uringOp{'w', off, buf, done})
}

func (c *uringChannel) push(op uringOp) {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		op.cb(err)
		return
	}
	c.next++
	c.ops[c.next] = op
	if !c.prepLocked(c.next, op) {
		c.backlog = append(c.backlog, taggedOp{c.next, op})
	}
	var err error
	if !c.batching {
		err = c.submitLocked()
	}
	c.mu.Unlock()
	if err != nil {
		op.cb(err)
	}
}

// prepLocked fills an SQE for op; false when the submission queue is full.
func (c *uringChannel) prepLocked(tag uint64, op uringOp) bool {
	sqe := c.r.GetSQE()
	if sqe == nil {
		return false
	}
	op.prep(sqe, c.fd, tag)
	return true
}

// submitLocked enters everything prepared, making room for the backlog as
// the kernel consumes entries. A failing io_uring_enter breaks the channel:
// later operations fail at once and the store's queue reports them.
func (c *uringChannel) submitLocked() error {
	for {
		if _, err := c.r.Submit(); err != nil {
			c.err = fmt.Errorf("queue io_uring submit: %w", err)
			return c.err
		}
		if len(c.backlog) == 0 {
			return nil
		}
		for len(c.backlog) > 0 && c.prepLocked(c.backlog[0].tag, c.backlog[0].op) {
			c.backlog = c.backlog[1:]
		}
	}
}

// begin starts an owner batch: submissions wait for end.
func (c *uringChannel) begin() {
	c.mu.Lock()
	c.batching = true
	c.mu.Unlock()
}

// end submits what the batch prepared.
func (c *uringChannel) end() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batching = false
	if c.err != nil {
		return c.err
	}
	return c.submitLocked()
}

// poll runs the callbacks of every finished operation (owner only) and
// reports how many ran.
func (c *uringChannel) poll() int {
	total := 0
	for {
		c.mu.Lock()
		n := c.r.Peek(c.out)
		c.ready = c.ready[:0]
		for _, cqe := range c.out[:n] {
			op, ok := c.ops[cqe.UserData]
			if !ok {
				continue
			}
			delete(c.ops, cqe.UserData)
			c.ready = append(c.ready, uringDone{op, cqe.Res})
		}
		ready := c.ready
		c.mu.Unlock()
		if n == 0 {
			return total
		}
		for _, r := range ready {
			r.op.cb(uringResult(r.op, r.res))
		}
		total += len(ready)
	}
}

func (c *uringChannel) pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ops)
}

// close releases the ring; nothing may be in flight.
func (c *uringChannel) close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.ops); n > 0 {
		return fmt.Errorf("close queue io_uring with %d operations in flight", n)
	}
	c.err = errChannelClosed
	c.r.UnregisterEventFD()
	return c.r.Close()
}
