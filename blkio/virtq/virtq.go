// Package virtq owns the device side of one split virtqueue: reading
// available descriptor chains out of guest memory, publishing used entries,
// notification suppression (including VIRTIO_F_EVENT_IDX), and the ordering
// rules between the two. Everything the guest wrote is treated as hostile:
// indices, chain links, lengths and addresses are bounds-checked, and a
// malformed ring yields an error, never a panic or an out-of-range access.
//
// A Queue is used by exactly one goroutine (its worker); nothing here locks.
package virtq

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/virtblk/virtblk/blkio/guestmem"
)

// Descriptor flags.
const (
	DescFNext     = 1
	DescFWrite    = 2
	DescFIndirect = 4
)

// Ring flags.
const (
	availFNoInterrupt = 1
	usedFNoNotify     = 1
)

const descSize = 16

// MaxSize is the largest split queue we accept (the spec's limit).
const MaxSize = 32768

// MaxChainLimit bounds any descriptor chain, as QEMU's VIRTQUEUE_MAX_SIZE
// does: it keeps a looping or over-long chain from pinning a worker.
const MaxChainLimit = 1024

// ErrBroken is wrapped by every error that means the driver violated the
// ring protocol; the device must stop the queue and ask for a reset.
var ErrBroken = errors.New("virtqueue broken by driver")

// Config locates a queue. Desc, Avail and Used are the host bytes of the
// three ring parts (already translated from front-end addresses).
type Config struct {
	Size     uint16
	Desc     []byte
	Avail    []byte
	Used     []byte
	Mem      *guestmem.Memory
	EventIdx bool // VIRTIO_F_EVENT_IDX negotiated
	Indirect bool // VIRTIO_F_INDIRECT_DESC negotiated
	// MaxChain bounds the descriptors of one chain, indirect entries
	// included; 0 means Size. It may exceed Size: a driver sizes indirect
	// tables from the device's seg_max, not from the ring size the
	// front-end picked (Linux with queue-size=128 and seg_max=254 sends
	// 163-entry tables). At most MaxChainLimit.
	MaxChain int
}

// Sizes of the ring parts for a queue of size n with EVENT_IDX fields.
func DescBytes(n uint16) uint64  { return descSize * uint64(n) }
func AvailBytes(n uint16) uint64 { return 6 + 2*uint64(n) }
func UsedBytes(n uint16) uint64  { return 6 + 8*uint64(n) }

// Queue is the device side of a split virtqueue.
type Queue struct {
	size     uint16
	mask     uint16
	desc     []byte
	avail    []byte
	used     []byte
	mem      *guestmem.Memory
	eventIdx bool
	indirect bool
	maxChain int

	lastAvail uint16 // next avail slot to read
	usedIdx   uint16 // shadow of used.idx including unpublished entries
	pubUsed   uint16 // last published used.idx
	signalled uint16 // used.idx at the last notification
	sigValid  bool
	noNotify  bool // our copy of used.flags

	fence uint32
}

// New checks cfg and returns a queue positioned at avail index base.
func New(cfg Config, base uint16) (*Queue, error) {
	n := cfg.Size
	if n == 0 || n&(n-1) != 0 || n > MaxSize {
		return nil, fmt.Errorf("queue size %d: must be a power of two up to %d", n, MaxSize)
	}
	if uint64(len(cfg.Desc)) < DescBytes(n) || uint64(len(cfg.Avail)) < AvailBytes(n) || uint64(len(cfg.Used)) < UsedBytes(n) {
		return nil, fmt.Errorf("queue size %d: ring areas too small (desc %d, avail %d, used %d bytes)", n, len(cfg.Desc), len(cfg.Avail), len(cfg.Used))
	}
	// The spec requires 16/2/4-byte alignment; used must be 4-aligned
	// because we publish used.idx with a 32-bit atomic store.
	if addr(cfg.Desc)%16 != 0 || addr(cfg.Avail)%2 != 0 || addr(cfg.Used)%4 != 0 {
		return nil, fmt.Errorf("queue size %d: ring areas misaligned (desc %#x, avail %#x, used %#x)", n, addr(cfg.Desc), addr(cfg.Avail), addr(cfg.Used))
	}
	mc := cfg.MaxChain
	if mc <= 0 {
		mc = int(n)
	}
	mc = min(mc, MaxChainLimit)
	q := &Queue{
		size: n, mask: n - 1, desc: cfg.Desc, avail: cfg.Avail, used: cfg.Used, mem: cfg.Mem,
		eventIdx: cfg.EventIdx, indirect: cfg.Indirect, maxChain: mc,
		lastAvail: base,
	}
	q.usedIdx = q.loadUsedIdx()
	q.pubUsed = q.usedIdx
	return q, nil
}

