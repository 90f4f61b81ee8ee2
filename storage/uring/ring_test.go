//go:build linux

package uring

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func newRing(t testing.TB, entries uint32, opt Options) *Ring {
	t.Helper()
	r, err := New(entries, opt)
	if err != nil {
		t.Fatalf("New(%d): %v", entries, err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

func tempFile(t testing.TB, flags int) (*os.File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|flags, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, path
}

func mmapBuf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := Mmap(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := Munmap(b); err != nil {
			t.Errorf("Munmap: %v", err)
		}
	})
	return b
}

func fill(b []byte, seed byte) {
	for i := range b {
		b[i] = seed + byte(i*7)
	}
}

// run submits what is prepared and reaps exactly n completions.
func run(t testing.TB, r *Ring, n int) []CQE {
	t.Helper()
	out := make([]CQE, n)
	got, err := r.Wait(out, n)
	if err != nil {
		t.Fatalf("Wait(%d): %v", n, err)
	}
	if got != n {
		t.Fatalf("Wait returned %d completions, want %d", got, n)
	}
	return out
}

func must(t testing.TB, sqe *SQE) *SQE {
	t.Helper()
	if sqe == nil {
		t.Fatal("GetSQE: submission queue full")
	}
	return sqe
}

func TestLayout(t *testing.T) {
	var s SQE
	offs := []struct {
		name      string
		got, want uintptr
	}{
		{"opcode", unsafe.Offsetof(s.Opcode), 0},
		{"flags", unsafe.Offsetof(s.Flags), 1},
		{"ioprio", unsafe.Offsetof(s.Ioprio), 2},
		{"fd", unsafe.Offsetof(s.Fd), 4},
		{"off", unsafe.Offsetof(s.Off), 8},
		{"addr", unsafe.Offsetof(s.Addr), 16},
		{"len", unsafe.Offsetof(s.Len), 24},
		{"op_flags", unsafe.Offsetof(s.OpFlags), 28},
		{"user_data", unsafe.Offsetof(s.UserData), 32},
		{"buf_index", unsafe.Offsetof(s.BufIndex), 40},
		{"personality", unsafe.Offsetof(s.Personality), 42},
		{"file_index", unsafe.Offsetof(s.FileIndex), 44},
		{"addr3", unsafe.Offsetof(s.Addr3), 48},
	}
	for _, o := range offs {
		if o.got != o.want {
			t.Errorf("SQE.%s at offset %d, kernel has %d", o.name, o.got, o.want)
		}
	}
	var p params
	if off := unsafe.Offsetof(p.sqOff); off != 40 {
		t.Errorf("params.sq_off at %d, want 40", off)
	}
	if off := unsafe.Offsetof(p.cqOff); off != 80 {
		t.Errorf("params.cq_off at %d, want 80", off)
	}
}

func TestSetup(t *testing.T) {
	r := newRing(t, 5, Options{})
	if r.SQEntries() != 8 {
		t.Errorf("SQEntries = %d, want 8 (5 rounded up)", r.SQEntries())
	}
	if r.CQEntries() != 16 {
		t.Errorf("CQEntries = %d, want 16", r.CQEntries())
	}
	if r.Features()&FeatSingleMmap == 0 {
		t.Errorf("kernel lacks IORING_FEAT_SINGLE_MMAP (features %#x)", r.Features())
	}
	r2 := newRing(t, 4, Options{CQEntries: 64})
	if r2.CQEntries() != 64 {
		t.Errorf("CQEntries = %d, want 64", r2.CQEntries())
	}
	if _, err := New(0, Options{}); err == nil {
		t.Error("New(0) succeeded")
	}
	if _, err := New(1<<20, Options{}); err == nil {
		t.Error("New(1<<20) succeeded without SetupClamp")
	}
}

func TestNopUserData(t *testing.T) {
	r := newRing(t, 8, Options{})
	want := []uint64{0, 1, 1 << 63, ^uint64(0), 0xdeadbeefcafef00d}
	for _, ud := range want {
		must(t, r.GetSQE()).PrepNop(ud)
	}
	cqes := run(t, r, len(want))
	for i, c := range cqes {
		if c.UserData != want[i] || c.Res != 0 {
			t.Errorf("cqe %d = %+v, want user data %#x res 0", i, c, want[i])
		}
	}
}

func TestSQFull(t *testing.T) {
	r := newRing(t, 4, Options{})
	for i := 0; i < 4; i++ {
		must(t, r.GetSQE()).PrepNop(uint64(i))
	}
	if r.GetSQE() != nil {
		t.Fatal("GetSQE returned an entry from a full queue")
	}
	if r.SQSpace() != 0 || r.Pending() != 4 {
		t.Fatalf("SQSpace %d Pending %d, want 0 and 4", r.SQSpace(), r.Pending())
	}
	if n, err := r.Submit(); err != nil || n != 4 {
		t.Fatalf("Submit = %d, %v; want 4", n, err)
	}
	if r.GetSQE() == nil {
		t.Fatal("GetSQE nil after Submit drained the queue")
	}
	r.sqeTail-- // give back the unused entry
	run(t, r, 4)
}

func TestReadWrite(t *testing.T) {
	r := newRing(t, 8, Options{})
	f, _ := tempFile(t, 0)
	wbuf := mmapBuf(t, 8192)
	fill(wbuf, 3)
	must(t, r.GetSQE()).PrepWrite(int(f.Fd()), wbuf, 4096, 1)
	if c := run(t, r, 1)[0]; c.Res != 8192 || c.UserData != 1 {
		t.Fatalf("write cqe %+v, want res 8192", c)
	}
	rbuf := mmapBuf(t, 8192)
	must(t, r.GetSQE()).PrepRead(int(f.Fd()), rbuf, 4096, 2)
	if c := run(t, r, 1)[0]; c.Res != 8192 || c.UserData != 2 {
		t.Fatalf("read cqe %+v, want res 8192", c)
	}
	if !bytes.Equal(rbuf, wbuf) {
		t.Fatal("read back different data")
	}
	// Cross-check with the ordinary syscall path.
	check := make([]byte, 8192)
	if _, err := f.ReadAt(check, 4096); err != nil || !bytes.Equal(check, wbuf) {
		t.Fatalf("pread disagrees: %v", err)
	}
	// A read past end of file is short, not an error.
	must(t, r.GetSQE()).PrepRead(int(f.Fd()), rbuf, 8192, 3)
	if c := run(t, r, 1)[0]; c.Res != 4096 {
		t.Fatalf("read at EOF-4096: res %d, want 4096", c.Res)
	}
}

func TestReadvWritev(t *testing.T) {
	r := newRing(t, 8, Options{})
	f, _ := tempFile(t, 0)
	iov, err := Iovecs(3)
	if err != nil {
		t.Fatal(err)
	}
	defer FreeIovecs(iov)
	sizes := []int{512, 4096, 1000}
	var bufs [][]byte
	var want []byte
	for i, n := range sizes {
		b := mmapBuf(t, n)
		fill(b, byte(i+1))
		bufs = append(bufs, b)
		want = append(want, b...)
		iov[i] = Iovec{Base: Addr(b), Len: uint64(n)}
	}
	must(t, r.GetSQE()).PrepWritev(int(f.Fd()), iov, 100, 7)
	if c := run(t, r, 1)[0]; c.Res != int32(len(want)) || c.UserData != 7 {
		t.Fatalf("writev cqe %+v, want res %d", c, len(want))
	}
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, 100); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("file content after writev wrong (%v)", err)
	}
	for _, b := range bufs {
		clear(b)
	}
	must(t, r.GetSQE()).PrepReadv(int(f.Fd()), iov, 100, 8)
	if c := run(t, r, 1)[0]; c.Res != int32(len(want)) {
		t.Fatalf("readv cqe %+v", c)
	}
	if !bytes.Equal(bytes.Join(bufs, nil), want) {
		t.Fatal("readv scattered different data")
	}
}

