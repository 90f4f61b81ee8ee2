package virtioblk

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/blkio/inflight"
	"github.com/virtblk/virtblk/blkio/metrics"
	"github.com/virtblk/virtblk/blkio/virtq"
	"github.com/virtblk/virtblk/storage"
)

// WorkerConfig wires one virtqueue to its worker.
type WorkerConfig struct {
	Index  int
	Queue  *virtq.Queue
	Volume storage.Queue
	KickFD int // eventfd the driver kicks; -1 = poll only
	CallFD int // eventfd to interrupt the driver; -1 = none
	ErrFD  int // eventfd to report a broken ring; -1 = none
	// Inflight tracks fetched heads in the front-end's shared region
	// (nil without INFLIGHT_SHMFD).
	Inflight *inflight.Queue
	// Resubmit are heads recovered from Inflight, fetched again first.
	Resubmit []uint16
	// PollDuration is how long to busy-poll the ring and the volume
	// before sleeping (0 = never).
	PollDuration time.Duration
	// Metrics receives this queue's request counts and latencies (nil =
	// off; then the hot path pays one nil check per request).
	Metrics *metrics.QueueStats
	Log     *slog.Logger
}

type slot struct {
	busy    bool
	flushed bool // write-through: the write finished, its flush is pending
	chain   virtq.Chain
	req     Request
	// sreq is the storage request; its Bufs array belongs to the slot so
	// it stays untouched until the volume completes the request.
	sreq storage.Request
	// For metrics: when the request was taken from the ring (the worker's
	// clock) and what it is.
	start int64
	op    metrics.Op
}

// Worker runs one virtqueue. All its state is private; Run owns it.
type Worker struct {
	dev     *Device
	cfg     WorkerConfig
	q       *virtq.Queue
	slots   []slot
	scratch virtq.Chain
	subs    []storage.Request
	comps   []storage.Completion
	batch   []uint16 // heads completed since the last publish
	out     int      // requests at the volume
	broken  error
	stopFD  int
	epfd    int
	log     *slog.Logger
	// completed counts requests finished by this worker (for the stop log).
	completed uint64
	// Metrics clock: nanoseconds since epoch, read at most once per batch
	// of fetches or completions (0 = not read yet for this batch).
	epoch time.Time
	tnow  int64
}

// NewWorker prepares a worker; call Run on its own goroutine and Stop to end
// it.
func (d *Device) NewWorker(cfg WorkerConfig) (*Worker, error) {
	n := int(cfg.Queue.Size())
	w := &Worker{
		dev: d, cfg: cfg, q: cfg.Queue, slots: make([]slot, n),
		subs: make([]storage.Request, 0, n), comps: make([]storage.Completion, n),
		batch: make([]uint16, 0, n), log: cfg.Log, epfd: -1, epoch: time.Now(),
	}
	if w.log == nil {
		w.log = slog.Default()
	}
	w.log = w.log.With("queue", cfg.Index)
	for i := range w.slots {
		w.slots[i].req.Data = make([][]byte, 0, 4)
		w.slots[i].chain.Readable = make([][]byte, 0, 4)
		w.slots[i].chain.Writable = make([][]byte, 0, 4)
		w.slots[i].sreq.Bufs = make([][]byte, 0, 4)
	}
	var err error
	if w.stopFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, fmt.Errorf("queue %d: stop eventfd: %w", cfg.Index, err)
	}
	if w.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		unix.Close(w.stopFD)
		return nil, fmt.Errorf("queue %d: epoll: %w", cfg.Index, err)
	}
	for _, fd := range []int{cfg.KickFD, cfg.Volume.NotifyFD(), w.stopFD} {
		if fd < 0 {
			continue
		}
		// Edge-triggered: every eventfd write queues one wakeup, so the
		// counters never need reading (a read(2) per fd per wakeup was a
		// third of the syscalls of a QD1 request). The loop re-checks the
		// ring and the volume after every wakeup, so none is lost.
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(fd)}
		if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			w.closeFDs()
			return nil, fmt.Errorf("queue %d: epoll add fd %d: %w", cfg.Index, fd, err)
		}
	}
	return w, nil
}

func (w *Worker) closeFDs() {
	unix.Close(w.epfd)
	unix.Close(w.stopFD)
}

// Stop asks Run to finish the requests in flight and return. Safe to call
// from any goroutine, once.
func (w *Worker) Stop() {
	var one [8]byte
	one[0] = 1
	unix.Write(w.stopFD, one[:])
}

