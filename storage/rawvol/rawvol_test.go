//go:build linux

package rawvol

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage"
	"github.com/virtblk/virtblk/storage/uring"

	"github.com/virtblk/virtblk/internal/testenv"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func imageFile(t testing.TB, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

func openVol(t testing.TB, path string, opt Options) *Volume {
	t.Helper()
	if opt.Logger == nil {
		opt.Logger = quiet
	}
	v, err := Open(path, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := v.Close(); err != nil {
			t.Errorf("volume Close: %v", err)
		}
	})
	return v
}

func openQ(t testing.TB, v *Volume, depth int) storage.Queue {
	t.Helper()
	q, err := v.OpenQueue(depth)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := q.Close(); err != nil {
			t.Errorf("queue Close: %v", err)
		}
	})
	return q
}

func mem(t testing.TB, n int) []byte {
	t.Helper()
	b, err := uring.Mmap(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uring.Munmap(b) })
	return b
}

// do submits reqs and reaps all their completions, indexed by tag.
func do(t testing.TB, q storage.Queue, reqs ...storage.Request) map[uint64]error {
	t.Helper()
	if err := q.Submit(reqs); err != nil {
		t.Fatalf("Submit: %v", err)
	}
	out := make([]storage.Completion, len(reqs))
	res := map[uint64]error{}
	for len(res) < len(reqs) {
		n, err := q.Reap(out, 1)
		if err != nil {
			t.Fatalf("Reap: %v", err)
		}
		for _, c := range out[:n] {
			if _, dup := res[c.Tag]; dup {
				t.Fatalf("tag %d completed twice", c.Tag)
			}
			res[c.Tag] = c.Err
		}
	}
	return res
}

func do1(t testing.TB, q storage.Queue, r storage.Request) error {
	t.Helper()
	r.Tag = 42
	return do(t, q, r)[42]
}

func pattern(b []byte, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
}

func TestOpenProperties(t *testing.T) {
	path := imageFile(t, 1<<20+100) // a tail that is not a whole block
	v := openVol(t, path, Options{})
	if v.Size() != 1<<20 {
		t.Errorf("Size = %d, want %d (rounded down to the block size)", v.Size(), 1<<20)
	}
	if bs := v.BlockSize(); bs < 512 || bs&(bs-1) != 0 {
		t.Errorf("BlockSize = %d", bs)
	}
	if v.ReadOnly() {
		t.Error("ReadOnly on a read-write open")
	}
	if !v.CanDiscard() || !v.CanWriteZeroes() {
		t.Errorf("ext4 image: CanDiscard %v CanWriteZeroes %v, want both", v.CanDiscard(), v.CanWriteZeroes())
	}
	// The probe must not have changed the file.
	if st, _ := os.Stat(path); st.Size() != 1<<20+100 {
		t.Errorf("open changed the image size to %d", st.Size())
	}
}

