package frontend

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// modelDevice is an in-process virtio-blk device: the back-end half of the
// split ring over the same guest memory, serving a RAM disk. It lets the
// driver side be tested without a socket, and concurrently (go test -race).
type modelDevice struct {
	mem       *guestMemory
	disk      []byte
	eventIdx  bool
	noNotify  bool // set VRING_USED_F_NO_NOTIFY (ignored with eventIdx)
	lastAvail map[int]uint16
	usedIdx   map[int]uint16
	corruptID bool // complete one request with a bogus id
}

func (m *modelDevice) gpa(addr uint64, n uint32) []byte {
	off := addr - guestBase
	return m.mem.mem[off : off+uint64(n)]
}

// process serves everything available on q and returns how many requests
// completed. It signals the call fd the way a real back-end would.
func (m *modelDevice) process(q *Queue) int {
	r := q.ring
	qs := int(r.q)
	avail := uint16(atomic.LoadUint32(word(r.avail, 0)) >> 16)
	last := m.lastAvail[q.index]
	used := m.usedIdx[q.index]
	oldUsed := used
	n := 0
	for last != avail {
		head := binary.LittleEndian.Uint16(r.avail[4+2*(int(last)%qs):])
		last++
		var segs [][]byte
		var flags []uint16
		for i, d := 0, head; i < qs; i++ {
			e := r.desc[int(d)*16:]
			addr, l, f, next := binary.LittleEndian.Uint64(e), binary.LittleEndian.Uint32(e[8:]), binary.LittleEndian.Uint16(e[12:]), binary.LittleEndian.Uint16(e[14:])
			segs = append(segs, m.gpa(addr, l))
			flags = append(flags, f)
			if f&descFNext == 0 {
				break
			}
			d = next
		}
		hdr, status := segs[0], segs[len(segs)-1]
		typ, sector := binary.LittleEndian.Uint32(hdr), binary.LittleEndian.Uint64(hdr[8:])
		st, written := StatusOK, uint32(1)
		switch typ {
		case TypeIn, TypeOut:
			data := segs[1]
			off := sector * SectorSize
			if off+uint64(len(data)) > uint64(len(m.disk)) {
				st = StatusIOErr
			} else if typ == TypeIn {
				copy(data, m.disk[off:])
				written += uint32(len(data))
				if flags[1]&descFWrite == 0 {
					st = StatusIOErr
				}
			} else {
				copy(m.disk[off:], data)
			}
		case TypeFlush:
		default:
			st = StatusUnsupp
		}
		status[0] = st
		id := uint32(head)
		if m.corruptID {
			id = 1 // never a head: heads are multiples of 3
			m.corruptID = false
		}
		e := r.used[4+8*(int(used)%qs):]
		binary.LittleEndian.PutUint32(e, id)
		binary.LittleEndian.PutUint32(e[4:], written)
		used++
		n++
	}
	m.lastAvail[q.index] = last
	if m.eventIdx {
		atomic.StoreUint32(word(r.used, 4+8*qs), uint32(last))
	}
	flagsWord := uint32(0)
	if m.noNotify && !m.eventIdx {
		flagsWord = uint32(usedFNoNotify)
	}
	atomic.StoreUint32(word(r.used, 0), flagsWord|uint32(used)<<16)
	m.usedIdx[q.index] = used
	if n > 0 {
		notify := true
		if m.eventIdx {
			ev := uint16(atomic.LoadUint32(word(r.avail, 4+2*qs)))
			notify = needEvent(ev, used, oldUsed)
		}
		if notify {
			var b [8]byte
			binary.LittleEndian.PutUint64(b[:], 1)
			unix.Write(q.callFD, b[:])
		}
	}
	return n
}