func TestFixedBuffersAndFiles(t *testing.T) {
	r := newRing(t, 8, Options{})
	f, _ := tempFile(t, unix.O_DIRECT)
	slab, err := NewSlab(4, 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer slab.Close()
	if err := r.RegisterBuffers([][]byte{slab.Region()}); err != nil {
		t.Fatal(err)
	}
	if err := r.RegisterFiles([]int{int(f.Fd())}); err != nil {
		t.Fatal(err)
	}
	i, w, _ := slab.Get()
	j, rd, _ := slab.Get()
	if i == j {
		t.Fatal("slab handed out one buffer twice")
	}
	fill(w, 9)
	sqe := must(t, r.GetSQE())
	sqe.PrepWriteFixed(0, w, 8192, 0, 1) // fd 0 = index into the file table
	sqe.SetFlags(SQEFixedFile)
	if c := run(t, r, 1)[0]; c.Res != 4096 {
		t.Fatalf("write_fixed cqe %+v", c)
	}
	sqe = must(t, r.GetSQE())
	sqe.PrepReadFixed(0, rd, 8192, 0, 2)
	sqe.SetFlags(SQEFixedFile)
	if c := run(t, r, 1)[0]; c.Res != 4096 {
		t.Fatalf("read_fixed cqe %+v", c)
	}
	if !bytes.Equal(w, rd) {
		t.Fatal("read_fixed returned different data")
	}
	// A buffer outside the registered region is refused.
	outside := mmapBuf(t, 4096)
	must(t, r.GetSQE()).PrepReadFixed(int(f.Fd()), outside, 0, 0, 3)
	if c := run(t, r, 1)[0]; c.Res != -int32(unix.EFAULT) {
		t.Fatalf("read_fixed outside registration: res %d, want -EFAULT", c.Res)
	}
	// A file index past the table is EBADF.
	sqe = must(t, r.GetSQE())
	sqe.PrepReadFixed(5, rd, 0, 0, 4)
	sqe.SetFlags(SQEFixedFile)
	if c := run(t, r, 1)[0]; c.Res != -int32(unix.EBADF) {
		t.Fatalf("fixed file index 5: res %d, want -EBADF", c.Res)
	}
	if err := r.UnregisterFiles(); err != nil {
		t.Fatal(err)
	}
	if err := r.UnregisterBuffers(); err != nil {
		t.Fatal(err)
	}
	must(t, r.GetSQE()).PrepReadFixed(int(f.Fd()), rd, 0, 0, 5)
	if c := run(t, r, 1)[0]; c.Res >= 0 {
		t.Fatalf("read_fixed after unregister: res %d, want an error", c.Res)
	}
}

func TestFsync(t *testing.T) {
	r := newRing(t, 8, Options{})
	f, _ := tempFile(t, 0)
	if _, err := f.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	must(t, r.GetSQE()).PrepFsync(int(f.Fd()), FsyncDatasync, 1)
	must(t, r.GetSQE()).PrepFsync(int(f.Fd()), 0, 2)
	for _, c := range run(t, r, 2) {
		if c.Res != 0 {
			t.Fatalf("fsync cqe %+v", c)
		}
	}
	// Unknown fsync flags are rejected.
	must(t, r.GetSQE()).PrepFsync(int(f.Fd()), 0x80, 3)
	if c := run(t, r, 1)[0]; c.Res != -int32(unix.EINVAL) {
		t.Fatalf("fsync with bad flags: res %d, want -EINVAL", c.Res)
	}
}

func TestFallocate(t *testing.T) {
	r := newRing(t, 8, Options{})
	f, _ := tempFile(t, 0)
	fd := int(f.Fd())
	// Mode 0 extends the file: proves length travels in Addr and mode in Len.
	must(t, r.GetSQE()).PrepFallocate(fd, 0, 0, 1<<20, 1)
	if c := run(t, r, 1)[0]; c.Res != 0 {
		t.Fatalf("fallocate cqe %+v", c)
	}
	if st, _ := f.Stat(); st.Size() != 1<<20 {
		t.Fatalf("size after fallocate %d, want %d", st.Size(), 1<<20)
	}
	data := bytes.Repeat([]byte{0xab}, 1<<20)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	must(t, r.GetSQE()).PrepFallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 4096, 8192, 2)
	must(t, r.GetSQE()).PrepFallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 65536, 4096, 3)
	for _, c := range run(t, r, 2) {
		if c.Res != 0 {
			t.Fatalf("fallocate cqe %+v", c)
		}
	}
	got := make([]byte, 1<<20)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i, b := range got {
		zero := (i >= 4096 && i < 12288) || (i >= 65536 && i < 69632)
		if zero && b != 0 || !zero && b != 0xab {
			t.Fatalf("byte %d = %#x after punch/zero", i, b)
		}
	}
	if st, _ := f.Stat(); st.Size() != 1<<20 {
		t.Fatalf("KEEP_SIZE changed size to %d", st.Size())
	}
	// Punch hole without KEEP_SIZE is invalid.
	must(t, r.GetSQE()).PrepFallocate(fd, unix.FALLOC_FL_PUNCH_HOLE, 0, 4096, 4)
	if c := run(t, r, 1)[0]; c.Res != -int32(unix.EOPNOTSUPP) && c.Res != -int32(unix.EINVAL) {
		t.Fatalf("punch without keep-size: res %d, want -EOPNOTSUPP or -EINVAL", c.Res)
	}
}

