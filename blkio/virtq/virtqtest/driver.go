// Package virtqtest plays the guest driver of a split virtqueue in tests:
// it lays out the descriptor table and both rings in real shared memory (a
// memfd), builds descriptor chains (direct or indirect), makes them
// available, and reads used entries back. Device-side code under test runs
// unchanged against it. Malformed rings are built with SetDesc/PutAvail.
package virtqtest

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/blkio/guestmem"
	"github.com/virtblk/virtblk/blkio/virtq"
)

// Guest is guest RAM backed by one memfd with GPA 0 == file offset 0 and a
// fake front-end virtual address UserBase.
type Guest struct {
	FD     int
	Region *guestmem.Region
	Mem    *guestmem.Memory
	Host   []byte
	next   uint64
}

// UserBase is the pretend front-end VA of GPA 0.
const UserBase = 0x7f0000000000

// NewGuest creates size bytes of guest memory.
func NewGuest(size uint64) (*Guest, error) {
	fd, err := unix.MemfdCreate("virtqtest-guest", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, err
	}
	r, err := guestmem.MapRegion(fd, guestmem.Spec{GuestAddr: 0, Size: size, UserAddr: UserBase})
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	m, _ := guestmem.New(r)
	return &Guest{FD: fd, Region: r, Mem: m, Host: r.Host(), next: 4096}, nil
}

// Close unmaps and closes the memory.
func (g *Guest) Close() {
	g.Region.Unmap()
	unix.Close(g.FD)
}

// Reset zeroes the memory and forgets every allocation.
func (g *Guest) Reset() {
	clear(g.Host)
	g.next = 4096
}

// Alloc returns n bytes of guest memory aligned to align (a power of two).
func (g *Guest) Alloc(n, align uint64) (uint64, []byte) {
	gpa := (g.next + align - 1) &^ (align - 1)
	if gpa+n > uint64(len(g.Host)) {
		panic(fmt.Sprintf("virtqtest: guest memory exhausted allocating %d bytes", n))
	}
	g.next = gpa + n
	return gpa, g.Host[gpa : gpa+n : gpa+n]
}

// Buf is one buffer of a chain.
type Buf struct {
	GPA   uint64
	Len   uint32
	Write bool
}

// Used is one used-ring entry.
type Used struct {
	ID  uint32
	Len uint32
}

// Driver drives one queue.
type Driver struct {
	G                          *Guest
	Size                       uint16
	DescGPA, AvailGPA, UsedGPA uint64
	desc, avail, used          []byte
	free                       []uint16
	chainLen                   map[uint16][]uint16
	availIdx                   uint16
	lastUsed                   uint16
	EventIdx                   bool
}

// NewDriver lays out a queue of size n in g.
func NewDriver(g *Guest, n uint16, eventIdx bool) *Driver {
	d := &Driver{G: g, Size: n, EventIdx: eventIdx, chainLen: map[uint16][]uint16{}}
	d.DescGPA, d.desc = g.Alloc(virtq.DescBytes(n), 16)
	d.AvailGPA, d.avail = g.Alloc(virtq.AvailBytes(n), 4)
	d.UsedGPA, d.used = g.Alloc(virtq.UsedBytes(n), 4)
	for i := int(n) - 1; i >= 0; i-- {
		d.free = append(d.free, uint16(i))
	}
	return d
}

// Config returns a device-side config for this queue.
func (d *Driver) Config() virtq.Config {
	return virtq.Config{Size: d.Size, Desc: d.desc, Avail: d.avail, Used: d.used, Mem: d.G.Mem, EventIdx: d.EventIdx, Indirect: true}
}

// SetDesc writes descriptor i raw.
func (d *Driver) SetDesc(i uint16, gpa uint64, ln uint32, flags, next uint16) {
	putDesc(d.desc[16*int(i):], gpa, ln, flags, next)
}

