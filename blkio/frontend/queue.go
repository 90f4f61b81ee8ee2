package frontend

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Queue is one started virtqueue with QueueDepth request slots. Slot s owns
// descriptors 3s (header), 3s+1 (data) and 3s+2 (status), a 16-byte header,
// a status byte and a MaxIO data buffer, all in guest memory and reused for
// every request on that slot: nothing is allocated per I/O.
//
// A Queue is driven by one goroutine: Submit any number of free slots, Kick,
// then Reap completions.
type Queue struct {
	dev    *Device
	index  int
	ring   *driverRing
	depth  int
	maxIO  int
	kickFD int
	callFD int

	hdrs      []byte
	hdrGPA    uint64
	status    []byte
	statusGPA uint64
	data      []byte
	dataGPA   uint64
	busy      []bool
	usedBuf   []usedElem
	eventBuf  [8]byte

	// Counters for load reports.
	Kicks      uint64 // kick eventfd writes
	Suppressed uint64 // publishes where the back-end asked not to be kicked
	Waits      uint64 // sleeps on the call eventfd
}

// Completion is one finished request.
type Completion struct {
	Slot   int
	Status byte   // VIRTIO_BLK_S_*, or StatusNone if the back-end wrote none
	Len    uint32 // bytes the back-end says it wrote into device-writable buffers
}

func newQueue(d *Device, index, qsize int, opts Options) (*Queue, error) {
	q := &Queue{dev: d, index: index, depth: opts.QueueDepth, maxIO: opts.MaxIO, kickFD: -1, callFD: -1}
	ds, as, us := ringLayout(qsize)
	desc, _, err := d.mem.alloc(ds, 4096)
	if err != nil {
		return nil, err
	}
	avail, _, err := d.mem.alloc(as, 4096)
	if err != nil {
		return nil, err
	}
	used, _, err := d.mem.alloc(us, 4096)
	if err != nil {
		return nil, err
	}
	if q.ring, err = newDriverRing(qsize, desc, avail, used, d.info.Features&FeatureRingEventIdx != 0); err != nil {
		return nil, err
	}
	if q.hdrs, q.hdrGPA, err = d.mem.alloc(16*q.depth, 4096); err != nil {
		return nil, err
	}
	if q.status, q.statusGPA, err = d.mem.alloc(q.depth, 4096); err != nil {
		return nil, err
	}
	if q.data, q.dataGPA, err = d.mem.alloc(q.depth*q.maxIO, 4096); err != nil {
		return nil, err
	}
	q.busy = make([]bool, q.depth)
	q.usedBuf = make([]usedElem, q.depth)
	if q.kickFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, fmt.Errorf("queue %d kick eventfd: %w", index, err)
	}
	if q.callFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, fmt.Errorf("queue %d call eventfd: %w", index, err)
	}
	return q, nil
}

// Index is the virtqueue number.
func (q *Queue) Index() int { return q.index }

// Depth is the number of request slots.
func (q *Queue) Depth() int { return q.depth }

// MaxIO is the size of each slot's data buffer.
func (q *Queue) MaxIO() int { return q.maxIO }

// Buffer is slot's data buffer: fill it before submitting a write (or a
// discard/write-zeroes segment list), read it after a read completes.
func (q *Queue) Buffer(slot int) []byte {
	return q.data[slot*q.maxIO : (slot+1)*q.maxIO : (slot+1)*q.maxIO]
}

// InFlight is the number of submitted requests not yet reaped.
func (q *Queue) InFlight() int { return q.ring.inFlight() }

// Submit queues a request of type typ at sector with n bytes of slot's
// buffer as its data (n = 0 for FLUSH). It becomes visible to the back-end
// at the next Kick. Bounds and alignment are not checked against the disk:
// judging bad requests is the back-end's job, and tests rely on sending them.
func (q *Queue) Submit(slot int, typ uint32, sector uint64, n int) error {
	if slot < 0 || slot >= q.depth {
		return fmt.Errorf("queue %d: slot %d out of range 0..%d", q.index, slot, q.depth-1)
	}
	if q.busy[slot] {
		return fmt.Errorf("queue %d: slot %d is still in flight", q.index, slot)
	}
	if n < 0 || n > q.maxIO {
		return fmt.Errorf("queue %d: request of %d bytes exceeds the %d-byte slot buffer", q.index, n, q.maxIO)
	}
	var dataFlags uint16
	switch typ {
	case TypeIn, TypeGetID:
		dataFlags = descFWrite
	case TypeOut, TypeDiscard, TypeWriteZeroes, TypeFlush:
	default:
		return fmt.Errorf("queue %d: unknown virtio-blk request type %d", q.index, typ)
	}
	putReqHeader(q.hdrs[16*slot:], typ, sector)
	q.status[slot] = StatusNone
	d0, d1, d2 := uint16(descPerReq*slot), uint16(descPerReq*slot+1), uint16(descPerReq*slot+2)
	r := q.ring
	if n > 0 {
		r.setDesc(d0, q.hdrGPA+uint64(16*slot), 16, descFNext, d1)
		r.setDesc(d1, q.dataGPA+uint64(slot*q.maxIO), uint32(n), dataFlags|descFNext, d2)
	} else {
		r.setDesc(d0, q.hdrGPA+uint64(16*slot), 16, descFNext, d2)
	}
	r.setDesc(d2, q.statusGPA+uint64(slot), 1, descFWrite, 0)
	r.push(d0)
	q.busy[slot] = true
	return nil
}

