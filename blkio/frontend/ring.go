package frontend

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// Split-ring descriptor flags.
const (
	descFNext  uint16 = 1
	descFWrite uint16 = 2
)

const (
	usedFNoNotify uint16 = 1
	descSize             = 16
	usedElemSize         = 8
)

// ringLayout gives the sizes of the three parts of a split ring of size q,
// each padded so that the 16-bit event fields at their ends can be accessed
// as the low half of an aligned 32-bit word (Go has no 16-bit atomics).
func ringLayout(q int) (desc, avail, used int) {
	return descSize * q, 4 + 2*q + 4, 4 + usedElemSize*q + 4
}

// driverRing is the driver (front-end) side of one split virtqueue living
// in memory shared with the back-end. It only reads and writes its three
// slices, so it can be tested against an in-process device model.
//
// Memory ordering: the avail index is published with a 32-bit atomic store
// of the avail flags+idx word, after the ring slots are written; the used
// index is read with an atomic load before the used elements. Go atomics
// are sequentially consistent, which also gives the full barrier the spec
// asks for between publishing an index and reading the peer's event field.
type driverRing struct {
	q        uint16
	desc     []byte
	avail    []byte
	used     []byte
	eventIdx bool

	availIdx  uint16 // next avail slot to fill (not yet visible until publish)
	published uint16 // avail idx at the last publish
	lastUsed  uint16 // next used slot to read
}

func newDriverRing(q int, desc, avail, used []byte, eventIdx bool) (*driverRing, error) {
	if q <= 0 || q > 32768 || q&(q-1) != 0 {
		return nil, fmt.Errorf("virtqueue size %d is not a power of two in 1..32768", q)
	}
	d, a, u := ringLayout(q)
	if len(desc) < d || len(avail) < a || len(used) < u {
		return nil, fmt.Errorf("virtqueue of size %d needs %d/%d/%d bytes, got %d/%d/%d", q, d, a, u, len(desc), len(avail), len(used))
	}
	for _, b := range [][]byte{avail, used} {
		if uintptr(unsafe.Pointer(&b[0]))%4 != 0 {
			return nil, fmt.Errorf("virtqueue avail/used ring is not 4-byte aligned")
		}
	}
	return &driverRing{q: uint16(q), desc: desc, avail: avail, used: used, eventIdx: eventIdx}, nil
}

func word(b []byte, off int) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }

// setDesc fills descriptor i. The back-end reads it only after the avail
// index that covers it is published.
func (r *driverRing) setDesc(i uint16, addr uint64, length uint32, flags, next uint16) {
	d := r.desc[int(i)*descSize:]
	binary.LittleEndian.PutUint64(d[0:], addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

// push queues chain head for the back-end; it becomes visible at publish.
func (r *driverRing) push(head uint16) {
	binary.LittleEndian.PutUint16(r.avail[4+2*int(r.availIdx&(r.q-1)):], head)
	r.availIdx++
}

// publish makes every pushed head visible and reports whether the back-end
// asked to be kicked for them (EVENT_IDX avail_event, or used NO_NOTIFY).
func (r *driverRing) publish() bool {
	if r.availIdx == r.published {
		return false
	}
	old, cur := r.published, r.availIdx
	// avail.flags stays 0: we always want interrupts (we sleep on the call fd).
	atomic.StoreUint32(word(r.avail, 0), uint32(cur)<<16)
	r.published = cur
	if r.eventIdx {
		ev := uint16(atomic.LoadUint32(word(r.used, 4+usedElemSize*int(r.q))))
		return needEvent(ev, cur, old)
	}
	return uint16(atomic.LoadUint32(word(r.used, 0)))&usedFNoNotify == 0
}

// needEvent is vring_need_event: has the index moved past event since old?
func needEvent(event, newIdx, old uint16) bool {
	return newIdx-event-1 < newIdx-old
}

// pending reports whether the back-end has published used entries we have
// not read.
func (r *driverRing) pending() bool {
	return uint16(atomic.LoadUint32(word(r.used, 0))>>16) != r.lastUsed
}

// harvest copies up to len(out) new used elements into out.
func (r *driverRing) harvest(out []usedElem) int {
	idx := uint16(atomic.LoadUint32(word(r.used, 0)) >> 16)
	n := 0
	for r.lastUsed != idx && n < len(out) {
		e := r.used[4+usedElemSize*int(r.lastUsed&(r.q-1)):]
		out[n] = usedElem{id: binary.LittleEndian.Uint32(e), len: binary.LittleEndian.Uint32(e[4:])}
		r.lastUsed++
		n++
	}
	return n
}

// armInterrupt asks the back-end to signal the call fd at the next used
// entry and reports whether entries arrived meanwhile, in which case the
// caller must harvest instead of sleeping (the lost-wakeup recheck).
func (r *driverRing) armInterrupt() bool {
	if r.eventIdx {
		// used_event shares its 32-bit word with our own padding.
		atomic.StoreUint32(word(r.avail, 4+2*int(r.q)), uint32(r.lastUsed))
	}
	return r.pending()
}

// inFlight is how many pushed heads have not come back in the used ring.
func (r *driverRing) inFlight() int { return int(uint16(r.availIdx - r.lastUsed)) }

type usedElem struct {
	id  uint32
	len uint32
}
