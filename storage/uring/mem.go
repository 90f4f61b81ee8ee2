//go:build linux

package uring

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PageSize is the granularity of Mmap allocations.
var pageSize = unix.Getpagesize()

// Mmap returns n bytes of zeroed, page-aligned anonymous memory outside the
// Go heap. Such memory may be handed to the kernel for asynchronous I/O:
// the garbage collector never moves or frees it. Release it with Munmap.
func Mmap(n int) ([]byte, error) {
	if n <= 0 {
		return nil, fmt.Errorf("mmap %d bytes: size must be positive", n)
	}
	size := roundUp(n, pageSize)
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes: %w", size, err)
	}
	return b[:n:n], nil
}

// Munmap releases memory returned by Mmap. b must be the whole slice Mmap
// returned (its capacity is used to find the mapping).
func Munmap(b []byte) error {
	if cap(b) == 0 {
		return nil
	}
	full := unsafe.Slice(unsafe.SliceData(b), roundUp(cap(b), pageSize))
	if err := unix.Munmap(full); err != nil {
		return fmt.Errorf("munmap %d bytes: %w", len(full), err)
	}
	return nil
}

// Slab is a fixed number of equal, page-aligned buffers carved from one
// mmap'd region: the usual shape for registered buffers (RegisterBuffers
// takes Slab.Region) and for per-request bounce buffers. A Slab is not safe
// for concurrent use; like a Ring it belongs to one goroutine.
type Slab struct {
	region []byte
	size   int
	free   []int
}

// NewSlab maps count buffers of size bytes each; size is rounded up to the
// page size so every buffer is page-aligned.
func NewSlab(count, size int) (*Slab, error) {
	if count <= 0 || size <= 0 {
		return nil, fmt.Errorf("slab of %d buffers of %d bytes: both must be positive", count, size)
	}
	size = roundUp(size, pageSize)
	region, err := Mmap(count * size)
	if err != nil {
		return nil, fmt.Errorf("slab of %d buffers of %d bytes: %w", count, size, err)
	}
	s := &Slab{region: region, size: size, free: make([]int, count)}
	for i := range s.free {
		s.free[i] = count - 1 - i // pop order 0, 1, 2, ...
	}
	return s, nil
}

// BufSize is the size of each buffer.
func (s *Slab) BufSize() int { return s.size }

// Region is the whole mapping, e.g. for RegisterBuffers.
func (s *Slab) Region() []byte { return s.region }

// Buf returns buffer i whether or not it is allocated.
func (s *Slab) Buf(i int) []byte {
	return s.region[i*s.size : (i+1)*s.size : (i+1)*s.size]
}

// Get takes a free buffer and returns its index and memory; ok is false when
// all buffers are in use.
func (s *Slab) Get() (i int, b []byte, ok bool) {
	if len(s.free) == 0 {
		return 0, nil, false
	}
	i = s.free[len(s.free)-1]
	s.free = s.free[:len(s.free)-1]
	return i, s.Buf(i), true
}

// Put returns buffer i to the slab.
func (s *Slab) Put(i int) { s.free = append(s.free, i) }

// Close unmaps the region; no buffer may be in use by the kernel.
func (s *Slab) Close() error {
	if s.region == nil {
		return nil
	}
	err := Munmap(s.region)
	s.region = nil
	return err
}

// Addr is the address of b's first byte as the kernel sees it (0 for an
// empty slice).
func Addr(b []byte) uint64 {
	if cap(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
}

// Iovecs returns an n-element iovec array in fresh mmap'd memory, for
// READV/WRITEV. Release it with FreeIovecs.
func Iovecs(n int) ([]Iovec, error) {
	b, err := Mmap(n * int(unsafe.Sizeof(Iovec{})))
	if err != nil {
		return nil, fmt.Errorf("iovec array of %d: %w", n, err)
	}
	return unsafe.Slice((*Iovec)(unsafe.Pointer(unsafe.SliceData(b))), n), nil
}

// FreeIovecs releases an array from Iovecs.
func FreeIovecs(iov []Iovec) error {
	if cap(iov) == 0 {
		return nil
	}
	b := unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(iov))), cap(iov)*int(unsafe.Sizeof(Iovec{})))
	return Munmap(b)
}

func roundUp(n, to int) int { return (n + to - 1) / to * to }

func uintptrOf(iov []Iovec) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(iov))) }
