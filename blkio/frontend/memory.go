package frontend

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// guestBase is the guest-physical address of our single memory region. It is
// deliberately not 0 and not our virtual address, so a back-end that mixes up
// guest-physical addresses (descriptors) and front-end virtual addresses
// (SET_VRING_ADDR) fails loudly instead of working by accident.
const guestBase = 1 << 32

// guestMemory is "guest RAM": a memfd mapped shared into this process and
// handed to the back-end with SET_MEM_TABLE. Everything the back-end touches
// (rings, request headers, data buffers, status bytes) lives in it.
type guestMemory struct {
	fd   int
	mem  []byte
	next int // bump allocator
}

func newGuestMemory(size int) (*guestMemory, error) {
	size = alignUp(size, 2<<20)
	fd, err := unix.MemfdCreate("virtblk-frontend", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("size guest memory memfd to %d bytes: %w", size, err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mmap guest memory (%d bytes): %w", size, err)
	}
	return &guestMemory{fd: fd, mem: mem}, nil
}

// alloc returns n zeroed bytes aligned to align (a power of two) and their
// guest-physical address.
func (g *guestMemory) alloc(n, align int) ([]byte, uint64, error) {
	off := alignUp(g.next, align)
	if off+n > len(g.mem) {
		return nil, 0, fmt.Errorf("guest memory exhausted: need %d more bytes at offset %d of %d", n, off, len(g.mem))
	}
	g.next = off + n
	return g.mem[off : off+n : off+n], guestBase + uint64(off), nil
}

// userAddr is the front-end virtual address of b, which must lie in g.
func (g *guestMemory) userAddr(b []byte) uint64 {
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}

func (g *guestMemory) base() uint64 { return uint64(uintptr(unsafe.Pointer(&g.mem[0]))) }

func (g *guestMemory) close() error {
	var first error
	if g.mem != nil {
		if err := unix.Munmap(g.mem); err != nil {
			first = fmt.Errorf("munmap guest memory: %w", err)
		}
		g.mem = nil
	}
	if g.fd >= 0 {
		if err := unix.Close(g.fd); err != nil && first == nil {
			first = fmt.Errorf("close guest memory memfd: %w", err)
		}
		g.fd = -1
	}
	return first
}

func alignUp(n, a int) int { return (n + a - 1) &^ (a - 1) }