func TestOpenErrors(t *testing.T) {
	if _, err := Open(filepath.Join(t.TempDir(), "missing"), Options{Logger: quiet}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := Open(t.TempDir(), Options{Logger: quiet, ReadOnly: true}); err == nil {
		t.Error("opening a directory succeeded")
	}
	v := openVol(t, imageFile(t, 1<<20), Options{})
	q, err := v.OpenQueue(4)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err == nil {
		t.Error("volume Close with an open queue succeeded")
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	for _, d := range []int{0, -1, maxDepth + 1} {
		if _, err := v.OpenQueue(d); err == nil {
			t.Errorf("OpenQueue(%d) succeeded", d)
		}
	}
}

// TestRoundTripManyQueues writes and reads back random multi-segment
// requests on several queues at once, each on its own goroutine and
// region, then checks the image with ordinary reads.
func TestRoundTripManyQueues(t *testing.T) {
	const queues, region = 4, 1 << 20
	path := imageFile(t, queues*region)
	v := openVol(t, path, Options{})
	want := make([][]byte, queues)
	var wg sync.WaitGroup
	for g := 0; g < queues; g++ {
		want[g] = make([]byte, region)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := roundTrip(v, uint64(g*region), want[g], uint64(g)); err != nil {
				t.Errorf("queue %d: %v", g, err)
			}
		}()
	}
	wg.Wait()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for g := range want {
		if !bytes.Equal(got[g*region:(g+1)*region], want[g]) {
			t.Errorf("region %d on disk differs from what queue %d wrote", g, g)
		}
	}
	if v.Bounces() != 0 {
		t.Errorf("aligned buffers bounced %d times", v.Bounces())
	}
}

// roundTrip runs on its own goroutine with its own queue; model is the
// expected content of [base, base+len(model)).
func roundTrip(v *Volume, base uint64, model []byte, seed uint64) error {
	const depth = 8
	q, err := v.OpenQueue(depth)
	if err != nil {
		return err
	}
	defer q.Close()
	arena, err := uring.Mmap(depth * 64 << 10)
	if err != nil {
		return err
	}
	defer uring.Munmap(arena)
	rng := rand.New(rand.NewPCG(seed, 7))
	out := make([]storage.Completion, depth)
	for round := 0; round < 20; round++ {
		// A batch of writes to disjoint blocks, 1-4 segments each.
		var reqs []storage.Request
		used := map[uint64]bool{}
		for i := 0; i < depth; i++ {
			blk := uint64(rng.IntN(len(model)/(64<<10))) * (64 << 10)
			if used[blk] {
				continue
			}
			used[blk] = true
			buf := arena[i*64<<10 : (i+1)*64<<10]
			pattern(buf, rng.Uint64())
			n := 1 + rng.IntN(4)
			seg := len(buf) / n / 512 * 512
			var bufs [][]byte
			for s := 0; s < n; s++ {
				end := (s + 1) * seg
				if s == n-1 {
					end = len(buf)
				}
				bufs = append(bufs, buf[s*seg:end])
			}
			copy(model[blk:], buf)
			reqs = append(reqs, storage.Request{Op: storage.OpWrite, Offset: base + blk, Bufs: bufs, Tag: uint64(i)})
		}
		if err := submitAll(q, reqs, out); err != nil {
			return fmt.Errorf("round %d writes: %w", round, err)
		}
		// Read every written block back.
		reqs = reqs[:0]
		i := 0
		for blk := range used {
			buf := arena[i*64<<10 : (i+1)*64<<10]
			clear(buf)
			reqs = append(reqs, storage.Request{Op: storage.OpRead, Offset: base + blk, Bufs: [][]byte{buf[:4096], buf[4096:]}, Tag: blk})
			i++
		}
		if err := submitAll(q, reqs, out); err != nil {
			return fmt.Errorf("round %d reads: %w", round, err)
		}
		for i, r := range reqs {
			if !bytes.Equal(arena[i*64<<10:(i+1)*64<<10], model[r.Tag:r.Tag+64<<10]) {
				return fmt.Errorf("round %d: block %d read back wrong", round, r.Tag)
			}
		}
	}
	return nil
}

func submitAll(q storage.Queue, reqs []storage.Request, out []storage.Completion) error {
	if err := q.Submit(reqs); err != nil {
		return err
	}
	for left := len(reqs); left > 0; {
		n, err := q.Reap(out, 1)
		if err != nil {
			return err
		}
		for _, c := range out[:n] {
			if c.Err != nil {
				return fmt.Errorf("tag %d: %w", c.Tag, c.Err)
			}
		}
		left -= n
	}
	return nil
}

func TestMisalignedBuffers(t *testing.T) {
	path := imageFile(t, 1<<20)
	v := openVol(t, path, Options{})
	q := openQ(t, v, 4)
	arena := mem(t, 64<<10)
	// Address off by 3 and segment lengths that are not block multiples
	// (700 + 324 + 3072 = 4096).
	src := arena[3 : 3+4096]
	pattern(src, 1)
	want := bytes.Clone(src)
	bufs := [][]byte{src[:700], src[700:1024], src[1024:]}
	if err := do1(t, q, storage.Request{Op: storage.OpWrite, Offset: 8192, Bufs: bufs}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	f, _ := os.Open(path)
	defer f.Close()
	if _, err := f.ReadAt(got, 8192); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("misaligned write landed wrong (%v)", err)
	}
	dst := arena[20000+5 : 20000+5+4096]
	if err := do1(t, q, storage.Request{Op: storage.OpRead, Offset: 8192, Bufs: [][]byte{dst[:1], dst[1:4000], dst[4000:]}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst, want) {
		t.Fatal("misaligned read returned wrong data")
	}
	if v.Bounces() != 2 {
		t.Errorf("Bounces = %d, want 2", v.Bounces())
	}
	// A large bounced request (bigger than the kept bounce buffer) too.
	big := mem(t, 3<<20)[1 : 1+(2<<20)]
	pattern(big, 2)
	wantBig := bytes.Clone(big)
	big2 := mem(t, 3<<20)[7 : 7+(2<<20)]
	v2 := openVol(t, imageFile(t, 4<<20), Options{})
	q2 := openQ(t, v2, 2)
	if err := do1(t, q2, storage.Request{Op: storage.OpWrite, Offset: 1 << 20, Bufs: [][]byte{big}}); err != nil {
		t.Fatal(err)
	}
	if err := do1(t, q2, storage.Request{Op: storage.OpRead, Offset: 1 << 20, Bufs: [][]byte{big2}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(big2, wantBig) {
		t.Fatal("2 MiB bounced round trip differs")
	}
	// More segments than one READV takes also bounce.
	many := make([][]byte, maxSegments+1)
	seg := mem(t, (maxSegments+1)*512)
	pattern(seg, 3)
	for i := range many {
		many[i] = seg[i*512 : (i+1)*512]
	}
	if err := do1(t, q2, storage.Request{Op: storage.OpWrite, Offset: 0, Bufs: many}); err != nil {
		t.Fatal(err)
	}
	back := mem(t, len(seg))
	if err := do1(t, q2, storage.Request{Op: storage.OpRead, Offset: 0, Bufs: [][]byte{back}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, seg) {
		t.Fatal("write with more than maxSegments segments differs")
	}
}

func TestRangeAndAlignmentErrors(t *testing.T) {
	v := openVol(t, imageFile(t, 1<<20), Options{})
	q := openQ(t, v, 8)
	buf := mem(t, 8192)
	size := v.Size()
	cases := []struct {
		name string
		req  storage.Request
		want error
	}{
		{"read at end", storage.Request{Op: storage.OpRead, Offset: size, Bufs: [][]byte{buf[:512]}}, storage.ErrRange},
		{"read across end", storage.Request{Op: storage.OpRead, Offset: size - 512, Bufs: [][]byte{buf[:1024]}}, storage.ErrRange},
		{"write far past end", storage.Request{Op: storage.OpWrite, Offset: 1 << 62, Bufs: [][]byte{buf[:512]}}, storage.ErrRange},
		{"offset overflow", storage.Request{Op: storage.OpDiscard, Offset: ^uint64(0) - 511, Length: 1024}, storage.ErrRange},
		{"discard across end", storage.Request{Op: storage.OpDiscard, Offset: size - 512, Length: 1024}, storage.ErrRange},
		{"write-zeroes across end", storage.Request{Op: storage.OpWriteZeroes, Offset: size, Length: 512}, storage.ErrRange},
		{"unaligned offset", storage.Request{Op: storage.OpRead, Offset: 100, Bufs: [][]byte{buf[:512]}}, unix.EINVAL},
		{"unaligned length", storage.Request{Op: storage.OpRead, Offset: 0, Bufs: [][]byte{buf[:100]}}, unix.EINVAL},
		{"unknown op", storage.Request{Op: 99}, storage.ErrUnsupported},
		{"read of last block", storage.Request{Op: storage.OpRead, Offset: size - 512, Bufs: [][]byte{buf[:512]}}, nil},
	}
	for _, c := range cases {
		err := do1(t, q, c.req)
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("%s: err %v, want %v", c.name, err, c.want)
		}
	}
}

func TestZeroLength(t *testing.T) {
	v := openVol(t, imageFile(t, 1<<20), Options{})
	q := openQ(t, v, 8)
	res := do(t, q,
		storage.Request{Op: storage.OpRead, Offset: 4096, Tag: 1},
		storage.Request{Op: storage.OpWrite, Offset: 4096, Bufs: [][]byte{{}}, Tag: 2},
		storage.Request{Op: storage.OpDiscard, Offset: 0, Tag: 3},
		storage.Request{Op: storage.OpWriteZeroes, Offset: v.Size(), Tag: 4},
		storage.Request{Op: storage.OpRead, Offset: v.Size() + 512, Tag: 5},
	)
	for tag := uint64(1); tag <= 4; tag++ {
		if res[tag] != nil {
			t.Errorf("zero-length request %d: %v", tag, res[tag])
		}
	}
	if !errors.Is(res[5], storage.ErrRange) {
		t.Errorf("zero-length read past the end: %v, want ErrRange", res[5])
	}
}

func TestReadOnly(t *testing.T) {
	path := imageFile(t, 1<<20)
	if err := os.WriteFile(path, bytes.Repeat([]byte{7}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	v := openVol(t, path, Options{ReadOnly: true})
	if !v.ReadOnly() || v.CanDiscard() || v.CanWriteZeroes() {
		t.Fatalf("read-only volume: ReadOnly %v CanDiscard %v CanWriteZeroes %v", v.ReadOnly(), v.CanDiscard(), v.CanWriteZeroes())
	}
	q := openQ(t, v, 4)
	buf := mem(t, 4096)
	res := do(t, q,
		storage.Request{Op: storage.OpWrite, Offset: 0, Bufs: [][]byte{buf}, Tag: 1},
		storage.Request{Op: storage.OpDiscard, Offset: 0, Length: 4096, Tag: 2},
		storage.Request{Op: storage.OpWriteZeroes, Offset: 0, Length: 4096, Tag: 3},
		storage.Request{Op: storage.OpRead, Offset: 0, Bufs: [][]byte{buf}, Tag: 4},
	)
	for tag := uint64(1); tag <= 3; tag++ {
		if !errors.Is(res[tag], storage.ErrReadOnly) {
			t.Errorf("request %d on read-only volume: %v, want ErrReadOnly", tag, res[tag])
		}
	}
	if res[4] != nil || !bytes.Equal(buf, bytes.Repeat([]byte{7}, 4096)) {
		t.Errorf("read on read-only volume: %v", res[4])
	}
	if err := do1(t, q, storage.Request{Op: storage.OpFlush}); err != nil {
		t.Errorf("flush on read-only volume: %v", err)
	}
}

func TestDiscardAndWriteZeroes(t *testing.T) {
	path := imageFile(t, 1<<20)
	v := openVol(t, path, Options{})
	q := openQ(t, v, 8)
	data := mem(t, 1<<20)
	for i := range data {
		data[i] = 0xee
	}
	if err := do1(t, q, storage.Request{Op: storage.OpWrite, Bufs: [][]byte{data}}); err != nil {
		t.Fatal(err)
	}
	res := do(t, q,
		storage.Request{Op: storage.OpDiscard, Offset: 0, Length: 64 << 10, Tag: 1},
		storage.Request{Op: storage.OpWriteZeroes, Offset: 128 << 10, Length: 512, Tag: 2},
		storage.Request{Op: storage.OpWriteZeroes, Offset: 256 << 10, Length: 128 << 10, Unmap: true, Tag: 3},
		storage.Request{Op: storage.OpFlush, Tag: 4},
	)
	for tag, err := range res {
		if err != nil {
			t.Errorf("request %d: %v", tag, err)
		}
	}
	clear(data)
	if err := do1(t, q, storage.Request{Op: storage.OpRead, Bufs: [][]byte{data}}); err != nil {
		t.Fatal(err)
	}
	for i, b := range data {
		zero := i < 64<<10 || (i >= 128<<10 && i < 128<<10+512) || (i >= 256<<10 && i < 384<<10)
		if zero && b != 0 || !zero && b != 0xee {
			t.Fatalf("byte %d = %#x after discard/write-zeroes", i, b)
		}
	}
	if st, _ := os.Stat(path); st.Size() != 1<<20 {
		t.Errorf("image size changed to %d", st.Size())
	}
}

// TestZeroRangeFallback forces the punch-hole fallback a filesystem
// without FALLOC_FL_ZERO_RANGE (tmpfs) takes.
func TestZeroRangeFallback(t *testing.T) {
	v := openVol(t, imageFile(t, 1<<20), Options{})
	qi := openQ(t, v, 4)
	qi.(*queue).noZeroRange = true
	data := mem(t, 8192)
	for i := range data {
		data[i] = 1
	}
	if err := do1(t, qi, storage.Request{Op: storage.OpWrite, Bufs: [][]byte{data}}); err != nil {
		t.Fatal(err)
	}
	if err := do1(t, qi, storage.Request{Op: storage.OpWriteZeroes, Offset: 4096, Length: 4096}); err != nil {
		t.Fatal(err)
	}
	if err := do1(t, qi, storage.Request{Op: storage.OpRead, Bufs: [][]byte{data}}); err != nil {
		t.Fatal(err)
	}
	if data[0] != 1 || data[4095] != 1 || !bytes.Equal(data[4096:], make([]byte, 4096)) {
		t.Fatal("write-zeroes via punch hole did not read back zeroes")
	}
}

// TestShrunkImage: the image is truncated under a running volume; a read
// that hits the new end must fail, never complete short.
func TestShrunkImage(t *testing.T) {
	path := imageFile(t, 1<<20)
	v := openVol(t, path, Options{})
	q := openQ(t, v, 4)
	if err := os.Truncate(path, 512<<10+4096); err != nil {
		t.Fatal(err)
	}
	buf := mem(t, 64<<10)
	err := do1(t, q, storage.Request{Op: storage.OpRead, Offset: 512 << 10, Bufs: [][]byte{buf}})
	if !errors.Is(err, storage.ErrIO) {
		t.Fatalf("read across the shrunk end: %v, want ErrIO", err)
	}
	if err := do1(t, q, storage.Request{Op: storage.OpRead, Offset: 0, Bufs: [][]byte{buf}}); err != nil {
		t.Fatalf("read inside the shrunk image: %v", err)
	}
}

func TestCloseWithInFlight(t *testing.T) {
	path := imageFile(t, 4<<20)
	v := openVol(t, path, Options{})
	const depth = 16
	q, err := v.OpenQueue(depth)
	if err != nil {
		t.Fatal(err)
	}
	arena := mem(t, depth*64<<10)
	pattern(arena, 9)
	var reqs []storage.Request
	for i := 0; i < depth-1; i++ {
		reqs = append(reqs, storage.Request{Op: storage.OpWrite, Offset: uint64(i) * 64 << 10, Bufs: [][]byte{arena[i*64<<10 : (i+1)*64<<10]}, Tag: uint64(i)})
	}
	reqs = append(reqs, storage.Request{Op: storage.OpFlush, Tag: depth})
	if err := q.Submit(reqs); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatalf("Close with requests in flight: %v", err)
	}
	if err := q.Submit(reqs[:1]); err == nil {
		t.Error("Submit after Close succeeded")
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:(depth-1)*64<<10], arena[:(depth-1)*64<<10]) {
		t.Fatal("writes in flight at Close did not all land")
	}
}

func TestDepthAndReapLimits(t *testing.T) {
	v := openVol(t, imageFile(t, 1<<20), Options{})
	q := openQ(t, v, 2)
	reqs := []storage.Request{{Op: storage.OpFlush, Tag: 1}, {Op: storage.OpFlush, Tag: 2}, {Op: storage.OpFlush, Tag: 3}}
	if err := q.Submit(reqs); err == nil {
		t.Fatal("Submit over depth succeeded")
	}
	out := make([]storage.Completion, 4)
	if _, err := q.Reap(out, 1); err == nil {
		t.Fatal("Reap(min 1) with nothing in flight succeeded instead of failing")
	}
	if n, err := q.Reap(out, 0); n != 0 || err != nil {
		t.Fatalf("Reap(min 0) = %d, %v", n, err)
	}
	res := do(t, q, reqs[:2]...)
	if len(res) != 2 || res[1] != nil || res[2] != nil {
		t.Fatalf("flushes after a refused batch: %v", res)
	}
}

func TestNotifyFD(t *testing.T) {
	v := openVol(t, imageFile(t, 1<<20), Options{})
	q := openQ(t, v, 4)
	fd := q.NotifyFD()
	poll := func(ms int) bool {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(p, ms)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			return n == 1
		}
	}
	if poll(0) {
		t.Fatal("NotifyFD readable before any request")
	}
	// Both a kernel completion and an immediately rejected request must
	// wake a worker sleeping on the eventfd.
	for _, r := range []storage.Request{{Op: storage.OpFlush}, {Op: storage.OpRead, Offset: 1 << 40}} {
		if err := q.Submit([]storage.Request{r}); err != nil {
			t.Fatal(err)
		}
		if !poll(10_000) { // a liveness bound, not a timing assertion
			t.Fatalf("%s: NotifyFD not readable after completion", r.Op)
		}
		var cnt [8]byte
		if _, err := unix.Read(fd, cnt[:]); err != nil {
			t.Fatal(err)
		}
		out := make([]storage.Completion, 1)
		if n, err := q.Reap(out, 0); n != 1 || err != nil {
			t.Fatalf("Reap after notification = %d, %v", n, err)
		}
	}
}

// TestLoopDevice runs a round trip, discard and write-zeroes on a loop
// block device. It needs root and /dev/loop-control.
func TestLoopDevice(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	img := imageFile(t, 8<<20)
	dev, err := attachLoop(img)
	if err != nil {
		testenv.Missing(t, "loop device (root, /dev/loop-control): %v", err)
	}
	t.Cleanup(func() { detachLoop(dev) })
	v := openVol(t, dev, Options{})
	if !v.isBlock || v.Size() != 8<<20 {
		t.Fatalf("loop device: isBlock %v size %d", v.isBlock, v.Size())
	}
	q := openQ(t, v, 8)
	buf := mem(t, 1<<20)
	pattern(buf, 5)
	want := bytes.Clone(buf)
	if err := do1(t, q, storage.Request{Op: storage.OpWrite, Offset: 1 << 20, Bufs: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	reqs := []storage.Request{{Op: storage.OpFlush, Tag: 1}, {Op: storage.OpWriteZeroes, Offset: 1 << 20, Length: 4096, Tag: 2}}
	if v.CanDiscard() {
		reqs = append(reqs, storage.Request{Op: storage.OpDiscard, Offset: 1<<20 + 8192, Length: 4096, Tag: 3})
		clear(want[8192 : 8192+4096])
	}
	for tag, err := range do(t, q, reqs...) {
		if err != nil {
			t.Errorf("request %d: %v", tag, err)
		}
	}
	clear(want[:4096])
	clear(buf)
	if err := do1(t, q, storage.Request{Op: storage.OpRead, Offset: 1 << 20, Bufs: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, want) {
		t.Fatal("loop device read back differs")
	}
	if err := do1(t, q, storage.Request{Op: storage.OpRead, Offset: 8 << 20, Bufs: [][]byte{buf[:512]}}); !errors.Is(err, storage.ErrRange) {
		t.Fatalf("read past the device end: %v", err)
	}
	t.Logf("loop device: async discard command %v, punch hole %v", v.blkDiscard, v.punch)

	// A kernel without the discard command answers EOPNOTSUPP; the queue
	// must fall back to punch hole and remember it.
	if v.punch {
		for i := range buf[:4096] {
			buf[i] = 0x5a
		}
		if err := do1(t, q, storage.Request{Op: storage.OpWrite, Offset: 0, Bufs: [][]byte{buf[:4096]}}); err != nil {
			t.Fatal(err)
		}
		qq := q.(*queue)
		idx, s := takeSlot(t, qq, storage.Request{Op: storage.OpDiscard, Offset: 0, Length: 4096})
		s.mode = 0
		if c := fake(t, qq, idx, -int32(unix.EOPNOTSUPP)); c.Err != nil {
			t.Fatalf("discard fallback: %v", c.Err)
		}
		if !qq.noBlkDiscard {
			t.Error("queue did not remember that the discard command is unsupported")
		}
		if err := do1(t, q, storage.Request{Op: storage.OpRead, Offset: 0, Bufs: [][]byte{buf[:4096]}}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:4096], make([]byte, 4096)) {
			t.Fatal("punch-hole discard fallback did not zero the block")
		}
	}
}

// A flush alone on an idle queue runs synchronously; one submitted while
// a write is in flight goes through the ring. Both complete once, with
// their own tag, and the written data is in the file.
func TestFlushIdleAndBusy(t *testing.T) {
	path := imageFile(t, 1<<20)
	v := openVol(t, path, Options{})
	q := openQ(t, v, 4)
	buf := mem(t, 4096)
	pattern(buf, 5)
	if err := do1(t, q, storage.Request{Op: storage.OpFlush, Tag: 9}); err != nil {
		t.Fatalf("flush on an idle queue: %v", err)
	}
	if err := q.Submit([]storage.Request{{Op: storage.OpWrite, Bufs: [][]byte{buf}, Tag: 1}}); err != nil {
		t.Fatal(err)
	}
	if err := q.Submit([]storage.Request{{Op: storage.OpFlush, Tag: 2}}); err != nil {
		t.Fatal(err)
	}
	out := make([]storage.Completion, 4)
	seen := map[uint64]int{}
	for got := 0; got < 2; {
		n, err := q.Reap(out, 1)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range out[:n] {
			if c.Err != nil {
				t.Errorf("request %d: %v", c.Tag, c.Err)
			}
			seen[c.Tag]++
		}
		got += n
	}
	if seen[1] != 1 || seen[2] != 1 || len(seen) != 2 {
		t.Fatalf("completions %v, want tags 1 and 2 once each", seen)
	}
	f, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f[:4096], buf) {
		t.Fatal("written data not in the image after the flush")
	}
}

// After a slow inline flush, flushes go through the ring except one probe
// in every flushProbeEvery; a fast probe brings the inline path back.
func TestFlushFastNowProbes(t *testing.T) {
	q := &queue{}
	if !q.flushFastNow() {
		t.Fatal("fresh queue does not flush inline")
	}
	q.slowFlush = true
	inline := 0
	for i := 0; i < 10*flushProbeEvery; i++ {
		if q.flushFastNow() {
			inline++
		}
	}
	if inline != 10 {
		t.Fatalf("%d inline flushes in %d after a slow one, want 10", inline, 10*flushProbeEvery)
	}
	q.slowFlush = false
	if !q.flushFastNow() {
		t.Fatal("fast again but not inline")
	}
}
