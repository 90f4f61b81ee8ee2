package store

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/virtblk/virtblk/storage"
	"github.com/virtblk/virtblk/storage/sim"
)

var (
	flagSeed  = flag.Uint64("seed", 0, "run only this simulator seed (TestSim)")
	flagSeeds = flag.Int("seeds", 120, "number of simulator seeds TestSim runs (a sixth of them under -race, 10 with -short)")
	flagSoak  = flag.Duration("soak", 0, "run random simulator seeds for this long (local soak)")
	flagSteps = flag.Int("steps", 0, "simulator steps per seed (default 3000, 20000 with -soak)")
)

func simSteps(def int) int {
	if *flagSteps > 0 {
		return *flagSteps
	}
	return def
}

// TestSim runs the store against the simulated disk for many seeds: random
// I/O, flushes, admin operations, crashes with torn and lost writes, and
// at-rest faults; after every recovery the checker verifies every sector.
func TestSim(t *testing.T) {
	switch {
	case *flagSeed != 0:
		runSeed(t, *flagSeed, simSteps(3000))
	case *flagSoak > 0:
		end := time.Now().Add(*flagSoak)
		base := uint64(time.Now().UnixNano())
		for i := uint64(0); time.Now().Before(end); i++ {
			runSeed(t, base+i, simSteps(20000))
			if t.Failed() {
				return
			}
		}
	default:
		n := *flagSeeds
		if raceEnabled {
			// The race detector slows the single-goroutine simulation
			// about tenfold and finds nothing in it; the concurrent tests
			// are what -race is for.
			n = max(1, n/6)
		}
		if testing.Short() {
			n = min(n, 10)
		}
		for seed := uint64(1); seed <= uint64(n); seed++ {
			runSeed(t, seed, simSteps(3000))
			if t.Failed() {
				return
			}
		}
	}
}

// vmodel is what a volume's sectors may contain. hist[s] lists the stamps
// written to sector s in order (0 = zeroes); after a crash the sector must
// hold one of hist[s][fl[s]:], fl[s] moving forward as flushes complete.
type vmodel struct {
	name     string
	snapshot bool
	size     uint64
	hist     map[uint64][]uint64
	fl       map[uint64]int
	ack      map[uint64]int // newest acknowledged write in hist: survives a process crash
	busy     map[uint64]bool
	created  int // admin sequence that created it
	deleted  int // admin sequence that deleted it, 0 = live
	sizes    []sizeAt
}

type sizeAt struct {
	size uint64
	at   int
}

func (m *vmodel) cur(s uint64) uint64 {
	h := m.hist[s]
	if len(h) == 0 {
		return 0
	}
	return h[len(h)-1]
}

type harness struct {
	t       *testing.T
	seed    uint64
	steps   int
	rng     *rand.Rand
	disk    *sim.Disk
	s       *Store
	opts    Options
	geo     Geometry
	vols    map[string]*vmodel
	dead    []*vmodel // deleted, maybe not durably
	stamp   uint64
	admin   int // admin operations so far
	durable int // admin operations known durable
	flight  int
	crashes int
	procs   int // of which process crashes (intent log kept)
	boots   int
	refused int
	reads   int
	readErr int
	names   int
}

func (h *harness) fatalf(format string, args ...any) {
	h.t.Helper()
	h.t.Fatalf("seed %d: %s\nreplay: go test ./storage/store -run 'TestSim$' -seed=%d -steps=%d -v",
		h.seed, fmt.Sprintf(format, args...), h.seed, h.steps)
}