func addr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// Size is the queue size.
func (q *Queue) Size() uint16 { return q.size }

// LastAvail is the next available-ring index the device will read
// (GET_VRING_BASE reports it).
func (q *Queue) LastAvail() uint16 { return q.lastAvail }

// SetLastAvail repositions the avail cursor (inflight recovery).
func (q *Queue) SetLastAvail(v uint16) { q.lastAvail = v }

// UsedIdx is the device's used index including unpublished entries.
func (q *Queue) UsedIdx() uint16 { return q.usedIdx }

// load16 reads a guest u16 with acquire semantics. Go has no 16-bit atomic,
// so it loads the naturally aligned 32-bit word that contains the field;
// that word never leaves the field's page, so it is always mapped.
func load16(b []byte, off int) uint16 {
	_ = b[off+1] // bounds check both bytes
	p := unsafe.Pointer(&b[off])
	mis := uintptr(p) & 3 // 0 or 2: fields are 2-aligned
	w := atomic.LoadUint32((*uint32)(unsafe.Add(p, -int(mis))))
	return uint16(w >> (mis * 8))
}

func (q *Queue) availIdx() uint16    { return load16(q.avail, 2) }
func (q *Queue) availFlags() uint16  { return load16(q.avail, 0) }
func (q *Queue) usedEvent() uint16   { return load16(q.avail, 4+2*int(q.size)) }
func (q *Queue) loadUsedIdx() uint16 { return load16(q.used, 2) }

// fullFence orders earlier stores before later loads (store-load), which
// neither x86 TSO nor Go's plain accesses give; a locked RMW does.
func (q *Queue) fullFence() { atomic.AddUint32(&q.fence, 1) }

// Pending reports how many chains the driver has made available that the
// device has not read yet. A jump of more than the queue size is a driver
// bug (or attack) that would make the device re-read stale slots forever.
func (q *Queue) Pending() (uint16, error) {
	n := q.availIdx() - q.lastAvail
	if n > q.size {
		return 0, fmt.Errorf("%w: avail idx %d is %d ahead of %d, queue size %d", ErrBroken, q.availIdx(), n, q.lastAvail, q.size)
	}
	return n, nil
}

// Chain is one descriptor chain translated to host memory: the
// device-readable buffers, then the device-writable ones.
type Chain struct {
	Head     uint16
	Readable [][]byte
	Writable [][]byte
	ReadLen  uint64
	WriteLen uint64
}

func (c *Chain) reset(head uint16) {
	c.Head = head
	c.Readable = c.Readable[:0]
	c.Writable = c.Writable[:0]
	c.ReadLen, c.WriteLen = 0, 0
}

// Next reads the next available head and walks its chain into c. It
// returns false when the ring is empty. Storage in c is reused.
func (q *Queue) Next(c *Chain) (bool, error) {
	n, err := q.Pending()
	if err != nil || n == 0 {
		return false, err
	}
	// The acquire load of avail.idx in Pending orders the reads below.
	head := binary.LittleEndian.Uint16(q.avail[4+2*int(q.lastAvail&q.mask):])
	q.lastAvail++
	// avail_event is left where EnableNotify put it: while the device is
	// awake and draining, the driver's later buffers pass an old event
	// index and it does not kick (a kick costs the guest a VM exit and the
	// device a wakeup). EnableNotify moves it up before the device sleeps.
	if err := q.Walk(head, c); err != nil {
		return false, err
	}
	return true, nil
}

