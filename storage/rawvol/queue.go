//go:build linux

package rawvol

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage"
	"github.com/virtblk/virtblk/storage/uring"
)

const (
	// maxSegments is the most iovecs one READV/WRITEV takes (UIO_MAXIOV);
	// requests with more segments go through a bounce buffer.
	maxSegments = 1024
	// maxDepth bounds OpenQueue's depth (the io_uring entry limit).
	maxDepth = 4096
	// keepBounce is the largest bounce buffer a slot keeps for reuse.
	keepBounce = 1 << 20
	// fileIndex is the volume's slot in each ring's registered file table.
	fileIndex = 0
	// maxRetries bounds resubmissions of a request that makes no progress
	// (EAGAIN/EINTR results).
	maxRetries = 100
	// syncFlushMax is the longest flush that may run inline on an idle
	// queue; a slower device gets its flushes through io_uring, so they do
	// not hold up the queue's next requests.
	syncFlushMax = 500 * time.Microsecond
	// flushProbeEvery: after a slow inline flush, one flush in this many
	// is tried inline again.
	flushProbeEvery = 64
)

// slot is one in-flight request. Its index is the SQE user data, so no Go
// pointer reaches the kernel.
type slot struct {
	req storage.Request
	// err, when set before submission, is the request's result; it rides
	// through the ring as a NOP so completion and eventfd stay uniform.
	err   error
	total uint64 // bytes to transfer (read/write)
	done  uint64 // bytes transferred so far
	// iov is this slot's iovec array in mmap'd memory; iov[first:n] is
	// what remains to transfer.
	iov      []uring.Iovec
	first, n int
	bounce   []byte // mmap'd, aligned; nil when the request uses its own buffers
	bounced  bool
	nop      bool   // completed through a NOP: rejected or zero-length
	mode     uint32 // fallocate mode in use; 0 means a block discard command
	retries  int
}

type queue struct {
	v      *Volume
	ring   *uring.Ring
	efd    int
	depth  int
	iovMem []uring.Iovec
	slots  []slot
	free   []uint32
	cqes   []uring.CQE
	// noZeroRange: FALLOC_FL_ZERO_RANGE failed with EOPNOTSUPP once; use
	// the fallback directly from now on. Per queue, so nothing is shared.
	noZeroRange bool
	// noBlkDiscard: the discard command failed with EOPNOTSUPP; use punch.
	noBlkDiscard bool
	// slowFlush: the last inline flush took longer than syncFlushMax, so
	// flushes go through the ring (flushSkips counts them, for probing).
	slowFlush  bool
	flushSkips uint32
	closed     bool
}

func newQueue(v *Volume, depth int) (*queue, error) {
	if depth < 1 || depth > maxDepth {
		return nil, fmt.Errorf("queue depth %d out of range 1..%d", depth, maxDepth)
	}
	q := &queue{v: v, depth: depth, efd: -1}
	var err error
	if q.ring, err = uring.New(uint32(depth), uring.Options{}); err != nil {
		return nil, err
	}
	fail := func(err error) (*queue, error) {
		q.release()
		return nil, err
	}
	if err := q.ring.RegisterFiles([]int{v.fd}); err != nil {
		return fail(err)
	}
	if q.efd, err = uring.NewEventFD(); err != nil {
		return fail(err)
	}
	if err := q.ring.RegisterEventFD(q.efd); err != nil {
		return fail(err)
	}
	if q.iovMem, err = uring.Iovecs(depth * maxSegments); err != nil {
		return fail(err)
	}
	q.slots = make([]slot, depth)
	q.free = make([]uint32, depth)
	for i := range q.slots {
		q.slots[i].iov = q.iovMem[i*maxSegments : (i+1)*maxSegments : (i+1)*maxSegments]
		q.free[i] = uint32(depth - 1 - i)
	}
	q.cqes = make([]uring.CQE, q.ring.CQEntries())
	return q, nil
}

func (q *queue) NotifyFD() int { return q.efd }

