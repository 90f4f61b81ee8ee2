package vhostuser_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/blkio/inflight"
	"github.com/virtblk/virtblk/blkio/internal/memvol"
	"github.com/virtblk/virtblk/blkio/vhostblk"
	"github.com/virtblk/virtblk/blkio/vhostuser"
	"github.com/virtblk/virtblk/blkio/vhostuser/wire"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	vt "github.com/virtblk/virtblk/blkio/virtq/virtqtest"
)

const qsize = 16

// fe is a minimal vhost-user front-end for tests: it speaks the protocol
// the way QEMU's vhost-user-blk does, over a real unix socket.
type fe struct {
	t          *testing.T
	c          *wire.Conn
	g          *vt.Guest
	ds         []*vt.Driver
	kick, call []int
	ring       uint32 // SET_VRING_NUM; qsize unless a test sets it
}

func dial(t *testing.T, path string, g *vt.Guest) *fe {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	f := &fe{t: t, c: wire.NewConn(c), g: g}
	t.Cleanup(func() { f.c.Close() })
	return f
}

// ack sends a request with NEED_REPLY and returns the ack value.
func (f *fe) ack(req wire.Request, payload []byte, fds ...int) uint64 {
	f.t.Helper()
	if err := f.c.SendRequest(req, true, payload, fds...); err != nil {
		f.t.Fatal(err)
	}
	m, err := f.c.RecvReply(req)
	if err != nil {
		f.t.Fatal(err)
	}
	v, err := wire.DecodeU64(m.Payload)
	if err != nil {
		f.t.Fatal(err)
	}
	return v
}

func (f *fe) mustAck(req wire.Request, payload []byte, fds ...int) {
	f.t.Helper()
	if v := f.ack(req, payload, fds...); v != 0 {
		f.t.Fatalf("%v: back-end replied %d", req, v)
	}
}

func (f *fe) get(req wire.Request, payload []byte) wire.Message {
	f.t.Helper()
	if err := f.c.SendRequest(req, false, payload); err != nil {
		f.t.Fatal(err)
	}
	m, err := f.c.RecvReply(req)
	if err != nil {
		f.t.Fatal(err)
	}
	return m
}

func (f *fe) getU64(req wire.Request) uint64 {
	m := f.get(req, nil)
	v, _ := wire.DecodeU64(m.Payload)
	return v
}