func putDesc(b []byte, gpa uint64, ln uint32, flags, next uint16) {
	binary.LittleEndian.PutUint64(b, gpa)
	binary.LittleEndian.PutUint32(b[8:], ln)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

// FreeDescs is the number of free descriptors.
func (d *Driver) FreeDescs() int { return len(d.free) }

// AddChain builds a direct chain and returns its head, or false if the
// table is full.
func (d *Driver) AddChain(bufs []Buf) (uint16, bool) {
	if len(bufs) == 0 || len(bufs) > len(d.free) {
		return 0, false
	}
	ids := make([]uint16, len(bufs))
	for i := range bufs {
		ids[i] = d.free[len(d.free)-1]
		d.free = d.free[:len(d.free)-1]
	}
	for i, b := range bufs {
		var flags, next uint16
		if b.Write {
			flags |= virtq.DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= virtq.DescFNext
			next = ids[i+1]
		}
		d.SetDesc(ids[i], b.GPA, b.Len, flags, next)
	}
	d.chainLen[ids[0]] = ids
	return ids[0], true
}

// AddIndirect builds a one-descriptor chain pointing at an indirect table.
func (d *Driver) AddIndirect(bufs []Buf) (uint16, bool) {
	if len(d.free) == 0 {
		return 0, false
	}
	gpa, tbl := d.G.Alloc(16*uint64(len(bufs)), 16)
	for i, b := range bufs {
		var flags, next uint16
		if b.Write {
			flags |= virtq.DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= virtq.DescFNext
			next = uint16(i + 1)
		}
		putDesc(tbl[16*i:], b.GPA, b.Len, flags, next)
	}
	id := d.free[len(d.free)-1]
	d.free = d.free[:len(d.free)-1]
	d.SetDesc(id, gpa, uint32(16*len(bufs)), virtq.DescFIndirect, 0)
	d.chainLen[id] = []uint16{id}
	return id, true
}

// PutAvail writes head into the next avail slot without publishing.
func (d *Driver) PutAvail(head uint16) {
	binary.LittleEndian.PutUint16(d.avail[4+2*int(d.availIdx%d.Size):], head)
	d.availIdx++
}

// Publish stores avail.idx (release).
func (d *Driver) Publish() { d.SetAvailIdx(d.availIdx) }

// SetAvailIdx stores an arbitrary avail.idx (hostile tests).
func (d *Driver) SetAvailIdx(v uint16) {
	w := (*uint32)(unsafe.Pointer(&d.avail[0]))
	for {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, old&0xffff|uint32(v)<<16) {
			return
		}
	}
}

// Submit makes chains available and publishes them.
func (d *Driver) Submit(heads ...uint16) {
	for _, h := range heads {
		d.PutAvail(h)
	}
	d.Publish()
}

// SetUsedEvent writes used_event (EVENT_IDX).
func (d *Driver) SetUsedEvent(v uint16) {
	binary.LittleEndian.PutUint16(d.avail[4+2*int(d.Size):], v)
}

// SetNoInterrupt sets or clears VIRTQ_AVAIL_F_NO_INTERRUPT.
func (d *Driver) SetNoInterrupt(on bool) {
	w := (*uint32)(unsafe.Pointer(&d.avail[0]))
	for {
		old := atomic.LoadUint32(w)
		nw := old &^ 1
		if on {
			nw |= 1
		}
		if atomic.CompareAndSwapUint32(w, old, nw) {
			return
		}
	}
}

// AvailEvent reads avail_event written by the device.
func (d *Driver) AvailEvent() uint16 {
	return binary.LittleEndian.Uint16(d.used[4+8*int(d.Size):])
}

// UsedFlags reads used.flags.
func (d *Driver) UsedFlags() uint16 {
	return uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&d.used[0]))))
}

// UsedIdx reads used.idx (acquire).
func (d *Driver) UsedIdx() uint16 {
	return uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&d.used[0]))) >> 16)
}

// Reap returns the used entries published since the last call and frees
// their descriptors.
func (d *Driver) Reap() []Used {
	idx := d.UsedIdx()
	var out []Used
	for d.lastUsed != idx {
		e := d.used[4+8*int(d.lastUsed%d.Size):]
		u := Used{binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])}
		out = append(out, u)
		if ids, ok := d.chainLen[uint16(u.ID)]; ok {
			d.free = append(d.free, ids...)
			delete(d.chainLen, uint16(u.ID))
		}
		d.lastUsed++
	}
	return out
}

// EnableInterrupts asks for an interrupt at the next used entry, as a
// driver does before it sleeps (used_event = last seen used index, or clear
// NO_INTERRUPT). The caller must check UsedIdx again afterwards.
func (d *Driver) EnableInterrupts() {
	if d.EventIdx {
		d.SetUsedEvent(d.lastUsed)
	} else {
		d.SetNoInterrupt(false)
	}
	var fence uint32
	atomic.AddUint32(&fence, 1)
}

// AvailIdx is the driver's avail index.
func (d *Driver) AvailIdx() uint16 { return d.availIdx }

// LastUsed is the used index up to which the driver has reaped.
func (d *Driver) LastUsed() uint16 { return d.lastUsed }
