package virtioblk_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/blkio/inflight"
	"github.com/virtblk/virtblk/blkio/internal/memvol"
	"github.com/virtblk/virtblk/blkio/metrics"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/blkio/virtq"
	vt "github.com/virtblk/virtblk/blkio/virtq/virtqtest"
)

const qsize = 16

type rig struct {
	t      testing.TB
	g      *vt.Guest
	d      *vt.Driver
	vol    *memvol.Volume
	dev    *virtioblk.Device
	w      *virtioblk.Worker
	kick   int
	call   int
	errfd  int
	done   chan struct{}
	region []byte
	inf    *inflight.Queue
	poll   time.Duration
	qs     *metrics.QueueStats
}

func efd(t testing.TB) int {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func newRig(t *testing.T, vol *memvol.Volume, opts virtioblk.Options) *rig {
	return newRigTB(t, vol, opts)
}

func newRigTB(t testing.TB, vol *memvol.Volume, opts virtioblk.Options) *rig {
	g, err := vt.NewGuest(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	if opts.QueueSize == 0 {
		opts.QueueSize = qsize
	}
	opts.NumQueues = 1
	dev, err := virtioblk.NewDevice(vol, opts)
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, g: g, d: vt.NewDriver(g, opts.QueueSize, true), vol: vol, dev: dev,
		kick: efd(t), call: efd(t), errfd: efd(t), region: make([]byte, inflight.RegionSize(1, opts.QueueSize))}
	r.start(nil)
	return r
}

func (r *rig) start(resubmit []uint16) {
	t := r.t
	cfg := r.d.Config()
	base := uint16(0)
	if r.w != nil {
		base = r.d.UsedIdx() + uint16(len(resubmit))
	}
	q, err := virtq.New(cfg, base)
	if err != nil {
		t.Fatal(err)
	}
	vq, err := r.vol.OpenQueue(int(cfg.Size))
	if err != nil {
		t.Fatal(err)
	}
	r.inf, err = inflight.Open(r.region, 1, 0, cfg.Size)
	if err != nil {
		t.Fatal(err)
	}
	w, err := r.dev.NewWorker(virtioblk.WorkerConfig{Queue: q, Volume: vq, KickFD: r.kick, CallFD: r.call, ErrFD: r.errfd, Inflight: r.inf, Resubmit: resubmit, PollDuration: r.poll, Metrics: r.qs, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	r.w = w
	r.done = make(chan struct{})
	go func() { w.Run(); vq.Close(); close(r.done) }()
	t.Cleanup(r.stop)
}

func (r *rig) stop() {
	select {
	case <-r.done:
		return
	default:
	}
	r.w.Stop()
	<-r.done
}

// quiet drops worker logs (the tests check behaviour, not log lines).
var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func writeFD(fd int, b []byte) { unix.Write(fd, b) }

func signal(fd int) {
	var b [8]byte
	b[0] = 1
	unix.Write(fd, b[:])
}

// wait blocks until the device has published n more used entries.
func (r *rig) wait(n int) []vt.Used {
	var got []vt.Used
	var b [8]byte
	for len(got) < n {
		got = append(got, r.d.Reap()...)
		if len(got) >= n {
			break
		}
		r.d.EnableInterrupts()
		if r.d.UsedIdx() != r.d.LastUsed() {
			continue
		}
		pfd := []unix.PollFd{{Fd: int32(r.call), Events: unix.POLLIN}}
		k, _ := unix.Poll(pfd, 20000)
		if k == 0 {
			r.t.Fatalf("no interrupt after 20s; have %d of %d used entries", len(got), n)
		}
		unix.Read(r.call, b[:])
	}
	return got
}

type req struct {
	head   uint16
	status []byte
	data   []byte
}

func (r *rig) hdr(typ uint32, sector uint64) (uint64, []byte) {
	gpa, h := r.g.Alloc(16, 16)
	binary.LittleEndian.PutUint32(h, typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	return gpa, h
}

// submit builds header + data + status in separate descriptors.
func (r *rig) submit(typ uint32, sector uint64, data []byte, write bool) req {
	hg, _ := r.hdr(typ, sector)
	bufs := []vt.Buf{{GPA: hg, Len: 16, Write: false}}
	var dbuf []byte
	if len(data) > 0 {
		var dg uint64
		dg, dbuf = r.g.Alloc(uint64(len(data)), 512)
		copy(dbuf, data)
		bufs = append(bufs, vt.Buf{GPA: dg, Len: uint32(len(data)), Write: write})
	}
	sg, st := r.g.Alloc(1, 1)
	st[0] = 0xee
	bufs = append(bufs, vt.Buf{GPA: sg, Len: 1, Write: true})
	h, ok := r.d.AddChain(bufs)
	if !ok {
		r.t.Fatal("descriptor table full")
	}
	r.d.Submit(h)
	signal(r.kick)
	return req{h, st, dbuf}
}

func (r *rig) do(typ uint32, sector uint64, data []byte, write bool) req {
	q := r.submit(typ, sector, data, write)
	u := r.wait(1)
	if u[0].ID != uint32(q.head) {
		r.t.Fatalf("used id %d, want %d", u[0].ID, q.head)
	}
	return q
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestReadWriteFlushGetID(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{Serial: "disk-42"})
	p := pattern(8192, 3)
	if q := r.do(virtioblk.TOut, 8, p, false); q.status[0] != virtioblk.SOK {
		t.Fatalf("write status %d", q.status[0])
	}
	if !bytes.Equal(vol.Bytes()[4096:4096+8192], p) {
		t.Fatal("volume does not hold the written data")
	}
	q := r.do(virtioblk.TIn, 8, make([]byte, 8192), true)
	if q.status[0] != virtioblk.SOK || !bytes.Equal(q.data, p) {
		t.Fatalf("read back: status %d, equal %v", q.status[0], bytes.Equal(q.data, p))
	}
	if q := r.do(virtioblk.TFlush, 0, nil, false); q.status[0] != virtioblk.SOK || vol.Flushes() != 1 {
		t.Fatalf("flush status %d flushes %d", q.status[0], vol.Flushes())
	}
	q = r.do(virtioblk.TGetID, 0, make([]byte, 20), true)
	if q.status[0] != virtioblk.SOK || string(bytes.TrimRight(q.data, "\x00")) != "disk-42" {
		t.Fatalf("GET_ID: status %d %q", q.status[0], q.data)
	}
}

// Header, data and status in one descriptor pair, data split at odd places:
// the device must not assume any layout.
func TestAnyLayout(t *testing.T) {
	vol := memvol.New(1<<20, false)
	p := pattern(1024, 9)
	vol.WriteAt(p, 512*5)
	r := newRig(t, vol, virtioblk.Options{})
	hg, h := r.g.Alloc(16+1024+1, 16)
	binary.LittleEndian.PutUint32(h, virtioblk.TIn)
	binary.LittleEndian.PutUint64(h[8:], 5)
	// readable: header; writable: 100 bytes, then 924 data + status in one.
	hd, _ := r.d.AddChain([]vt.Buf{{GPA: hg, Len: 16, Write: false}, {GPA: hg + 16, Len: 100, Write: true}, {GPA: hg + 116, Len: 925, Write: true}})
	r.d.Submit(hd)
	signal(r.kick)
	u := r.wait(1)
	if u[0].Len != 1025 {
		t.Fatalf("used len %d, want 1025", u[0].Len)
	}
	if h[16+1024] != virtioblk.SOK || !bytes.Equal(h[16:16+1024], p) {
		t.Fatalf("status %d data equal %v", h[16+1024], bytes.Equal(h[16:16+1024], p))
	}
}

func seg(sector uint64, n, flags uint32) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint64(b, sector)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint32(b[12:], flags)
	return b
}

func TestDiscardWriteZeroesAndErrors(t *testing.T) {
	vol := memvol.New(1<<20, false)
	vol.WriteAt(bytes.Repeat([]byte{0xab}, 1<<20), 0)
	r := newRig(t, vol, virtioblk.Options{})
	check := func(name string, q req, want byte) {
		t.Helper()
		if q.status[0] != want {
			t.Errorf("%s: status %d, want %d", name, q.status[0], want)
		}
	}
	check("discard", r.do(virtioblk.TDiscard, 0, seg(2, 4, 0), false), virtioblk.SOK)
	if !bytes.Equal(vol.Bytes()[1024:3072], make([]byte, 2048)) {
		t.Error("discard did not zero the range in memvol")
	}
	check("write-zeroes unmap", r.do(virtioblk.TWriteZeroes, 0, seg(100, 8, 1), false), virtioblk.SOK)
	if !bytes.Equal(vol.Bytes()[51200:51200+4096], make([]byte, 4096)) {
		t.Error("write-zeroes left data")
	}
	check("discard with unmap", r.do(virtioblk.TDiscard, 0, seg(2, 4, 1), false), virtioblk.SUnsupp)
	check("unknown segment flag", r.do(virtioblk.TWriteZeroes, 0, seg(2, 4, 2), false), virtioblk.SUnsupp)
	check("two segments", r.do(virtioblk.TDiscard, 0, append(seg(2, 1, 0), seg(9, 1, 0)...), false), virtioblk.SIOErr)
	check("discard past end", r.do(virtioblk.TDiscard, 0, seg(2047, 2, 0), false), virtioblk.SIOErr)
	check("read past end", r.do(virtioblk.TIn, 2047, make([]byte, 1024), true), virtioblk.SIOErr)
	check("sector overflow", r.do(virtioblk.TIn, ^uint64(0)-1, make([]byte, 1024), true), virtioblk.SIOErr)
	check("unaligned length", r.do(virtioblk.TOut, 0, make([]byte, 100), false), virtioblk.SIOErr)
	check("unknown type", r.do(77, 0, nil, false), virtioblk.SUnsupp)
	vol.SetFailAt(512 * 300)
	check("media error", r.do(virtioblk.TIn, 300, make([]byte, 512), true), virtioblk.SIOErr)
	if vol.Bytes()[0] != 0xab {
		t.Error("rejected requests changed the volume")
	}
}

func TestShortHeaderGetsIOErr(t *testing.T) {
	r := newRig(t, memvol.New(1<<20, false), virtioblk.Options{})
	hg, _ := r.g.Alloc(8, 8)
	sg, st := r.g.Alloc(1, 1)
	h, _ := r.d.AddChain([]vt.Buf{{GPA: hg, Len: 8, Write: false}, {GPA: sg, Len: 1, Write: true}})
	r.d.Submit(h)
	signal(r.kick)
	r.wait(1)
	if st[0] != virtioblk.SIOErr {
		t.Fatalf("status %d", st[0])
	}
}

func TestReadOnly(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{ReadOnly: true})
	if r.dev.Features()&virtioblk.FRO == 0 || r.dev.Features()&virtioblk.FDiscard != 0 {
		t.Fatalf("features %#x", r.dev.Features())
	}
	for _, c := range []struct {
		typ  uint32
		data []byte
	}{{virtioblk.TOut, pattern(512, 1)}, {virtioblk.TDiscard, seg(0, 1, 0)}, {virtioblk.TWriteZeroes, seg(0, 1, 0)}} {
		if q := r.do(c.typ, 0, c.data, false); q.status[0] != virtioblk.SIOErr {
			t.Errorf("type %d on read-only: status %d", c.typ, q.status[0])
		}
	}
	if !bytes.Equal(vol.Bytes(), make([]byte, 1<<20)) {
		t.Fatal("read-only device wrote data")
	}
	if q := r.do(virtioblk.TIn, 0, make([]byte, 512), true); q.status[0] != virtioblk.SOK {
		t.Fatal("read on read-only failed")
	}
}

func TestWriteThroughFlushesEachWrite(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{})
	if err := r.dev.WriteConfig(virtioblk.WritebackOffset, []byte{0}); err != nil {
		t.Fatal(err)
	}
	if c := r.dev.Config(); c[virtioblk.WritebackOffset] != 0 {
		t.Fatal("config still says writeback")
	}
	r.do(virtioblk.TOut, 0, pattern(512, 1), false)
	if vol.Flushes() != 1 {
		t.Fatalf("write-through write caused %d flushes, want 1", vol.Flushes())
	}
	r.dev.WriteConfig(virtioblk.WritebackOffset, []byte{1})
	r.do(virtioblk.TOut, 0, pattern(512, 1), false)
	if vol.Flushes() != 1 {
		t.Fatalf("writeback write flushed")
	}
	if err := r.dev.WriteConfig(0, []byte{1, 2, 3, 4}); err == nil {
		t.Fatal("capacity write accepted")
	}
}

func TestBatchOfManyOneInterrupt(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{})
	r.stop() // queue requests while the worker is not running
	var want []req
	for i := 0; i < 5; i++ {
		hg, _ := r.hdr(virtioblk.TOut, uint64(i))
		dg, db := r.g.Alloc(512, 512)
		copy(db, pattern(512, byte(i)))
		sg, st := r.g.Alloc(1, 1)
		h, _ := r.d.AddChain([]vt.Buf{{GPA: hg, Len: 16, Write: false}, {GPA: dg, Len: 512, Write: false}, {GPA: sg, Len: 1, Write: true}})
		r.d.PutAvail(h)
		want = append(want, req{head: h, status: st})
	}
	r.d.Publish()
	r.start(nil)
	signal(r.kick)
	got := r.wait(5)
	if len(got) != 5 {
		t.Fatalf("%d used", len(got))
	}
	for i, q := range want {
		if q.status[0] != virtioblk.SOK {
			t.Errorf("req %d status %d", i, q.status[0])
		}
		if !bytes.Equal(vol.Bytes()[i*512:(i+1)*512], pattern(512, byte(i))) {
			t.Errorf("sector %d wrong", i)
		}
	}
}