// Walk translates the chain that starts at head into c without touching the
// avail ring (inflight resubmission uses it directly).
func (q *Queue) Walk(head uint16, c *Chain) error {
	c.reset(head)
	if head >= q.size {
		return fmt.Errorf("%w: head %d >= queue size %d", ErrBroken, head, q.size)
	}
	table := q.desc
	tableLen := uint32(q.size)
	idx := uint32(head)
	budget := q.maxChain
	inIndirect := false
	for {
		if idx >= tableLen {
			return fmt.Errorf("%w: chain %d: descriptor index %d >= table size %d", ErrBroken, head, idx, tableLen)
		}
		// A chain longer than the budget is either a loop or over-long;
		// both would let the driver pin the device thread.
		if budget == 0 {
			return fmt.Errorf("%w: chain %d longer than %d descriptors (loop?)", ErrBroken, head, q.maxChain)
		}
		budget--
		d := table[idx*descSize : idx*descSize+descSize]
		gpa := binary.LittleEndian.Uint64(d)
		ln := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&DescFIndirect != 0 {
			if !q.indirect {
				return fmt.Errorf("%w: chain %d: indirect descriptor without VIRTIO_F_INDIRECT_DESC", ErrBroken, head)
			}
			if inIndirect {
				return fmt.Errorf("%w: chain %d: nested indirect table", ErrBroken, head)
			}
			if flags&DescFNext != 0 {
				return fmt.Errorf("%w: chain %d: indirect descriptor with NEXT", ErrBroken, head)
			}
			if ln == 0 || ln%descSize != 0 || ln/descSize > uint32(q.maxChain) {
				return fmt.Errorf("%w: chain %d: indirect table of %d bytes", ErrBroken, head, ln)
			}
			t, err := q.mem.Slice(gpa, uint64(ln))
			if err != nil {
				return fmt.Errorf("%w: chain %d: indirect table: %v", ErrBroken, head, err)
			}
			table, tableLen, idx, inIndirect = t, ln/descSize, 0, true
			continue
		}
		if flags&DescFWrite != 0 {
			var err error
			if c.Writable, err = q.mem.AppendSlices(c.Writable, gpa, uint64(ln)); err != nil {
				return fmt.Errorf("%w: chain %d: %v", ErrBroken, head, err)
			}
			c.WriteLen += uint64(ln)
		} else {
			if len(c.Writable) > 0 {
				return fmt.Errorf("%w: chain %d: readable descriptor after a writable one", ErrBroken, head)
			}
			var err error
			if c.Readable, err = q.mem.AppendSlices(c.Readable, gpa, uint64(ln)); err != nil {
				return fmt.Errorf("%w: chain %d: %v", ErrBroken, head, err)
			}
			c.ReadLen += uint64(ln)
		}
		if c.ReadLen+c.WriteLen > 1<<32 {
			return fmt.Errorf("%w: chain %d: more than 4 GiB", ErrBroken, head)
		}
		if flags&DescFNext == 0 {
			return nil
		}
		idx = uint32(next)
	}
}

func (q *Queue) setAvailEvent(v uint16) {
	binary.LittleEndian.PutUint16(q.used[4+8*int(q.size):], v)
}

// Push records a used entry without publishing it; Publish makes a batch
// visible with one index store.
func (q *Queue) Push(head uint16, written uint32) {
	e := q.used[4+8*int(q.usedIdx&q.mask):]
	binary.LittleEndian.PutUint32(e, uint32(head))
	binary.LittleEndian.PutUint32(e[4:], written)
	q.usedIdx++
}

// Publish stores used.idx (with our used.flags) in one 32-bit atomic store,
// which is a release: the entries, and the data written into guest buffers
// before them, become visible first.
func (q *Queue) Publish() {
	if q.pubUsed == q.usedIdx {
		return
	}
	var flags uint32
	if q.noNotify {
		flags = usedFNoNotify
	}
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&q.used[0])), flags|uint32(q.usedIdx)<<16)
	q.pubUsed = q.usedIdx
}

// NeedNotify decides whether the driver wants an interrupt for what has
// been published since the last notification, and if so records it as
// signalled.
func (q *Queue) NeedNotify() bool {
	q.fullFence() // used.idx store before the suppression loads
	if !q.eventIdx {
		if q.availFlags()&availFNoInterrupt != 0 {
			return false
		}
		q.signalled = q.pubUsed
		return true
	}
	old, valid := q.signalled, q.sigValid
	q.signalled, q.sigValid = q.pubUsed, true
	if !valid {
		return true
	}
	if old == q.pubUsed {
		return false
	}
	ev := q.usedEvent()
	// vring_need_event: notify if event index lies in (old, new].
	return q.pubUsed-ev-1 < q.pubUsed-old
}

// ResetSignalled forgets the last notification, so the next NeedNotify
// notifies (after a reconnect the guest may have missed one).
func (q *Queue) ResetSignalled() { q.sigValid = false }

// EnableNotify asks the driver to kick on new buffers and reports whether
// buffers arrived in the meantime (then the caller must process them rather
// than sleep, or it would miss a kick the driver decided not to send).
func (q *Queue) EnableNotify() (bool, error) {
	if q.eventIdx {
		q.setAvailEvent(q.lastAvail)
	} else if q.noNotify {
		q.noNotify = false
		q.storeUsedFlags()
	}
	q.fullFence()
	n, err := q.Pending()
	return n > 0, err
}

// DisableNotify asks the driver not to kick while the device is polling.
// With EVENT_IDX there is nothing to do: avail_event only moves in
// EnableNotify, so once the driver has kicked past it, it stays quiet.
func (q *Queue) DisableNotify() {
	if q.eventIdx || q.noNotify {
		return
	}
	q.noNotify = true
	q.storeUsedFlags()
}

func (q *Queue) storeUsedFlags() {
	var flags uint32
	if q.noNotify {
		flags = usedFNoNotify
	}
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&q.used[0])), flags|uint32(q.pubUsed)<<16)
}
