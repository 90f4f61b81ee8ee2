package bench

import (
	"math"
	"math/rand/v2"
	"sort"
	"testing"
)

func TestBucketsCoverEveryValue(t *testing.T) {
	vals := []uint64{0, 1, 31, 32, 33, 63, 64, 65, 1000, 1 << 20, 1<<40 + 12345, math.MaxUint64}
	r := rand.New(rand.NewPCG(1, 1))
	for i := 0; i < 10000; i++ {
		vals = append(vals, r.Uint64()>>r.IntN(64))
	}
	for _, v := range vals {
		b := bucketOf(v)
		if b < 0 || b >= histBuckets {
			t.Fatalf("value %d -> bucket %d out of range", v, b)
		}
		lo, hi := bucketRange(b)
		if v < lo || v > hi {
			t.Fatalf("value %d in bucket %d [%d,%d]", v, b, lo, hi)
		}
		if v >= histSub && float64(hi-lo) > float64(lo)/histSub {
			t.Fatalf("bucket %d [%d,%d] wider than 1/%d", b, lo, hi, histSub)
		}
	}
	// Buckets are contiguous and increasing.
	for i := 1; i < histBuckets; i++ {
		_, phi := bucketRange(i - 1)
		lo, _ := bucketRange(i)
		if lo != phi+1 {
			t.Fatalf("gap between bucket %d (hi %d) and %d (lo %d)", i-1, phi, i, lo)
		}
	}
}

func TestQuantilesMatchSorted(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var h Histogram
	var vals []uint64
	var sum uint64
	for i := 0; i < 100000; i++ {
		// Log-normal-ish latencies around 50 µs with a tail.
		v := uint64(math.Exp(r.NormFloat64()*0.8+math.Log(50000))) + 1
		vals = append(vals, v)
		sum += v
		h.Record(v)
	}
	sort.Slice(vals, func(i, j int) bool { return vals[i] < vals[j] })
	for _, q := range []float64{0.01, 0.5, 0.9, 0.99, 0.999} {
		exact := vals[int(math.Ceil(q*float64(len(vals))))-1]
		got := h.Quantile(q)
		if math.Abs(float64(got)-float64(exact)) > float64(exact)/histSub {
			t.Errorf("q%.3f = %d, exact %d", q, got, exact)
		}
	}
	if h.Mean() != float64(sum)/float64(len(vals)) {
		t.Errorf("mean %f, want %f", h.Mean(), float64(sum)/float64(len(vals)))
	}
	if h.Quantile(1) != vals[len(vals)-1] || h.Max() != vals[len(vals)-1] || h.Min() != vals[0] {
		t.Errorf("max/min wrong")
	}
}

func TestSmallValuesExact(t *testing.T) {
	var a, b Histogram
	for v := uint64(1); v <= 10; v++ {
		a.Record(v)
	}
	for v := uint64(11); v <= 20; v++ {
		b.Record(v)
	}
	a.Merge(&b)
	if a.Count() != 20 || a.Quantile(0.5) != 10 || a.Quantile(0.95) != 19 || a.Min() != 1 || a.Max() != 20 || a.Mean() != 10.5 {
		t.Fatalf("count %d p50 %d p95 %d min %d max %d mean %f", a.Count(), a.Quantile(0.5), a.Quantile(0.95), a.Min(), a.Max(), a.Mean())
	}
	var empty Histogram
	if empty.Quantile(0.99) != 0 || empty.Mean() != 0 {
		t.Fatal("empty histogram not zero")
	}
}
