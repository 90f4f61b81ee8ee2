//go:build linux

// Package uring is virtblk's own io_uring binding, built on raw syscalls
// from golang.org/x/sys/unix. It owns the ring memory (setup, mmap, head and
// tail indices), SQE preparation for the opcodes the storage layer uses,
// buffer/file/eventfd registration, and batched submit and reap.
//
// # Ownership
//
// A Ring belongs to one goroutine: nothing inside takes a lock, so the
// owner is the only one that may call GetSQE, Submit, Peek or Wait. Run one
// ring per worker instead of sharing one.
//
// # Memory
//
// The kernel reads and writes I/O buffers and iovec arrays after Submit
// returns, while Go code keeps running. Go heap memory may be freed and
// reused once it is unreachable, and stack memory moves, so: every address
// placed in an SQE (buffers, iovec arrays) and every registered buffer must
// be memory the Go runtime does not manage — Mmap, Slab, Iovecs, or memory
// shared with a guest — and must stay mapped until its CQE is reaped. No Go
// pointer is ever stored in kernel-visible memory: SQE and Iovec hold plain
// integers, and UserData is an integer the caller maps back to its own
// state (typically a slot index).
//
// # Ring indices
//
// The kernel writes the SQ head and the CQ tail; we write the SQ tail and
// the CQ head. We read the kernel's indices with atomic loads (acquire) and
// publish ours with atomic stores (release), so SQE contents are visible
// before the tail that covers them, and a CQE is read before its slot is
// handed back. Go's sync/atomic is sequentially consistent, which is
// stronger than required.
package uring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Options tune New.
type Options struct {
	// CQEntries sets the completion queue size (rounded up to a power of
	// two by the kernel); zero keeps the kernel default of twice the SQ.
	CQEntries uint32
	// Flags are extra IORING_SETUP_* flags (Setup*).
	Flags uint32
}

// Ring is one io_uring instance. See the package doc for ownership rules.
type Ring struct {
	fd       int
	features uint32
	flags    uint32

	ringMem []byte // SQ ring (and CQ ring with FeatSingleMmap)
	cqMem   []byte // CQ ring when it has its own mapping, else nil
	sqeMem  []byte

	// SQ: kernel-shared indices, and our local view.
	sqHead    *uint32 // written by kernel
	sqTail    *uint32 // written by us
	sqFlags   *uint32
	sqDropped *uint32
	sqMask    uint32
	sqEntries uint32
	sqes      []SQE
	sqeTail   uint32 // next SQE to hand out; published to *sqTail on Submit

	// CQ.
	cqHead    *uint32 // written by us
	cqTail    *uint32 // written by kernel
	cqOverflo *uint32
	cqMask    uint32
	cqEntries uint32
	cqes      []CQE

	// backlog holds CQEs reaped while retrying a submit that hit a full
	// completion queue; Peek returns them first, keeping kernel order.
	backlog []CQE
}

// New creates a ring with at least entries submission slots (the kernel
// rounds up to a power of two).
func New(entries uint32, opt Options) (*Ring, error) {
	if entries == 0 {
		return nil, fmt.Errorf("io_uring setup: entries must be at least 1")
	}
	var p params
	p.flags = opt.Flags
	if opt.CQEntries != 0 {
		p.flags |= SetupCQSize
		p.cqEntries = opt.CQEntries
	}
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, setupError(entries, errno)
	}
	r := &Ring{fd: int(fd), features: p.features, flags: p.flags}
	if err := r.mapRings(&p); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func setupError(entries uint32, errno syscall.Errno) error {
	switch errno {
	case unix.ENOSYS:
		return fmt.Errorf("io_uring setup: %w (kernel built without io_uring; need Linux 5.10 or newer)", errno)
	case unix.EPERM:
		return fmt.Errorf("io_uring setup: %w (io_uring is disabled: check sysctl kernel.io_uring_disabled and the container's seccomp profile)", errno)
	case unix.ENOMEM:
		return fmt.Errorf("io_uring setup with %d entries: %w (raise RLIMIT_MEMLOCK or use fewer entries)", entries, errno)
	}
	return fmt.Errorf("io_uring setup with %d entries: %w", entries, errno)
}

