// Package guestmem owns the guest's RAM as the back-end sees it: regions
// mapped from file descriptors the front-end passes, and bounds-checked
// translation of guest-physical addresses (used by descriptors) and
// front-end virtual addresses (used by SET_VRING_ADDR) to host byte slices.
//
// A Memory is immutable once built; adding or removing a region builds a new
// Memory that shares the surviving mappings, so readers never lock. Regions
// are unmapped explicitly by the owner once no worker can still use them.
package guestmem

import (
	"errors"
	"fmt"
	"sort"

	"golang.org/x/sys/unix"
)

// Spec describes one region as the front-end announces it.
type Spec struct {
	GuestAddr  uint64 // guest-physical start
	Size       uint64
	UserAddr   uint64 // front-end virtual start
	MmapOffset uint64 // offset of the region in its fd
}

// Region is one mapped region.
type Region struct {
	Spec
	mapping []byte // the whole mmap, from file offset 0
	host    []byte // mapping[MmapOffset : MmapOffset+Size]
}

// Host returns the region's bytes.
func (r *Region) Host() []byte { return r.host }

// ErrOutOfBounds is wrapped by every translation failure: the guest (or
// front-end) named memory that no region covers.
var ErrOutOfBounds = errors.New("address outside guest memory")

// maxRegionSize keeps offset arithmetic far from overflow (1 PiB).
const maxRegionSize = 1 << 50

// MapRegion mmaps spec from fd. The fd is not closed; the caller may close it
// once MapRegion returns (the mapping keeps the file alive).
func MapRegion(fd int, spec Spec) (*Region, error) {
	if spec.Size == 0 || spec.Size > maxRegionSize || spec.MmapOffset > maxRegionSize {
		return nil, fmt.Errorf("map guest region gpa %#x: size %#x offset %#x out of range", spec.GuestAddr, spec.Size, spec.MmapOffset)
	}
	if spec.GuestAddr+spec.Size < spec.GuestAddr || spec.UserAddr+spec.Size < spec.UserAddr {
		return nil, fmt.Errorf("map guest region gpa %#x: address range wraps", spec.GuestAddr)
	}
	total := spec.Size + spec.MmapOffset
	if err := CheckFDSize(fd, total); err != nil {
		return nil, fmt.Errorf("map guest region gpa %#x: %w", spec.GuestAddr, err)
	}
	m, err := unix.Mmap(fd, 0, int(total), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("mmap guest region gpa %#x size %#x: %w", spec.GuestAddr, spec.Size, err)
	}
	return &Region{Spec: spec, mapping: m, host: m[spec.MmapOffset:total:total]}, nil
}

// CheckFDSize refuses a file shorter than need bytes: touching a mapping
// past the end of its file raises SIGBUS, which would kill the process
// instead of failing one request.
func CheckFDSize(fd int, need uint64) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat memory fd: %w", err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Size) < need {
		return fmt.Errorf("memory fd holds %d bytes, the region needs %d", st.Size, need)
	}
	return nil
}

// NewRegion wraps host bytes that are already mapped (tests, or memory the
// caller manages). Unmap on such a region does nothing.
func NewRegion(spec Spec, host []byte) *Region {
	return &Region{Spec: spec, host: host[:spec.Size:spec.Size]}
}

// Unmap releases the mapping. The region must not be used afterwards.
func (r *Region) Unmap() error {
	if r.mapping == nil {
		return nil
	}
	err := unix.Munmap(r.mapping)
	r.mapping, r.host = nil, nil
	return err
}

// Memory is an immutable set of non-overlapping regions.
type Memory struct {
	regions []*Region // sorted by GuestAddr
}

// New builds a Memory, refusing overlaps in either address space.
func New(regions ...*Region) (*Memory, error) {
	rs := append([]*Region(nil), regions...)
	sort.Slice(rs, func(i, j int) bool { return rs[i].GuestAddr < rs[j].GuestAddr })
	for i := 1; i < len(rs); i++ {
		if rs[i-1].GuestAddr+rs[i-1].Size > rs[i].GuestAddr {
			return nil, fmt.Errorf("guest regions at gpa %#x and %#x overlap", rs[i-1].GuestAddr, rs[i].GuestAddr)
		}
	}
	for i := range rs {
		for j := i + 1; j < len(rs); j++ {
			a, b := rs[i], rs[j]
			if a.UserAddr < b.UserAddr+b.Size && b.UserAddr < a.UserAddr+a.Size {
				return nil, fmt.Errorf("guest regions at user address %#x and %#x overlap", a.UserAddr, b.UserAddr)
			}
		}
	}
	return &Memory{regions: rs}, nil
}