// Submit starts reqs. Per-request problems (range, read-only, alignment,
// unsupported op) are not errors here: they come back as that request's
// Completion. Submit fails only for queue-level trouble — a closed queue,
// more requests than free depth (nothing is started then), or a ring
// failure.
func (q *queue) Submit(reqs []storage.Request) error {
	if q.closed {
		return fmt.Errorf("submit to %s: queue is closed", q.v.path)
	}
	if len(reqs) > len(q.free) {
		return fmt.Errorf("submit %d requests to %s: only %d of depth %d free; reap first", len(reqs), q.v.path, len(q.free), q.depth)
	}
	// A flush alone on an idle queue runs fdatasync on this thread: io_uring
	// cannot fsync without blocking, so it would hand the call to an io-wq
	// kernel thread and signal us back, two thread wake-ups that are a
	// large part of a QD1 write+flush. Nothing else of this queue waits
	// behind it, since nothing else is in flight.
	// A device whose cache flush is slow (milliseconds on a disk with a
	// volatile cache) would stall this queue's next requests that long, so
	// the synchronous path is only taken while flushes are fast.
	syncFlush := len(reqs) == 1 && reqs[0].Op == storage.OpFlush && len(q.free) == q.depth && q.flushFastNow()
	for i := range reqs {
		idx := q.free[len(q.free)-1]
		q.free = q.free[:len(q.free)-1]
		s := &q.slots[idx]
		*s = slot{req: reqs[i], iov: s.iov, bounce: s.bounce}
		if syncFlush {
			q.flushNow(idx, s)
			continue
		}
		q.start(idx, s)
	}
	if _, err := q.ring.Submit(); err != nil {
		return fmt.Errorf("submit to %s: %w", q.v.path, err)
	}
	return nil
}

// start validates the request in slot idx and prepares its SQE.
func (q *queue) start(idx uint32, s *slot) {
	r := &s.req
	v := q.v
	switch r.Op {
	case storage.OpRead, storage.OpWrite:
		for _, b := range r.Bufs {
			s.total += uint64(len(b))
		}
		if r.Op == storage.OpWrite && v.readOnly {
			s.err = storage.ErrReadOnly
		} else {
			s.err = q.checkRange(r.Offset, s.total)
		}
		if s.err == nil && s.total > 0 {
			q.prepRW(idx, s)
			return
		}
	case storage.OpFlush:
		e := q.sqe()
		e.PrepFsync(fileIndex, uring.FsyncDatasync, uint64(idx))
		e.SetFlags(uring.SQEFixedFile)
		return
	case storage.OpDiscard, storage.OpWriteZeroes:
		switch {
		case v.readOnly:
			s.err = storage.ErrReadOnly
		case r.Op == storage.OpDiscard && !v.CanDiscard(), r.Op == storage.OpWriteZeroes && !v.CanWriteZeroes():
			s.err = storage.ErrUnsupported
		default:
			s.err = q.checkRange(r.Offset, r.Length)
		}
		if s.err == nil && r.Length > 0 {
			s.mode = q.fallocMode(r)
			q.prepFallocate(idx, s)
			return
		}
	default:
		s.err = storage.ErrUnsupported
	}
	if s.err != nil {
		s.err = q.reqErr(s, s.err)
	}
	// Zero-length requests and rejected ones complete through a NOP.
	s.nop = true
	q.sqe().PrepNop(uint64(idx))
}

// flushFastNow reports whether an idle-queue flush should run inline: yes
// while the last inline flush took at most syncFlushMax, and for one probe
// in every flushProbeEvery flushes after a slow one (devices change).
func (q *queue) flushFastNow() bool {
	if !q.slowFlush {
		return true
	}
	q.flushSkips++
	return q.flushSkips%flushProbeEvery == 0
}

// flushNow runs the flush in slot idx synchronously and completes it
// through a NOP, like a rejected request, so the caller sees it in Reap.
func (q *queue) flushNow(idx uint32, s *slot) {
	var err error
	start := time.Now()
	for {
		if err = unix.Fdatasync(q.v.fd); err != unix.EINTR {
			break
		}
	}
	q.slowFlush = time.Since(start) > syncFlushMax
	if errno, ok := err.(syscall.Errno); ok {
		s.err = q.reqErr(s, errnoErr(errno))
	} else if err != nil {
		s.err = q.reqErr(s, err)
	}
	s.nop = true
	q.sqe().PrepNop(uint64(idx))
}