// runSeed runs one simulation and returns its disk.
func runSeed(t *testing.T, seed uint64, steps int) *sim.Disk {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	fo := FormatOptions{JournalSlots: 16, SlotSize: 8192, UUID: [16]byte{byte(seed), byte(seed >> 8), 1}}
	size := uint64(8 << 20)
	geo, err := computeGeometry(size, fo)
	if err != nil {
		t.Fatal(err)
	}
	so := sim.Options{Seed: seed, Size: size, LatencyMax: 1 + rng.Uint64N(20)}
	so.TornWrite = rng.Float64()
	so.LoseUnflushed = rng.Float64()
	// Half the seeds inject at-rest faults into the data zone; one in eight
	// also into the metadata zones, where Open may have to refuse.
	if rng.IntN(2) == 0 {
		so.FaultRanges = [][2]uint64{{geo.DataOff, size}}
		so.BitRot, so.LatentError, so.Misdirect = rng.Float64()*0.01, rng.Float64()*0.01, rng.Float64()*0.003
		if rng.IntN(4) == 0 {
			so.FaultRanges = append(so.FaultRanges, [2]uint64{0, geo.DataOff})
		}
	}
	h := &harness{t: t, seed: seed, steps: steps, rng: rng, disk: sim.New(so), geo: geo, vols: map[string]*vmodel{}}
	h.opts = Options{Pump: h.disk.Step, CommitRecords: 1 + rng.IntN(200)}
	// Most seeds run with an intent log, some so small that writes wait
	// for a commit when it fills.
	if rng.IntN(8) != 0 {
		slots := 4 + rng.IntN(300)
		h.opts.Intent = &IntentLog{Mem: make([]byte, intentHeaderSize+2*(intentRegionHdr+intentSlotSize*slots)), Boot: "boot-0"}
	}
	if os.Getenv("VIRTBLK_SIM_LOG") != "" {
		h.opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if err := Format(h.disk, fo, h.opts); err != nil {
		h.fatalf("format: %v", err)
	}
	if !h.reopen() {
		return h.disk
	}
	crashEvery := 200 + rng.IntN(1500)
	for step := 0; step < steps && !t.Failed(); step++ {
		switch r := h.rng.IntN(100); {
		case step > 0 && step%crashEvery == 0:
			if h.opts.Intent != nil && h.rng.IntN(2) == 0 {
				h.processCrash()
			} else {
				h.crash()
			}
			if !h.reopen() {
				return h.disk
			}
		case r < 40 && h.flight < 16:
			h.issueIO()
		case r < 43 && h.flight == 0:
			h.issueAdmin()
		case r < 46:
			h.s.Tick()
		default:
			if !h.disk.Step() && h.flight > 0 {
				h.fatalf("%d operations outstanding but the disk is idle", h.flight)
			}
		}
	}
	if t.Failed() {
		return h.disk
	}
	h.crash()
	h.reopen()
	t.Logf("seed %d: %d crashes (%d of the process), %d refused opens, %d reads (%d failed as faults), faults %v",
		seed, h.crashes, h.procs, h.refused, h.reads, h.readErr, h.disk.Faults)
	return h.disk
}

// TestSimDeterministic checks storage determinism: a seed replays to a
// byte-identical disk, which is what makes a printed seed a reproduction.
func TestSimDeterministic(t *testing.T) {
	for _, seed := range []uint64{2, 11} {
		a := runSeed(t, seed, 1500).Image()
		b := runSeed(t, seed, 1500).Image()
		if string(a) != string(b) {
			t.Fatalf("seed %d: two runs left different disks", seed)
		}
	}
}

// content returns the self-describing contents of one sector.
func content(stamp, sector uint64) []byte {
	b := make([]byte, storage.SectorSize)
	if stamp == 0 {
		return b
	}
	binary.LittleEndian.PutUint64(b, stamp)
	binary.LittleEndian.PutUint64(b[8:], sector)
	for i := 16; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], stamp*0x9e3779b97f4a7c15+uint64(i))
	}
	return b
}

// decode returns the stamp a sector holds, or ok=false for garbage.
func decode(b []byte, sector uint64) (uint64, bool) {
	stamp := binary.LittleEndian.Uint64(b)
	if stamp == 0 {
		return 0, !slices.ContainsFunc(b, func(c byte) bool { return c != 0 })
	}
	return stamp, string(b) == string(content(stamp, sector))
}