// Err is the ring error that broke the queue, if any (valid after Run).
func (w *Worker) Err() error { return w.broken }

// Run is the I/O loop. It returns after Stop once nothing is in flight at
// the volume, with every completion published to the used ring.
func (w *Worker) Run() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer w.closeFDs()
	defer func() { w.log.Info("queue stopped", "requests", w.completed) }()
	stopping := false
	events := make([]unix.EpollEvent, 4)
	w.tnow = 0
	for _, h := range w.cfg.Resubmit {
		w.fetch(h, true)
	}
	w.cfg.Resubmit = nil
	for {
		progress := false
		w.tnow = 0
		if !stopping && w.broken == nil {
			progress = w.drainAvail()
		}
		if w.submit() {
			progress = true
		}
		if w.reap() {
			progress = true
		}
		w.publish()
		if stopping && w.out == 0 && len(w.subs) == 0 {
			return
		}
		if progress {
			continue
		}
		if !stopping && w.broken == nil && w.poll() {
			continue
		}
		if !stopping && w.broken == nil {
			more, err := w.q.EnableNotify()
			if err != nil {
				w.fail(err)
			} else if more {
				continue
			}
		}
		n, err := unix.EpollWait(w.epfd, events, -1)
		if err != nil && !errors.Is(err, unix.EINTR) {
			w.log.Error("epoll wait failed; stopping queue", "err", err)
			return
		}
		for _, ev := range events[:max(n, 0)] {
			if int(ev.Fd) == w.stopFD {
				stopping = true
			}
		}
		if !stopping && w.broken == nil {
			w.q.DisableNotify()
		}
	}
}

// poll spins on the ring and the volume for PollDuration; it reports
// whether work appeared.
func (w *Worker) poll() bool {
	if w.cfg.PollDuration <= 0 {
		return false
	}
	deadline := time.Now().Add(w.cfg.PollDuration)
	for time.Now().Before(deadline) {
		if n, err := w.q.Pending(); n > 0 || err != nil {
			return true
		}
		if w.out > 0 {
			if k, _ := w.cfg.Volume.Reap(w.comps, 0); k > 0 {
				w.complete(w.comps[:k])
				w.publish()
				return true
			}
		}
	}
	return false
}

// drainAvail fetches every available chain and prepares its request.
func (w *Worker) drainAvail() bool {
	got := false
	for {
		ok, err := w.q.Next(&w.scratch)
		if err != nil {
			w.fail(err)
			return got
		}
		if !ok {
			return got
		}
		got = true
		head := w.scratch.Head
		s := &w.slots[head]
		if s.busy {
			// The driver made a head available twice; completing it twice
			// would corrupt the guest's bookkeeping.
			w.fail(fmt.Errorf("%w: head %d made available while in flight", virtq.ErrBroken, head))
			return got
		}
		s.chain, w.scratch = w.scratch, s.chain
		w.fetch(head, false)
		if w.broken != nil {
			return got
		}
	}
}

// fetch starts the request at head; resubmit walks the chain first
// (inflight recovery, the avail ring has already moved past it).
func (w *Worker) fetch(head uint16, resubmit bool) {
	s := &w.slots[head]
	if resubmit {
		if err := w.q.Walk(head, &s.chain); err != nil {
			w.fail(err)
			return
		}
	}
	if w.cfg.Inflight != nil && !resubmit {
		w.cfg.Inflight.Get(head)
	}
	s.busy, s.flushed = true, false
	ok, err := Parse(&s.chain, &s.req)
	if err != nil {
		s.busy = false
		w.fail(fmt.Errorf("%w: %v", virtq.ErrBroken, err))
		return
	}
	if m := w.cfg.Metrics; m != nil {
		// From here on the request always reaches finish, which observes it.
		m.Begin()
		s.start = w.clock()
		s.op = metrics.OpOther // a short header has no type
		if ok {
			s.op = metrics.OpFromVirtio(s.req.Type)
		}
	}
	if !ok {
		w.finish(head, SIOErr)
		return
	}
	submit, status := w.dev.Prepare(&s.req, &s.sreq)
	if !submit {
		w.finish(head, status)
		return
	}
	s.sreq.Tag = uint64(head)
	w.subs = append(w.subs, s.sreq)
}