// A hostile chain stops the queue and signals the error fd, without
// panicking or touching memory outside the guest.
func TestBrokenRingSignalsError(t *testing.T) {
	r := newRig(t, memvol.New(1<<20, false), virtioblk.Options{})
	r.d.SetDesc(0, 1<<40, 16, 0, 0)
	r.d.Submit(0)
	signal(r.kick)
	pfd := []unix.PollFd{{Fd: int32(r.errfd), Events: unix.POLLIN}}
	if k, _ := unix.Poll(pfd, 20000); k != 1 {
		t.Fatal("error fd not signalled")
	}
	r.stop()
	if r.w.Err() == nil {
		t.Fatal("worker has no error")
	}
}

// The same head made available twice while in flight must not complete
// twice.
func TestDuplicateHead(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{})
	r.stop()
	hg, _ := r.hdr(virtioblk.TFlush, 0)
	sg, _ := r.g.Alloc(1, 1)
	h, _ := r.d.AddChain([]vt.Buf{{GPA: hg, Len: 16, Write: false}, {GPA: sg, Len: 1, Write: true}})
	r.d.Submit(h, h)
	r.start(nil)
	signal(r.kick)
	pfd := []unix.PollFd{{Fd: int32(r.errfd), Events: unix.POLLIN}}
	if k, _ := unix.Poll(pfd, 20000); k != 1 {
		t.Fatal("duplicate head not detected")
	}
}