func (h *harness) live() []*vmodel {
	var out []*vmodel
	for _, m := range h.vols {
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b *vmodel) int { return cmpStr(a.name, b.name) })
	return out
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (h *harness) pick(writable bool) *vmodel {
	var c []*vmodel
	for _, m := range h.live() {
		if !writable || !m.snapshot {
			c = append(c, m)
		}
	}
	if len(c) == 0 {
		return nil
	}
	return c[h.rng.IntN(len(c))]
}

var physRE = regexp.MustCompile(`physical block (\d+)`)

// faultExplains reports whether a failed I/O on volume block lb is
// explained by an injected fault at the physical block the error names (the
// map may have moved on since the read looked it up) or at the block lb
// maps now.
func (h *harness) faultExplains(name string, lb uint32, err error) bool {
	if err != nil {
		for _, m := range physRE.FindAllStringSubmatch(err.Error(), -1) {
			p, _ := strconv.ParseUint(m[1], 10, 32)
			if h.disk.Faulted(h.geo.blockOffset(uint32(p)), blockSize) {
				return true
			}
		}
	}
	v := h.s.table().byName[name]
	if v == nil {
		return false
	}
	e := v.t.lookup(lb)
	return e != 0 && h.disk.Faulted(h.geo.blockOffset(entryBlock(e)), blockSize)
}

func (h *harness) issueIO() {
	m := h.pick(h.rng.IntN(3) != 0)
	if m == nil {
		return
	}
	vol, err := h.s.Volume(m.name)
	if err != nil {
		h.fatalf("volume %q in model but not in store: %v", m.name, err)
	}
	sectors := m.size / storage.SectorSize
	n := uint64(1 + h.rng.IntN(24))
	if h.rng.IntN(2) == 0 {
		n = 8 * uint64(1+h.rng.IntN(3))
	}
	first := h.rng.Uint64N(sectors)
	if h.rng.IntN(2) == 0 {
		first -= first % 8
	}
	n = min(n, sectors-first)
	for s := first; s < first+n; s++ {
		if m.busy[s] {
			return
		}
	}
	off, length := first*storage.SectorSize, n*storage.SectorSize
	switch k := h.rng.IntN(10); {
	case k < 4 || m.snapshot:
		buf := make([]byte, length)
		h.flight++
		mark := func(v bool) {
			for s := first; s < first+n; s++ {
				m.busy[s] = v
			}
		}
		mark(true) // a read must not overlap a write in flight
		vol.ReadAt(buf, off, func(err error) {
			h.flight--
			mark(false)
			h.reads++
			if err != nil {
				if !errors.Is(err, storage.ErrIO) {
					h.fatalf("read %q at %d: error %v does not wrap storage.ErrIO", m.name, off, err)
				}
				for lb := uint32(off / blockSize); uint64(lb)*blockSize < off+length; lb++ {
					if h.faultExplains(m.name, lb, err) {
						h.readErr++
						return
					}
				}
				h.fatalf("read %q at %d+%d failed with no injected fault behind it: %v", m.name, off, length, err)
			}
			for i := range n {
				s := first + i
				got, ok := decode(buf[i*storage.SectorSize:(i+1)*storage.SectorSize], s)
				if !ok || got != m.cur(s) {
					h.fatalf("read %q sector %d: got stamp %d (valid=%v), want %d", m.name, s, got, ok, m.cur(s))
				}
			}
		})
	case k < 9:
		buf := make([]byte, length)
		zero := h.rng.IntN(8) == 0
		idx := make([]int, n)
		for i := range n {
			h.stamp++
			st := h.stamp
			if zero {
				st = 0
			}
			copy(buf[i*storage.SectorSize:], content(st, first+i))
			if len(m.hist[first+i]) == 0 {
				m.hist[first+i] = []uint64{0}
			}
			m.hist[first+i] = append(m.hist[first+i], st)
			idx[i] = len(m.hist[first+i]) - 1
			m.busy[first+i] = true
		}
		h.flight++
		done := func(err error) {
			h.flight--
			for i := range n {
				m.busy[first+i] = false
			}
			if err == nil {
				for i := range n {
					m.ack[first+i] = max(m.ack[first+i], idx[i])
				}
			}
			if err != nil {
				// A partial write fails when its read-modify-write hits a
				// faulted block; the sectors keep their old contents.
				explained := false
				for lb := uint32(off / blockSize); uint64(lb)*blockSize < off+length; lb++ {
					explained = explained || h.faultExplains(m.name, lb, err)
				}
				if !explained || !errors.Is(err, storage.ErrIO) {
					h.fatalf("write %q at %d+%d: %v", m.name, off, length, err)
				}
				h.readErr++
				// Which blocks took the write is unknown: keep every
				// stamp as possible but read checks are skipped by making
				// the current value ambiguous is not modelled; instead
				// re-read and adopt what the store now holds.
				h.adopt(m, first, n)
			}
		}
		if zero {
			vol.WriteZeroes(off, length, done)
		} else {
			vol.WriteAt(buf, off, done)
		}
	default:
		h.flush()
	}
}