// Do runs one request in slot 0 and waits for it, on a queue with nothing
// else in flight. The error is the front-end's (submit, kick, reap); how
// the back-end judged the request is the completion's Status.
func (q *Queue) Do(typ uint32, sector uint64, n int) (Completion, error) {
	if err := q.Submit(0, typ, sector, n); err != nil {
		return Completion{}, err
	}
	if err := q.Kick(); err != nil {
		return Completion{}, err
	}
	var c [1]Completion
	if _, err := q.Reap(c[:], 1); err != nil {
		return Completion{}, err
	}
	return c[0], nil
}

// Kick publishes submitted requests and notifies the back-end unless it has
// asked not to be (EVENT_IDX avail_event or VRING_USED_F_NO_NOTIFY).
func (q *Queue) Kick() error {
	if q.ring.availIdx == q.ring.published {
		return nil
	}
	if !q.ring.publish() {
		q.Suppressed++
		return nil
	}
	q.Kicks++
	binary.LittleEndian.PutUint64(q.eventBuf[:], 1)
	if _, err := unix.Write(q.kickFD, q.eventBuf[:]); err != nil && !errors.Is(err, unix.EAGAIN) {
		return fmt.Errorf("queue %d kick: %w", q.index, err)
	}
	return nil
}

// Reap moves finished requests into out and returns how many. It sleeps on
// the call eventfd until at least min have finished (min is capped at the
// number in flight, so it cannot wait forever for requests never submitted).
// A back-end that returns a descriptor we did not submit is reported as an
// error: the front-end's state can no longer be trusted.
func (q *Queue) Reap(out []Completion, min int) (int, error) {
	if f := q.InFlight(); min > f {
		min = f
	}
	if min > len(out) {
		min = len(out)
	}
	got := 0
	for {
		if q.dev.aborted.Load() {
			return got, ErrAborted
		}
		want := len(out) - got
		if want > len(q.usedBuf) {
			want = len(q.usedBuf)
		}
		n := q.ring.harvest(q.usedBuf[:want])
		for _, e := range q.usedBuf[:n] {
			slot := int(e.id / descPerReq)
			if e.id%descPerReq != 0 || slot >= q.depth || !q.busy[slot] {
				return got, fmt.Errorf("queue %d: back-end completed descriptor %d, which is not the head of an in-flight request", q.index, e.id)
			}
			q.busy[slot] = false
			out[got] = Completion{Slot: slot, Status: q.status[slot], Len: e.len}
			got++
		}
		if got >= min || got == len(out) {
			return got, nil
		}
		if q.ring.armInterrupt() {
			continue
		}
		q.Waits++
		if err := q.sleep(); err != nil {
			return got, err
		}
	}
}

// sleep waits for the call eventfd and drains it. The back-end may have
// switched the fd to non-blocking (the file status flags are shared with
// our descriptor; QEMU's event loop does so), so wait with poll rather
// than a blocking read.
func (q *Queue) sleep() error {
	pfd := []unix.PollFd{{Fd: int32(q.callFD), Events: unix.POLLIN}}
	for {
		_, err := unix.Read(q.callFD, q.eventBuf[:])
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("queue %d wait for completion: %w", q.index, err)
		}
		if _, err := unix.Poll(pfd, -1); err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("queue %d wait for completion: poll: %w", q.index, err)
		}
	}
}

// wake unblocks a Reap sleeping on the call eventfd.
func (q *Queue) wake() {
	if q.callFD >= 0 {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], 1)
		unix.Write(q.callFD, b[:])
	}
}

func (q *Queue) close() {
	closeFD(&q.kickFD)
	closeFD(&q.callFD)
}
