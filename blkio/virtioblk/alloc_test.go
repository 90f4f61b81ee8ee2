package virtioblk_test

import (
	"encoding/binary"
	"runtime"
	"testing"

	"github.com/virtblk/virtblk/blkio/internal/memvol"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/blkio/virtq"
)

// steadyState runs rounds of 16 reads through the worker, reusing the same
// descriptor chains, and returns heap allocations per request.
func steadyState(tb testing.TB, r *rig, rounds int) float64 {
	const batch = 16
	var heads [batch]uint16
	for i := range heads {
		hg, _ := r.hdr(virtioblk.TIn, uint64(8*i))
		dg, _ := r.g.Alloc(4096, 4096)
		sg, _ := r.g.Alloc(1, 1)
		base := uint16(3 * i)
		r.d.SetDesc(base, hg, 16, virtq.DescFNext, base+1)
		r.d.SetDesc(base+1, dg, 4096, virtq.DescFWrite|virtq.DescFNext, base+2)
		r.d.SetDesc(base+2, sg, 1, virtq.DescFWrite, 0)
		heads[i] = base
	}
	var kick [8]byte
	binary.LittleEndian.PutUint64(kick[:], 1)
	run := func() {
		for _, h := range heads {
			r.d.PutAvail(h)
		}
		r.d.Publish()
		want := r.d.AvailIdx()
		writeFD(r.kick, kick[:])
		for r.d.UsedIdx() != want {
			runtime.Gosched()
		}
	}
	run() // warm up: slots, batch arrays and the volume's slices grow once
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := 0; i < rounds; i++ {
		run()
	}
	runtime.ReadMemStats(&after)
	return float64(after.Mallocs-before.Mallocs) / float64(rounds*batch)
}

// The I/O path must not allocate per request (slots, chains, buffer lists
// and batches are preallocated per queue and reused).
func TestSteadyStateAllocs(t *testing.T) {
	r := newRig(t, memvol.New(1<<20, false), virtioblk.Options{QueueSize: 64})
	per := steadyState(t, r, 200)
	t.Logf("%.3f heap allocations per request", per)
	if per > 0.25 {
		t.Fatalf("%.3f heap allocations per request in steady state, want ~0", per)
	}
}

// BenchmarkWorkerRead4k measures the device path alone (ring walk, parse,
// batch submit/reap on an in-memory volume, used-ring publish, kick and
// interrupt eventfds); one op is a batch of 16 requests.
func BenchmarkWorkerRead4k(b *testing.B) {
	r := newRigTB(b, memvol.New(1<<20, false), virtioblk.Options{QueueSize: 64})
	b.ResetTimer()
	per := steadyState(b, r, b.N)
	b.ReportMetric(per, "allocs/req")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*16), "ns/req")
}