// Requests fetched by a worker that died before completing them are
// resubmitted, in order, by the next worker from the inflight region.
func TestInflightResubmit(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{})
	r.stop()
	// Simulate a crashed back-end: it fetched two writes (marking them in
	// flight and moving avail_event) but never completed them.
	var reqs []req
	for i := 0; i < 2; i++ {
		hg, _ := r.hdr(virtioblk.TOut, uint64(10+i))
		dg, db := r.g.Alloc(512, 512)
		copy(db, pattern(512, byte(40+i)))
		sg, st := r.g.Alloc(1, 1)
		h, _ := r.d.AddChain([]vt.Buf{{GPA: hg, Len: 16, Write: false}, {GPA: dg, Len: 512, Write: false}, {GPA: sg, Len: 1, Write: true}})
		reqs = append(reqs, req{head: h, status: st})
	}
	r.d.Submit(reqs[1].head, reqs[0].head)
	inf, _ := inflight.Open(r.region, 1, 0, qsize)
	inf.Get(reqs[1].head)
	inf.Get(reqs[0].head)
	// The restarted worker resumes after the two fetched entries.
	inf2, _ := inflight.Open(r.region, 1, 0, qsize)
	resub := inf2.Recover(r.d.UsedIdx())
	if len(resub) != 2 || resub[0] != reqs[1].head {
		t.Fatalf("recovered %v", resub)
	}
	r.start(resub)
	got := r.wait(2)
	if len(got) != 2 {
		t.Fatalf("%d completions", len(got))
	}
	for i, q := range reqs {
		if q.status[0] != virtioblk.SOK {
			t.Errorf("req %d status %d", i, q.status[0])
		}
		if !bytes.Equal(vol.Bytes()[(10+i)*512:(11+i)*512], pattern(512, byte(40+i))) {
			t.Errorf("req %d not written", i)
		}
	}
	r.stop() // the worker clears the region after publishing; let it finish
	inf3, _ := inflight.Open(r.region, 1, 0, qsize)
	if left := inf3.Recover(r.d.UsedIdx()); len(left) != 0 {
		t.Fatalf("still in flight after completion: %v", left)
	}
}

