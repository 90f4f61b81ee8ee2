// Package vhostblk joins a virtio-blk device to the vhost-user server: it
// adapts virtioblk.Device to vhostuser.Backend, opening one storage queue
// per started virtqueue so nothing on the I/O path is shared between
// queues.
package vhostblk

import (
	"fmt"

	"github.com/virtblk/virtblk/blkio/metrics"
	"github.com/virtblk/virtblk/blkio/vhostuser"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/storage"
)

// Backend serves a virtioblk.Device over vhost-user.
type Backend struct {
	*virtioblk.Device
	// Metrics, if set, receives per-queue request stats: virtqueue i
	// reports to Metrics.Queue(i). Set it before serving.
	Metrics *metrics.VolumeStats
}

// New returns the backend for dev (metrics off).
func New(dev *virtioblk.Device) *Backend { return &Backend{Device: dev} }

// StartQueue opens a storage queue for the virtqueue and returns its worker.
func (b *Backend) StartQueue(c vhostuser.QueueConfig) (vhostuser.Runner, error) {
	sq, err := b.Volume().OpenQueue(int(c.Queue.Size()))
	if err != nil {
		return nil, fmt.Errorf("open storage queue for virtqueue %d: %w", c.Index, err)
	}
	var qs *metrics.QueueStats
	if b.Metrics != nil {
		qs = b.Metrics.Queue(c.Index) // nil (off) for a queue past the stats' count
	}
	w, err := b.NewWorker(virtioblk.WorkerConfig{
		Index: c.Index, Queue: c.Queue, Volume: sq, KickFD: c.KickFD, CallFD: c.CallFD, ErrFD: c.ErrFD,
		Inflight: c.Inflight, Resubmit: c.Resubmit, PollDuration: c.Poll, Metrics: qs, Log: c.Log,
	})
	if err != nil {
		sq.Close()
		return nil, err
	}
	return &runner{w: w, sq: sq}, nil
}

type runner struct {
	w  *virtioblk.Worker
	sq storage.Queue
}

func (r *runner) Run() {
	r.w.Run()
	r.sq.Close()
}

func (r *runner) Stop() { r.w.Stop() }