func TestErrorResults(t *testing.T) {
	r := newRing(t, 8, Options{})
	buf := mmapBuf(t, 4096)
	// An fd number that is not open.
	must(t, r.GetSQE()).PrepRead(1<<20, buf, 0, 1)
	// An opcode the kernel does not know.
	sqe := must(t, r.GetSQE())
	sqe.PrepNop(2)
	sqe.Opcode = 250
	// A read on a write-only file.
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "wo"), os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	must(t, r.GetSQE()).PrepRead(int(f.Fd()), buf, 0, 3)
	// A block-device command on a regular file.
	must(t, r.GetSQE()).PrepBlockDiscard(int(f.Fd()), 0, 4096, 4)
	want := map[uint64]int32{1: -int32(unix.EBADF), 2: -int32(unix.EINVAL), 3: -int32(unix.EBADF), 4: -int32(unix.EOPNOTSUPP)}
	for _, c := range run(t, r, 4) {
		if w, ok := want[c.UserData]; !ok || c.Res != w {
			t.Errorf("cqe %+v, want res %d", c, w)
		}
		delete(want, c.UserData)
	}
	if len(want) != 0 {
		t.Errorf("missing completions for %v", want)
	}
}

func TestEventFD(t *testing.T) {
	r := newRing(t, 8, Options{})
	efd, err := NewEventFD()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if err := r.RegisterEventFD(efd); err != nil {
		t.Fatal(err)
	}
	readable := func(timeoutMs int) bool {
		fds := []unix.PollFd{{Fd: int32(efd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, timeoutMs)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			return n == 1
		}
	}
	if readable(0) {
		t.Fatal("eventfd readable before any completion")
	}
	for i := 0; i < 3; i++ {
		must(t, r.GetSQE()).PrepNop(uint64(i))
	}
	if _, err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	// A liveness bound, not a timing assertion: NOPs complete inline.
	if !readable(10_000) {
		t.Fatal("eventfd not readable after completions were posted")
	}
	var cnt [8]byte
	if _, err := unix.Read(efd, cnt[:]); err != nil {
		t.Fatal(err)
	}
	// The kernel may coalesce signals for a batch of CQEs.
	if v := *(*uint64)(unsafe.Pointer(&cnt[0])); v < 1 || v > 3 {
		t.Errorf("eventfd counter %d, want 1..3", v)
	}
	run(t, r, 3)
	if err := r.UnregisterEventFD(); err != nil {
		t.Fatal(err)
	}
	must(t, r.GetSQE()).PrepNop(9)
	run(t, r, 1)
	if readable(0) {
		t.Fatal("eventfd signalled after unregister")
	}
}

// TestBatchBeyondSQ pushes many more requests than the SQ holds, in
// batches, and checks every user data comes back exactly once and in
// submission order (NOPs complete inline, in order).
func TestBatchBeyondSQ(t *testing.T) {
	r := newRing(t, 8, Options{})
	const total = 1000
	next := uint64(0)
	var got []uint64
	out := make([]CQE, 32)
	for next < total || len(got) < total {
		for next < total {
			sqe := r.GetSQE()
			if sqe == nil {
				break
			}
			sqe.PrepNop(next)
			next++
		}
		n, err := r.Wait(out, 1)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range out[:n] {
			got = append(got, c.UserData)
		}
	}
	for i, ud := range got {
		if ud != uint64(i) {
			t.Fatalf("completion %d has user data %d: lost, duplicated or reordered", i, ud)
		}
	}
}

// TestCQOverflow submits far more than the CQ holds without reaping; the
// kernel keeps the overflow (FEAT_NODROP) or refuses with EBUSY, and
// either way every completion must arrive once, in order.
func TestCQOverflow(t *testing.T) {
	r := newRing(t, 4, Options{CQEntries: 4})
	if r.Features()&FeatNoDrop == 0 {
		t.Fatal("kernel lacks IORING_FEAT_NODROP")
	}
	const total = 64
	for i := 0; i < total; i++ {
		sqe := r.GetSQE()
		if sqe == nil {
			if _, err := r.Submit(); err != nil {
				t.Fatalf("Submit with full CQ: %v", err)
			}
			sqe = must(t, r.GetSQE())
		}
		sqe.PrepNop(uint64(i))
	}
	out := make([]CQE, total)
	n, err := r.Wait(out, total)
	if err != nil || n != total {
		t.Fatalf("Wait = %d, %v; want %d", n, err, total)
	}
	for i, c := range out {
		if c.UserData != uint64(i) {
			t.Fatalf("completion %d has user data %d", i, c.UserData)
		}
	}
}

// TestLinkedWriteFsync checks reap ordering of a linked chain: the fsync
// starts only after the write completes, so its CQE comes second.
func TestLinkedWriteFsync(t *testing.T) {
	r := newRing(t, 8, Options{})
	f, _ := tempFile(t, unix.O_DIRECT)
	buf := mmapBuf(t, 4096)
	for round := 0; round < 20; round++ {
		sqe := must(t, r.GetSQE())
		sqe.PrepWrite(int(f.Fd()), buf, uint64(round)*4096, 1)
		sqe.SetFlags(SQEIOLink)
		must(t, r.GetSQE()).PrepFsync(int(f.Fd()), FsyncDatasync, 2)
		cqes := run(t, r, 2)
		if cqes[0].UserData != 1 || cqes[0].Res != 4096 || cqes[1].UserData != 2 || cqes[1].Res != 0 {
			t.Fatalf("round %d: linked write+fsync completions %+v", round, cqes)
		}
	}
}

// TestRingsInParallel runs one ring per goroutine, the intended model, under
// the race detector.
func TestRingsInParallel(t *testing.T) {
	f, _ := tempFile(t, unix.O_DIRECT)
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := New(16, Options{})
			if err != nil {
				t.Error(err)
				return
			}
			defer r.Close()
			buf, err := Mmap(4096)
			if err != nil {
				t.Error(err)
				return
			}
			defer Munmap(buf)
			off := uint64(g) * 256 << 10
			for i := 0; i < 50; i++ {
				fill(buf, byte(g*50+i))
				want := bytes.Clone(buf)
				r.GetSQE().PrepWrite(int(f.Fd()), buf, off, 1)
				out := make([]CQE, 1)
				if _, err := r.Wait(out, 1); err != nil || out[0].Res != 4096 {
					t.Errorf("write: %v %+v", err, out[0])
					return
				}
				clear(buf)
				r.GetSQE().PrepRead(int(f.Fd()), buf, off, 2)
				if _, err := r.Wait(out, 1); err != nil || out[0].Res != 4096 {
					t.Errorf("read: %v %+v", err, out[0])
					return
				}
				if !bytes.Equal(buf, want) {
					t.Errorf("goroutine %d round %d: data mismatch", g, i)
					return
				}
			}
		}()
	}
	wg.Wait()
}

