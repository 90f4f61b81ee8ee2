// Package storage owns where virtual disk bytes live: the asynchronous
// volume interface that a virtio-blk device drives, and the volumes that
// implement it (a raw O_DIRECT file or block device, and the block store).
package storage

import (
	"errors"
	"fmt"
)

// Op is the kind of a Request.
type Op uint8

const (
	OpRead Op = iota + 1
	OpWrite
	OpFlush
	OpDiscard
	OpWriteZeroes
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpFlush:
		return "flush"
	case OpDiscard:
		return "discard"
	case OpWriteZeroes:
		return "write-zeroes"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Request is one I/O on a volume. Offset and lengths are in bytes and are
// multiples of SectorSize (512, the virtio-blk sector).
type Request struct {
	Op     Op
	Offset uint64
	// Bufs holds the data of a read or write. The memory must stay valid and
	// must not move until the request completes, because the kernel reads or
	// writes it asynchronously: guest memory mapped from a memfd, or an mmap'd
	// buffer; never the Go heap.
	Bufs [][]byte
	// Length is the byte count of Discard and WriteZeroes; Read and Write use
	// the total length of Bufs.
	Length uint64
	// Unmap lets WriteZeroes deallocate the range instead of writing zeroes
	// (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP). Reads return zeroes either way.
	Unmap bool
	// Tag is returned unchanged in the request's Completion.
	Tag uint64
}

// Completion reports the end of one Request.
type Completion struct {
	Tag uint64
	// Err is nil on success. Otherwise it wraps one of the Err* values below
	// (or an errno) so the device can map it to a virtio-blk status.
	Err error
}

// Errors a Completion may wrap.
var (
	// ErrIO: the medium failed (EIO) or returned data that failed its checksum.
	ErrIO = errors.New("i/o error")
	// ErrChecksum: stored data did not match its checksum; never served.
	ErrChecksum = fmt.Errorf("checksum mismatch: %w", ErrIO)
	// ErrRange: the request reaches past the end of the volume.
	ErrRange = errors.New("request beyond end of volume")
	// ErrReadOnly: a write, discard or write-zeroes on a read-only volume.
	ErrReadOnly = errors.New("volume is read-only")
	// ErrUnsupported: the volume cannot do this operation.
	ErrUnsupported = errors.New("operation not supported by volume")
)

// SectorSize is the unit of Request offsets and lengths.
const SectorSize = 512

// Volume is a virtual disk's backing store. It is safe for concurrent use:
// each virtqueue worker opens its own Queue and nothing on the I/O path is
// shared between queues.
type Volume interface {
	// Size is the volume size in bytes.
	Size() uint64
	// BlockSize is the preferred I/O size in bytes (512 or 4096): offsets and
	// lengths aligned to it avoid read-modify-write in the volume.
	BlockSize() uint32
	ReadOnly() bool
	// CanDiscard and CanWriteZeroes tell the device which features to offer.
	CanDiscard() bool
	CanWriteZeroes() bool
	// OpenQueue returns a new submission queue with room for depth requests
	// in flight. The caller never has more than depth requests outstanding.
	OpenQueue(depth int) (Queue, error)
	// Close releases the volume. All queues must be closed first.
	Close() error
}

// Queue is one worker's channel to a Volume. It is not safe for concurrent
// use; a worker owns it and is the only one that submits and reaps.
type Queue interface {
	// Submit starts reqs without waiting for them. Requests are independent:
	// the volume may complete them in any order, and a Flush covers every
	// write that completed before the Flush was submitted.
	Submit(reqs []Request) error
	// Reap moves finished requests into out and returns how many. It blocks
	// until at least min requests have finished (min 0 never blocks).
	Reap(out []Completion, min int) (int, error)
	// NotifyFD is an eventfd that becomes readable when completions are
	// waiting, so a worker can sleep on it together with its kick eventfd.
	// The worker drains it (reads its 8-byte counter) before reaping.
	NotifyFD() int
	// Close waits for every outstanding request and releases the queue.
	Close() error
}