func (q *queue) checkRange(off, n uint64) error {
	a := uint64(q.v.ioAlign)
	if off%a != 0 || n%a != 0 {
		return fmt.Errorf("not aligned to the volume's %d-byte blocks: %w", a, unix.EINVAL)
	}
	if off > q.v.size || n > q.v.size-off {
		return fmt.Errorf("volume size %d: %w", q.v.size, storage.ErrRange)
	}
	return nil
}

func (q *queue) reqErr(s *slot, err error) error {
	n := s.total
	if s.req.Op != storage.OpRead && s.req.Op != storage.OpWrite {
		n = s.req.Length
	}
	return fmt.Errorf("%s %s offset %d length %d: %w", q.v.path, s.req.Op, s.req.Offset, n, err)
}

// sqe returns a free SQE. The ring has at least depth entries and each
// slot has at most one SQE outstanding, so the SQ cannot be full.
func (q *queue) sqe() *uring.SQE {
	sqe := q.ring.GetSQE()
	if sqe == nil {
		panic(fmt.Sprintf("rawvol: io_uring SQ full with depth %d: slot accounting is broken", q.depth))
	}
	return sqe
}

func (q *queue) prepRW(idx uint32, s *slot) {
	if err := q.load(s); err != nil {
		s.err = q.reqErr(s, err)
		s.nop = true
		q.sqe().PrepNop(uint64(idx))
		return
	}
	q.prepIO(idx, s)
}

// load points the slot's iovecs at the request's buffers, or at a bounce
// buffer (filled for a write) when O_DIRECT would reject the memory.
func (q *queue) load(s *slot) error {
	r := &s.req
	if q.aligned(r.Bufs) {
		n := 0
		for _, b := range r.Bufs {
			if len(b) > 0 {
				s.iov[n] = uring.Iovec{Base: uring.Addr(b), Len: uint64(len(b))}
				n++
			}
		}
		s.n = n
		return nil
	}
	if err := q.bounceFor(s); err != nil {
		return err
	}
	if r.Op == storage.OpWrite {
		off := 0
		for _, b := range r.Bufs {
			off += copy(s.bounce[off:], b)
		}
	}
	s.iov[0] = uring.Iovec{Base: uring.Addr(s.bounce), Len: s.total}
	s.n = 1
	return nil
}

// prepIO (re)submits the remaining part of a read or write.
func (q *queue) prepIO(idx uint32, s *slot) {
	e := q.sqe()
	iov := s.iov[s.first:s.n]
	off := s.req.Offset + s.done
	if len(iov) == 1 && iov[0].Len <= 1<<30 {
		// One segment: plain READ/WRITE spares the kernel the iovec import.
		op := uring.OpRead
		if s.req.Op == storage.OpWrite {
			op = uring.OpWrite
		}
		*e = uring.SQE{Opcode: op, Fd: fileIndex, Off: off, Addr: iov[0].Base, Len: uint32(iov[0].Len), UserData: uint64(idx)}
	} else if s.req.Op == storage.OpRead {
		e.PrepReadv(fileIndex, iov, off, uint64(idx))
	} else {
		e.PrepWritev(fileIndex, iov, off, uint64(idx))
	}
	e.SetFlags(uring.SQEFixedFile)
}

// aligned reports whether bufs can go to the kernel as they are: O_DIRECT
// needs every segment's address aligned to the memory alignment and its
// length to the block size.
func (q *queue) aligned(bufs [][]byte) bool {
	if len(bufs) > maxSegments {
		return false
	}
	ma, ia := uint64(q.v.memAlign), uint64(q.v.ioAlign)
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		if uring.Addr(b)%ma != 0 || uint64(len(b))%ia != 0 {
			return false
		}
	}
	return true
}

func (q *queue) bounceFor(s *slot) error {
	q.v.bounces.Add(1)
	s.bounced = true
	if uint64(len(s.bounce)) >= s.total {
		return nil
	}
	if s.bounce != nil {
		_ = uring.Munmap(s.bounce)
		s.bounce = nil
	}
	size := uint64(64 << 10)
	for size < s.total {
		size *= 2
	}
	b, err := uring.Mmap(int(size))
	if err != nil {
		return fmt.Errorf("bounce buffer: %w", err)
	}
	s.bounce = b
	return nil
}