func TestConfigSpace(t *testing.T) {
	vol := memvol.New(1<<30, false)
	dev, err := virtioblk.NewDevice(vol, virtioblk.Options{NumQueues: 2, QueueSize: 128})
	if err != nil {
		t.Fatal(err)
	}
	c := dev.Config()
	le := binary.LittleEndian
	if le.Uint64(c[0:]) != (1<<30)/512 || le.Uint32(c[12:]) != 126 || le.Uint32(c[20:]) != 512 || le.Uint16(c[34:]) != 2 || c[32] != 1 {
		t.Fatalf("config % x", c[:40])
	}
	win := make([]byte, 8)
	dev.ReadConfig(92, win)
	if !bytes.Equal(win, make([]byte, 8)) {
		t.Fatal("read past config end not zero")
	}
	for _, o := range []virtioblk.Options{{NumQueues: 0, QueueSize: 128}, {NumQueues: 1, QueueSize: 100}, {NumQueues: 1, QueueSize: 128, Serial: "0123456789012345678901"}} {
		if _, err := virtioblk.NewDevice(vol, o); err == nil {
			t.Errorf("options %+v accepted", o)
		}
	}
}

// FuzzRequest builds a chain from fuzz bytes (header, data, layout) and runs
// the parser and request builder: no panic, no slice beyond the chain, and
// a submitted request always lies inside the disk.
func FuzzRequest(f *testing.F) {
	hdr := func(typ uint32, sector uint64) []byte {
		b := make([]byte, 16)
		binary.LittleEndian.PutUint32(b, typ)
		binary.LittleEndian.PutUint64(b[8:], sector)
		return b
	}
	f.Add(hdr(virtioblk.TIn, 0), uint16(512), uint8(2), uint8(0))
	f.Add(hdr(virtioblk.TOut, 7), uint16(4096), uint8(3), uint8(1))
	f.Add(append(hdr(virtioblk.TDiscard, 0), seg(1, 1, 0)...), uint16(0), uint8(1), uint8(0))
	f.Add(append(hdr(virtioblk.TWriteZeroes, 0), seg(1<<40, 1, 1)...), uint16(0), uint8(1), uint8(0))
	f.Add(hdr(virtioblk.TGetID, 0), uint16(20), uint8(1), uint8(0))
	g, err := vt.NewGuest(1 << 20)
	if err != nil {
		f.Fatal(err)
	}
	defer g.Close()
	vol := memvol.New(1<<20, false)
	dev, _ := virtioblk.NewDevice(vol, virtioblk.Options{NumQueues: 1, QueueSize: 16})
	f.Fuzz(func(t *testing.T, readable []byte, writeLen uint16, splits uint8, mode uint8) {
		g.Reset()
		var c virtq.Chain
		rg, rb := g.Alloc(uint64(len(readable))+1, 1)
		copy(rb, readable)
		// Split the readable bytes into up to splits+1 pieces.
		n := int(splits%8) + 1
		step := len(readable)/n + 1
		for o := 0; o < len(readable); o += step {
			e := min(o+step, len(readable))
			c.Readable = append(c.Readable, rb[o:e])
			c.ReadLen += uint64(e - o)
		}
		_ = rg
		if mode%4 != 3 {
			_, wb := g.Alloc(uint64(writeLen)+1, 1)
			c.Writable = append(c.Writable, wb[:len(wb)/2], wb[len(wb)/2:])
			c.WriteLen = uint64(len(wb))
		}
		var r virtioblk.Request
		ok, err := virtioblk.Parse(&c, &r)
		if err != nil || !ok {
			return
		}
		var total uint64
		for _, b := range r.Data {
			total += uint64(len(b))
		}
		if total != r.DataLen {
			t.Fatalf("data slices hold %d bytes, DataLen %d", total, r.DataLen)
		}
		var sr = new(storageReq)
		submit, _ := dev.Prepare(&r, &sr.r)
		if submit && sr.r.Op != 3 /* flush */ {
			l := sr.r.Length
			for _, b := range sr.r.Bufs {
				l += uint64(len(b))
			}
			if sr.r.Offset+l > vol.Size() || sr.r.Offset+l < sr.r.Offset {
				t.Fatalf("request %+v beyond the disk", sr.r)
			}
		}
	})
}

// With busy-polling the worker serves requests the same way (it finds them
// by polling instead of a kick).
func TestBusyPoll(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{})
	r.stop()
	r.poll = 200 * time.Microsecond
	r.start(nil)
	for i := 0; i < 20; i++ {
		p := pattern(4096, byte(i))
		if q := r.do(virtioblk.TOut, uint64(8*i), p, false); q.status[0] != virtioblk.SOK {
			t.Fatalf("write %d status %d", i, q.status[0])
		}
		got := r.do(virtioblk.TIn, uint64(8*i), make([]byte, 4096), true)
		if !bytes.Equal(got.data, p) {
			t.Fatalf("read %d differs", i)
		}
	}
}
