package metrics

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Registry holds the volumes a process serves. Adding and removing volumes
// takes a lock; the per-request counters never do.
type Registry struct {
	mu   sync.Mutex
	vols map[string]*VolumeStats // by escaped label, so two names that escape alike collide here and not in the output
	// lastLen sizes the next scrape's buffer so it rarely grows.
	lastLen atomic.Int64
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{vols: map[string]*VolumeStats{}}
}

// Add registers a volume. Its series appear from the next scrape.
func (r *Registry) Add(v *VolumeStats) error {
	if v == nil {
		return fmt.Errorf("metrics registry: nil volume")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.vols[v.label]; dup {
		return fmt.Errorf("metrics registry: volume %q already registered: remove it first or use another name", v.name)
	}
	r.vols[v.label] = v
	return nil
}

// Remove unregisters v (when its device stops). It reports whether v was
// registered.
func (r *Registry) Remove(v *VolumeStats) bool {
	if v == nil {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.vols[v.label] != v {
		return false
	}
	delete(r.vols, v.label)
	return true
}

func (r *Registry) list() []*VolumeStats {
	r.mu.Lock()
	out := make([]*VolumeStats, 0, len(r.vols))
	for _, v := range r.vols {
		out = append(out, v)
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b *VolumeStats) int { return strings.Compare(a.label, b.label) })
	return out
}

// Metric family names. docs/metrics.md describes each one.
const (
	nameInfo          = "virtblk_volume_info"
	nameRequests      = "virtblk_requests_total"
	nameBytes         = "virtblk_request_bytes_total"
	nameErrors        = "virtblk_request_errors_total"
	nameChecksum      = "virtblk_request_checksum_failures_total"
	nameInFlight      = "virtblk_requests_in_flight"
	nameDuration      = "virtblk_request_duration_seconds"
	nameStoreChecksum = "virtblk_store_checksum_failures_total"
	nameStoreFree     = "virtblk_store_free_bytes"
	nameAllocated     = "virtblk_volume_allocated_bytes"
	nameCapacity      = "virtblk_volume_capacity_bytes"
)

// leLabels are the histogram's upper bounds in seconds, formatted once.
var leLabels = func() [numBuckets]string {
	var out [numBuckets]string
	for i := range numBounds {
		out[i] = strconv.FormatFloat(float64(bound(i))/1e9, 'g', -1, 64)
	}
	out[numBounds] = "+Inf"
	return out
}()

// opLabels and errLabels are the op and status label pairs, built once so a
// scrape does not concatenate strings per sample.
var opLabels, errLabels = func() (ops [numOps]string, errs [numOps][numErrs]string) {
	for o := range numOps {
		ops[o] = `op="` + opNames[o] + `"`
		for k := range numErrs {
			errs[o][k] = ops[o] + `,status="` + errNames[k] + `"`
		}
	}
	return
}()

// ContentType is the media type of WriteText's output.
const ContentType = "text/plain; version=0.0.4; charset=utf-8"

// WriteText writes every registered volume's metrics in the Prometheus text
// exposition format 0.0.4. Each family is written whole (HELP, TYPE, then
// all its samples) because the format requires a family's samples to be
// contiguous.
func (r *Registry) WriteText(w io.Writer) error {
	vols := r.list()
	snaps := make([][]queueSnapshot, len(vols))
	for i, v := range vols {
		snaps[i] = make([]queueSnapshot, len(v.queues))
		for j, q := range v.queues {
			q.snapshot(&snaps[i][j])
		}
	}
	var e textEnc
	e.buf = make([]byte, 0, max(4096, r.lastLen.Load()*9/8))

	e.header(nameInfo, "gauge", "Always 1; labels name each served volume and its vhost-user socket.")
	for _, v := range vols {
		e.sample(nameInfo, v.label+`,socket="`+v.socket+`"`, "", "", 1)
	}

	e.header(nameRequests, "counter", "Requests completed, by operation (successful or not).")
	e.perOp(vols, snaps, nameRequests, func(s *opSnapshot) uint64 { return s.count })

	e.header(nameBytes, "counter", "Bytes moved by completed requests, by operation (range length for discard and write-zeroes).")
	e.perOp(vols, snaps, nameBytes, func(s *opSnapshot) uint64 { return s.bytes })

	e.header(nameErrors, "counter", "Requests that completed with an error status, by operation and virtio-blk status.")
	for i, v := range vols {
		for j, q := range v.queues {
			for o := range numOps {
				for k := range numErrs {
					e.sample(nameErrors, q.label, errLabels[o][k], "", snaps[i][j].ops[o].errs[k])
				}
			}
		}
	}

	e.header(nameChecksum, "counter", "Requests failed because stored data did not match its checksum (also counted as status ioerr).")
	for i, v := range vols {
		for j, q := range v.queues {
			e.sample(nameChecksum, q.label, "", "", snaps[i][j].checksum)
		}
	}

	e.header(nameInFlight, "gauge", "Requests taken from the virtqueue and not yet completed.")
	for i, v := range vols {
		for j, q := range v.queues {
			e.sample(nameInFlight, q.label, "", "", snaps[i][j].inFlight)
		}
	}

	e.header(nameDuration, "histogram", "Request latency from leaving the virtqueue to completion, by operation; only operations seen at least once.")
	for i, v := range vols {
		for j, q := range v.queues {
			for o := range numOps {
				s := &snaps[i][j].ops[o]
				if s.count == 0 {
					continue
				}
				op := opLabels[o]
				for b := range numBuckets {
					e.sample(nameDuration+"_bucket", q.label, op, leLabels[b], s.cum[b])
				}
				e.sampleFloat(nameDuration+"_sum", q.label, op, float64(s.sumNs)/1e9)
				e.sample(nameDuration+"_count", q.label, op, "", s.count)
			}
		}
	}

	e.volumeFunc(vols, nameStoreChecksum, "counter", "Blocks whose checksum did not match, counted by the volume's backing store (store-wide).",
		func(v *VolumeStats) func() uint64 { return v.storeChecksum })
	e.volumeFunc(vols, nameStoreFree, "gauge", "Bytes left for new blocks in the volume's backing store (store-wide); at 0 writes to unmapped blocks fail.",
		func(v *VolumeStats) func() uint64 { return v.storeFree })
	e.volumeFunc(vols, nameAllocated, "gauge", "Bytes the volume occupies in its backing store.",
		func(v *VolumeStats) func() uint64 { return v.allocated })
	e.volumeFunc(vols, nameCapacity, "gauge", "Size of the volume as the guest sees it, in bytes.",
		func(v *VolumeStats) func() uint64 { return v.capacity })

	r.lastLen.Store(int64(len(e.buf)))
	_, err := w.Write(e.buf)
	return err
}

// textEnc appends the exposition format to a byte slice.
type textEnc struct{ buf []byte }

func (e *textEnc) header(name, typ, help string) {
	e.buf = append(e.buf, "# HELP "...)
	e.buf = append(e.buf, name...)
	e.buf = append(e.buf, ' ')
	e.buf = append(e.buf, help...)
	e.buf = append(e.buf, "\n# TYPE "...)
	e.buf = append(e.buf, name...)
	e.buf = append(e.buf, ' ')
	e.buf = append(e.buf, typ...)
	e.buf = append(e.buf, '\n')
}

// labels writes {base,extra,le="…"}; base is never empty.
func (e *textEnc) labels(base, extra, le string) {
	e.buf = append(e.buf, '{')
	e.buf = append(e.buf, base...)
	if extra != "" {
		e.buf = append(e.buf, ',')
		e.buf = append(e.buf, extra...)
	}
	if le != "" {
		e.buf = append(e.buf, `,le="`...)
		e.buf = append(e.buf, le...)
		e.buf = append(e.buf, '"')
	}
	e.buf = append(e.buf, "} "...)
}

func (e *textEnc) sample(name, base, extra, le string, v uint64) {
	e.buf = append(e.buf, name...)
	e.labels(base, extra, le)
	e.buf = strconv.AppendUint(e.buf, v, 10)
	e.buf = append(e.buf, '\n')
}

func (e *textEnc) sampleFloat(name, base, extra string, v float64) {
	e.buf = append(e.buf, name...)
	e.labels(base, extra, "")
	e.buf = strconv.AppendFloat(e.buf, v, 'g', -1, 64)
	e.buf = append(e.buf, '\n')
}

func (e *textEnc) perOp(vols []*VolumeStats, snaps [][]queueSnapshot, name string, val func(*opSnapshot) uint64) {
	for i, v := range vols {
		for j, q := range v.queues {
			for o := range numOps {
				e.sample(name, q.label, opLabels[o], "", val(&snaps[i][j].ops[o]))
			}
		}
	}
}

// volumeFunc writes a per-volume family fed by an optional callback; the
// family is left out when no volume has one.
func (e *textEnc) volumeFunc(vols []*VolumeStats, name, typ, help string, get func(*VolumeStats) func() uint64) {
	wrote := false
	for _, v := range vols {
		f := get(v)
		if f == nil {
			continue
		}
		if !wrote {
			e.header(name, typ, help)
			wrote = true
		}
		e.sample(name, v.label, "", "", f())
	}
}