func (r *Ring) mapRings(p *params) error {
	sqSize := int(p.sqOff.array) + int(p.sqEntries)*4
	cqSize := int(p.cqOff.cqes) + int(p.cqEntries)*int(unsafe.Sizeof(CQE{}))
	single := p.features&FeatSingleMmap != 0
	if single {
		// One mapping serves both rings; it must cover the larger one.
		sqSize = max(sqSize, cqSize)
	}
	var err error
	r.ringMem, err = unix.Mmap(r.fd, int64(offSQRing), sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring mmap SQ ring (%d bytes): %w", sqSize, err)
	}
	cqBase := r.ringMem
	if !single {
		r.cqMem, err = unix.Mmap(r.fd, int64(offCQRing), cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return fmt.Errorf("io_uring mmap CQ ring (%d bytes): %w", cqSize, err)
		}
		cqBase = r.cqMem
	}
	sqeSize := int(p.sqEntries) * int(unsafe.Sizeof(SQE{}))
	r.sqeMem, err = unix.Mmap(r.fd, int64(offSQEs), sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring mmap SQEs (%d bytes): %w", sqeSize, err)
	}

	sq := unsafe.Pointer(unsafe.SliceData(r.ringMem))
	r.sqHead = (*uint32)(unsafe.Add(sq, p.sqOff.head))
	r.sqTail = (*uint32)(unsafe.Add(sq, p.sqOff.tail))
	r.sqFlags = (*uint32)(unsafe.Add(sq, p.sqOff.flags))
	r.sqDropped = (*uint32)(unsafe.Add(sq, p.sqOff.dropped))
	r.sqMask = *(*uint32)(unsafe.Add(sq, p.sqOff.ringMask))
	r.sqEntries = *(*uint32)(unsafe.Add(sq, p.sqOff.ringEntries))
	r.sqes = unsafe.Slice((*SQE)(unsafe.Pointer(unsafe.SliceData(r.sqeMem))), p.sqEntries)
	// The indirection array maps ring positions to SQE indices. We always
	// fill SQE i at ring position i, so the identity map is written once.
	array := unsafe.Slice((*uint32)(unsafe.Add(sq, p.sqOff.array)), p.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}
	r.sqeTail = atomic.LoadUint32(r.sqTail)

	cq := unsafe.Pointer(unsafe.SliceData(cqBase))
	r.cqHead = (*uint32)(unsafe.Add(cq, p.cqOff.head))
	r.cqTail = (*uint32)(unsafe.Add(cq, p.cqOff.tail))
	r.cqOverflo = (*uint32)(unsafe.Add(cq, p.cqOff.overflow))
	r.cqMask = *(*uint32)(unsafe.Add(cq, p.cqOff.ringMask))
	r.cqEntries = *(*uint32)(unsafe.Add(cq, p.cqOff.ringEntries))
	r.cqes = unsafe.Slice((*CQE)(unsafe.Add(cq, p.cqOff.cqes)), p.cqEntries)
	return nil
}

// Close unmaps the rings and closes the ring fd. In-flight requests are
// cancelled by the kernel; their buffers must stay mapped until then, so
// reap everything first.
func (r *Ring) Close() error {
	var errs []error
	for _, m := range []*[]byte{&r.sqeMem, &r.cqMem, &r.ringMem} {
		if *m != nil {
			if err := unix.Munmap(*m); err != nil {
				errs = append(errs, fmt.Errorf("io_uring munmap: %w", err))
			}
			*m = nil
		}
	}
	if r.fd >= 0 {
		if err := unix.Close(r.fd); err != nil {
			errs = append(errs, fmt.Errorf("io_uring close: %w", err))
		}
		r.fd = -1
	}
	r.sqes, r.cqes = nil, nil
	return errors.Join(errs...)
}

// FD is the ring's file descriptor.
func (r *Ring) FD() int { return r.fd }

// Features is the IORING_FEAT_* mask the kernel reported.
func (r *Ring) Features() uint32 { return r.features }

// SQEntries and CQEntries are the ring sizes the kernel chose.
func (r *Ring) SQEntries() uint32 { return r.sqEntries }
func (r *Ring) CQEntries() uint32 { return r.cqEntries }

// SQSpace is how many SQEs GetSQE can still hand out before a Submit.
func (r *Ring) SQSpace() int {
	return int(r.sqEntries - (r.sqeTail - atomic.LoadUint32(r.sqHead)))
}

// Pending is how many SQEs were handed out but not yet consumed by the kernel.
func (r *Ring) Pending() int {
	return int(r.sqeTail - atomic.LoadUint32(r.sqHead))
}