// newModelPair builds a Device with started queues over guest memory but
// no socket, and a model device serving them.
func newModelPair(t *testing.T, queues, depth int, eventIdx bool) (*Device, *modelDevice) {
	t.Helper()
	d := &Device{log: nil}
	if eventIdx {
		d.info.Features |= FeatureRingEventIdx
	}
	opts := Options{Queues: queues, QueueDepth: depth, MaxIO: 8192}
	qsize := 4
	for qsize < depth*descPerReq {
		qsize *= 2
	}
	mem, err := newGuestMemory(queues * (64<<10 + depth*8192 + 5*4096))
	if err != nil {
		t.Fatal(err)
	}
	d.mem = mem
	for i := 0; i < queues; i++ {
		q, err := newQueue(d, i, qsize, opts)
		if err != nil {
			t.Fatal(err)
		}
		d.queues = append(d.queues, q)
	}
	t.Cleanup(func() { d.teardown() })
	m := &modelDevice{mem: mem, disk: make([]byte, 1<<20), eventIdx: eventIdx, lastAvail: map[int]uint16{}, usedIdx: map[int]uint16{}}
	return d, m
}

func TestRingRoundTripSynchronous(t *testing.T) {
	for _, ev := range []bool{false, true} {
		d, m := newModelPair(t, 1, 4, ev)
		q := d.queues[0]
		rng := rand.New(rand.NewPCG(5, 6))
		comps := make([]Completion, 4)
		// Many more requests than the ring size, so indices wrap.
		for round := 0; round < 200; round++ {
			want := make([][]byte, 4)
			for s := 0; s < 4; s++ {
				b := q.Buffer(s)[:4096]
				for i := range b {
					b[i] = byte(rng.Uint32())
				}
				want[s] = bytes.Clone(b)
				if err := q.Submit(s, TypeOut, uint64(s*8), 4096); err != nil {
					t.Fatal(err)
				}
			}
			if err := q.Kick(); err != nil {
				t.Fatal(err)
			}
			if m.process(q) != 4 {
				t.Fatal("device did not see 4 requests")
			}
			if n, err := q.Reap(comps, 4); err != nil || n != 4 {
				t.Fatalf("reap %d %v", n, err)
			}
			for _, c := range comps {
				if c.Status != StatusOK || c.Len != 1 {
					t.Fatalf("write completion %+v", c)
				}
			}
			for s := 0; s < 4; s++ {
				clear(q.Buffer(s))
				q.Submit(s, TypeIn, uint64(s*8), 4096)
			}
			q.Kick()
			m.process(q)
			if n, err := q.Reap(comps, 4); err != nil || n != 4 {
				t.Fatalf("reap %d %v", n, err)
			}
			for _, c := range comps {
				if c.Status != StatusOK || c.Len != 4097 || !bytes.Equal(q.Buffer(c.Slot)[:4096], want[c.Slot]) {
					t.Fatalf("read completion %+v, data match %v", c, bytes.Equal(q.Buffer(c.Slot)[:4096], want[c.Slot]))
				}
			}
		}
		if q.InFlight() != 0 {
			t.Fatalf("%d in flight", q.InFlight())
		}
		if ev && q.Kicks == 0 {
			t.Fatal("EVENT_IDX: never kicked")
		}
	}
}

func TestNoNotifySuppressesKicks(t *testing.T) {
	d, m := newModelPair(t, 1, 2, false)
	m.noNotify = true
	q := d.queues[0]
	comps := make([]Completion, 2)
	q.Submit(0, TypeFlush, 0, 0)
	q.Kick() // first publish: flags still 0, so it kicks
	m.process(q)
	q.Reap(comps, 1)
	kicks := q.Kicks
	for i := 0; i < 10; i++ {
		q.Submit(0, TypeFlush, 0, 0)
		q.Kick()
		m.process(q)
		if n, err := q.Reap(comps, 1); n != 1 || err != nil {
			t.Fatal(n, err)
		}
	}
	if q.Kicks != kicks || q.Suppressed != 10 {
		t.Fatalf("kicks %d->%d suppressed %d: NO_NOTIFY ignored", kicks, q.Kicks, q.Suppressed)
	}
}

