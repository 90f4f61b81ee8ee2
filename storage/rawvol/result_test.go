//go:build linux

package rawvol

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage"
	"github.com/virtblk/virtblk/storage/uring"

	"github.com/virtblk/virtblk/internal/testenv"
)

// The kernel rarely produces short transfers, EAGAIN or EOPNOTSUPP on
// demand, so these tests hand complete() a synthetic CQE for a loaded
// slot and let the real ring carry out whatever it resubmits.

func takeSlot(t *testing.T, q *queue, r storage.Request) (uint32, *slot) {
	t.Helper()
	idx := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	s := &q.slots[idx]
	*s = slot{req: r, iov: s.iov, bounce: s.bounce}
	for _, b := range r.Bufs {
		s.total += uint64(len(b))
	}
	if r.Op == storage.OpRead || r.Op == storage.OpWrite {
		if err := q.load(s); err != nil {
			t.Fatal(err)
		}
	}
	return idx, s
}

// fake completes slot idx with res; it reports the completion, or reaps
// the resubmitted operation when complete() chose to go again.
func fake(t *testing.T, q *queue, idx uint32, res int32) storage.Completion {
	t.Helper()
	var c storage.Completion
	if q.complete(uring.CQE{UserData: uint64(idx), Res: res}, &c) {
		return c
	}
	out := make([]storage.Completion, 1)
	if n, err := q.Reap(out, 1); err != nil || n != 1 {
		t.Fatalf("Reap after resubmit = %d, %v", n, err)
	}
	return out[0]
}

func imageWith(t *testing.T, data []byte) (*Volume, *queue) {
	t.Helper()
	path := imageFile(t, 0)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	v := openVol(t, path, Options{})
	return v, openQ(t, v, 4).(*queue)
}

func TestShortReadResumes(t *testing.T) {
	content := make([]byte, 64<<10)
	pattern(content, 11)
	_, q := imageWith(t, content)
	arena := mem(t, 16<<10)
	bufs := [][]byte{arena[:1024], arena[4096 : 4096+3072], arena[8192 : 8192+4096]}
	idx, _ := takeSlot(t, q, storage.Request{Op: storage.OpRead, Offset: 4096, Bufs: bufs, Tag: 3})
	// Pretend the kernel transferred the first 1536 bytes only.
	copy(bufs[0], content[4096:])
	copy(bufs[1][:512], content[4096+1024:])
	c := fake(t, q, idx, 1536)
	if c.Err != nil || c.Tag != 3 {
		t.Fatalf("completion %+v", c)
	}
	if got := bytes.Join(bufs, nil); !bytes.Equal(got, content[4096:4096+8192]) {
		t.Fatal("resumed read assembled the wrong data")
	}
}

func TestShortWriteResumesThroughBounce(t *testing.T) {
	_, q := imageWith(t, make([]byte, 64<<10))
	arena := mem(t, 16<<10)
	src := arena[1 : 1+8192] // misaligned: bounced
	pattern(src, 12)
	idx, s := takeSlot(t, q, storage.Request{Op: storage.OpWrite, Offset: 0, Bufs: [][]byte{src}})
	if !s.bounced {
		t.Fatal("misaligned buffer was not bounced")
	}
	// The kernel "wrote" the first 4096 bytes; write them for real.
	if _, err := unix.Pwrite(q.v.fd, s.bounce[:4096], 0); err != nil {
		t.Fatal(err)
	}
	if c := fake(t, q, idx, 4096); c.Err != nil {
		t.Fatal(c.Err)
	}
	got, _ := os.ReadFile(q.v.path)
	if !bytes.Equal(got[:8192], src) {
		t.Fatal("resumed write left the wrong data")
	}
}