// Dropped counts SQEs the kernel rejected as invalid (bad SQE index).
func (r *Ring) Dropped() uint32 { return atomic.LoadUint32(r.sqDropped) }

// GetSQE returns the next free SQE, or nil when the submission queue is
// full (Submit, then retry). The entry holds stale data: fill it with one
// of the Prep methods, which set every field.
func (r *Ring) GetSQE() *SQE {
	head := atomic.LoadUint32(r.sqHead)
	if r.sqeTail-head >= r.sqEntries {
		return nil
	}
	sqe := &r.sqes[r.sqeTail&r.sqMask]
	r.sqeTail++
	return sqe
}

// Submit hands every prepared SQE to the kernel and returns how many it
// consumed.
func (r *Ring) Submit() (int, error) { return r.SubmitAndWait(0) }

// SubmitAndWait submits every prepared SQE and waits until at least wait
// completions are available (they are not reaped: use Peek). Interrupted
// calls are retried. A completion queue that is full (EBUSY) or a kernel
// out of request memory (EAGAIN) is handled by moving the visible CQEs into
// the ring's backlog, which Peek drains first, and retrying. wait is capped
// at CQEntries.
func (r *Ring) SubmitAndWait(wait uint32) (int, error) {
	// More than the CQ holds can never be waiting in it at once.
	wait = min(wait, r.cqEntries)
	// Publish SQE contents before the tail that makes them visible.
	atomic.StoreUint32(r.sqTail, r.sqeTail)
	submitted := 0
	stalls := 0
	flushTried := false
	for {
		toSubmit := r.sqeTail - atomic.LoadUint32(r.sqHead)
		// The kernel counts every CQE in the ring towards min_complete,
		// but not our backlog.
		backlog := uint32(len(r.backlog))
		var w, flags uint32
		if r.cqReady()+backlog < wait {
			w = wait - backlog
			flags |= enterGetEvents
		}
		if !flushTried && r.needsFlush() {
			flags |= enterGetEvents
			flushTried = true
		}
		if toSubmit == 0 && flags == 0 {
			return submitted, nil
		}
		n, err := r.enter(toSubmit, w, flags)
		submitted += n
		switch {
		case err == nil:
			if n > 0 || toSubmit == 0 {
				stalls = 0
				continue
			}
			// The kernel took nothing and said nothing; never spin on it.
			stalls++
			if stalls > maxStalls {
				return submitted, fmt.Errorf("io_uring submit %d entries: kernel accepted none", toSubmit)
			}
		case errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.EBUSY), errors.Is(err, unix.EAGAIN):
			// Make room in the CQ; if nothing can be moved and the kernel
			// still refuses, give up rather than spin forever.
			if r.drainToBacklog() == 0 {
				stalls++
				if stalls > maxStalls {
					return submitted, fmt.Errorf("io_uring submit %d entries: %w", toSubmit, err)
				}
			}
		default:
			return submitted, fmt.Errorf("io_uring submit %d entries: %w", toSubmit, err)
		}
	}
}

// maxStalls bounds retries of an io_uring_enter that makes no progress.
const maxStalls = 1000

// enter is io_uring_enter(2). Syscall (not RawSyscall) lets the runtime
// hand this thread's P to another goroutine while the kernel blocks.
func (r *Ring) enter(toSubmit, minComplete, flags uint32) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

func (r *Ring) cqReady() uint32 {
	return atomic.LoadUint32(r.cqTail) - atomic.LoadUint32(r.cqHead)
}

// needsFlush reports completions the kernel holds back because the CQ was
// full (IORING_FEAT_NODROP); io_uring_enter with GETEVENTS moves them in.
func (r *Ring) needsFlush() bool {
	return atomic.LoadUint32(r.sqFlags)&sqCQOverflow != 0
}

func (r *Ring) drainToBacklog() int {
	var buf [64]CQE
	total := 0
	for {
		n := r.peekRing(buf[:])
		if n == 0 {
			return total
		}
		r.backlog = append(r.backlog, buf[:n]...)
		total += n
	}
}

// Peek copies up to len(out) available completions into out, in the order
// the kernel posted them, frees their CQ slots in one step, and returns how
// many it copied. It never blocks.
func (r *Ring) Peek(out []CQE) int {
	n := 0
	if len(r.backlog) > 0 {
		n = copy(out, r.backlog)
		r.backlog = r.backlog[:copy(r.backlog, r.backlog[n:])]
	}
	if n < len(out) {
		m := r.peekRing(out[n:])
		if m == 0 && r.needsFlush() {
			// Overflowed completions wait in the kernel; pull them in.
			_, _ = r.enter(0, 0, enterGetEvents)
			m = r.peekRing(out[n:])
		}
		n += m
	}
	return n
}

