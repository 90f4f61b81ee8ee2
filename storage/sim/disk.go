// Package sim owns deterministic simulation of storage: a simulated disk with
// a volatile write cache and injected faults, and a simulated clock. Every
// random choice comes from one seed, and nothing runs on another goroutine,
// so a seed replays a run exactly.
package sim

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
)

// SectorSize is the unit the simulated disk writes atomically.
const SectorSize = 512

// ErrLatent is the error of a read that hits a latent sector error.
var ErrLatent = errors.New("sim: latent sector error (EIO)")

// Clock is simulated time in ticks. Only the simulation advances it.
type Clock struct{ now uint64 }

// Now returns the current tick.
func (c *Clock) Now() uint64 { return c.now }

// Advance moves time forward.
func (c *Clock) Advance(d uint64) { c.now += d }

// Options configure a Disk. Probabilities are in [0, 1].
type Options struct {
	Seed uint64
	Size uint64 // bytes, multiple of SectorSize
	// LatencyMax is the largest number of ticks an operation takes.
	LatencyMax uint64
	// FaultRanges are the byte ranges [start, end) that at-rest faults
	// (misdirected writes, latent errors, bit rot) may hit. Empty: none.
	FaultRanges [][2]uint64
	// Per completed write: the write lands at a random place in a fault
	// range instead of its target.
	Misdirect float64
	// Per completed write: one random sector in a fault range becomes
	// unreadable until rewritten.
	LatentError float64
	// Per completed write: one bit flips in a random sector of a fault range.
	BitRot float64
	// At crash, per write still in flight: some of its sectors reach the
	// medium (a torn write), and with half that chance one becomes garbage.
	TornWrite float64
	// At crash, per sector of a completed but unflushed write: it is lost.
	LoseUnflushed float64
}

type cached struct {
	data  []byte
	stamp uint64
}

type op struct {
	kind  byte // 'r', 'w', 'f'
	off   uint64
	buf   []byte
	done  func(error)
	ready uint64
	order uint64
	mark  uint64 // flush: last write stamp it covers
}

// Disk is a simulated disk. It is not safe for concurrent use: the
// simulation runs in one goroutine.
type Disk struct {
	o       Options
	rng     *rand.Rand
	Clock   Clock
	durable []byte
	cache   map[uint64][]cached // sector -> completed, unflushed versions, oldest first
	latent  map[uint64]bool
	faulted map[uint64]bool // sectors an at-rest fault touched
	pending []*op
	order   uint64
	stamp   uint64
	// Faults counts injected faults by kind, for reports.
	Faults map[string]int
}

// New returns a zero-filled disk.
func New(o Options) *Disk {
	if o.LatencyMax == 0 {
		o.LatencyMax = 10
	}
	return &Disk{
		o: o, rng: rand.New(rand.NewPCG(o.Seed, o.Seed^0x9e3779b97f4a7c15)),
		durable: make([]byte, o.Size), cache: map[uint64][]cached{},
		latent: map[uint64]bool{}, faulted: map[uint64]bool{}, Faults: map[string]int{},
	}
}

// Rand exposes the disk's generator so a harness can draw from the same seed.
func (d *Disk) Rand() *rand.Rand { return d.rng }

// Size returns the disk size.
func (d *Disk) Size() uint64 { return d.o.Size }

func (d *Disk) check(off uint64, n int) {
	if off%SectorSize != 0 || n%SectorSize != 0 || off+uint64(n) > d.o.Size {
		panic(fmt.Sprintf("sim: bad I/O offset %d length %d on a %d-byte disk", off, n, d.o.Size))
	}
}

func (d *Disk) submit(o *op) {
	d.order++
	o.order = d.order
	o.ready = d.Clock.Now() + 1 + d.rng.Uint64N(d.o.LatencyMax)
	d.pending = append(d.pending, o)
}

// Read starts a read.
func (d *Disk) Read(off uint64, buf []byte, done func(error)) {
	d.check(off, len(buf))
	d.submit(&op{kind: 'r', off: off, buf: buf, done: done})
}

// Write starts a write. The data is taken when the write completes.
func (d *Disk) Write(off uint64, buf []byte, done func(error)) {
	d.check(off, len(buf))
	d.submit(&op{kind: 'w', off: off, buf: buf, done: done})
}

