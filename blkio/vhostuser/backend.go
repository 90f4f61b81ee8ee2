// Package vhostuser owns the back-end side of a vhost-user connection: the
// per-connection state machine (feature and protocol-feature negotiation,
// REPLY_ACK, device config, guest memory table including
// CONFIGURE_MEM_SLOTS, vring setup and teardown, INFLIGHT_SHMFD) and the
// listener that accepts a new front-end after the old one goes, so QEMU can
// reconnect. It turns started vrings into virtqueues over guest memory and
// hands them to a Backend, which runs the device; it never walks a ring or
// parses a device request itself.
package vhostuser

import (
	"log/slog"
	"time"

	"github.com/virtblk/virtblk/blkio/inflight"
	"github.com/virtblk/virtblk/blkio/virtq"
)

// Backend is the device behind the socket.
type Backend interface {
	// Features are the virtio feature bits offered (device and ring bits;
	// the server adds VHOST_USER_F_PROTOCOL_FEATURES).
	Features() uint64
	NumQueues() uint16
	QueueSize() uint16
	ReadConfig(off uint32, dst []byte)
	WriteConfig(off uint32, src []byte) error
	// Negotiated is called with the feature bits the front-end acked.
	Negotiated(acked uint64)
	// StartQueue starts serving one virtqueue. The returned runner's Run is
	// called on its own goroutine; Stop must make Run return after it has
	// completed every request in flight.
	StartQueue(QueueConfig) (Runner, error)
}

// QueueConfig is a started vring.
type QueueConfig struct {
	Index    int
	Queue    *virtq.Queue
	KickFD   int
	CallFD   int // -1 if none
	ErrFD    int // -1 if none
	Inflight *inflight.Queue
	Resubmit []uint16
	Poll     time.Duration
	Log      *slog.Logger
}

// Runner serves one queue.
type Runner interface {
	Run()
	Stop()
}
