// Package inflight owns the vhost-user inflight I/O tracking region
// (INFLIGHT_SHMFD) for split virtqueues: which descriptor heads the device
// has fetched but not yet completed, kept in memory the front-end preserves
// across a back-end crash, and the recovery that tells a restarted back-end
// which requests to resubmit.
//
// Layout per queue (vhost-user.rst "Inflight I/O tracking"): a 16-byte header
// {u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16
// used_idx} followed by desc_num 16-byte entries {u8 inflight; u8 pad[5]; u16
// next; u64 counter}, indexed by head. Queues follow each other, each padded
// to 64 bytes.
//
// Completions are published in batches, so one crash can interrupt a batch
// of several heads after used.idx moved. PrePut links the batch through the
// entries' next fields, starting at last_batch_head, and Recover walks that
// many links (the distance between the ring's used.idx and the region's
// copy) to clear them.
package inflight

import (
	"encoding/binary"
	"fmt"
	"slices"
	"sync/atomic"
)

const (
	headerSize = 16
	entrySize  = 16
	version    = 1

	offVersion   = 8
	offDescNum   = 10
	offLastBatch = 12
	offUsedIdx   = 14
)

// QueueRegionSize is the bytes one queue of size n takes.
func QueueRegionSize(n uint16) uint64 {
	return (headerSize + entrySize*uint64(n) + 63) &^ 63
}

// RegionSize is the bytes numQueues queues of size n take.
func RegionSize(numQueues, n uint16) uint64 {
	return uint64(numQueues) * QueueRegionSize(n)
}

// Queue tracks one virtqueue in its part of the region.
type Queue struct {
	b       []byte
	size    uint16
	counter uint64
	fence   uint32
}

// Open attaches to queue q of a region for numQueues queues of size n. A
// zeroed (fresh) queue area is initialised; an area written before must
// match n.
func Open(region []byte, numQueues, q, n uint16) (*Queue, error) {
	if q >= numQueues {
		return nil, fmt.Errorf("inflight queue %d: region holds %d queues", q, numQueues)
	}
	qs := QueueRegionSize(n)
	if uint64(len(region)) < RegionSize(numQueues, n) {
		return nil, fmt.Errorf("inflight region of %d bytes is too small for %d queues of size %d", len(region), numQueues, n)
	}
	b := region[uint64(q)*qs : uint64(q+1)*qs]
	le := binary.LittleEndian
	switch v := le.Uint16(b[offVersion:]); v {
	case 0:
		clear(b)
		le.PutUint16(b[offVersion:], version)
		le.PutUint16(b[offDescNum:], n)
	case version:
		if dn := le.Uint16(b[offDescNum:]); dn != n {
			return nil, fmt.Errorf("inflight queue %d: region was written for queue size %d, now %d", q, dn, n)
		}
	default:
		return nil, fmt.Errorf("inflight queue %d: unknown region version %d", q, v)
	}
	t := &Queue{b: b, size: n}
	for h := range n {
		if c := t.counterOf(h); c >= t.counter {
			t.counter = c + 1
		}
	}
	return t, nil
}

func (t *Queue) entry(h uint16) []byte {
	o := headerSize + entrySize*int(h)
	return t.b[o : o+entrySize]
}

func (t *Queue) counterOf(h uint16) uint64 { return binary.LittleEndian.Uint64(t.entry(h)[8:]) }

func (t *Queue) fullFence() { atomic.AddUint32(&t.fence, 1) }

// Get marks head as fetched and in flight.
func (t *Queue) Get(head uint16) {
	e := t.entry(head)
	binary.LittleEndian.PutUint64(e[8:], t.counter)
	t.counter++
	e[0] = 1
}

// InFlight reports whether head is marked in flight.
func (t *Queue) InFlight(head uint16) bool { return t.entry(head)[0] == 1 }

// PrePut records the batch of heads about to be published in the used ring,
// before used.idx is stored.
func (t *Queue) PrePut(heads []uint16) {
	if len(heads) == 0 {
		return
	}
	// Link heads[i] -> heads[i-1] so recovery walks from the last one.
	for i := 1; i < len(heads); i++ {
		binary.LittleEndian.PutUint16(t.entry(heads[i])[6:], heads[i-1])
	}
	t.fullFence()
	binary.LittleEndian.PutUint16(t.b[offLastBatch:], heads[len(heads)-1])
	t.fullFence()
}

// PostPut clears the batch after used.idx was published as usedIdx.
func (t *Queue) PostPut(heads []uint16, usedIdx uint16) {
	if len(heads) == 0 {
		return
	}
	t.fullFence()
	for _, h := range heads {
		t.entry(h)[0] = 0
	}
	t.fullFence()
	binary.LittleEndian.PutUint16(t.b[offUsedIdx:], usedIdx)
}

// Recover repairs a batch that a crash interrupted after ringUsedIdx was
// published, and returns the heads still in flight in the order they were
// fetched. The caller resumes fetching at ringUsedIdx + len(heads).
func (t *Queue) Recover(ringUsedIdx uint16) []uint16 {
	le := binary.LittleEndian
	saved := le.Uint16(t.b[offUsedIdx:])
	if done := ringUsedIdx - saved; done != 0 && done <= t.size {
		h := le.Uint16(t.b[offLastBatch:])
		for range done {
			if h >= t.size {
				break
			}
			t.entry(h)[0] = 0
			h = le.Uint16(t.entry(h)[6:])
		}
	}
	le.PutUint16(t.b[offUsedIdx:], ringUsedIdx)
	var heads []uint16
	for h := range t.size {
		if t.entry(h)[0] == 1 {
			heads = append(heads, h)
		}
	}
	slices.SortFunc(heads, func(a, b uint16) int {
		ca, cb := t.counterOf(a), t.counterOf(b)
		switch {
		case ca < cb:
			return -1
		case ca > cb:
			return 1
		}
		return 0
	})
	return heads
}

// Reset marks nothing in flight (the device was reset by the driver).
func (t *Queue) Reset(usedIdx uint16) {
	for h := range t.size {
		t.entry(h)[0] = 0
	}
	binary.LittleEndian.PutUint16(t.b[offUsedIdx:], usedIdx)
}
