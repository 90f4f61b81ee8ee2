package virtq_test

import (
	"encoding/binary"
	"errors"
	"runtime"
	"sync"
	"testing"

	"github.com/virtblk/virtblk/blkio/virtq"
	vt "github.com/virtblk/virtblk/blkio/virtq/virtqtest"
)

func setup(t testing.TB, n uint16, eventIdx bool) (*vt.Guest, *vt.Driver, *virtq.Queue) {
	t.Helper()
	g, err := vt.NewGuest(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	d := vt.NewDriver(g, n, eventIdx)
	q, err := virtq.New(d.Config(), 0)
	if err != nil {
		t.Fatal(err)
	}
	return g, d, q
}

func TestDirectAndIndirectChains(t *testing.T) {
	g, d, q := setup(t, 8, false)
	hg, hdr := g.Alloc(16, 8)
	dg, _ := g.Alloc(4096, 512)
	sg, _ := g.Alloc(1, 1)
	copy(hdr, "0123456789abcdef")
	h1, _ := d.AddChain([]vt.Buf{{GPA: hg, Len: 16, Write: false}, {GPA: dg, Len: 4096, Write: true}, {GPA: sg, Len: 1, Write: true}})
	h2, _ := d.AddIndirect([]vt.Buf{{GPA: hg, Len: 16, Write: false}, {GPA: dg, Len: 512, Write: false}, {GPA: sg, Len: 1, Write: true}})
	d.Submit(h1, h2)

	var c virtq.Chain
	ok, err := q.Next(&c)
	if !ok || err != nil {
		t.Fatalf("Next: %v %v", ok, err)
	}
	if c.Head != h1 || c.ReadLen != 16 || c.WriteLen != 4097 || len(c.Readable) != 1 || len(c.Writable) != 2 {
		t.Fatalf("chain 1: %+v", c)
	}
	if string(c.Readable[0]) != "0123456789abcdef" {
		t.Fatalf("readable bytes %q", c.Readable[0])
	}
	ok, err = q.Next(&c)
	if !ok || err != nil || c.Head != h2 || c.ReadLen != 528 || c.WriteLen != 1 {
		t.Fatalf("chain 2: %+v %v", c, err)
	}
	if ok, err := q.Next(&c); ok || err != nil {
		t.Fatalf("empty ring: %v %v", ok, err)
	}
	q.Push(h2, 1)
	q.Push(h1, 4097)
	if d.UsedIdx() != 0 {
		t.Fatal("used.idx moved before Publish")
	}
	q.Publish()
	got := d.Reap()
	if len(got) != 2 || got[0] != (vt.Used{ID: uint32(h2), Len: 1}) || got[1] != (vt.Used{ID: uint32(h1), Len: 4097}) {
		t.Fatalf("used %+v", got)
	}
	if q.LastAvail() != 2 {
		t.Fatalf("LastAvail %d", q.LastAvail())
	}
}

func TestHostileRings(t *testing.T) {
	type build func(g *vt.Guest, d *vt.Driver) // leaves one head at avail slot 0
	ok := func(g *vt.Guest) uint64 { a, _ := g.Alloc(64, 8); return a }
	cases := map[string]build{
		"head out of range": func(g *vt.Guest, d *vt.Driver) { d.Submit(200) },
		"next out of range": func(g *vt.Guest, d *vt.Driver) {
			d.SetDesc(0, ok(g), 16, virtq.DescFNext, 99)
			d.Submit(0)
		},
		"loop": func(g *vt.Guest, d *vt.Driver) {
			a := ok(g)
			d.SetDesc(0, a, 16, virtq.DescFNext, 1)
			d.SetDesc(1, a, 16, virtq.DescFNext, 0)
			d.Submit(0)
		},
		"self loop": func(g *vt.Guest, d *vt.Driver) {
			d.SetDesc(3, ok(g), 16, virtq.DescFNext, 3)
			d.Submit(3)
		},
		"address outside memory": func(g *vt.Guest, d *vt.Driver) {
			d.SetDesc(0, 1<<40, 16, 0, 0)
			d.Submit(0)
		},
		"length past end": func(g *vt.Guest, d *vt.Driver) {
			d.SetDesc(0, uint64(len(g.Host))-8, 16, 0, 0)
			d.Submit(0)
		},
		"address wraps": func(g *vt.Guest, d *vt.Driver) {
			d.SetDesc(0, ^uint64(0)-4, 16, 0, 0)
			d.Submit(0)
		},
		"readable after writable": func(g *vt.Guest, d *vt.Driver) {
			a := ok(g)
			d.SetDesc(0, a, 16, virtq.DescFWrite|virtq.DescFNext, 1)
			d.SetDesc(1, a, 16, 0, 0)
			d.Submit(0)
		},
		"indirect with next": func(g *vt.Guest, d *vt.Driver) {
			tg, _ := g.Alloc(32, 16)
			d.SetDesc(0, tg, 32, virtq.DescFIndirect|virtq.DescFNext, 1)
			d.Submit(0)
		},
		"indirect bad length": func(g *vt.Guest, d *vt.Driver) {
			tg, _ := g.Alloc(32, 16)
			d.SetDesc(0, tg, 17, virtq.DescFIndirect, 0)
			d.Submit(0)
		},
		"indirect too long": func(g *vt.Guest, d *vt.Driver) {
			tg, _ := g.Alloc(16*64, 16)
			d.SetDesc(0, tg, 16*64, virtq.DescFIndirect, 0)
			d.Submit(0)
		},
		"nested indirect": func(g *vt.Guest, d *vt.Driver) {
			tg, tbl := g.Alloc(16, 16)
			binary.LittleEndian.PutUint64(tbl, tg)
			binary.LittleEndian.PutUint32(tbl[8:], 16)
			binary.LittleEndian.PutUint16(tbl[12:], virtq.DescFIndirect)
			d.SetDesc(0, tg, 16, virtq.DescFIndirect, 0)
			d.Submit(0)
		},
		"indirect loop": func(g *vt.Guest, d *vt.Driver) {
			a := ok(g)
			tg, tbl := g.Alloc(32, 16)
			for i := 0; i < 2; i++ {
				binary.LittleEndian.PutUint64(tbl[16*i:], a)
				binary.LittleEndian.PutUint32(tbl[16*i+8:], 8)
				binary.LittleEndian.PutUint16(tbl[16*i+12:], virtq.DescFNext)
				binary.LittleEndian.PutUint16(tbl[16*i+14:], uint16(1-i))
			}
			d.SetDesc(0, tg, 32, virtq.DescFIndirect, 0)
			d.Submit(0)
		},
		"avail index jump": func(g *vt.Guest, d *vt.Driver) { d.SetAvailIdx(17) },
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			g, d, q := setup(t, 8, true)
			b(g, d)
			var c virtq.Chain
			ok, err := q.Next(&c)
			if ok || !errors.Is(err, virtq.ErrBroken) {
				t.Fatalf("got ok=%v err=%v, want ErrBroken", ok, err)
			}
		})
	}
}