func TestErrorResults(t *testing.T) {
	_, q := imageWith(t, make([]byte, 64<<10))
	buf := mem(t, 8192)
	read := storage.Request{Op: storage.OpRead, Offset: 0, Bufs: [][]byte{buf}}
	cases := []struct {
		name    string
		res     int32
		retries int
		want    []error
	}{
		{"EIO", -int32(unix.EIO), 0, []error{storage.ErrIO, unix.EIO}},
		{"ENOSPC", -int32(unix.ENOSPC), 0, []error{unix.ENOSPC}},
		{"EOPNOTSUPP", -int32(unix.EOPNOTSUPP), 0, []error{storage.ErrUnsupported}},
		{"EAGAIN retried out", -int32(unix.EAGAIN), maxRetries, []error{unix.EAGAIN}},
		{"zero progress", 0, 0, []error{storage.ErrIO}},
		{"too many bytes", 8192 + 512, 0, []error{storage.ErrIO}},
		{"unaligned short", 100, 0, []error{storage.ErrIO}},
	}
	for _, c := range cases {
		idx, s := takeSlot(t, q, read)
		s.retries = c.retries
		got := fake(t, q, idx, c.res)
		for _, w := range c.want {
			if !errors.Is(got.Err, w) {
				t.Errorf("%s: err %v, want it to wrap %v", c.name, got.Err, w)
			}
		}
	}
	if len(q.free) != q.depth {
		t.Fatalf("%d slots leaked", q.depth-len(q.free))
	}
	// EAGAIN with retries left goes to the kernel again and succeeds.
	idx, _ := takeSlot(t, q, read)
	if c := fake(t, q, idx, -int32(unix.EAGAIN)); c.Err != nil {
		t.Fatalf("retried read: %v", c.Err)
	}
	idx, _ = takeSlot(t, q, storage.Request{Op: storage.OpFlush})
	if c := fake(t, q, idx, -int32(unix.EINTR)); c.Err != nil {
		t.Fatalf("retried flush: %v", c.Err)
	}
	idx, s := takeSlot(t, q, storage.Request{Op: storage.OpDiscard, Offset: 0, Length: 4096})
	s.mode = q.fallocMode(&s.req)
	if c := fake(t, q, idx, -int32(unix.EAGAIN)); c.Err != nil {
		t.Fatalf("retried discard: %v", c.Err)
	}
}

func TestZeroRangeUnsupportedFallsBack(t *testing.T) {
	data := bytes.Repeat([]byte{5}, 64<<10)
	_, q := imageWith(t, data)
	idx, s := takeSlot(t, q, storage.Request{Op: storage.OpWriteZeroes, Offset: 8192, Length: 4096})
	s.mode = q.fallocMode(&s.req)
	if s.mode&unix.FALLOC_FL_ZERO_RANGE == 0 {
		t.Fatalf("write-zeroes mode %#x, want zero-range first", s.mode)
	}
	if c := fake(t, q, idx, -int32(unix.EOPNOTSUPP)); c.Err != nil {
		t.Fatalf("fallback: %v", c.Err)
	}
	if !q.noZeroRange {
		t.Error("queue did not remember that zero-range is unsupported")
	}
	got, _ := os.ReadFile(q.v.path)
	clear(data[8192 : 8192+4096])
	if !bytes.Equal(got, data) {
		t.Fatal("punch-hole fallback did not zero exactly the range")
	}
}

// TestTmpfs runs on a filesystem without FALLOC_FL_ZERO_RANGE, where the
// fallback happens for real (tmpfs has O_DIRECT since Linux 6.6).
func TestTmpfs(t *testing.T) {
	dir, err := os.MkdirTemp("/dev/shm", "rawvol")
	if err != nil {
		testenv.Missing(t, "/dev/shm: %v", err)
	}
	defer os.RemoveAll(dir)
	path := dir + "/disk.img"
	if err := os.WriteFile(path, bytes.Repeat([]byte{9}, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := Open(path, Options{Logger: quiet})
	if err != nil {
		// Older kernels: the error must name the path and the fix.
		if !bytes.Contains([]byte(err.Error()), []byte(path)) || !bytes.Contains([]byte(err.Error()), []byte("direct I/O")) {
			t.Fatalf("O_DIRECT refusal does not explain itself: %v", err)
		}
		t.Logf("tmpfs refused O_DIRECT (kernel older than 6.6): %v", err)
		return
	}
	defer v.Close()
	q, err := v.OpenQueue(2)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if err := do1(t, q, storage.Request{Op: storage.OpWriteZeroes, Offset: 4096, Length: 4096}); err != nil {
		t.Fatal(err)
	}
	buf := mem(t, 12288)
	if err := do1(t, q, storage.Request{Op: storage.OpRead, Bufs: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	if buf[4095] != 9 || buf[8192] != 9 || !bytes.Equal(buf[4096:8192], make([]byte, 4096)) {
		t.Fatal("write-zeroes on tmpfs did not zero exactly the range")
	}
}
