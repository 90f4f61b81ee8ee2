package virtioblk_test

import (
	"bytes"
	"strconv"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/blkio/internal/memvol"
	"github.com/virtblk/virtblk/blkio/metrics"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	vt "github.com/virtblk/virtblk/blkio/virtq/virtqtest"
)

// samples renders the registry and returns its samples by name and labels.
func samples(t *testing.T, reg *metrics.Registry) map[string]float64 {
	t.Helper()
	var b bytes.Buffer
	if err := reg.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, l := range strings.Split(b.String(), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			t.Fatalf("sample %q: %v", l, err)
		}
		out[l[:i]] = v
	}
	return out
}

// withMetrics restarts the rig's worker reporting to queue 0 of a fresh
// volume's stats.
func withMetrics(t *testing.T, r *rig) *metrics.Registry {
	t.Helper()
	vs, err := metrics.NewVolume(metrics.VolumeOptions{Name: "v", Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	reg := metrics.NewRegistry()
	if err := reg.Add(vs); err != nil {
		t.Fatal(err)
	}
	r.stop()
	r.qs = vs.Queue(0)
	r.start(nil)
	return reg
}

// The worker reports every finished request once, with its op, bytes and
// status, whether it went to the volume or was answered at once.
func TestWorkerMetrics(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{Serial: "s"})
	reg := withMetrics(t, r)

	for i := 0; i < 3; i++ {
		r.do(virtioblk.TOut, uint64(8*i), pattern(4096, byte(i)), false)
	}
	r.do(virtioblk.TIn, 0, make([]byte, 8192), true)
	r.do(virtioblk.TFlush, 0, nil, false)
	r.do(virtioblk.TGetID, 0, make([]byte, 20), true)
	r.do(virtioblk.TDiscard, 0, seg(16, 8, 0), false)
	r.do(virtioblk.TWriteZeroes, 0, seg(32, 16, 1), false)
	r.do(virtioblk.TIn, 2047, make([]byte, 1024), true) // past the end: IOERR, no volume I/O
	r.do(77, 0, nil, false)                             // unknown type: UNSUPP
	vol.SetFailAt(512 * 300)
	r.do(virtioblk.TIn, 300, make([]byte, 512), true) // media error from the volume
	// A chain whose header is too short has no type: counted as "other".
	hg, _ := r.g.Alloc(8, 8)
	sg, _ := r.g.Alloc(1, 1)
	h, _ := r.d.AddChain([]vt.Buf{{GPA: hg, Len: 8}, {GPA: sg, Len: 1, Write: true}})
	r.d.Submit(h)
	signal(r.kick)
	r.wait(1)

	m := samples(t, reg)
	q := `volume="v",queue="0",`
	want := map[string]float64{
		`virtblk_requests_total{` + q + `op="write"}`:                       3,
		`virtblk_request_bytes_total{` + q + `op="write"}`:                  3 * 4096,
		`virtblk_requests_total{` + q + `op="read"}`:                        3,
		`virtblk_request_bytes_total{` + q + `op="read"}`:                   8192, // failed reads move nothing
		`virtblk_request_errors_total{` + q + `op="read",status="ioerr"}`:   2,
		`virtblk_requests_total{` + q + `op="flush"}`:                       1,
		`virtblk_requests_total{` + q + `op="get-id"}`:                      1,
		`virtblk_request_bytes_total{` + q + `op="get-id"}`:                 20, // the zero-padded serial
		`virtblk_requests_total{` + q + `op="discard"}`:                     1,
		`virtblk_request_bytes_total{` + q + `op="discard"}`:                8 * 512,
		`virtblk_request_bytes_total{` + q + `op="write-zeroes"}`:           16 * 512,
		`virtblk_requests_total{` + q + `op="other"}`:                       2,
		`virtblk_request_errors_total{` + q + `op="other",status="unsupp"}`: 1,
		`virtblk_request_errors_total{` + q + `op="other",status="ioerr"}`:  1,
		`virtblk_requests_in_flight{volume="v",queue="0"}`:                  0,
		`virtblk_request_duration_seconds_count{` + q + `op="write"}`:       3,
	}
	for k, v := range want {
		if got, ok := m[k]; !ok {
			t.Errorf("missing %s", k)
		} else if got != v {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
}

// A write-through write is one request in the metrics, though the worker
// follows it with a flush at the volume.
func TestWorkerMetricsWriteThrough(t *testing.T) {
	vol := memvol.New(1<<20, false)
	r := newRig(t, vol, virtioblk.Options{})
	reg := withMetrics(t, r)
	if err := r.dev.WriteConfig(virtioblk.WritebackOffset, []byte{0}); err != nil {
		t.Fatal(err)
	}
	r.do(virtioblk.TOut, 0, pattern(512, 1), false)
	m := samples(t, reg)
	if w, f := m[`virtblk_requests_total{volume="v",queue="0",op="write"}`], m[`virtblk_requests_total{volume="v",queue="0",op="flush"}`]; w != 1 || f != 0 || vol.Flushes() != 1 {
		t.Fatalf("writes %v flushes %v (volume flushes %d), want 1 0 (1)", w, f, vol.Flushes())
	}
}

// Metrics on, the I/O path still allocates nothing per request.
func TestSteadyStateAllocsWithMetrics(t *testing.T) {
	r := newRig(t, memvol.New(1<<20, false), virtioblk.Options{QueueSize: 64})
	reg := withMetrics(t, r)
	per := steadyState(t, r, 200)
	t.Logf("%.3f heap allocations per request", per)
	if per > 0.25 {
		t.Fatalf("%.3f heap allocations per request with metrics on, want ~0", per)
	}
	if n := samples(t, reg)[`virtblk_requests_total{volume="v",queue="0",op="read"}`]; n != 201*16 {
		t.Fatalf("read count %v, want %d", n, 201*16)
	}
}