func eventfd(t *testing.T) int {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// negotiate runs QEMU's init sequence.
func (f *fe) negotiate() {
	feats := f.getU64(wire.GetFeatures)
	if feats&wire.FeatureProtocolFeatures == 0 || feats&virtioblk.FVersion1 == 0 {
		f.t.Fatalf("features %#x lack PROTOCOL_FEATURES or VERSION_1", feats)
	}
	proto := f.getU64(wire.GetProtocolFeatures)
	need := wire.ProtoReplyAck | wire.ProtoConfig | wire.ProtoMQ | wire.ProtoInflightSHMFD | wire.ProtoConfigureMemSlots
	if proto&need != need {
		f.t.Fatalf("protocol features %#x lack %#x", proto, need&^proto)
	}
	if err := f.c.SendRequest(wire.SetProtocolFeatures, false, wire.AppendU64(nil, need)); err != nil {
		f.t.Fatal(err)
	}
	if n := f.getU64(wire.GetQueueNum); n != 2 {
		f.t.Fatalf("GET_QUEUE_NUM %d", n)
	}
	if n := f.getU64(wire.GetMaxMemSlots); n < 8 {
		f.t.Fatalf("GET_MAX_MEM_SLOTS %d", n)
	}
	f.mustAck(wire.SetOwner, nil)
	f.mustAck(wire.SetFeatures, wire.AppendU64(nil, feats))
}

// start maps memory and starts both queues (QEMU's vhost_dev_start).
func (f *fe) start(inflightFD int, inf wire.Inflight, viaAddMemReg bool) {
	if inflightFD >= 0 {
		f.mustAck(wire.SetInflightFD, inf.Append(nil), inflightFD)
	}
	reg := wire.MemRegion{GuestAddr: 0, Size: uint64(len(f.g.Host)), UserAddr: vt.UserBase}
	if viaAddMemReg {
		f.mustAck(wire.AddMemReg, wire.AppendSingleMemRegion(nil, reg), f.g.FD)
	} else {
		f.mustAck(wire.SetMemTable, wire.AppendMemTable(nil, []wire.MemRegion{reg}), f.g.FD)
	}
	for i, d := range f.ds {
		idx := uint32(i)
		ring := f.ring
		if ring == 0 {
			ring = qsize
		}
		f.mustAck(wire.SetVringNum, wire.VringState{Index: idx, Num: ring}.Append(nil))
		f.mustAck(wire.SetVringBase, wire.VringState{Index: idx, Num: uint32(d.LastUsed())}.Append(nil))
		f.mustAck(wire.SetVringAddr, wire.VringAddr{Index: idx, Desc: vt.UserBase + d.DescGPA, Avail: vt.UserBase + d.AvailGPA, Used: vt.UserBase + d.UsedGPA}.Append(nil))
		f.mustAck(wire.SetVringKick, wire.VringFD{Index: uint8(i)}.Append(nil), f.kick[i])
		f.mustAck(wire.SetVringCall, wire.VringFD{Index: uint8(i)}.Append(nil), f.call[i])
		f.mustAck(wire.SetVringEnable, wire.VringState{Index: idx, Num: 1}.Append(nil))
	}
}

func (f *fe) stop() []uint32 {
	var bases []uint32
	for i := range f.ds {
		f.mustAck(wire.SetVringEnable, wire.VringState{Index: uint32(i), Num: 0}.Append(nil))
		m := f.get(wire.GetVringBase, wire.VringState{Index: uint32(i)}.Append(nil))
		s, err := wire.DecodeVringState(m.Payload)
		if err != nil {
			f.t.Fatal(err)
		}
		bases = append(bases, s.Num)
	}
	return bases
}

func signal(fd int) {
	var b [8]byte
	b[0] = 1
	unix.Write(fd, b[:])
}

// io submits a write or read of one 4 KiB block on queue qi and waits for it.
func (f *fe) io(qi int, typ uint32, sector uint64, data []byte) byte {
	f.t.Helper()
	d := f.ds[qi]
	hg, h := f.g.Alloc(16, 16)
	binary.LittleEndian.PutUint32(h, typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	dg, db := f.g.Alloc(uint64(len(data)), 512)
	copy(db, data)
	sg, st := f.g.Alloc(1, 1)
	st[0] = 0xff
	head, ok := d.AddIndirect([]vt.Buf{{GPA: hg, Len: 16}, {GPA: dg, Len: uint32(len(data)), Write: typ == virtioblk.TIn}, {GPA: sg, Len: 1, Write: true}})
	if !ok {
		f.t.Fatal("queue full")
	}
	d.Submit(head)
	signal(f.kick[qi])
	f.waitUsed(qi, 1)
	if typ == virtioblk.TIn {
		copy(data, db)
	}
	return st[0]
}

func (f *fe) waitUsed(qi, n int) []vt.Used {
	d := f.ds[qi]
	var got []vt.Used
	var b [8]byte
	for {
		got = append(got, d.Reap()...)
		if len(got) >= n {
			return got
		}
		d.EnableInterrupts()
		if d.UsedIdx() != d.LastUsed() {
			continue
		}
		pfd := []unix.PollFd{{Fd: int32(f.call[qi]), Events: unix.POLLIN}}
		if k, _ := unix.Poll(pfd, 20000); k == 0 {
			f.t.Fatalf("queue %d: no interrupt within 20s (%d of %d done)", qi, len(got), n)
		}
		unix.Read(f.call[qi], b[:])
	}
}

type rig struct {
	sock   string
	vol    *memvol.Volume
	cancel context.CancelFunc
	done   chan error
}

func serve(t *testing.T, vol *memvol.Volume) *rig {
	dev, err := virtioblk.NewDevice(vol, virtioblk.Options{NumQueues: 2, QueueSize: qsize, Serial: "vu-test"})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "vu.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &rig{sock: sock, vol: vol, cancel: cancel, done: make(chan error, 1)}
	srv := vhostuser.NewServer(vhostblk.New(dev), vhostuser.Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	go func() { r.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-r.done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return r
}

func newGuest(t *testing.T) (*vt.Guest, []*vt.Driver) {
	g, err := vt.NewGuest(8 << 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	return g, []*vt.Driver{vt.NewDriver(g, qsize, true), vt.NewDriver(g, qsize, true)}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed ^ byte(i*13)
	}
	return b
}

func TestFullSessionTwoQueues(t *testing.T) {
	r := serve(t, memvol.New(4<<20, false))
	g, ds := newGuest(t)
	f := dial(t, r.sock, g)
	f.ds, f.kick, f.call = ds, []int{eventfd(t), eventfd(t)}, []int{eventfd(t), eventfd(t)}
	f.negotiate()

	// Config space: capacity and the writeback byte.
	m := f.get(wire.GetConfig, wire.Config{Data: make([]byte, 60)}.Append(nil))
	c, err := wire.DecodeConfig(m.Payload)
	if err != nil || c.Size != 60 {
		t.Fatalf("GET_CONFIG reply: %+v %v", c, err)
	}
	if capSectors := binary.LittleEndian.Uint64(c.Data); capSectors != (4<<20)/512 {
		t.Fatalf("capacity %d", capSectors)
	}
	f.mustAck(wire.SetConfig, wire.Config{Offset: virtioblk.WritebackOffset, Data: []byte{0}}.Append(nil))
	m = f.get(wire.GetConfig, wire.Config{Offset: virtioblk.WritebackOffset, Data: make([]byte, 1)}.Append(nil))
	if c, _ := wire.DecodeConfig(m.Payload); c.Data[0] != 0 {
		t.Fatal("SET_CONFIG writeback=0 not reflected")
	}
	if v := f.ack(wire.SetConfig, wire.Config{Offset: 0, Data: make([]byte, 8)}.Append(nil)); v == 0 {
		t.Fatal("write to capacity acked")
	}

	// Inflight region from the back-end.
	im := f.get(wire.GetInflightFD, wire.Inflight{NumQueues: 2, QueueSize: qsize}.Append(nil))
	inf, _ := wire.DecodeInflight(im.Payload)
	infFD, err := im.TakeFD()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(infFD)
	if inf.MmapSize < inflight.RegionSize(2, qsize) {
		t.Fatalf("inflight region %d bytes", inf.MmapSize)
	}
	f.start(infFD, inf, false)

	for qi := 0; qi < 2; qi++ {
		p := pattern(4096, byte(qi+1))
		if st := f.io(qi, virtioblk.TOut, uint64(8*qi), p); st != virtioblk.SOK {
			t.Fatalf("queue %d write status %d", qi, st)
		}
		got := make([]byte, 4096)
		if st := f.io(qi, virtioblk.TIn, uint64(8*qi), got); st != virtioblk.SOK || !bytes.Equal(got, p) {
			t.Fatalf("queue %d read back: status %d equal %v", qi, st, bytes.Equal(got, p))
		}
	}
	if !bytes.Equal(r.vol.Bytes()[4096:8192], pattern(4096, 2)) {
		t.Fatal("queue 1 data not on the volume")
	}
	if r.vol.Flushes() < 2 {
		t.Fatalf("write-through mode: %d flushes for 2 writes", r.vol.Flushes())
	}
	bases := f.stop()
	if bases[0] != 2 || bases[1] != 2 {
		t.Fatalf("GET_VRING_BASE %v, want [2 2]", bases)
	}
}

func TestRejectsBadRequests(t *testing.T) {
	r := serve(t, memvol.New(1<<20, false))
	g, ds := newGuest(t)
	f := dial(t, r.sock, g)
	f.ds = ds
	f.negotiate()
	bad := []struct {
		name    string
		req     wire.Request
		payload []byte
	}{
		{"ring size not power of two", wire.SetVringNum, wire.VringState{Index: 0, Num: 12}.Append(nil)},
		{"ring size too big", wire.SetVringNum, wire.VringState{Index: 0, Num: 4096}.Append(nil)},
		{"ring index out of range", wire.SetVringNum, wire.VringState{Index: 7, Num: 16}.Append(nil)},
		{"packed base", wire.SetVringBase, wire.VringState{Index: 0, Num: 1 << 20}.Append(nil)},
		{"dirty log", wire.SetVringAddr, wire.VringAddr{Index: 0, Flags: wire.VringFlagLog}.Append(nil)},
		{"kick without fd", wire.SetVringKick, wire.VringFD{Index: 0, NoFD: true}.Append(nil)},
		{"features without VERSION_1", wire.SetFeatures, wire.AppendU64(nil, wire.FeatureProtocolFeatures)},
		{"unoffered feature", wire.SetFeatures, wire.AppendU64(nil, 1<<63|virtioblk.FVersion1)},
		{"log base", wire.SetLogBase, make([]byte, 16)},
	}
	for _, b := range bad {
		if v := f.ack(b.req, b.payload); v == 0 {
			t.Errorf("%s: acked", b.name)
		}
	}
	// Ring addresses outside guest memory: accepted as state, refused when
	// the ring starts.
	reg := wire.MemRegion{GuestAddr: 0, Size: uint64(len(g.Host)), UserAddr: vt.UserBase}
	f.mustAck(wire.SetMemTable, wire.AppendMemTable(nil, []wire.MemRegion{reg}), g.FD)
	f.mustAck(wire.SetVringNum, wire.VringState{Index: 0, Num: qsize}.Append(nil))
	f.mustAck(wire.SetVringAddr, wire.VringAddr{Index: 0, Desc: 0x1000, Avail: 0x2000, Used: 0x3000}.Append(nil))
	k := eventfd(t)
	f.mustAck(wire.SetVringKick, wire.VringFD{Index: 0}.Append(nil), k)
	if v := f.ack(wire.SetVringEnable, wire.VringState{Index: 0, Num: 1}.Append(nil)); v == 0 {
		t.Error("ring with unmapped addresses started")
	}
	// The connection still works.
	if n := f.getU64(wire.GetQueueNum); n != 2 {
		t.Fatalf("GET_QUEUE_NUM after errors: %d", n)
	}
}

// A malformed header ends the connection; the server accepts the next
// front-end.
func TestReconnectAfterGarbage(t *testing.T) {
	r := serve(t, memvol.New(1<<20, false))
	g, ds := newGuest(t)
	f := dial(t, r.sock, g)
	f.c.UnixConn().Write([]byte{1, 0, 0, 0, 0x77, 0, 0, 0, 0, 0, 0, 0})
	if _, err := f.c.Recv(); err == nil {
		t.Fatal("connection survived a bad header")
	}
	f2 := dial(t, r.sock, g)
	f2.ds = ds
	f2.negotiate()
}

// A back-end that dies with requests fetched but not completed leaves them
// marked in the inflight region; the next connection (same region, as QEMU
// passes it back) resubmits them and the guest sees them complete.
func TestInflightResubmitOnReconnect(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := serve(t, vol)
	g, ds := newGuest(t)
	f := dial(t, r.sock, g)
	f.ds, f.kick, f.call = ds, []int{eventfd(t), eventfd(t)}, []int{eventfd(t), eventfd(t)}
	f.negotiate()
	im := f.get(wire.GetInflightFD, wire.Inflight{NumQueues: 2, QueueSize: qsize}.Append(nil))
	inf, _ := wire.DecodeInflight(im.Payload)
	infFD, _ := im.TakeFD()
	defer unix.Close(infFD)
	f.start(infFD, inf, true)
	if st := f.io(1, virtioblk.TOut, 0, pattern(4096, 9)); st != virtioblk.SOK {
		t.Fatalf("write status %d", st)
	}
	f.c.Close() // QEMU sees the back-end vanish

	// What a killed back-end leaves behind: two writes made available,
	// fetched and marked in flight, never completed.
	d := ds[1]
	region, err := unix.Mmap(infFD, 0, int(inf.MmapSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(region)
	track, err := inflight.Open(region, 2, 1, inf.QueueSize)
	if err != nil {
		t.Fatal(err)
	}
	var status [][]byte
	for i := 0; i < 2; i++ {
		hg, h := g.Alloc(16, 16)
		binary.LittleEndian.PutUint32(h, virtioblk.TOut)
		binary.LittleEndian.PutUint64(h[8:], uint64(16+8*i))
		dg, db := g.Alloc(4096, 512)
		copy(db, pattern(4096, byte(20+i)))
		sg, st := g.Alloc(1, 1)
		head, _ := d.AddChain([]vt.Buf{{GPA: hg, Len: 16}, {GPA: dg, Len: 4096}, {GPA: sg, Len: 1, Write: true}})
		d.Submit(head)
		track.Get(head)
		status = append(status, st)
	}

	f2 := dial(t, r.sock, g)
	f2.ds, f2.kick, f2.call = ds, []int{eventfd(t), eventfd(t)}, []int{eventfd(t), eventfd(t)}
	f2.negotiate()
	// QEMU hands the region back with its own queue size, not the layout
	// GET_INFLIGHT_FD answered.
	f2.start(infFD, wire.Inflight{MmapSize: inf.MmapSize, NumQueues: 2, QueueSize: qsize}, false)
	f2.waitUsed(1, 2)
	for i, st := range status {
		if st[0] != virtioblk.SOK {
			t.Errorf("resubmitted write %d status %d", i, st[0])
		}
		if !bytes.Equal(vol.Bytes()[(16+8*i)*512:(24+8*i)*512], pattern(4096, byte(20+i))) {
			t.Errorf("resubmitted write %d not on the volume", i)
		}
	}
	// I/O continues normally after recovery.
	got := make([]byte, 4096)
	if st := f2.io(1, virtioblk.TIn, 0, got); st != virtioblk.SOK || !bytes.Equal(got, pattern(4096, 9)) {
		t.Fatalf("read after reconnect: status %d", st)
	}
}

func TestMain(m *testing.M) {
	os.Exit(m.Run())
}

// FuzzServeConn feeds an arbitrary byte stream to a back-end connection: the
// state machine must reject or handle every message and return when the
// stream ends, never panic or hang.
func FuzzServeConn(f *testing.F) {
	msg := func(req wire.Request, payload []byte) []byte {
		b := make([]byte, wire.HeaderSize)
		wire.Header{Request: req, Flags: wire.FlagVersion | wire.FlagNeedReply, Size: uint32(len(payload))}.Put(b)
		return append(b, payload...)
	}
	var seq []byte
	seq = append(seq, msg(wire.GetFeatures, nil)...)
	seq = append(seq, msg(wire.SetProtocolFeatures, wire.AppendU64(nil, wire.ProtoReplyAck|wire.ProtoConfig))...)
	seq = append(seq, msg(wire.SetFeatures, wire.AppendU64(nil, virtioblk.FVersion1|wire.FeatureProtocolFeatures))...)
	seq = append(seq, msg(wire.GetConfig, wire.Config{Offset: 90, Data: make([]byte, 20)}.Append(nil))...)
	seq = append(seq, msg(wire.SetVringNum, wire.VringState{Index: 1, Num: 8}.Append(nil))...)
	seq = append(seq, msg(wire.SetVringAddr, wire.VringAddr{Index: 1, Desc: 1 << 40}.Append(nil))...)
	seq = append(seq, msg(wire.SetVringEnable, wire.VringState{Index: 1, Num: 1}.Append(nil))...)
	seq = append(seq, msg(wire.GetVringBase, wire.VringState{Index: 1}.Append(nil))...)
	seq = append(seq, msg(wire.GetInflightFD, wire.Inflight{NumQueues: 2, QueueSize: 16}.Append(nil))...)
	seq = append(seq, msg(wire.RemMemReg, wire.AppendSingleMemRegion(nil, wire.MemRegion{Size: 4096}))...)
	seq = append(seq, msg(wire.ResetDevice, nil)...)
	f.Add(seq)
	f.Add(msg(wire.Request(99), []byte{1, 2, 3}))
	vol := memvol.New(1<<20, false)
	dev, err := virtioblk.NewDevice(vol, virtioblk.Options{NumQueues: 2, QueueSize: qsize})
	if err != nil {
		f.Fatal(err)
	}
	srv := vhostuser.NewServer(vhostblk.New(dev), vhostuser.Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	f.Fuzz(func(t *testing.T, stream []byte) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		peer := os.NewFile(uintptr(fds[0]), "fe")
		defer peer.Close()
		bf := os.NewFile(uintptr(fds[1]), "be")
		bc, err := net.FileConn(bf)
		bf.Close()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { srv.ServeConn(wire.NewConn(bc.(*net.UnixConn))); close(done) }()
		// Drain replies so the back-end never blocks on a full socket.
		go io.Copy(io.Discard, peer)
		peer.Write(stream)
		unix.Shutdown(fds[0], unix.SHUT_WR)
		<-done
	})
}

// QEMU 10 behind libvirt was seen building 1024-entry rings for a device
// with queue-size 256 and an inflight region asked for 256. The back-end
// must serve the larger ring and still track every head of it.
func TestRingLargerThanDeviceQueueSize(t *testing.T) {
	const ring = 4 * qsize
	r := serve(t, memvol.New(1<<20, false))
	g, err := vt.NewGuest(8 << 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	ds := []*vt.Driver{vt.NewDriver(g, ring, true), vt.NewDriver(g, ring, true)}
	f := dial(t, r.sock, g)
	f.ds, f.kick, f.call, f.ring = ds, []int{eventfd(t), eventfd(t)}, []int{eventfd(t), eventfd(t)}, ring
	f.negotiate()
	im := f.get(wire.GetInflightFD, wire.Inflight{NumQueues: 2, QueueSize: qsize}.Append(nil))
	inf, _ := wire.DecodeInflight(im.Payload)
	infFD, err := im.TakeFD()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(infFD)
	if inf.QueueSize < ring || inf.MmapSize < inflight.RegionSize(2, inf.QueueSize) {
		t.Fatalf("inflight region %+v cannot track %d-entry rings", inf, ring)
	}
	f.start(infFD, wire.Inflight{MmapSize: inf.MmapSize, NumQueues: 2, QueueSize: qsize}, false)
	// More requests in flight at once than the device's queue size, so
	// heads beyond it are fetched and tracked.
	const n = 3 * qsize
	d := ds[0]
	var heads []uint16
	for i := 0; i < n; i++ {
		hg, h := g.Alloc(16, 16)
		binary.LittleEndian.PutUint32(h, virtioblk.TOut)
		binary.LittleEndian.PutUint64(h[8:], uint64(i))
		dg, db := g.Alloc(512, 512)
		copy(db, pattern(512, byte(i)))
		sg, _ := g.Alloc(1, 1)
		head, ok := d.AddIndirect([]vt.Buf{{GPA: hg, Len: 16}, {GPA: dg, Len: 512}, {GPA: sg, Len: 1, Write: true}})
		if !ok {
			t.Fatalf("request %d: ring full", i)
		}
		heads = append(heads, head)
		d.Submit(head)
	}
	if slices.Max(heads) < qsize {
		t.Fatalf("heads %v never pass the device queue size %d", heads, qsize)
	}
	signal(f.kick[0])
	f.waitUsed(0, n)
	for i := 0; i < n; i++ {
		if !bytes.Equal(r.vol.Bytes()[i*512:(i+1)*512], pattern(512, byte(i))) {
			t.Fatalf("sector %d not written", i)
		}
	}
	if v := f.ack(wire.SetVringNum, wire.VringState{Index: 0, Num: 2048}.Append(nil)); v == 0 {
		t.Fatal("SET_VRING_NUM 2048 acked: QEMU never builds rings over 1024")
	}
}