// Regions returns the regions (do not modify).
func (m *Memory) Regions() []*Region {
	if m == nil {
		return nil
	}
	return m.regions
}

// With returns a new Memory with r added.
func (m *Memory) With(r *Region) (*Memory, error) {
	return New(append(append([]*Region(nil), m.Regions()...), r)...)
}

// Without returns a new Memory without the region matching spec (GuestAddr,
// Size and UserAddr), and that region so the caller can unmap it later.
func (m *Memory) Without(spec Spec) (*Memory, *Region, error) {
	var keep []*Region
	var gone *Region
	for _, r := range m.Regions() {
		if gone == nil && r.GuestAddr == spec.GuestAddr && r.Size == spec.Size && r.UserAddr == spec.UserAddr {
			gone = r
			continue
		}
		keep = append(keep, r)
	}
	if gone == nil {
		return nil, nil, fmt.Errorf("remove guest region gpa %#x size %#x: no such region", spec.GuestAddr, spec.Size)
	}
	nm, err := New(keep...)
	return nm, gone, err
}

func (m *Memory) findGPA(gpa uint64) *Region {
	if m == nil {
		return nil
	}
	for _, r := range m.regions {
		if gpa >= r.GuestAddr && gpa-r.GuestAddr < r.Size {
			return r
		}
	}
	return nil
}

// Slice returns the host bytes for [gpa, gpa+n) when one region holds all of
// them. Ring structures use it; data buffers use AppendSlices.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	r := m.findGPA(gpa)
	if r == nil {
		return nil, fmt.Errorf("%w: gpa %#x", ErrOutOfBounds, gpa)
	}
	off := gpa - r.GuestAddr
	if n > r.Size-off {
		return nil, fmt.Errorf("%w: gpa %#x+%#x crosses the end of its region", ErrOutOfBounds, gpa, n)
	}
	return r.host[off : off+n : off+n], nil
}

// AppendSlices appends the host bytes of [gpa, gpa+n) to dst, split where
// the range crosses from one region into an adjacent one.
func (m *Memory) AppendSlices(dst [][]byte, gpa, n uint64) ([][]byte, error) {
	if gpa+n < gpa {
		return dst, fmt.Errorf("%w: gpa %#x+%#x wraps", ErrOutOfBounds, gpa, n)
	}
	for n > 0 {
		r := m.findGPA(gpa)
		if r == nil {
			return dst, fmt.Errorf("%w: gpa %#x", ErrOutOfBounds, gpa)
		}
		off := gpa - r.GuestAddr
		take := min(n, r.Size-off)
		dst = append(dst, r.host[off:off+take:off+take])
		gpa += take
		n -= take
	}
	return dst, nil
}

// UserSlice translates a front-end virtual address range (ring addresses in
// SET_VRING_ADDR) to host bytes; the range must lie in one region.
func (m *Memory) UserSlice(va, n uint64) ([]byte, error) {
	for _, r := range m.Regions() {
		if va >= r.UserAddr && va-r.UserAddr < r.Size {
			off := va - r.UserAddr
			if n > r.Size-off {
				break
			}
			return r.host[off : off+n : off+n], nil
		}
	}
	return nil, fmt.Errorf("%w: front-end address %#x+%#x", ErrOutOfBounds, va, n)
}

// UserToGuest translates a front-end virtual address to guest-physical.
func (m *Memory) UserToGuest(va uint64) (uint64, error) {
	for _, r := range m.Regions() {
		if va >= r.UserAddr && va-r.UserAddr < r.Size {
			return r.GuestAddr + (va - r.UserAddr), nil
		}
	}
	return 0, fmt.Errorf("%w: front-end address %#x", ErrOutOfBounds, va)
}