func TestNeedEvent(t *testing.T) {
	cases := []struct {
		ev, nw, old uint16
		want        bool
	}{
		{0, 1, 0, true},
		{5, 5, 4, false},
		{4, 5, 4, true},
		{3, 10, 5, false},
		{7, 10, 5, true},
		{65535, 2, 65534, true}, // wrap
		{1, 2, 65534, true},
		{2, 2, 65534, false},
	}
	for _, c := range cases {
		if got := needEvent(c.ev, c.nw, c.old); got != c.want {
			t.Errorf("needEvent(%d,%d,%d) = %v", c.ev, c.nw, c.old, got)
		}
	}
}

func TestBogusUsedIDIsAnError(t *testing.T) {
	d, m := newModelPair(t, 1, 2, true)
	q := d.queues[0]
	m.corruptID = true
	q.Submit(0, TypeFlush, 0, 0)
	q.Kick()
	m.process(q)
	comps := make([]Completion, 2)
	if _, err := q.Reap(comps, 1); err == nil {
		t.Fatal("completion of a descriptor that is not an in-flight head accepted")
	}
}

func TestSubmitRejectsBadSlots(t *testing.T) {
	d, _ := newModelPair(t, 1, 2, false)
	q := d.queues[0]
	if q.Submit(2, TypeIn, 0, 512) == nil || q.Submit(-1, TypeIn, 0, 512) == nil || q.Submit(0, TypeIn, 0, 1<<20) == nil || q.Submit(0, 99, 0, 0) == nil {
		t.Fatal("bad submit accepted")
	}
	if err := q.Submit(0, TypeFlush, 0, 0); err != nil {
		t.Fatal(err)
	}
	if q.Submit(0, TypeFlush, 0, 0) == nil {
		t.Fatal("busy slot resubmitted")
	}
}