// Flush starts a flush covering every write completed before this call.
func (d *Disk) Flush(done func(error)) {
	d.submit(&op{kind: 'f', done: done, mark: d.stamp})
}

// Pending reports how many operations are in flight.
func (d *Disk) Pending() int { return len(d.pending) }

// Step completes the next due operation and runs its callback. It returns
// false when nothing is pending.
func (d *Disk) Step() bool {
	if len(d.pending) == 0 {
		return false
	}
	best := 0
	for i, o := range d.pending {
		b := d.pending[best]
		if o.ready < b.ready || o.ready == b.ready && o.order < b.order {
			best = i
		}
	}
	o := d.pending[best]
	d.pending = append(d.pending[:best], d.pending[best+1:]...)
	if o.ready > d.Clock.Now() {
		d.Clock.now = o.ready
	}
	var err error
	switch o.kind {
	case 'r':
		err = d.doRead(o.off, o.buf)
	case 'w':
		d.doWrite(o.off, o.buf)
	case 'f':
		d.doFlush(o.mark)
	}
	o.done(err)
	return true
}

func (d *Disk) doRead(off uint64, buf []byte) error {
	for i := 0; i < len(buf); i += SectorSize {
		s := (off + uint64(i)) / SectorSize
		if d.latent[s] {
			return fmt.Errorf("read at %d: %w", off, ErrLatent)
		}
		if c := d.cache[s]; len(c) > 0 {
			copy(buf[i:i+SectorSize], c[len(c)-1].data)
		} else {
			copy(buf[i:i+SectorSize], d.durable[s*SectorSize:])
		}
	}
	return nil
}

func (d *Disk) doWrite(off uint64, buf []byte) {
	if d.roll(d.o.Misdirect) {
		if to, ok := d.randomRange(uint64(len(buf))); ok {
			d.markFaulted(off, uint64(len(buf)))
			d.markFaulted(to, uint64(len(buf)))
			d.Faults["misdirect"]++
			off = to
		}
	}
	for i := 0; i < len(buf); i += SectorSize {
		s := (off + uint64(i)) / SectorSize
		d.stamp++
		d.cache[s] = append(d.cache[s], cached{data: append([]byte(nil), buf[i:i+SectorSize]...), stamp: d.stamp})
		delete(d.latent, s)
	}
	if d.roll(d.o.LatentError) {
		if at, ok := d.randomRange(SectorSize); ok {
			d.latent[at/SectorSize] = true
			d.markFaulted(at, SectorSize)
			d.Faults["latent"]++
		}
	}
	if d.roll(d.o.BitRot) {
		if at, ok := d.randomRange(SectorSize); ok {
			d.FlipBit(at, d.rng.IntN(SectorSize*8))
			d.Faults["bitrot"]++
		}
	}
}

func (d *Disk) doFlush(mark uint64) {
	for s, vs := range d.cache {
		n := 0
		for n < len(vs) && vs[n].stamp <= mark {
			n++
		}
		if n == 0 {
			continue
		}
		copy(d.durable[s*SectorSize:], vs[n-1].data)
		if n == len(vs) {
			delete(d.cache, s)
		} else {
			d.cache[s] = vs[n:]
		}
	}
}

func (d *Disk) roll(p float64) bool { return p > 0 && d.rng.Float64() < p }

// randomRange picks a 4 KiB-aligned offset in a fault range with room for n
// bytes.
func (d *Disk) randomRange(n uint64) (uint64, bool) {
	if len(d.o.FaultRanges) == 0 {
		return 0, false
	}
	r := d.o.FaultRanges[d.rng.IntN(len(d.o.FaultRanges))]
	if r[1] < r[0]+n {
		return 0, false
	}
	span := (r[1] - r[0] - n) / SectorSize
	at := r[0] + d.rng.Uint64N(span+1)*SectorSize
	if n >= 4096 {
		at -= (at - r[0]) % 4096
	}
	return at, true
}

func (d *Disk) markFaulted(off, n uint64) {
	for s := off / SectorSize; s < (off+n+SectorSize-1)/SectorSize; s++ {
		d.faulted[s] = true
	}
}

// Faulted reports whether an at-rest fault touched any sector of
// [off, off+n): errors reading there are expected.
func (d *Disk) Faulted(off, n uint64) bool {
	for s := off / SectorSize; s < (off+n+SectorSize-1)/SectorSize; s++ {
		if d.faulted[s] {
			return true
		}
	}
	return false
}