func TestMmapAndSlab(t *testing.T) {
	if _, err := Mmap(0); err == nil {
		t.Error("Mmap(0) succeeded")
	}
	b, err := Mmap(100)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 100 || Addr(b)%uint64(pageSize) != 0 {
		t.Errorf("Mmap(100): len %d addr %#x not page-aligned", len(b), Addr(b))
	}
	if err := Munmap(b); err != nil {
		t.Fatal(err)
	}
	s, err := NewSlab(3, 1000)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.BufSize() != pageSize {
		t.Errorf("BufSize %d, want %d", s.BufSize(), pageSize)
	}
	seen := map[int]bool{}
	for k := 0; k < 3; k++ {
		i, b, ok := s.Get()
		if !ok || seen[i] || Addr(b)%uint64(pageSize) != 0 || len(b) != pageSize {
			t.Fatalf("Get %d: i=%d ok=%v addr=%#x len=%d", k, i, ok, Addr(b), len(b))
		}
		seen[i] = true
	}
	if _, _, ok := s.Get(); ok {
		t.Fatal("Get from an empty slab succeeded")
	}
	s.Put(1)
	if i, _, ok := s.Get(); !ok || i != 1 {
		t.Fatalf("Get after Put(1) = %d, %v", i, ok)
	}
	if _, err := NewSlab(0, 1); err == nil {
		t.Error("NewSlab(0, 1) succeeded")
	}
}