// fallocMode picks the fallocate mode for a discard or write-zeroes, or 0
// for the block device's discard command.
func (q *queue) fallocMode(r *storage.Request) uint32 {
	const punch = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	const zero = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
	switch {
	case r.Op == storage.OpDiscard && q.v.blkDiscard && !q.noBlkDiscard:
		return 0
	case r.Op == storage.OpDiscard:
		return punch
	case r.Unmap && q.v.punch:
		return punch
	case q.noZeroRange && !q.v.isBlock:
		// On a file a punched hole reads back as zeroes.
		return punch
	}
	return zero
}

func (q *queue) prepFallocate(idx uint32, s *slot) {
	e := q.sqe()
	if s.mode == 0 {
		e.PrepBlockDiscard(fileIndex, s.req.Offset, s.req.Length, uint64(idx))
	} else {
		e.PrepFallocate(fileIndex, s.mode, s.req.Offset, s.req.Length, uint64(idx))
	}
	e.SetFlags(uring.SQEFixedFile)
}

// Reap moves finished requests into out. It blocks until at least min have
// finished; asking for more than are outstanding is an error, not a hang.
func (q *queue) Reap(out []storage.Completion, minN int) (int, error) {
	if q.closed {
		return 0, fmt.Errorf("reap from %s: queue is closed", q.v.path)
	}
	inflight := q.depth - len(q.free)
	if minN > len(out) || minN > inflight {
		return 0, fmt.Errorf("reap at least %d from %s with room for %d and %d in flight: would never return", minN, q.v.path, len(out), inflight)
	}
	got := 0
	for {
		// Peek no more CQEs than out has room for: each yields at most
		// one completion.
		n := q.ring.Peek(q.cqes[:min(len(q.cqes), len(out)-got)])
		for _, c := range q.cqes[:n] {
			if q.complete(c, &out[got]) {
				got++
			}
		}
		if got >= minN && (n == 0 || got == len(out)) {
			break
		}
		if got < minN {
			// Submits retries prepared above, then sleeps for a CQE.
			if _, err := q.ring.SubmitAndWait(1); err != nil {
				return got, fmt.Errorf("reap from %s: %w", q.v.path, err)
			}
		}
	}
	if q.ring.Pending() > 0 {
		if _, err := q.ring.Submit(); err != nil {
			return got, fmt.Errorf("resubmit to %s: %w", q.v.path, err)
		}
	}
	return got, nil
}

// complete handles one CQE. It returns true and fills out when the request
// is finished, false when it was resubmitted (short transfer, retry,
// fallback).
func (q *queue) complete(c uring.CQE, out *storage.Completion) bool {
	if c.UserData >= uint64(len(q.slots)) {
		// Not ours; the ring only ever carries slot indices.
		panic(fmt.Sprintf("rawvol: completion with unknown user data %d", c.UserData))
	}
	idx := uint32(c.UserData)
	s := &q.slots[idx]
	if !s.nop {
		if !q.result(idx, s, c.Res) {
			return false
		}
	}
	*out = storage.Completion{Tag: s.req.Tag, Err: s.err}
	q.finish(idx, s)
	return true
}

// result applies res to the slot; false means the request was resubmitted.
func (q *queue) result(idx uint32, s *slot, res int32) bool {
	if res < 0 {
		errno := syscall.Errno(-res)
		switch {
		case errno == unix.EINTR || errno == unix.EAGAIN:
			if s.retries < maxRetries {
				s.retries++
				q.resubmit(idx, s)
				return false
			}
		case errno == unix.EOPNOTSUPP && s.req.Op == storage.OpDiscard && s.mode == 0 && q.v.punch:
			q.noBlkDiscard = true
			s.mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
			q.prepFallocate(idx, s)
			return false
		case errno == unix.EOPNOTSUPP && s.mode&unix.FALLOC_FL_ZERO_RANGE != 0 && !q.v.isBlock && q.v.punch:
			q.noZeroRange = true
			s.mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
			q.prepFallocate(idx, s)
			return false
		case errno == unix.EOPNOTSUPP && s.mode&unix.FALLOC_FL_PUNCH_HOLE != 0 && q.v.isBlock && s.req.Op == storage.OpWriteZeroes:
			// The device cannot unmap-zero; plain zeroing always works.
			s.mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
			q.prepFallocate(idx, s)
			return false
		}
		s.err = q.reqErr(s, errnoErr(errno))
		return true
	}
	if s.req.Op != storage.OpRead && s.req.Op != storage.OpWrite {
		return true
	}
	if res == 0 {
		s.err = q.reqErr(s, fmt.Errorf("no progress after %d of %d bytes (image shrank?): %w", s.done, s.total, storage.ErrIO))
		return true
	}
	s.done += uint64(res)
	if s.done > s.total {
		s.err = q.reqErr(s, fmt.Errorf("kernel reported %d bytes for a %d-byte transfer: %w", s.done, s.total, storage.ErrIO))
		return true
	}
	if s.done < s.total {
		if uint64(res)%uint64(q.v.ioAlign) != 0 {
			// The rest would start misaligned; O_DIRECT cannot continue.
			s.err = q.reqErr(s, fmt.Errorf("short transfer of %d bytes, not block aligned: %w", res, storage.ErrIO))
			return true
		}
		q.advance(s, uint64(res))
		q.prepIO(idx, s)
		return false
	}
	if s.bounced && s.req.Op == storage.OpRead {
		off := 0
		for _, b := range s.req.Bufs {
			off += copy(b, s.bounce[off:s.total])
		}
	}
	return true
}