func TestIndirectRequiresFeature(t *testing.T) {
	g, d, _ := setup(t, 8, false)
	cfg := d.Config()
	cfg.Indirect = false
	q, err := virtq.New(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := g.Alloc(16, 16)
	h, _ := d.AddIndirect([]vt.Buf{{GPA: a, Len: 16, Write: false}})
	d.Submit(h)
	var c virtq.Chain
	if _, err := q.Next(&c); !errors.Is(err, virtq.ErrBroken) {
		t.Fatalf("indirect without feature: %v", err)
	}
}

func TestNewRejects(t *testing.T) {
	_, d, _ := setup(t, 8, false)
	cfg := d.Config()
	for _, n := range []uint16{0, 3, 12} {
		c := cfg
		c.Size = n
		if _, err := virtq.New(c, 0); err == nil {
			t.Errorf("size %d accepted", n)
		}
	}
	c := cfg
	c.Size = 16 // rings laid out for 8
	if _, err := virtq.New(c, 0); err == nil {
		t.Error("rings too small accepted")
	}
	c = cfg
	c.Used = c.Used[2:]
	if _, err := virtq.New(c, 0); err == nil {
		t.Error("misaligned used ring accepted")
	}
}

func TestNotifyNoEventIdx(t *testing.T) {
	g, d, q := setup(t, 8, false)
	a, _ := g.Alloc(16, 16)
	h, _ := d.AddChain([]vt.Buf{{GPA: a, Len: 1, Write: true}})
	d.Submit(h)
	var c virtq.Chain
	q.Next(&c)
	q.Push(c.Head, 1)
	q.Publish()
	if !q.NeedNotify() {
		t.Fatal("no notification with interrupts enabled")
	}
	d.SetNoInterrupt(true)
	q.Push(c.Head, 1)
	q.Publish()
	if q.NeedNotify() {
		t.Fatal("notified despite NO_INTERRUPT")
	}
	q.DisableNotify()
	if d.UsedFlags()&1 == 0 {
		t.Fatal("DisableNotify did not set NO_NOTIFY")
	}
	more, err := q.EnableNotify()
	if more || err != nil || d.UsedFlags()&1 != 0 {
		t.Fatalf("EnableNotify: %v %v flags %d", more, err, d.UsedFlags())
	}
	d.Submit(h)
	if more, _ := q.EnableNotify(); !more {
		t.Fatal("EnableNotify missed a pending buffer")
	}
}

func TestNotifyEventIdx(t *testing.T) {
	g, d, q := setup(t, 8, true)
	a, _ := g.Alloc(16, 16)
	var heads []uint16
	for i := 0; i < 4; i++ {
		h, _ := d.AddChain([]vt.Buf{{GPA: a, Len: 1, Write: true}})
		heads = append(heads, h)
	}
	d.Submit(heads...)
	var c virtq.Chain
	for i := 0; i < 4; i++ {
		q.Next(&c)
	}
	// While the device drains, avail_event stays put (kicks suppressed);
	// EnableNotify moves it to the next buffer before the device sleeps.
	if d.AvailEvent() != 0 {
		t.Fatalf("avail_event %d while draining, want 0", d.AvailEvent())
	}
	if more, _ := q.EnableNotify(); more || d.AvailEvent() != 4 {
		t.Fatalf("after EnableNotify: more %v, avail_event %d, want false, 4", more, d.AvailEvent())
	}
	// First notification always goes out.
	q.Push(heads[0], 1)
	q.Publish()
	if !q.NeedNotify() {
		t.Fatal("first notification suppressed")
	}
	// Driver wants an interrupt only when used.idx passes 3.
	d.SetUsedEvent(2)
	q.Push(heads[1], 1) // used.idx 2: event 2 not crossed (needs new > 2)
	q.Publish()
	if q.NeedNotify() {
		t.Fatal("notified before used_event was crossed")
	}
	q.Push(heads[2], 1) // used.idx 3 crosses event 2
	q.Publish()
	if !q.NeedNotify() {
		t.Fatal("not notified when used_event was crossed")
	}
	if q.NeedNotify() {
		t.Fatal("notified twice for the same used.idx")
	}
	q.ResetSignalled()
	if !q.NeedNotify() {
		t.Fatal("ResetSignalled did not force a notification")
	}
}

// TestConcurrentDriver runs the driver and the device on different
// goroutines (go test -race) and checks every request completes once with
// the right length.
func TestConcurrentDriver(t *testing.T) {
	const n, total = 16, 5000
	g, d, q := setup(t, n, true)
	bufGPA, _ := g.Alloc(64*n, 64)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var c virtq.Chain
		for {
			select {
			case <-done:
				return
			default:
			}
			got := false
			for {
				ok, err := q.Next(&c)
				if err != nil {
					t.Error(err)
					return
				}
				if !ok {
					break
				}
				got = true
				q.Push(c.Head, uint32(c.WriteLen))
			}
			q.Publish()
			q.NeedNotify()
			if !got {
				runtime.Gosched()
			}
		}
	}()
	sent, recv := 0, 0
	for recv < total {
		for sent < total && d.FreeDescs() > 0 {
			ln := uint32(sent%63 + 1)
			h, _ := d.AddChain([]vt.Buf{{GPA: bufGPA, Len: ln, Write: true}})
			d.PutAvail(h)
			sent++
		}
		d.Publish()
		for _, u := range d.Reap() {
			if u.Len == 0 || u.Len > 63 {
				t.Fatalf("bad used len %d", u.Len)
			}
			recv++
		}
		runtime.Gosched()
	}
	close(done)
	wg.Wait()
}

