package guestmem

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

func memfd(t *testing.T, size int) int {
	t.Helper()
	fd, err := unix.MemfdCreate("guestmem-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func TestMapAndTranslate(t *testing.T) {
	fd := memfd(t, 3*4096)
	// Two adjacent guest regions backed by different parts of one memfd.
	a, err := MapRegion(fd, Spec{GuestAddr: 0, Size: 4096, UserAddr: 0x10000, MmapOffset: 0})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Unmap()
	b, err := MapRegion(fd, Spec{GuestAddr: 4096, Size: 8192, UserAddr: 0x50000, MmapOffset: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Unmap()
	m, err := New(b, a)
	if err != nil {
		t.Fatal(err)
	}
	s, err := m.Slice(4096+10, 4)
	if err != nil {
		t.Fatal(err)
	}
	copy(s, "abcd")
	if got := string(b.Host()[10:14]); got != "abcd" {
		t.Fatalf("write through slice: %q", got)
	}
	if _, err := m.Slice(4000, 200); !errors.Is(err, ErrOutOfBounds) {
		t.Fatalf("cross-region Slice: %v", err)
	}
	parts, err := m.AppendSlices(nil, 4000, 200)
	if err != nil || len(parts) != 2 || len(parts[0]) != 96 || len(parts[1]) != 104 {
		t.Fatalf("AppendSlices: %d parts %v", len(parts), err)
	}
	for _, bad := range [][2]uint64{{3 * 4096, 1}, {3*4096 - 1, 2}, {^uint64(0), 2}, {1 << 40, 1}} {
		if _, err := m.AppendSlices(nil, bad[0], bad[1]); !errors.Is(err, ErrOutOfBounds) {
			t.Errorf("AppendSlices(%#x,%#x): %v", bad[0], bad[1], err)
		}
	}
	u, err := m.UserSlice(0x50000+8, 8)
	if err != nil || &u[0] != &b.Host()[8] {
		t.Fatalf("UserSlice: %v", err)
	}
	if _, err := m.UserSlice(0x50000+8190, 8); !errors.Is(err, ErrOutOfBounds) {
		t.Fatalf("UserSlice past end: %v", err)
	}
	if g, err := m.UserToGuest(0x10000 + 5); err != nil || g != 5 {
		t.Fatalf("UserToGuest: %#x %v", g, err)
	}
	m2, gone, err := m.Without(a.Spec)
	if err != nil || gone != a || len(m2.Regions()) != 1 {
		t.Fatalf("Without: %v", err)
	}
	if _, err := m2.Slice(0, 1); err == nil {
		t.Fatal("removed region still translates")
	}
	if _, err := m2.With(NewRegion(Spec{GuestAddr: 8192, Size: 4096, UserAddr: 0x90000}, make([]byte, 4096))); err == nil {
		t.Fatal("overlapping region accepted")
	}
}

func TestMapRegionRejects(t *testing.T) {
	fd := memfd(t, 4096)
	for _, s := range []Spec{{Size: 0}, {Size: 1 << 60}, {Size: 8192}, {Size: 4096, MmapOffset: 4096}, {GuestAddr: ^uint64(0) - 10, Size: 4096}} {
		if r, err := MapRegion(fd, s); err == nil {
			r.Unmap()
			t.Errorf("MapRegion(%+v) accepted", s)
		}
	}
}
