// Package metrics owns virtblk's Prometheus metrics: per-queue request
// counters and latency histograms updated lock-free from the virtqueue
// workers, the per-volume grouping, the text exposition format (0.0.4) and
// the HTTP endpoint that serves it. It has no dependency on a Prometheus
// client library.
package metrics

import (
	"errors"
	"math/bits"
	"time"

	"sync/atomic"

	"golang.org/x/sys/cpu"

	"github.com/virtblk/virtblk/storage"
)

// Op is the kind of a request as the metrics label it.
type Op uint8

const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpDiscard
	OpWriteZeroes
	OpGetID
	OpOther
	numOps
)

var opNames = [numOps]string{"read", "write", "flush", "discard", "write-zeroes", "get-id", "other"}

func (o Op) String() string {
	if o >= numOps {
		return "other"
	}
	return opNames[o]
}

// Virtio-blk request types (the spec's numbers). They are repeated here
// rather than imported so that the device package can import metrics.
const (
	virtioIn          = 0
	virtioOut         = 1
	virtioFlush       = 4
	virtioFlushOut    = 5
	virtioGetID       = 8
	virtioDiscard     = 11
	virtioWriteZeroes = 13
)

// OpFromVirtio maps a virtio-blk request type (the header's type field) to
// an Op. Unknown types are OpOther.
func OpFromVirtio(t uint32) Op {
	switch t {
	case virtioIn:
		return OpRead
	case virtioOut:
		return OpWrite
	case virtioFlush, virtioFlushOut:
		return OpFlush
	case virtioGetID:
		return OpGetID
	case virtioDiscard:
		return OpDiscard
	case virtioWriteZeroes:
		return OpWriteZeroes
	}
	return OpOther
}

// Status is how a request ended. The first three values equal the virtio-blk
// status bytes, so Status(b) converts a status byte.
type Status uint8

const (
	StatusOK     Status = 0 // VIRTIO_BLK_S_OK
	StatusIOErr  Status = 1 // VIRTIO_BLK_S_IOERR
	StatusUnsupp Status = 2 // VIRTIO_BLK_S_UNSUPP
	// StatusChecksum is a read whose data failed its checksum. The guest sees
	// IOERR; the metrics count it as an ioerr error and as a checksum failure.
	StatusChecksum Status = 3
)

// StatusOf classifies a storage completion error.
func StatusOf(err error) Status {
	switch {
	case err == nil:
		return StatusOK
	case errors.Is(err, storage.ErrChecksum):
		return StatusChecksum
	case errors.Is(err, storage.ErrUnsupported):
		return StatusUnsupp
	}
	return StatusIOErr
}

// Error classes of the status label.
const (
	errIOErr = iota
	errUnsupp
	numErrs
)

var errNames = [numErrs]string{"ioerr", "unsupp"}

// Latency buckets: upper bounds 16µs·2^k for k = 0..16, so 16µs .. ~1.05s,
// plus the +Inf bucket. Doubling bounds let Observe find the bucket with one
// division by a constant and a bit length instead of a search.
const (
	bucketBase = 16000 // ns, the first upper bound
	numBounds  = 17
	numBuckets = numBounds + 1 // the last one is +Inf
)

// bucketOf is the index of the first bucket whose upper bound is >= ns.
func bucketOf(ns int64) int {
	if ns <= bucketBase {
		return 0
	}
	b := bits.Len64(uint64(ns-1) / bucketBase)
	if b > numBounds {
		return numBounds
	}
	return b
}

// bound is bucket i's upper bound in nanoseconds (i < numBounds).
func bound(i int) int64 { return bucketBase << uint(i) }

// opStats are one op's counters. The request count is the sum of the
// buckets: one add fewer per request, and requests_total always equals the
// histogram's count.
type opStats struct {
	buckets [numBuckets]atomic.Uint64
	sumNs   atomic.Uint64
	bytes   atomic.Uint64
	errs    [numErrs]atomic.Uint64
}

// QueueStats are the counters of one virtqueue. The worker that runs the
// queue updates them on its hot path (Begin, Observe: atomic adds only, no
// locks, no allocation); the scraper reads them at any time. More than one
// writer is safe too, only slower.
type QueueStats struct {
	// Padding keeps two queues' workers, on different CPUs, off each other's
	// cache lines.
	_        cpu.CacheLinePad
	ops      [numOps]opStats
	started  atomic.Uint64
	checksum atomic.Uint64
	_        cpu.CacheLinePad

	index int
	label string // `volume="…",queue="N"`, escaped once at creation
}

// Index is the queue's number (the queue label).
func (q *QueueStats) Index() int { return q.index }

// Begin counts one request taken from the ring. The in-flight gauge is
// Begin calls minus Observe calls; a worker calls Begin for every request
// it will Observe, or never (then the gauge stays 0).
func (q *QueueStats) Begin() { q.started.Add(1) }

// Observe records one finished request: its op, the bytes it moved (data
// length of a read or write, range length of a discard or write-zeroes),
// its latency from Begin to completion, and how it ended.
func (q *QueueStats) Observe(op Op, bytes uint64, latency time.Duration, status Status) {
	if op >= numOps {
		op = OpOther
	}
	s := &q.ops[op]
	s.buckets[bucketOf(int64(latency))].Add(1)
	if latency > 0 {
		s.sumNs.Add(uint64(latency))
	}
	if bytes != 0 {
		s.bytes.Add(bytes)
	}
	if status != StatusOK {
		q.observeError(s, status)
	}
}

func (q *QueueStats) observeError(s *opStats, status Status) {
	switch status {
	case StatusUnsupp:
		s.errs[errUnsupp].Add(1)
	case StatusChecksum:
		q.checksum.Add(1)
		s.errs[errIOErr].Add(1)
	default:
		s.errs[errIOErr].Add(1)
	}
}

// opSnapshot is a consistent-enough copy of one op's counters: buckets are
// cumulative and count equals the +Inf bucket by construction.
type opSnapshot struct {
	cum   [numBuckets]uint64
	count uint64
	sumNs uint64
	bytes uint64
	errs  [numErrs]uint64
}

type queueSnapshot struct {
	ops      [numOps]opSnapshot
	inFlight uint64
	checksum uint64
}

func (q *QueueStats) snapshot(out *queueSnapshot) {
	var done uint64
	for o := range q.ops {
		s, d := &q.ops[o], &out.ops[o]
		var c uint64
		for i := range s.buckets {
			c += s.buckets[i].Load()
			d.cum[i] = c
		}
		d.count = c
		d.sumNs = s.sumNs.Load()
		d.bytes = s.bytes.Load()
		for i := range s.errs {
			d.errs[i] = s.errs[i].Load()
		}
		done += c
	}
	// Completions were read first, so started (read later) is at least as
	// large unless Begin is not used at all.
	if st := q.started.Load(); st > done {
		out.inFlight = st - done
	} else {
		out.inFlight = 0
	}
	out.checksum = q.checksum.Load()
}