// adopt re-reads sectors after a partly failed write and records what the
// store holds as their current value, after checking it is allowed.
func (h *harness) adopt(m *vmodel, first, n uint64) {
	for s := first; s < first+n; s++ {
		h.flight++
		m.busy[s] = true
		buf := make([]byte, storage.SectorSize)
		vol, _ := h.s.Volume(m.name)
		vol.ReadAt(buf, s*storage.SectorSize, func(err error) {
			h.flight--
			m.busy[s] = false
			if err != nil {
				return // still faulted; the next read checks again
			}
			got, ok := decode(buf, s)
			hist := m.hist[s]
			if !ok || !slices.Contains(hist, got) {
				h.fatalf("after failed write, %q sector %d holds %d (valid=%v), history %v", m.name, s, got, ok, hist)
			}
			// Move the value to the end of the history: it is current.
			m.hist[s] = append(hist, got)
		})
	}
}

func (h *harness) flush() {
	type mark struct {
		m   *vmodel
		idx map[uint64]int
	}
	var marks []mark
	for _, m := range h.live() {
		idx := map[uint64]int{}
		for s, hist := range m.hist {
			i := len(hist) - 1
			if m.busy[s] && !m.snapshot {
				i-- // the write in flight is not covered
			}
			idx[s] = i
		}
		marks = append(marks, mark{m, idx})
	}
	admin := h.admin
	h.flight++
	h.s.flush(func(err error) {
		h.flight--
		if err != nil {
			h.fatalf("flush: %v", err)
		}
		for _, mk := range marks {
			for s, i := range mk.idx {
				if i > mk.m.fl[s] {
					mk.m.fl[s] = i
				}
			}
		}
		h.durable = max(h.durable, admin)
	})
}

func (h *harness) newName(prefix string) string {
	h.names++
	return fmt.Sprintf("%s%d", prefix, h.names)
}

func newModel(name string, size uint64, at int) *vmodel {
	return &vmodel{name: name, size: size, hist: map[uint64][]uint64{}, fl: map[uint64]int{}, ack: map[uint64]int{},
		busy: map[uint64]bool{}, created: at, sizes: []sizeAt{{size, at}}}
}

// copyModel makes a snapshot or clone model whose only allowed value per
// sector is the source's current one: the snapshot record is journaled
// after every record of its source that was applied before it.
func copyModel(src *vmodel, name string, at int) *vmodel {
	m := newModel(name, src.size, at)
	for s := range src.hist {
		if c := src.cur(s); c != 0 {
			m.hist[s] = []uint64{c}
		}
	}
	return m
}