func (r *Ring) peekRing(out []CQE) int {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail) // acquire: CQE contents are visible
	n := 0
	for head != tail && n < len(out) {
		out[n] = r.cqes[head&r.cqMask]
		head++
		n++
	}
	if n > 0 {
		atomic.StoreUint32(r.cqHead, head) // release: slots are free again
	}
	return n
}

// Wait copies completions into out like Peek, first blocking until at
// least minN are available (minN is capped at len(out)). It also submits
// any prepared SQEs. Like io_uring_enter it blocks for good if fewer than
// minN operations are in flight; callers track that themselves.
func (r *Ring) Wait(out []CQE, minN int) (int, error) {
	minN = max(0, min(minN, len(out)))
	n := r.Peek(out)
	for n < minN {
		if _, err := r.SubmitAndWait(uint32(minN - n)); err != nil {
			return n, err
		}
		n += r.Peek(out[n:])
	}
	return n, nil
}

// RegisterBuffers registers fixed buffers for OpReadFixed/OpWriteFixed;
// buffer i is addressed by BufIndex i. The kernel pins the pages for the
// life of the registration, so they must be mmap'd memory (Mmap, Slab),
// never the Go heap.
func (r *Ring) RegisterBuffers(bufs [][]byte) error {
	if len(bufs) == 0 {
		return fmt.Errorf("io_uring register buffers: no buffers")
	}
	iov := make([]Iovec, len(bufs))
	for i, b := range bufs {
		iov[i] = Iovec{Base: Addr(b), Len: uint64(len(b))}
	}
	// The kernel copies the iovec array during the call, so Go memory is fine here.
	err := r.register(regBuffers, unsafe.Pointer(unsafe.SliceData(iov)), uint32(len(iov)))
	if err != nil {
		return fmt.Errorf("io_uring register %d buffers: %w", len(bufs), err)
	}
	return nil
}

// UnregisterBuffers drops the fixed buffers.
func (r *Ring) UnregisterBuffers() error {
	if err := r.register(regUnregBuffers, nil, 0); err != nil {
		return fmt.Errorf("io_uring unregister buffers: %w", err)
	}
	return nil
}

// RegisterFiles registers fds as fixed files; with SQEFixedFile an SQE's Fd
// is an index into this table instead of a file descriptor.
func (r *Ring) RegisterFiles(fds []int) error {
	if len(fds) == 0 {
		return fmt.Errorf("io_uring register files: no files")
	}
	table := make([]int32, len(fds))
	for i, fd := range fds {
		table[i] = int32(fd)
	}
	if err := r.register(regFiles, unsafe.Pointer(unsafe.SliceData(table)), uint32(len(table))); err != nil {
		return fmt.Errorf("io_uring register %d files: %w", len(fds), err)
	}
	return nil
}

// UnregisterFiles drops the fixed file table.
func (r *Ring) UnregisterFiles() error {
	if err := r.register(regUnregFiles, nil, 0); err != nil {
		return fmt.Errorf("io_uring unregister files: %w", err)
	}
	return nil
}

// RegisterEventFD makes the kernel signal the eventfd whenever it posts a
// completion, so an owner can sleep in poll/epoll together with other fds.
func (r *Ring) RegisterEventFD(efd int) error {
	v := int32(efd)
	if err := r.register(regEventFD, unsafe.Pointer(&v), 1); err != nil {
		return fmt.Errorf("io_uring register eventfd %d: %w", efd, err)
	}
	return nil
}

// UnregisterEventFD stops eventfd notification.
func (r *Ring) UnregisterEventFD() error {
	if err := r.register(regUnregEventFD, nil, 0); err != nil {
		return fmt.Errorf("io_uring unregister eventfd: %w", err)
	}
	return nil
}

func (r *Ring) register(op uint32, arg unsafe.Pointer, n uint32) error {
	for {
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), uintptr(op), uintptr(arg), uintptr(n), 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return errno
		}
		return nil
	}
}

// NewEventFD returns a non-blocking, close-on-exec eventfd for
// RegisterEventFD.
func NewEventFD() (int, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return -1, fmt.Errorf("eventfd: %w", err)
	}
	return fd, nil
}
