package metrics

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/virtblk/virtblk/storage"
)

// refBucket is the obvious linear search bucketOf must agree with.
func refBucket(ns int64) int {
	for i := range numBounds {
		if ns <= bound(i) {
			return i
		}
	}
	return numBounds
}

func TestBucketOf(t *testing.T) {
	cases := []struct {
		ns   int64
		want int
	}{
		{math.MinInt64, 0}, {-1, 0}, {0, 0}, {1, 0}, {16000, 0},
		{16001, 1}, {32000, 1}, {32001, 2}, {64000, 2}, {64001, 3},
		{1_000_000, 6}, {1_024_000, 6}, {1_024_001, 7},
		{bound(16), 16}, {bound(16) + 1, 17}, {int64(time.Hour), 17}, {math.MaxInt64, 17},
	}
	for _, c := range cases {
		if got := bucketOf(c.ns); got != c.want {
			t.Errorf("bucketOf(%d) = %d, want %d", c.ns, got, c.want)
		}
	}
	// Every bound and its neighbours, then random values on a log scale.
	for i := range numBounds {
		for _, ns := range []int64{bound(i) - 1, bound(i), bound(i) + 1} {
			if got, want := bucketOf(ns), refBucket(ns); got != want {
				t.Errorf("bucketOf(%d) = %d, want %d", ns, got, want)
			}
		}
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 100000 {
		ns := int64(math.Exp(r.Float64() * 23)) // 1ns .. ~10s
		if got, want := bucketOf(ns), refBucket(ns); got != want {
			t.Fatalf("bucketOf(%d) = %d, want %d", ns, got, want)
		}
	}
}

func TestLeLabels(t *testing.T) {
	want := []string{"1.6e-05", "3.2e-05", "6.4e-05", "0.000128", "0.000256", "0.000512", "0.001024",
		"0.002048", "0.004096", "0.008192", "0.016384", "0.032768", "0.065536", "0.131072",
		"0.262144", "0.524288", "1.048576", "+Inf"}
	if len(want) != numBuckets {
		t.Fatalf("%d buckets, test lists %d", numBuckets, len(want))
	}
	for i, w := range want {
		if leLabels[i] != w {
			t.Errorf("le[%d] = %q, want %q", i, leLabels[i], w)
		}
	}
}

func TestOpFromVirtioAndStatusOf(t *testing.T) {
	ops := map[uint32]Op{0: OpRead, 1: OpWrite, 4: OpFlush, 5: OpFlush, 8: OpGetID, 11: OpDiscard, 13: OpWriteZeroes, 2: OpOther, 99: OpOther}
	for typ, want := range ops {
		if got := OpFromVirtio(typ); got != want {
			t.Errorf("OpFromVirtio(%d) = %v, want %v", typ, got, want)
		}
	}
	if Op(200).String() != "other" || OpWriteZeroes.String() != "write-zeroes" {
		t.Errorf("Op names: %q %q", Op(200), OpWriteZeroes)
	}
	st := []struct {
		err  error
		want Status
	}{
		{nil, StatusOK},
		{fmt.Errorf("read block 7: %w", storage.ErrChecksum), StatusChecksum},
		{storage.ErrUnsupported, StatusUnsupp},
		{storage.ErrIO, StatusIOErr},
		{storage.ErrRange, StatusIOErr},
	}
	for _, c := range st {
		if got := StatusOf(c.err); got != c.want {
			t.Errorf("StatusOf(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}

func mustVolume(t testing.TB, o VolumeOptions) *VolumeStats {
	t.Helper()
	v, err := NewVolume(o)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestObserveSnapshot(t *testing.T) {
	v := mustVolume(t, VolumeOptions{Name: "v", Queues: 2})
	q := v.Queue(1)
	lat := []time.Duration{0, 10 * time.Microsecond, 16 * time.Microsecond, 17 * time.Microsecond, time.Millisecond, 2 * time.Second}
	for _, l := range lat {
		q.Begin()
		q.Observe(OpRead, 4096, l, StatusOK)
	}
	q.Begin()
	q.Observe(OpWrite, 8192, 100*time.Microsecond, StatusIOErr)
	q.Begin()
	q.Observe(OpRead, 4096, 50*time.Microsecond, StatusChecksum)
	q.Begin()
	q.Observe(OpDiscard, 1<<20, 30*time.Microsecond, StatusUnsupp)
	q.Observe(Op(77), 0, -time.Second, Status(9)) // out-of-range op and status: counted, not a panic
	q.Begin()
	q.Begin()

	var s queueSnapshot
	q.snapshot(&s)
	r := s.ops[OpRead]
	if r.count != 7 || r.bytes != 7*4096 {
		t.Fatalf("read count %d bytes %d, want 7, %d", r.count, r.bytes, 7*4096)
	}
	wantCum := map[int]uint64{0: 3, 1: 4, 2: 5, 6: 6, 16: 6, 17: 7}
	for b, w := range wantCum {
		if r.cum[b] != w {
			t.Errorf("read cum[%d] = %d, want %d", b, r.cum[b], w)
		}
	}
	for b := 1; b < numBuckets; b++ {
		if r.cum[b] < r.cum[b-1] {
			t.Errorf("cum not monotonic at %d", b)
		}
	}
	var sum time.Duration
	for _, l := range lat {
		sum += l
	}
	sum += 50 * time.Microsecond
	if r.sumNs != uint64(sum) {
		t.Errorf("read sum %d ns, want %d", r.sumNs, sum)
	}
	if r.errs != [numErrs]uint64{1, 0} || s.ops[OpWrite].errs != [numErrs]uint64{1, 0} || s.ops[OpDiscard].errs != [numErrs]uint64{0, 1} {
		t.Errorf("errors read %v write %v discard %v", r.errs, s.ops[OpWrite].errs, s.ops[OpDiscard].errs)
	}
	if o := s.ops[OpOther]; o.count != 1 || o.errs[errIOErr] != 1 || o.sumNs != 0 || o.cum[0] != 1 {
		t.Errorf("other: %+v", o)
	}
	if s.checksum != 1 {
		t.Errorf("checksum %d, want 1", s.checksum)
	}
	// Begin ran 11 times (6+1+1+1+2), Observe 10 times (one more without Begin).
	if s.inFlight != 1 {
		t.Errorf("in flight %d, want 1", s.inFlight)
	}
	if v.Queue(0) == nil || v.Queue(2) != nil || v.Queue(-1) != nil || v.NumQueues() != 2 {
		t.Error("Queue bounds")
	}
}

func TestInFlightWithoutBegin(t *testing.T) {
	v := mustVolume(t, VolumeOptions{Name: "v", Queues: 1})
	v.Queue(0).Observe(OpFlush, 0, time.Millisecond, StatusOK)
	var s queueSnapshot
	v.Queue(0).snapshot(&s)
	if s.inFlight != 0 {
		t.Fatalf("in flight %d without Begin, want 0", s.inFlight)
	}
}

func TestNewVolumeErrors(t *testing.T) {
	for _, o := range []VolumeOptions{
		{Name: "", Queues: 1},
		{Name: "a", Queues: 0},
		{Name: "a", Queues: MaxQueues + 1},
	} {
		if _, err := NewVolume(o); err == nil {
			t.Errorf("NewVolume(%+v) accepted", o)
		}
	}
}

func TestRegistryAddRemove(t *testing.T) {
	reg := NewRegistry()
	a := mustVolume(t, VolumeOptions{Name: "a", Queues: 1})
	if err := reg.Add(a); err != nil {
		t.Fatal(err)
	}
	if err := reg.Add(mustVolume(t, VolumeOptions{Name: "a", Queues: 3})); err == nil || !strings.Contains(err.Error(), `"a"`) {
		t.Fatalf("duplicate volume: %v", err)
	}
	// Two invalid UTF-8 names escape to the same label value.
	if err := reg.Add(mustVolume(t, VolumeOptions{Name: "x\xff", Queues: 1})); err != nil {
		t.Fatal(err)
	}
	if err := reg.Add(mustVolume(t, VolumeOptions{Name: "x\xfe", Queues: 1})); err == nil {
		t.Fatal("volumes whose names escape alike were both accepted")
	}
	if err := reg.Add(nil); err == nil {
		t.Fatal("nil volume accepted")
	}
	other := mustVolume(t, VolumeOptions{Name: "a", Queues: 1})
	if reg.Remove(other) {
		t.Fatal("removed a different volume with the same name")
	}
	if !reg.Remove(a) || reg.Remove(a) {
		t.Fatal("Remove")
	}
	var buf bytes.Buffer
	if err := reg.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(buf.String(), `volume="a"`) {
		t.Fatal("removed volume still exported")
	}
}

func scrape(t testing.TB, reg *Registry) *exposition {
	t.Helper()
	var buf bytes.Buffer
	if err := reg.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	x, err := parseExposition(buf.String())
	if err != nil {
		t.Fatalf("%v\n%s", err, buf.String())
	}
	return x
}

func TestWriteText(t *testing.T) {
	reg := NewRegistry()
	var csum, alloc uint64 = 3, 1 << 30
	a := mustVolume(t, VolumeOptions{Name: "vol-a", Socket: "/run/virtblk/a.sock", Queues: 2,
		StoreChecksumFailures: func() uint64 { return csum }, AllocatedBytes: func() uint64 { return alloc },
		StoreFreeBytes: func() uint64 { return 7 << 20 }})
	b := mustVolume(t, VolumeOptions{Name: "vol-b", Queues: 1, CapacityBytes: func() uint64 { return 10 << 30 }})
	for _, v := range []*VolumeStats{b, a} {
		if err := reg.Add(v); err != nil {
			t.Fatal(err)
		}
	}
	a.Queue(1).Begin()
	a.Queue(1).Observe(OpRead, 4096, 20*time.Microsecond, StatusOK)
	a.Queue(1).Begin()
	a.Queue(1).Observe(OpRead, 512, 3*time.Millisecond, StatusChecksum)
	a.Queue(1).Begin()
	b.Queue(0).Begin()
	b.Queue(0).Observe(OpWriteZeroes, 1<<20, 5*time.Second, StatusUnsupp)

	x := scrape(t, reg)
	wantOrder := []string{nameInfo, nameRequests, nameBytes, nameErrors, nameChecksum, nameInFlight, nameDuration, nameStoreChecksum, nameStoreFree, nameAllocated, nameCapacity}
	if strings.Join(x.order, " ") != strings.Join(wantOrder, " ") {
		t.Fatalf("families %v, want %v", x.order, wantOrder)
	}
	types := map[string]string{nameInfo: "gauge", nameRequests: "counter", nameBytes: "counter", nameErrors: "counter",
		nameChecksum: "counter", nameInFlight: "gauge", nameDuration: "histogram", nameStoreChecksum: "counter",
		nameStoreFree: "gauge", nameAllocated: "gauge", nameCapacity: "gauge"}
	for n, typ := range types {
		if x.families[n].typ != typ {
			t.Errorf("%s: type %s, want %s", n, x.families[n].typ, typ)
		}
	}
	// Every series count: 3 queues × 7 ops for requests and bytes, ×2 statuses for errors.
	for n, want := range map[string]int{nameInfo: 2, nameRequests: 21, nameBytes: 21, nameErrors: 42, nameChecksum: 3,
		nameInFlight: 3, nameDuration: 2 * (numBuckets + 2), nameStoreChecksum: 1, nameStoreFree: 1, nameAllocated: 1, nameCapacity: 1} {
		if got := len(x.families[n].samples); got != want {
			t.Errorf("%s: %d samples, want %d", n, got, want)
		}
	}
	expect := func(want float64, name string, labels ...string) {
		t.Helper()
		got, ok := x.find(name, labels...)
		if !ok {
			t.Errorf("no sample %s%v", name, labels)
		} else if got != want {
			t.Errorf("%s%v = %v, want %v", name, labels, got, want)
		}
	}
	expect(1, nameInfo, "volume", "vol-a", "socket", "/run/virtblk/a.sock")
	expect(1, nameInfo, "volume", "vol-b", "socket", "")
	expect(2, nameRequests, "volume", "vol-a", "queue", "1", "op", "read")
	expect(0, nameRequests, "volume", "vol-a", "queue", "0", "op", "read")
	expect(4608, nameBytes, "volume", "vol-a", "queue", "1", "op", "read")
	expect(1, nameErrors, "volume", "vol-a", "queue", "1", "op", "read", "status", "ioerr")
	expect(0, nameErrors, "volume", "vol-a", "queue", "1", "op", "read", "status", "unsupp")
	expect(1, nameErrors, "volume", "vol-b", "queue", "0", "op", "write-zeroes", "status", "unsupp")
	expect(1, nameChecksum, "volume", "vol-a", "queue", "1")
	expect(1, nameInFlight, "volume", "vol-a", "queue", "1")
	expect(0, nameInFlight, "volume", "vol-b", "queue", "0")
	expect(0, nameDuration+"_bucket", "volume", "vol-a", "queue", "1", "op", "read", "le", "1.6e-05")
	expect(1, nameDuration+"_bucket", "volume", "vol-a", "queue", "1", "op", "read", "le", "3.2e-05")
	expect(1, nameDuration+"_bucket", "volume", "vol-a", "queue", "1", "op", "read", "le", "0.002048")
	expect(2, nameDuration+"_bucket", "volume", "vol-a", "queue", "1", "op", "read", "le", "0.004096")
	expect(2, nameDuration+"_bucket", "volume", "vol-a", "queue", "1", "op", "read", "le", "+Inf")
	expect(2, nameDuration+"_count", "volume", "vol-a", "queue", "1", "op", "read")
	expect(0.00302, nameDuration+"_sum", "volume", "vol-a", "queue", "1", "op", "read")
	expect(0, nameDuration+"_bucket", "volume", "vol-b", "queue", "0", "op", "write-zeroes", "le", "1.048576")
	expect(1, nameDuration+"_bucket", "volume", "vol-b", "queue", "0", "op", "write-zeroes", "le", "+Inf")
	expect(5, nameDuration+"_sum", "volume", "vol-b", "queue", "0", "op", "write-zeroes")
	expect(3, nameStoreChecksum, "volume", "vol-a")
	expect(1<<30, nameAllocated, "volume", "vol-a")
	expect(7<<20, nameStoreFree, "volume", "vol-a")
	expect(10<<30, nameCapacity, "volume", "vol-b")
	if _, ok := x.find(nameDuration+"_count", "volume", "vol-a", "queue", "0", "op", "read"); ok {
		t.Error("histogram series for an op never observed")
	}

	// Callbacks are read at scrape time.
	csum = 4
	x = scrape(t, reg)
	expect(4, nameStoreChecksum, "volume", "vol-a")
}

func TestWriteTextEmpty(t *testing.T) {
	x := scrape(t, NewRegistry())
	if len(x.families[nameRequests].samples) != 0 || x.families[nameStoreChecksum] != nil {
		t.Fatalf("empty registry: %+v", x.families)
	}
}

func TestLabelEscaping(t *testing.T) {
	name := "a\"b\\c\nd{e}=,f"
	sock := "/tmp/x\xffy\\\".sock"
	reg := NewRegistry()
	v := mustVolume(t, VolumeOptions{Name: name, Socket: sock, Queues: 1})
	if err := reg.Add(v); err != nil {
		t.Fatal(err)
	}
	v.Queue(0).Observe(OpRead, 1, time.Microsecond, StatusOK)
	var buf bytes.Buffer
	if err := reg.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), `volume="a\"b\\c\nd{e}=,f"`) {
		t.Fatalf("escaped name not found:\n%s", buf.String())
	}
	x, err := parseExposition(buf.String())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := x.find(nameInfo, "volume", name, "socket", "/tmp/x\uFFFDy\\\".sock"); !ok {
		t.Fatalf("info sample with original labels not found:\n%s", buf.String())
	}
	if got, _ := x.find(nameRequests, "volume", name, "queue", "0", "op", "read"); got != 1 {
		t.Fatalf("requests = %v", got)
	}
}

// FuzzLabels writes volumes with arbitrary names and sockets and reads the
// output back strictly: escaping must keep it valid and round-trip values.
func FuzzLabels(f *testing.F) {
	for _, s := range [][2]string{
		{"vol", "/run/a.sock"}, {`a"b`, `c\d`}, {"x\ny", "\n"}, {"\xff\xfe", "\\"}, {`\n`, `"`}, {"é€😀", "} 1\n# TYPE x counter"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, name, sock string) {
		v, err := NewVolume(VolumeOptions{Name: name, Socket: sock, Queues: 2})
		if name == "" {
			if err == nil {
				t.Fatal("empty name accepted")
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		reg := NewRegistry()
		if err := reg.Add(v); err != nil {
			t.Fatal(err)
		}
		other, err := NewVolume(VolumeOptions{Name: name + "2", Queues: 1})
		if err != nil {
			t.Fatal(err)
		}
		if err := reg.Add(other); err != nil {
			t.Fatal(err)
		}
		v.Queue(1).Observe(OpWrite, 512, time.Millisecond, StatusOK)
		x := scrape(t, reg)
		wn, ws := strings.ToValidUTF8(name, "\uFFFD"), strings.ToValidUTF8(sock, "\uFFFD")
		if _, ok := x.find(nameInfo, "volume", wn, "socket", ws); !ok {
			t.Fatalf("info for %q %q not found", wn, ws)
		}
		if got, _ := x.find(nameRequests, "volume", wn, "queue", "1", "op", "write"); got != 1 {
			t.Fatalf("requests = %v", got)
		}
	})
}

// TestConcurrentWritersAndScraper runs one writer per queue while a scraper
// reads; under -race it checks the counters are race-free, and every scrape
// must parse strictly with counters that never go backwards.
func TestConcurrentWritersAndScraper(t *testing.T) {
	const queues = 4
	n := 200000
	if testing.Short() {
		n = 20000
	}
	reg := NewRegistry()
	v := mustVolume(t, VolumeOptions{Name: "busy", Queues: queues})
	w := mustVolume(t, VolumeOptions{Name: "late", Queues: 1})
	if err := reg.Add(v); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range queues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := v.Queue(i)
			r := rand.New(rand.NewPCG(uint64(i), 7))
			for k := range n {
				q.Begin()
				op := Op(k % int(numOps))
				st := StatusOK
				if k%100 == 0 {
					st = StatusIOErr
				}
				q.Observe(op, 4096, time.Duration(r.IntN(int(2*time.Second))), st)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()

	prev := map[string]float64{}
	scrapes := 0
	for finished := false; !finished; {
		select {
		case <-done:
			finished = true
		default:
		}
		if scrapes == 1 {
			if err := reg.Add(w); err != nil { // registration concurrent with writers
				t.Fatal(err)
			}
		}
		x := scrape(t, reg)
		scrapes++
		for _, name := range []string{nameRequests, nameBytes, nameErrors, nameDuration} {
			for _, s := range x.families[name].samples {
				k := seriesKey(s.name, s.labels, "")
				if s.value < prev[k] {
					t.Fatalf("%s went backwards: %v -> %v", k, prev[k], s.value)
				}
				prev[k] = s.value
			}
		}
	}
	x := scrape(t, reg)
	for i := range queues {
		q := fmt.Sprint(i)
		var total float64
		for o := range numOps {
			got, _ := x.find(nameRequests, "volume", "busy", "queue", q, "op", opNames[o])
			total += got
			c, _ := x.find(nameDuration+"_count", "volume", "busy", "queue", q, "op", opNames[o])
			if c != got {
				t.Errorf("queue %s op %s: histogram count %v != requests %v", q, opNames[o], c, got)
			}
		}
		if total != float64(n) {
			t.Errorf("queue %s: %v requests, want %d", q, total, n)
		}
		if f, _ := x.find(nameInFlight, "volume", "busy", "queue", q); f != 0 {
			t.Errorf("queue %s: %v in flight after the writers finished", q, f)
		}
		var e float64
		for o := range numOps {
			c, _ := x.find(nameErrors, "volume", "busy", "queue", q, "op", opNames[o], "status", "ioerr")
			e += c
		}
		if e != float64(n/100) {
			t.Errorf("queue %s: %v errors, want %d", q, e, n/100)
		}
	}
	t.Logf("%d scrapes during %d×%d observations", scrapes, queues, n)
}

func TestObserveAllocs(t *testing.T) {
	v := mustVolume(t, VolumeOptions{Name: "v", Queues: 1})
	q := v.Queue(0)
	allocs := testing.AllocsPerRun(1000, func() {
		q.Begin()
		q.Observe(OpWrite, 4096, 42*time.Microsecond, StatusOK)
		q.Begin()
		q.Observe(OpRead, 4096, 42*time.Microsecond, StatusChecksum)
	})
	if allocs != 0 {
		t.Fatalf("Begin+Observe allocate %v times per run", allocs)
	}
}

func BenchmarkObserve(b *testing.B) {
	v := mustVolume(b, VolumeOptions{Name: "v", Queues: 1})
	q := v.Queue(0)
	lat := [8]time.Duration{20 * time.Microsecond, 45 * time.Microsecond, 90 * time.Microsecond, 300 * time.Microsecond,
		time.Millisecond, 5 * time.Microsecond, 70 * time.Microsecond, 2 * time.Millisecond}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		q.Observe(Op(i&1), 4096, lat[i&7], StatusOK)
	}
}

func BenchmarkBeginObserve(b *testing.B) {
	v := mustVolume(b, VolumeOptions{Name: "v", Queues: 1})
	q := v.Queue(0)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		q.Begin()
		q.Observe(OpRead, 4096, 50*time.Microsecond, StatusOK)
	}
}

func BenchmarkWriteText(b *testing.B) {
	reg := NewRegistry()
	for i := range 4 {
		v := mustVolume(b, VolumeOptions{Name: fmt.Sprint("vol", i), Queues: 4})
		for j := range 4 {
			for o := range numOps {
				v.Queue(j).Observe(o, 4096, time.Millisecond, StatusOK)
			}
		}
		if err := reg.Add(v); err != nil {
			b.Fatal(err)
		}
	}
	var buf bytes.Buffer
	b.ReportAllocs()
	for b.Loop() {
		buf.Reset()
		if err := reg.WriteText(&buf); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(buf.Len()))
}