func (h *harness) issueAdmin() {
	var snaps []*vmodel
	for _, m := range h.live() {
		if m.snapshot {
			snaps = append(snaps, m)
		}
	}
	switch k := h.rng.IntN(10); {
	case k < 3 && len(h.vols) < 6:
		defer h.adminDurable()
		name := h.newName("vol")
		size := uint64(16+h.rng.IntN(112)) * blockSize
		if err := h.s.CreateVolume(name, size); err != nil {
			h.fatalf("create %s: %v", name, err)
		}
		h.admin++
		h.vols[name] = newModel(name, size, h.admin)
	case k < 5 && len(h.vols) < 6:
		src := h.pick(true)
		if src == nil {
			return
		}
		defer h.adminDurable()
		name := h.newName("snap")
		if err := h.s.Snapshot(src.name, name); err != nil {
			h.fatalf("snapshot %s of %s: %v", name, src.name, err)
		}
		h.admin++
		m := copyModel(src, name, h.admin)
		m.snapshot = true
		h.vols[name] = m
	case k < 6 && len(snaps) > 0 && len(h.vols) < 6:
		src := snaps[h.rng.IntN(len(snaps))]
		defer h.adminDurable()
		name := h.newName("clone")
		if err := h.s.Clone(src.name, name); err != nil {
			h.fatalf("clone %s of %s: %v", name, src.name, err)
		}
		h.admin++
		h.vols[name] = copyModel(src, name, h.admin)
	case k < 8:
		m := h.pick(false)
		if m == nil || len(h.vols) < 2 {
			return
		}
		defer h.adminDurable()
		if err := h.s.Delete(m.name); err != nil {
			h.fatalf("delete %s: %v", m.name, err)
		}
		h.admin++
		m.deleted = h.admin
		delete(h.vols, m.name)
		h.dead = append(h.dead, m)
	default:
		m := h.pick(true)
		if m == nil {
			return
		}
		defer h.adminDurable()
		size := m.size + uint64(h.rng.IntN(32))*blockSize
		if err := h.s.Resize(m.name, size); err != nil {
			h.fatalf("resize %s: %v", m.name, err)
		}
		h.admin++
		m.size = size
		m.sizes = append(m.sizes, sizeAt{size, h.admin})
	}
}

// adminDurable notes that with an intent log an admin operation is
// durable when it returns.
func (h *harness) adminDurable() {
	if h.opts.Intent != nil {
		h.durable = h.admin
	}
}

// processCrash kills the store's process, not the machine: the disk keeps
// its cache and the intent log its memory, so every acknowledged write must
// survive, flushed or not.
func (h *harness) processCrash() {
	h.procs++
	h.crashes++
	h.disk.ProcessCrash()
	h.s = nil
	h.flight = 0
	for _, m := range h.vols {
		m.busy = map[uint64]bool{}
		for s, i := range m.ack {
			m.fl[s] = max(m.fl[s], i)
		}
	}
}

func (h *harness) crash() {
	h.crashes++
	if h.opts.Intent != nil {
		// A new boot: whatever the log's memory holds must be ignored.
		h.boots++
		h.opts.Intent.Boot = fmt.Sprintf("boot-%d", h.boots)
	}
	h.disk.Crash()
	h.s = nil
	h.flight = 0
	for _, m := range h.vols {
		m.busy = map[uint64]bool{}
	}
}

var offsetRE = regexp.MustCompile(`(?:offsets?|and) (\d+)`)

// refusalExplained reports whether an injected fault lies in a structure
// the refusal names: the superblock zone for a lost quorum, otherwise the
// journal slot or checkpoint area at one of the offsets it quotes.
func (h *harness) refusalExplained(err error) bool {
	if !errors.Is(err, ErrCorrupt) {
		return false
	}
	msg := err.Error()
	if strings.Contains(msg, "no superblock quorum") {
		return h.disk.Faulted(0, superZoneBytes)
	}
	for _, m := range offsetRE.FindAllStringSubmatch(msg, -1) {
		off, _ := strconv.ParseUint(m[1], 10, 64)
		n := uint64(h.geo.SlotSize)
		if off >= h.geo.CkptOff[0] && off < h.geo.DataOff {
			n = h.geo.CkptSize
		}
		if h.disk.Faulted(off, n) {
			return true
		}
	}
	return false
}

