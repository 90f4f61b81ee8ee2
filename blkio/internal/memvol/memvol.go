// Package memvol is an in-memory storage.Volume for tests and fuzzing of the
// device code: requests complete at Submit time (in reverse batch order, to
// exercise out-of-order completion) and are announced on a real eventfd like
// an io_uring-backed queue would.
package memvol

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage"
)

// Volume is a byte slice with storage.Volume semantics.
type Volume struct {
	mu      sync.Mutex
	data    []byte
	ro      bool
	flushes int
	failAt  int64
}

// SetFailAt makes any request touching byte offset off fail with
// storage.ErrIO (off < 0 turns this off).
func (v *Volume) SetFailAt(off int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.failAt = off
}

// New returns a zeroed volume of size bytes.
func New(size uint64, readOnly bool) *Volume {
	return &Volume{data: make([]byte, size), ro: readOnly, failAt: -1}
}

func (v *Volume) Size() uint64         { return uint64(len(v.data)) }
func (v *Volume) BlockSize() uint32    { return 512 }
func (v *Volume) ReadOnly() bool       { return v.ro }
func (v *Volume) CanDiscard() bool     { return true }
func (v *Volume) CanWriteZeroes() bool { return true }
func (v *Volume) Close() error         { return nil }

// Bytes returns a copy of the volume contents.
func (v *Volume) Bytes() []byte {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]byte(nil), v.data...)
}

// Flushes counts completed flushes.
func (v *Volume) Flushes() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.flushes
}

// WriteAt stores p (test setup).
func (v *Volume) WriteAt(p []byte, off int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	copy(v.data[off:], p)
}

// OpenQueue opens a queue.
func (v *Volume) OpenQueue(depth int) (storage.Queue, error) {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("memvol eventfd: %w", err)
	}
	return &Queue{v: v, efd: efd, depth: depth}, nil
}

// Queue is a storage.Queue on a Volume.
type Queue struct {
	v        *Volume
	efd      int
	depth    int
	inflight int
	done     []storage.Completion
}

func (q *Queue) NotifyFD() int { return q.efd }

func (q *Queue) Close() error { return unix.Close(q.efd) }

func (q *Queue) Submit(reqs []storage.Request) error {
	if q.inflight+len(reqs) > q.depth {
		return fmt.Errorf("memvol: %d requests would exceed depth %d", q.inflight+len(reqs), q.depth)
	}
	for i := len(reqs) - 1; i >= 0; i-- {
		q.done = append(q.done, storage.Completion{Tag: reqs[i].Tag, Err: q.v.do(&reqs[i])})
	}
	q.inflight += len(reqs)
	if len(reqs) > 0 {
		var one [8]byte
		one[0] = 1
		unix.Write(q.efd, one[:])
	}
	return nil
}

func (q *Queue) Reap(out []storage.Completion, min int) (int, error) {
	if min > len(q.done) {
		return 0, fmt.Errorf("memvol: Reap would block forever: want %d, %d done", min, len(q.done))
	}
	n := copy(out, q.done)
	q.done = q.done[:copy(q.done, q.done[n:])]
	q.inflight -= n
	return n, nil
}

func (v *Volume) do(r *storage.Request) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	length := r.Length
	if r.Op == storage.OpRead || r.Op == storage.OpWrite {
		length = 0
		for _, b := range r.Bufs {
			length += uint64(len(b))
		}
	}
	if r.Op != storage.OpFlush {
		if r.Offset%storage.SectorSize != 0 || length%storage.SectorSize != 0 {
			return fmt.Errorf("memvol: unaligned %v at %d+%d", r.Op, r.Offset, length)
		}
		if r.Offset > uint64(len(v.data)) || length > uint64(len(v.data))-r.Offset {
			return storage.ErrRange
		}
		if v.failAt >= 0 && uint64(v.failAt) >= r.Offset && uint64(v.failAt) < r.Offset+length {
			return storage.ErrIO
		}
	}
	if v.ro && r.Op != storage.OpRead && r.Op != storage.OpFlush {
		return storage.ErrReadOnly
	}
	off := r.Offset
	switch r.Op {
	case storage.OpRead:
		for _, b := range r.Bufs {
			copy(b, v.data[off:])
			off += uint64(len(b))
		}
	case storage.OpWrite:
		for _, b := range r.Bufs {
			copy(v.data[off:], b)
			off += uint64(len(b))
		}
	case storage.OpFlush:
		v.flushes++
	case storage.OpDiscard, storage.OpWriteZeroes:
		clear(v.data[off : off+length])
	default:
		return storage.ErrUnsupported
	}
	return nil
}