// FuzzWalk builds a descriptor table and avail ring from fuzz bytes; the
// walker must return a chain within memory or ErrBroken, never panic.
func FuzzWalk(f *testing.F) {
	seed := make([]byte, 16*8+4)
	binary.LittleEndian.PutUint64(seed, 8192)
	binary.LittleEndian.PutUint32(seed[8:], 16)
	binary.LittleEndian.PutUint16(seed[12:], virtq.DescFNext)
	binary.LittleEndian.PutUint16(seed[14:], 1)
	binary.LittleEndian.PutUint64(seed[16:], 8192+16)
	binary.LittleEndian.PutUint32(seed[24:], 1)
	binary.LittleEndian.PutUint16(seed[28:], virtq.DescFWrite)
	f.Add(seed, uint16(1), uint16(0))
	loop := append([]byte(nil), seed...)
	binary.LittleEndian.PutUint16(loop[14:], 0)
	f.Add(loop, uint16(1), uint16(0))
	ind := make([]byte, 16*8)
	binary.LittleEndian.PutUint64(ind, 8192)
	binary.LittleEndian.PutUint32(ind[8:], 32)
	binary.LittleEndian.PutUint16(ind[12:], virtq.DescFIndirect)
	f.Add(ind, uint16(1), uint16(0))
	g, err := vt.NewGuest(1 << 16)
	if err != nil {
		f.Fatal(err)
	}
	defer g.Close()
	f.Fuzz(func(t *testing.T, table []byte, availIdx uint16, head uint16) {
		g.Reset()
		d := vt.NewDriver(g, 8, true)
		// Put the fuzz bytes in the descriptor table and the indirect area.
		copy(g.Host[d.DescGPA:d.DescGPA+128], table)
		if len(table) > 128 {
			copy(g.Host[8192:], table[128:])
		}
		d.PutAvail(head)
		d.SetAvailIdx(availIdx)
		q, err := virtq.New(d.Config(), 0)
		if err != nil {
			t.Fatal(err)
		}
		var c virtq.Chain
		for i := 0; i < 10; i++ {
			ok, err := q.Next(&c)
			if err != nil {
				if !errors.Is(err, virtq.ErrBroken) {
					t.Fatalf("error not ErrBroken: %v", err)
				}
				return
			}
			if !ok {
				return
			}
			if c.ReadLen+c.WriteLen > 1<<32 || len(c.Readable)+len(c.Writable) > 8*2 {
				t.Fatalf("chain too big: %+v", c)
			}
		}
	})
}