// reopen opens the store after a crash and checks every volume against the
// model. It returns false when the run cannot continue (a refused open that
// injected metadata faults explain).
func (h *harness) reopen() bool {
	s, err := Open(h.disk, h.opts)
	if err != nil {
		if h.refusalExplained(err) {
			h.refused++
			h.t.Logf("seed %d: open refused after metadata faults (allowed): %v", h.seed, err)
			return false
		}
		h.fatalf("open after crash %d: %v", h.crashes, err)
		return false
	}
	h.s = s
	got := map[string]VolumeInfo{}
	for _, vi := range s.List() {
		got[vi.Name] = vi
	}
	for name, m := range h.vols {
		vi, ok := got[name]
		if !ok {
			if m.created <= h.durable {
				h.fatalf("volume %q (created by durable admin op %d <= %d) is missing after crash %d", name, m.created, h.durable, h.crashes)
			}
			delete(h.vols, name)
			continue
		}
		if vi.Snapshot != m.snapshot {
			h.fatalf("volume %q snapshot=%v, model %v", name, vi.Snapshot, m.snapshot)
		}
		m.size = h.checkSize(m, vi.Size)
		delete(got, name)
	}
	for _, m := range h.dead {
		vi, ok := got[m.name]
		if !ok {
			continue
		}
		if m.deleted <= h.durable {
			h.fatalf("volume %q came back after a durable delete", m.name)
		}
		m.deleted = 0
		m.size = h.checkSize(m, vi.Size)
		h.vols[m.name] = m
		delete(got, m.name)
	}
	h.dead = nil
	for name := range got {
		h.fatalf("store has volume %q the model never created", name)
	}
	for _, m := range h.live() {
		h.verifyVolume(m)
	}
	h.durable = h.admin
	return !h.t.Failed()
}

// checkSize accepts the size of the last durable resize or any later one.
func (h *harness) checkSize(m *vmodel, size uint64) uint64 {
	floor := 0
	for i, sa := range m.sizes {
		if sa.at <= h.durable {
			floor = i
		}
	}
	if !slices.ContainsFunc(m.sizes[floor:], func(sa sizeAt) bool { return sa.size == size }) {
		h.fatalf("volume %q has size %d after crash; sizes %v, durable admin %d", m.name, size, m.sizes, h.durable)
	}
	m.sizes = []sizeAt{{size, 0}}
	for s := range m.hist {
		if s >= size/storage.SectorSize {
			delete(m.hist, s)
			delete(m.fl, s)
			delete(m.ack, s)
		}
	}
	return size
}

// verifyVolume reads every sector and checks it against the model, then
// makes the observed state the model's only allowed state.
func (h *harness) verifyVolume(m *vmodel) {
	vol, err := h.s.Volume(m.name)
	if err != nil {
		h.fatalf("%v", err)
	}
	buf := make([]byte, m.size)
	for off := uint64(0); off < m.size; off += blockSize {
		err := waitIO(h.opts.Pump, func(done func(error)) { vol.ReadAt(buf[off:off+blockSize], off, done) })
		lb := uint32(off / blockSize)
		if err != nil {
			if errors.Is(err, storage.ErrIO) && h.faultExplains(m.name, lb, err) {
				h.readErr++
				// Unreadable: any allowed value stays allowed.
				continue
			}
			h.fatalf("after crash %d: read %q block %d: %v", h.crashes, m.name, lb, err)
		}
		for s := off / storage.SectorSize; s < (off+blockSize)/storage.SectorSize; s++ {
			b := buf[s*storage.SectorSize : (s+1)*storage.SectorSize]
			got, ok := decode(b, s)
			hist := m.hist[s]
			allowed := []uint64{0}
			if len(hist) > 0 {
				allowed = hist[m.fl[s]:]
			}
			if !ok || !slices.Contains(allowed, got) {
				h.fatalf("after crash %d: %q sector %d holds stamp %d (valid=%v); allowed %v (history %v)",
					h.crashes, m.name, s, got, ok, allowed, hist)
			}
			delete(m.ack, s)
			if got == 0 {
				delete(m.hist, s)
				delete(m.fl, s)
			} else {
				m.hist[s] = []uint64{got}
				m.fl[s] = 0
			}
		}
	}
}
