package wire

import (
	"bytes"
	"errors"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func socketPair(t testing.TB) (*Conn, *Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(fd int) *Conn {
		f := os.NewFile(uintptr(fd), "sock")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return NewConn(c.(*net.UnixConn))
	}
	a, b := mk(fds[0]), mk(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func TestRoundTripPayloads(t *testing.T) {
	va := VringAddr{Index: 1, Flags: VringFlagLog, Desc: 0x1000, Used: 0x3000, Avail: 0x2000, Log: 0x9000}
	got, err := DecodeVringAddr(va.Append(nil))
	if err != nil || got != va {
		t.Fatalf("vring addr: got %+v, %v", got, err)
	}
	regs := []MemRegion{{0, 1 << 20, 0x7f0000000000, 0}, {1 << 32, 4096, 0x7f1000000000, 4096}}
	rt, err := DecodeMemTable(AppendMemTable(nil, regs))
	if err != nil || len(rt) != 2 || rt[0] != regs[0] || rt[1] != regs[1] {
		t.Fatalf("mem table: got %+v, %v", rt, err)
	}
	if err := CheckPayload(SetMemTable, AppendMemTable(nil, regs)); err != nil {
		t.Fatal(err)
	}
	one, err := DecodeSingleMemRegion(AppendSingleMemRegion(nil, regs[1]))
	if err != nil || one != regs[1] {
		t.Fatalf("single region: %+v %v", one, err)
	}
	inf := Inflight{MmapSize: 8192, MmapOffset: 0, NumQueues: 2, QueueSize: 128}
	enc := inf.Append(nil)
	if len(enc) != InflightSize {
		t.Fatalf("inflight encodes to %d bytes, want %d", len(enc), InflightSize)
	}
	if g, err := DecodeInflight(enc); err != nil || g != inf {
		t.Fatalf("inflight: %+v %v", g, err)
	}
	cfg := Config{Offset: 32, Flags: ConfigFlagWritable, Data: []byte{1}}
	gc, err := DecodeConfig(cfg.Append(nil))
	if err != nil || gc.Offset != 32 || gc.Size != 1 || !bytes.Equal(gc.Data, []byte{1}) {
		t.Fatalf("config: %+v %v", gc, err)
	}
	for _, v := range []VringFD{{3, false}, {0, true}, {255, true}} {
		if g, err := DecodeVringFD(v.Append(nil)); err != nil || g != v {
			t.Fatalf("vring fd %+v: %+v %v", v, g, err)
		}
	}
	if _, err := DecodeVringFD(AppendU64(nil, 0x200)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("unknown vring fd bits accepted: %v", err)
	}
}

func TestDecodeHeaderRejects(t *testing.T) {
	cases := map[string]Header{
		"version 0":    {Request: GetFeatures, Flags: 0},
		"version 2":    {Request: GetFeatures, Flags: 2},
		"unknown flag": {Request: GetFeatures, Flags: FlagVersion | 0x10},
		"huge":         {Request: SetMemTable, Flags: FlagVersion, Size: MaxPayload + 1},
	}
	for name, h := range cases {
		b := make([]byte, HeaderSize)
		h.Put(b)
		if _, err := DecodeHeader(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: got %v, want ErrMalformed", name, err)
		}
	}
	if _, err := DecodeHeader(make([]byte, 5)); err == nil {
		t.Error("short header accepted")
	}
}

func TestCheckPayload(t *testing.T) {
	if err := CheckPayload(SetVringNum, make([]byte, 7)); err == nil {
		t.Error("7-byte vring state accepted")
	}
	if err := CheckPayload(SetVringAddr, make([]byte, VringAddrSize)); err != nil {
		t.Error(err)
	}
	bad := AppendMemTable(nil, []MemRegion{{}})
	bad = append(bad, 0) // trailing garbage
	if err := CheckPayload(SetMemTable, bad); err == nil {
		t.Error("mem table with trailing byte accepted")
	}
	tooMany := AppendMemTable(nil, make([]MemRegion, MaxMemRegions+1))
	if err := CheckPayload(SetMemTable, tooMany); err == nil {
		t.Error("9-region mem table accepted")
	}
	c := Config{Data: make([]byte, 4)}.Append(nil)
	if err := CheckPayload(GetConfig, c[:len(c)-1]); err == nil {
		t.Error("truncated config accepted")
	}
}

func TestSendRecvWithFDs(t *testing.T) {
	a, b := socketPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	payload := VringFD{Index: 2}.Append(nil)
	if err := a.SendRequest(SetVringKick, true, payload, int(w.Fd())); err != nil {
		t.Fatal(err)
	}
	m, err := b.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if m.Request != SetVringKick || !m.NeedReply() || !bytes.Equal(m.Payload, payload) {
		t.Fatalf("got %+v", m)
	}
	fd, err := m.TakeFD()
	if err != nil {
		t.Fatal(err)
	}
	// The received fd is a new descriptor for the same pipe.
	if _, err := unix.Write(fd, []byte("x")); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	buf := make([]byte, 1)
	if _, err := r.Read(buf); err != nil || buf[0] != 'x' {
		t.Fatalf("read through passed fd: %q %v", buf, err)
	}

	if err := b.SendReply(GetFeatures, AppendU64(nil, 42)); err != nil {
		t.Fatal(err)
	}
	rep, err := a.RecvReply(GetFeatures)
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := DecodeU64(rep.Payload); v != 42 {
		t.Fatalf("reply %d", v)
	}
	// A reply for a different request is refused.
	b.SendReply(GetQueueNum, AppendU64(nil, 1))
	if _, err := a.RecvReply(GetFeatures); !errors.Is(err, ErrMalformed) {
		t.Fatalf("mismatched reply: %v", err)
	}
	a.Close()
	if _, err := b.Recv(); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

func TestRecvTruncatedPayload(t *testing.T) {
	a, b := socketPair(t)
	hdr := make([]byte, HeaderSize)
	Header{Request: SetFeatures, Flags: FlagVersion, Size: 8}.Put(hdr)
	a.uc.Write(append(hdr, 1, 2, 3))
	a.Close()
	if _, err := b.Recv(); err == nil || errors.Is(err, ErrClosed) {
		t.Fatalf("truncated message: %v", err)
	}
}

// FuzzRecv feeds arbitrary bytes through the framing and every payload
// decoder: nothing may panic, and anything accepted must re-check cleanly.
func FuzzRecv(f *testing.F) {
	seed := func(req Request, flags uint32, payload []byte) {
		b := make([]byte, HeaderSize)
		Header{Request: req, Flags: flags, Size: uint32(len(payload))}.Put(b)
		f.Add(append(b, payload...))
	}
	seed(GetFeatures, FlagVersion, nil)
	seed(SetFeatures, FlagVersion|FlagNeedReply, AppendU64(nil, 1<<32))
	seed(SetMemTable, FlagVersion, AppendMemTable(nil, []MemRegion{{0, 1 << 29, 0x7f00, 0}}))
	seed(SetVringAddr, FlagVersion, VringAddr{Index: 1, Desc: 1, Used: 2, Avail: 3}.Append(nil))
	seed(GetConfig, FlagVersion, Config{Data: make([]byte, 60)}.Append(nil))
	seed(SetInflightFD, FlagVersion, Inflight{MmapSize: 4096, NumQueues: 1, QueueSize: 128}.Append(nil))
	seed(AddMemReg, FlagVersion, AppendSingleMemRegion(nil, MemRegion{Size: 4096}))
	seed(SetVringKick, FlagVersion, VringFD{Index: 1, NoFD: true}.Append(nil))
	f.Add([]byte{1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := socketPair(t)
		go func() { a.uc.Write(data); a.Close() }()
		for {
			m, err := b.Recv()
			if err != nil {
				return
			}
			if err := CheckPayload(m.Request, m.Payload); err != nil {
				continue
			}
			switch m.Request {
			case SetMemTable:
				if _, err := DecodeMemTable(m.Payload); err != nil {
					t.Fatalf("CheckPayload ok but DecodeMemTable: %v", err)
				}
			case SetVringAddr:
				if _, err := DecodeVringAddr(m.Payload); err != nil {
					t.Fatal(err)
				}
			case GetConfig, SetConfig:
				c, err := DecodeConfig(m.Payload)
				if err != nil || len(c.Data) != int(c.Size) {
					t.Fatalf("config %v", err)
				}
			case SetInflightFD, GetInflightFD:
				if _, err := DecodeInflight(m.Payload); err != nil {
					t.Fatal(err)
				}
			case AddMemReg, RemMemReg:
				if _, err := DecodeSingleMemRegion(m.Payload); err != nil {
					t.Fatal(err)
				}
			case SetVringKick, SetVringCall, SetVringErr:
				DecodeVringFD(m.Payload)
			}
		}
	})
}