// Linux sizes indirect tables from the device's seg_max, which may exceed
// the ring size QEMU picked (queue-size=128 with seg_max=254): such a table
// is legal and must be served, up to the configured MaxChain.
func TestIndirectTableLongerThanRing(t *testing.T) {
	g, err := vt.NewGuest(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	d := vt.NewDriver(g, 8, false)
	cfg := d.Config()
	cfg.MaxChain = 64
	q, err := virtq.New(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(n int) []vt.Buf {
		bufs := make([]vt.Buf, n)
		for i := range bufs {
			gpa, _ := g.Alloc(512, 512)
			bufs[i] = vt.Buf{GPA: gpa, Len: 512, Write: i == n-1}
		}
		return bufs
	}
	h, _ := d.AddIndirect(mk(40))
	d.Submit(h)
	var c virtq.Chain
	if ok, err := q.Next(&c); !ok || err != nil || len(c.Readable)+len(c.Writable) != 40 {
		t.Fatalf("40-entry table on an 8-entry ring: ok=%v err=%v chain=%d+%d", ok, err, len(c.Readable), len(c.Writable))
	}
	h, _ = d.AddIndirect(mk(65))
	d.Submit(h)
	if _, err := q.Next(&c); !errors.Is(err, virtq.ErrBroken) {
		t.Fatalf("65-entry table with MaxChain 64: err=%v, want ErrBroken", err)
	}
}