// TestConcurrentDevice runs the model device in its own goroutine, woken by
// the kick eventfd, while the driver keeps every queue full: the shape of
// real use, under the race detector.
func TestConcurrentDevice(t *testing.T) {
	for _, ev := range []bool{false, true} {
		d, m := newModelPair(t, 2, 8, ev)
		var mu sync.Mutex // the model's maps are shared between its queue goroutines
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for _, q := range d.queues {
			wg.Add(1)
			go func() {
				defer wg.Done()
				pfd := []unix.PollFd{{Fd: int32(q.kickFD), Events: unix.POLLIN}}
				var b [8]byte
				for {
					select {
					case <-stop:
						return
					default:
					}
					unix.Poll(pfd, 10)
					unix.Read(q.kickFD, b[:])
					mu.Lock()
					m.process(q)
					mu.Unlock()
				}
			}()
		}
		var dwg sync.WaitGroup
		errs := make(chan error, 2)
		for _, q := range d.queues {
			dwg.Add(1)
			go func() {
				defer dwg.Done()
				comps := make([]Completion, 8)
				for s := 0; s < 8; s++ {
					q.Submit(s, TypeIn, uint64(q.index*64+s), 512)
				}
				q.Kick()
				for done := 0; done < 5000; {
					n, err := q.Reap(comps, 1)
					if err != nil {
						errs <- err
						return
					}
					for _, c := range comps[:n] {
						if c.Status != StatusOK {
							errs <- errors.New("bad status")
							return
						}
						q.Submit(c.Slot, TypeIn, uint64(c.Slot), 512)
					}
					done += n
					q.Kick()
				}
				n := q.InFlight()
				for n > 0 {
					k, err := q.Reap(comps, n)
					if err != nil {
						errs <- err
						return
					}
					n -= k
				}
			}()
		}
		dwg.Wait()
		close(stop)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
}

func TestAbortWakesReap(t *testing.T) {
	d, _ := newModelPair(t, 1, 2, true)
	q := d.queues[0]
	q.Submit(0, TypeFlush, 0, 0)
	q.Kick()
	errc := make(chan error)
	go func() {
		_, err := q.Reap(make([]Completion, 1), 1)
		errc <- err
	}()
	d.Abort()
	if err := <-errc; !errors.Is(err, ErrAborted) {
		t.Fatalf("Reap after Abort: %v", err)
	}
}

func TestParseConfig(t *testing.T) {
	cfg := make([]byte, configReadSize)
	binary.LittleEndian.PutUint64(cfg, 2048)
	binary.LittleEndian.PutUint32(cfg[20:], 4096)
	binary.LittleEndian.PutUint16(cfg[34:], 4)
	binary.LittleEndian.PutUint32(cfg[36:], 100)
	cfg[56] = 1
	info := Info{Features: FeatureBlkBlkSize | FeatureBlkMQ | FeatureBlkDiscard | FeatureBlkWriteZeroes}
	if err := parseConfig(&info, cfg); err != nil {
		t.Fatal(err)
	}
	if info.Capacity != 2048*512 || info.BlockSize != 4096 || info.NumQueues != 4 || info.MaxDiscardSectors != 100 || !info.WriteZeroesMayUnmap {
		t.Fatalf("%+v", info)
	}
	binary.LittleEndian.PutUint32(cfg[20:], 3000)
	if parseConfig(&info, cfg) == nil {
		t.Fatal("blk_size 3000 accepted")
	}
	if parseConfig(&Info{Features: FeatureBlkDiscard}, cfg[:40]) == nil {
		t.Fatal("short config with DISCARD accepted")
	}
}

// FuzzParseConfig: config bytes come from the back-end; any input must give
// an Info or an error, never a panic.
func FuzzParseConfig(f *testing.F) {
	f.Add(uint64(0x7fff), make([]byte, configReadSize))
	f.Add(uint64(FeatureBlkDiscard|FeatureBlkWriteZeroes|FeatureBlkBlkSize), make([]byte, 47))
	f.Add(^uint64(0), bytes.Repeat([]byte{0xff}, 96))
	f.Fuzz(func(t *testing.T, features uint64, cfg []byte) {
		info := Info{Features: features}
		if parseConfig(&info, cfg) == nil && (info.BlockSize < 512 || info.BlockSize&(info.BlockSize-1) != 0) {
			t.Fatalf("accepted block size %d", info.BlockSize)
		}
	})
}

// FuzzUsedRing: the used ring is written by the back-end; whatever it
// contains, Reap returns completions of in-flight slots or an error.
func FuzzUsedRing(f *testing.F) {
	f.Add(uint16(1), []byte{0, 0, 0, 0, 1, 0, 0, 0})
	f.Add(uint16(3), []byte{3, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff})
	f.Add(uint16(0xffff), bytes.Repeat([]byte{0xab}, 64))
	d := &Device{}
	mem, err := newGuestMemory(1 << 20)
	if err != nil {
		f.Fatal(err)
	}
	d.mem = mem
	q, err := newQueue(d, 0, 8, Options{QueueDepth: 2, MaxIO: 4096})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, idx uint16, elems []byte) {
		// Fresh ring state each run: two requests in flight.
		q.ring.availIdx, q.ring.published, q.ring.lastUsed = 0, 0, 0
		clear(q.busy)
		clear(q.ring.used)
		q.Submit(0, TypeFlush, 0, 0)
		q.Submit(1, TypeIn, 0, 512)
		q.ring.publish()
		copy(q.ring.used[4:4+8*8], elems)
		*(*uint32)(unsafe.Pointer(&q.ring.used[0])) = uint32(idx) << 16
		out := make([]Completion, 2)
		n, err := q.Reap(out, 0)
		if err == nil {
			seen := map[int]bool{}
			for _, c := range out[:n] {
				if c.Slot < 0 || c.Slot > 1 || seen[c.Slot] {
					t.Fatalf("bad completion %+v", c)
				}
				seen[c.Slot] = true
			}
		}
	})
}