func (q *queue) resubmit(idx uint32, s *slot) {
	switch s.req.Op {
	case storage.OpRead, storage.OpWrite:
		q.prepIO(idx, s)
	case storage.OpFlush:
		e := q.sqe()
		e.PrepFsync(fileIndex, uring.FsyncDatasync, uint64(idx))
		e.SetFlags(uring.SQEFixedFile)
	default:
		q.prepFallocate(idx, s)
	}
}

// advance drops n transferred bytes from the front of the slot's iovecs.
func (q *queue) advance(s *slot, n uint64) {
	for n > 0 && s.first < s.n {
		v := &s.iov[s.first]
		if v.Len <= n {
			n -= v.Len
			s.first++
			continue
		}
		v.Base += n
		v.Len -= n
		n = 0
	}
}

func (q *queue) finish(idx uint32, s *slot) {
	if len(s.bounce) > keepBounce {
		_ = uring.Munmap(s.bounce)
		s.bounce = nil
	}
	s.req = storage.Request{} // drop references to guest buffers
	s.err = nil
	q.free = append(q.free, idx)
}

// errnoErr wraps an errno so the device can map it: EIO becomes ErrIO.
func errnoErr(errno syscall.Errno) error {
	switch errno {
	case unix.EIO, unix.EILSEQ:
		return fmt.Errorf("%w: %w", storage.ErrIO, errno)
	case unix.EOPNOTSUPP:
		return fmt.Errorf("%w: %w", storage.ErrUnsupported, errno)
	}
	return errno
}

// Close waits for every outstanding request, then releases the ring,
// eventfd and buffers.
func (q *queue) Close() error {
	if q.closed {
		return nil
	}
	var errs []error
	drain := make([]storage.Completion, q.depth)
	for inflight := q.depth - len(q.free); inflight > 0; inflight = q.depth - len(q.free) {
		if _, err := q.Reap(drain, inflight); err != nil {
			// The ring is broken; in-flight buffers may still be in use by
			// the kernel, so keep the memory mapped (leak) rather than
			// risk it being reused.
			q.closed = true
			q.v.queueClosed()
			return fmt.Errorf("close queue on %s: waiting for %d requests: %w", q.v.path, inflight, err)
		}
	}
	q.closed = true
	errs = append(errs, q.release())
	q.v.queueClosed()
	return errors.Join(errs...)
}

// release frees everything newQueue allocated; nothing may be in flight.
func (q *queue) release() error {
	var errs []error
	if q.ring != nil {
		errs = append(errs, q.ring.Close())
		q.ring = nil
	}
	if q.efd >= 0 {
		errs = append(errs, unix.Close(q.efd))
		q.efd = -1
	}
	for i := range q.slots {
		if q.slots[i].bounce != nil {
			errs = append(errs, uring.Munmap(q.slots[i].bounce))
			q.slots[i].bounce = nil
		}
	}
	if q.iovMem != nil {
		errs = append(errs, uring.FreeIovecs(q.iovMem))
		q.iovMem = nil
	}
	return errors.Join(errs...)
}
