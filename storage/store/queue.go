package store

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage"
)

// BlockVolume serves one store volume through storage.Volume, the
// interface the vhost-user-blk device drives.
type BlockVolume struct {
	h *Vol
}

var _ storage.Volume = (*BlockVolume)(nil)

// BlockVolume returns the named volume as a storage.Volume.
func (s *Store) BlockVolume(name string) (*BlockVolume, error) {
	h, err := s.Volume(name)
	if err != nil {
		return nil, err
	}
	return &BlockVolume{h: h}, nil
}

func (b *BlockVolume) Size() uint64         { return b.h.Size() }
func (b *BlockVolume) BlockSize() uint32    { return blockSize }
func (b *BlockVolume) ReadOnly() bool       { return b.h.ReadOnly() }
func (b *BlockVolume) CanDiscard() bool     { return !b.h.ReadOnly() }
func (b *BlockVolume) CanWriteZeroes() bool { return !b.h.ReadOnly() }

// AllocatedBytes is the space the volume's mapped blocks take in the store
// (blocks shared with snapshots or clones included). It walks the block
// map: a few milliseconds per million mapped blocks, fine for a scrape.
func (b *BlockVolume) AllocatedBytes() uint64 { return b.h.v.t.mapped() * blockSize }

func (b *BlockVolume) Close() error {
	if n := b.h.v.queues.Load(); n != 0 {
		return fmt.Errorf("close volume %q: %d queues still open", b.h.v.name, n)
	}
	return nil
}

// OpenQueue returns a queue. Queues share nothing but the store's lock-free
// block map and allocator.
func (b *BlockVolume) OpenQueue(depth int) (storage.Queue, error) {
	if depth <= 0 {
		return nil, fmt.Errorf("open queue on %q: depth %d must be positive", b.h.v.name, depth)
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("open queue on %q: eventfd: %w", b.h.v.name, err)
	}
	h := *b.h
	q := &queue{h: &h, efd: efd}
	// On an io_uring disk the queue gets a ring of its own for data blocks
	// (see uringChannel); the simulator and the pread fallback share the
	// store's disk.
	if ud, ok := b.h.s.disk.(*UringDisk); ok && b.h.s.opts.Pump == nil {
		ch, err := ud.openChannel(efd)
		if err != nil {
			unix.Close(efd)
			return nil, fmt.Errorf("open queue on %q: %w", b.h.v.name, err)
		}
		q.ch, h.io = ch, ch
	}
	b.h.v.queues.Add(1)
	q.cond.L = &q.mu
	return q, nil
}

type queue struct {
	h      *Vol
	efd    int
	ch     *uringChannel // nil: data I/O goes through the store's disk
	mu     sync.Mutex
	cond   sync.Cond
	done   []storage.Completion
	flight int
	closed bool
	// reaping is set while the owner runs completions in Reap: a
	// completion then needs no eventfd write, Reap collects it.
	reaping bool
}

func (q *queue) NotifyFD() int { return q.efd }

func (q *queue) complete(tag uint64, err error) {
	q.mu.Lock()
	q.done = append(q.done, storage.Completion{Tag: tag, Err: err})
	q.flight--
	q.cond.Broadcast()
	wake := !q.reaping
	q.mu.Unlock()
	if wake {
		var one = [8]byte{1}
		_, _ = unix.Write(q.efd, one[:])
	}
}

// progress runs the completions of the queue's own ring, if it has one,
// and submits what they started.
func (q *queue) progress() error {
	if q.ch == nil {
		return nil
	}
	q.ch.begin()
	q.ch.poll()
	return q.ch.end()
}

// sleep waits for the next completion event: on the eventfd when the queue
// has its own ring (whose completions only the owner runs), otherwise on
// the condition the disk goroutine signals. q.mu is held on entry and exit.
func (q *queue) sleep() {
	if q.ch == nil {
		q.cond.Wait()
		return
	}
	q.mu.Unlock()
	pfd := []unix.PollFd{{Fd: int32(q.efd), Events: unix.POLLIN}}
	_, _ = unix.Poll(pfd, 10)
	var b [8]byte
	_, _ = unix.Read(q.efd, b[:])
	q.progress()
	q.mu.Lock()
}

func (q *queue) Submit(reqs []storage.Request) error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return errors.New("submit on a closed queue")
	}
	q.flight += len(reqs)
	q.mu.Unlock()
	if q.ch != nil {
		q.ch.begin()
		defer q.ch.end()
	}
	for i := range reqs {
		r := reqs[i]
		done := func(err error) { q.complete(r.Tag, err) }
		switch r.Op {
		case storage.OpRead, storage.OpWrite:
			offs := make([]uint64, len(r.Bufs))
			off := r.Offset
			for j, b := range r.Bufs {
				offs[j] = off
				off += uint64(len(b))
			}
			if err := q.h.check(r.Offset, off-r.Offset, r.Op == storage.OpWrite); err != nil {
				done(err)
				continue
			}
			all(len(r.Bufs), func(j int, d func(error)) {
				if r.Op == storage.OpRead {
					q.h.ReadAt(r.Bufs[j], offs[j], d)
				} else {
					q.h.WriteAt(r.Bufs[j], offs[j], d)
				}
			}, done)
		case storage.OpFlush:
			q.h.Flush(done)
		case storage.OpDiscard, storage.OpWriteZeroes:
			q.h.WriteZeroes(r.Offset, r.Length, done)
		default:
			done(fmt.Errorf("%v: %w", r.Op, storage.ErrUnsupported))
		}
	}
	return nil
}

func (q *queue) Reap(out []storage.Completion, min int) (int, error) {
	q.mu.Lock()
	q.reaping = true
	q.mu.Unlock()
	err := q.progress()
	q.mu.Lock()
	q.reaping = false
	defer q.mu.Unlock()
	if err != nil && len(q.done) == 0 {
		return 0, err
	}
	for len(q.done) < min && len(q.done) < len(out) {
		if q.flight == 0 {
			return 0, fmt.Errorf("reap: waiting for %d completions with only %d pending", min, len(q.done))
		}
		if pump := q.h.s.opts.Pump; pump != nil {
			q.mu.Unlock()
			pump()
			q.mu.Lock()
			continue
		}
		q.sleep()
	}
	n := copy(out, q.done)
	q.done = q.done[n:]
	return n, nil
}

func (q *queue) Close() error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	for q.flight > 0 {
		if pump := q.h.s.opts.Pump; pump != nil {
			q.mu.Unlock()
			pump()
			q.mu.Lock()
			continue
		}
		q.sleep()
	}
	q.mu.Unlock()
	var err error
	if q.ch != nil {
		// Writes of other queues to this queue's blocks may still run on
		// this ring (see uringChannel); they finish quickly.
		for q.ch.pending() > 0 {
			q.mu.Lock()
			q.sleep()
			q.mu.Unlock()
		}
		err = q.ch.close()
	}
	q.h.v.queues.Add(-1)
	if cerr := unix.Close(q.efd); err == nil {
		err = cerr
	}
	return err
}