func (w *Worker) submit() bool {
	if len(w.subs) == 0 {
		return false
	}
	if err := w.cfg.Volume.Submit(w.subs); err != nil {
		w.log.Error("volume submit failed; failing the batch", "requests", len(w.subs), "err", err)
		for i := range w.subs {
			w.finish(uint16(w.subs[i].Tag), SIOErr)
		}
	} else {
		w.out += len(w.subs)
	}
	w.subs = w.subs[:0]
	return true
}

func (w *Worker) reap() bool {
	if w.out == 0 {
		return false
	}
	n, err := w.cfg.Volume.Reap(w.comps, 0)
	if err != nil {
		w.log.Error("volume reap failed", "err", err)
		return false
	}
	w.complete(w.comps[:n])
	return n > 0
}

func (w *Worker) complete(cs []storage.Completion) {
	w.out -= len(cs)
	w.tnow = 0 // completion time of this batch, read on first use
	for _, c := range cs {
		head := uint16(c.Tag)
		if int(head) >= len(w.slots) || !w.slots[head].busy {
			w.log.Error("volume completed an unknown request", "tag", c.Tag)
			continue
		}
		s := &w.slots[head]
		if c.Err != nil {
			w.log.Warn("request failed", "head", head, "type", s.req.Type, "sector", s.req.Sector, "err", c.Err)
			w.finishAs(head, StatusOf(c.Err), metrics.StatusOf(c.Err))
			continue
		}
		// Write-through: a write is complete only once it is stable, so
		// follow it with a flush (which covers every completed write).
		if s.req.Type == TOut && !s.flushed && !w.dev.Writeback() {
			s.flushed = true
			w.subs = append(w.subs, storage.Request{Op: storage.OpFlush, Tag: uint64(head)})
			continue
		}
		w.finish(head, SOK)
	}
}

// finish writes the status and queues the used entry.
func (w *Worker) finish(head uint16, status byte) {
	w.finishAs(head, status, metrics.Status(status))
}

// finishAs is finish with the metrics' view of how the request ended (a
// checksum failure is IOERR to the guest but counted apart).
func (w *Worker) finishAs(head uint16, status byte, ms metrics.Status) {
	s := &w.slots[head]
	s.req.Status[0] = status
	written := s.req.Written
	if status != SOK {
		written = 1
	}
	if m := w.cfg.Metrics; m != nil {
		m.Observe(s.op, s.bytes(status), time.Duration(w.clock()-s.start), ms)
	}
	w.q.Push(head, written)
	s.busy = false
	w.batch = append(w.batch, head)
	w.completed++
}

// publish makes the batch visible with one used.idx store and at most one
// interrupt, keeping the inflight region consistent across a crash.
func (w *Worker) publish() {
	if len(w.batch) == 0 {
		return
	}
	inf := w.cfg.Inflight
	if inf != nil {
		inf.PrePut(w.batch)
	}
	w.q.Publish()
	if inf != nil {
		inf.PostPut(w.batch, w.q.UsedIdx())
	}
	w.batch = w.batch[:0]
	if w.cfg.CallFD >= 0 && w.q.NeedNotify() {
		signal(w.cfg.CallFD)
	}
}

// clock reads the metrics clock once per batch: requests fetched (or
// completed) together share one reading, which keeps the clock off the
// per-request cost.
func (w *Worker) clock() int64 {
	if w.tnow == 0 {
		// time.Since of a time with a monotonic reading is one vDSO
		// clock read; +1 keeps it from being 0 ("not read yet").
		w.tnow = int64(time.Since(w.epoch)) + 1
	}
	return w.tnow
}

// bytes is what a finished request moved, for the bytes counter: the data
// length of a read or write, the range of a discard or write-zeroes, the ID
// bytes of GET_ID; nothing for a failed request.
func (s *slot) bytes(status byte) uint64 {
	if status != SOK {
		return 0
	}
	switch s.op {
	case metrics.OpRead, metrics.OpWrite:
		return s.req.DataLen
	case metrics.OpDiscard, metrics.OpWriteZeroes:
		return s.sreq.Length
	case metrics.OpGetID:
		return uint64(s.req.Written) - 1
	}
	return 0
}

func signal(fd int) {
	var one [8]byte
	one[0] = 1
	unix.Write(fd, one[:])
}

// fail marks the queue broken: no more fetching; requests already at the
// volume still complete so guest memory is not written after we return.
func (w *Worker) fail(err error) {
	if w.broken != nil {
		return
	}
	w.broken = err
	w.log.Error("virtqueue broken by the driver; queue stopped until reset", "err", err)
	if w.cfg.ErrFD >= 0 {
		signal(w.cfg.ErrFD)
	}
}