// FaultCount returns the number of faulted sectors.
func (d *Disk) FaultCount() int { return len(d.faulted) }

// Crash simulates power loss: operations in flight are dropped (a write may
// be torn), completed but unflushed sectors are lost at random, and the
// callbacks of dropped operations never run.
func (d *Disk) Crash() {
	for _, o := range d.pending {
		if o.kind != 'w' || !d.roll(d.o.TornWrite) {
			continue
		}
		d.Faults["torn"]++
		for i := 0; i < len(o.buf); i += SectorSize {
			if d.rng.IntN(2) == 0 {
				copy(d.durable[o.off+uint64(i):], o.buf[i:i+SectorSize])
			}
		}
		if d.rng.IntN(2) == 0 {
			at := o.off + uint64(d.rng.IntN(len(o.buf)/SectorSize))*SectorSize
			for i := range SectorSize {
				d.durable[at+uint64(i)] = byte(d.rng.Uint32())
			}
		}
	}
	d.pending = nil
	// Sectors persist in stamp order so a sector written twice keeps the
	// newer surviving copy; map order must not decide.
	var lost int
	keys := make([]uint64, 0, len(d.cache))
	for s := range d.cache {
		keys = append(keys, s)
	}
	slices.Sort(keys)
	for _, s := range keys {
		for _, c := range d.cache[s] {
			if d.roll(d.o.LoseUnflushed) {
				lost++
				continue
			}
			copy(d.durable[s*SectorSize:], c.data)
		}
	}
	if lost > 0 {
		d.Faults["lost-unflushed-sectors"] += lost
	}
	d.cache = map[uint64][]cached{}
}

// ProcessCrash simulates the death of the process using the disk, not of
// the machine: what the kernel already took stays, completed writes keep
// waiting in the volatile cache for a flush, and each write in flight
// reaches the cache or not, sector by sector. No callback of an operation
// in flight ever runs.
func (d *Disk) ProcessCrash() {
	for _, o := range d.pending {
		if o.kind != 'w' {
			continue
		}
		for i := 0; i < len(o.buf); i += SectorSize {
			if d.rng.IntN(2) == 0 {
				d.stamp++
				s := (o.off + uint64(i)) / SectorSize
				d.cache[s] = append(d.cache[s], cached{data: append([]byte(nil), o.buf[i:i+SectorSize]...), stamp: d.stamp})
			}
		}
	}
	d.pending = nil
}

// FlipBit flips one bit of the sector at off (durable and cached copy).
func (d *Disk) FlipBit(off uint64, bit int) {
	s := off / SectorSize
	d.markFaulted(s*SectorSize, SectorSize)
	d.durable[s*SectorSize+uint64(bit/8)] ^= 1 << (bit % 8)
	for _, c := range d.cache[s] {
		c.data[bit/8] ^= 1 << (bit % 8)
	}
}

// CorruptSector overwrites the sector at off with random bytes.
func (d *Disk) CorruptSector(off uint64) {
	s := off / SectorSize
	d.markFaulted(s*SectorSize, SectorSize)
	for i := range uint64(SectorSize) {
		d.durable[s*SectorSize+i] = byte(d.rng.Uint32())
	}
	delete(d.cache, s)
}

// CopySector copies the sector at from over the sector at to, as a
// misdirected write of from's data would.
func (d *Disk) CopySector(from, to uint64) {
	d.markFaulted(to, SectorSize)
	buf := make([]byte, SectorSize)
	_ = d.doRead(from/SectorSize*SectorSize, buf)
	copy(d.durable[to/SectorSize*SectorSize:], buf)
	delete(d.cache, to/SectorSize)
}

// SetLatent makes the sector at off fail reads until it is rewritten.
func (d *Disk) SetLatent(off uint64) {
	d.markFaulted(off, SectorSize)
	d.latent[off/SectorSize] = true
}

// Image returns the durable contents plus the unflushed cache, as a reader
// would see them.
func (d *Disk) Image() []byte {
	b := append([]byte(nil), d.durable...)
	for s, c := range d.cache {
		copy(b[s*SectorSize:], c[len(c)-1].data)
	}
	return b
}