// TestBacklogOrder exercises the path taken when the kernel refuses a
// submit with EBUSY: visible CQEs move to the backlog, and Peek must still
// return everything in kernel order.
func TestBacklogOrder(t *testing.T) {
	r := newRing(t, 8, Options{})
	for i := 0; i < 8; i++ {
		must(t, r.GetSQE()).PrepNop(uint64(i))
	}
	if _, err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	if n := r.drainToBacklog(); n != 8 {
		t.Fatalf("drainToBacklog moved %d, want 8", n)
	}
	for i := 8; i < 12; i++ {
		must(t, r.GetSQE()).PrepNop(uint64(i))
	}
	out := make([]CQE, 5)
	got := []uint64{}
	for len(got) < 12 {
		n, err := r.Wait(out, 1)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range out[:n] {
			got = append(got, c.UserData)
		}
	}
	for i, ud := range got {
		if ud != uint64(i) {
			t.Fatalf("completion %d has user data %d; want backlog first, in order", i, ud)
		}
	}
}

// TestSeparateCQMapping maps the CQ ring on its own, the layout for
// kernels without IORING_FEAT_SINGLE_MMAP (the kernel still accepts it).
func TestSeparateCQMapping(t *testing.T) {
	var p params
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, 8, uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		t.Fatal(errno)
	}
	p.features &^= FeatSingleMmap
	r := &Ring{fd: int(fd), features: p.features}
	if err := r.mapRings(&p); err != nil {
		r.Close()
		t.Fatal(err)
	}
	defer r.Close()
	if r.cqMem == nil {
		t.Fatal("CQ ring was not mapped separately")
	}
	for round := 0; round < 5; round++ { // wrap both rings
		for i := 0; i < 8; i++ {
			must(t, r.GetSQE()).PrepNop(uint64(round*8 + i))
		}
		for i, c := range run(t, r, 8) {
			if c.UserData != uint64(round*8+i) {
				t.Fatalf("round %d: completion %d has user data %d", round, i, c.UserData)
			}
		}
	}
}
