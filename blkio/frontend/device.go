// Package frontend owns a vhost-user-blk front-end written in Go: it
// connects to a back-end's unix socket the way QEMU does, negotiates
// features, shares memfd "guest memory" with it, runs the driver side of
// the split virtqueues and submits virtio-blk requests. It exists so that
// any vhost-user-blk back-end (virtblkd, qemu-storage-daemon, ...) can be
// tested and load-tested from the host without booting a guest.
//
// A Device is set up and torn down by one goroutine; each Queue is then
// driven by one goroutine of its own (nothing is shared between queues on
// the I/O path). Abort is the only method safe to call concurrently.
package frontend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/blkio/vhostuser/wire"
)

// Options configure a front-end connection.
type Options struct {
	// Queues is how many virtqueues to start (default 1). The back-end must
	// serve at least that many (GET_QUEUE_NUM).
	Queues int
	// QueueDepth is how many requests each queue keeps in flight at most
	// (default 32, at most 341: each request takes three descriptors and a
	// virtqueue has at most 1024).
	QueueDepth int
	// MaxIO is the size of each request's data buffer in bytes (default
	// 128 KiB, rounded up to 4 KiB so buffers stay page-aligned for O_DIRECT
	// back-ends).
	MaxIO int
	// NoEventIdx declines VIRTIO_RING_F_EVENT_IDX even if offered, to
	// exercise the flag-based notification suppression instead.
	NoEventIdx bool
	// Timeout bounds each control-message exchange (default 10 s), so a
	// wedged back-end yields an error instead of a hang.
	Timeout time.Duration
	Logger  *slog.Logger
}

const (
	maxQueueSize = 1024 // VIRTQUEUE_MAX_SIZE in QEMU and libvhost-user
	descPerReq   = 3    // header, data, status
)

// ErrAborted is returned by Queue.Reap after Device.Abort.
var ErrAborted = errors.New("vhost-user front-end aborted")

// Device is a connected, started vhost-user-blk device.
type Device struct {
	conn     *wire.Conn
	log      *slog.Logger
	timeout  time.Duration
	info     Info
	replyAck bool
	mem      *guestMemory
	queues   []*Queue
	aborted  atomic.Bool
	started  bool
}

// Dial connects to the back-end listening on socket and starts opts.Queues
// virtqueues.
func Dial(ctx context.Context, socket string, opts Options) (*Device, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("connect to vhost-user back-end %s: %w", socket, err)
	}
	dev, err := Start(ctx, c.(*net.UnixConn), opts)
	if err != nil {
		return nil, fmt.Errorf("vhost-user back-end %s: %w", socket, err)
	}
	return dev, nil
}

// Start runs the QEMU-style initialisation and start sequence on an
// established connection, which the Device then owns.
func Start(ctx context.Context, uc *net.UnixConn, opts Options) (*Device, error) {
	if opts.Queues == 0 {
		opts.Queues = 1
	}
	if opts.QueueDepth == 0 {
		opts.QueueDepth = 32
	}
	if opts.MaxIO == 0 {
		opts.MaxIO = 128 << 10
	}
	if opts.Timeout == 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case opts.Queues < 1 || opts.Queues > 256:
		uc.Close()
		return nil, fmt.Errorf("queue count %d out of range 1..256", opts.Queues)
	case opts.QueueDepth < 1 || opts.QueueDepth*descPerReq > maxQueueSize:
		uc.Close()
		return nil, fmt.Errorf("queue depth %d out of range 1..%d", opts.QueueDepth, maxQueueSize/descPerReq)
	case opts.MaxIO < SectorSize || opts.MaxIO > 16<<20:
		uc.Close()
		return nil, fmt.Errorf("max I/O size %d out of range 512..16MiB", opts.MaxIO)
	}
	opts.MaxIO = alignUp(opts.MaxIO, 4096)
	d := &Device{conn: wire.NewConn(uc), log: opts.Logger, timeout: opts.Timeout}
	if err := d.negotiate(ctx, opts); err != nil {
		d.teardown()
		return nil, err
	}
	if err := d.start(ctx, opts); err != nil {
		d.teardown()
		return nil, err
	}
	return d, nil
}

// Info returns what was negotiated and read from the device config.
func (d *Device) Info() Info { return d.info }

// Queues returns the started queues.
func (d *Device) Queues() []*Queue { return d.queues }

// Abort wakes every goroutine blocked in Queue.Reap and makes further Reap
// calls fail with ErrAborted. It is safe to call from any goroutine.
func (d *Device) Abort() {
	d.aborted.Store(true)
	for _, q := range d.queues {
		q.wake()
	}
}

// deadline applies the per-exchange timeout, shortened by ctx's deadline.
func (d *Device) deadline(ctx context.Context) {
	t := time.Now().Add(d.timeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(t) {
		t = dl
	}
	d.conn.UnixConn().SetDeadline(t)
}

// set sends a request that has no reply of its own and, once REPLY_ACK is
// negotiated, waits for the back-end's ack so failures surface here.
func (d *Device) set(ctx context.Context, req wire.Request, payload []byte, fds ...int) error {
	d.deadline(ctx)
	if err := d.conn.SendRequest(req, d.replyAck, payload, fds...); err != nil {
		return err
	}
	if !d.replyAck {
		return nil
	}
	m, err := d.conn.RecvReply(req)
	if err != nil {
		return err
	}
	m.CloseFDs()
	v, err := wire.DecodeU64(m.Payload)
	if err != nil {
		return fmt.Errorf("ack of %v: %w", req, err)
	}
	if v != 0 {
		return fmt.Errorf("back-end refused %v (ack %d)", req, v)
	}
	return nil
}

// get sends a request and returns its reply payload.
func (d *Device) get(ctx context.Context, req wire.Request, payload []byte) ([]byte, error) {
	d.deadline(ctx)
	if err := d.conn.SendRequest(req, false, payload); err != nil {
		return nil, err
	}
	m, err := d.conn.RecvReply(req)
	if err != nil {
		return nil, err
	}
	m.CloseFDs()
	return m.Payload, nil
}

func (d *Device) getU64(ctx context.Context, req wire.Request) (uint64, error) {
	p, err := d.get(ctx, req, nil)
	if err != nil {
		return 0, err
	}
	v, err := wire.DecodeU64(p)
	if err != nil {
		return 0, fmt.Errorf("reply to %v: %w", req, err)
	}
	return v, nil
}

// The virtio-blk features we can drive. Everything else the back-end offers
// is declined.
const wantFeatures = FeatureVersion1 | wire.FeatureProtocolFeatures | FeatureRingEventIdx |
	FeatureBlkSegMax | FeatureBlkRO | FeatureBlkBlkSize | FeatureBlkFlush | FeatureBlkTopology |
	FeatureBlkMQ | FeatureBlkDiscard | FeatureBlkWriteZeroes

const wantProtocol = wire.ProtoMQ | wire.ProtoReplyAck | wire.ProtoConfig

// negotiate is QEMU's vhost_user_backend_init + vhost_dev_init: features,
// protocol features, queue count, owner, config.
func (d *Device) negotiate(ctx context.Context, opts Options) error {
	offered, err := d.getU64(ctx, wire.GetFeatures)
	if err != nil {
		return err
	}
	if offered&FeatureVersion1 == 0 {
		return fmt.Errorf("back-end does not offer VIRTIO_F_VERSION_1 (features %#x); legacy virtio is not supported", offered)
	}
	if offered&wire.FeatureProtocolFeatures == 0 {
		return fmt.Errorf("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES (features %#x); without it the disk config cannot be read", offered)
	}
	want := wantFeatures
	if opts.NoEventIdx {
		want &^= FeatureRingEventIdx
	}
	d.info.Features = offered & want

	proto, err := d.getU64(ctx, wire.GetProtocolFeatures)
	if err != nil {
		return err
	}
	if proto&wire.ProtoConfig == 0 {
		return fmt.Errorf("back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG (protocol features %#x)", proto)
	}
	d.info.ProtocolFeatures = proto & wantProtocol
	if err := d.set(ctx, wire.SetProtocolFeatures, wire.AppendU64(nil, d.info.ProtocolFeatures)); err != nil {
		return err
	}
	d.replyAck = d.info.ProtocolFeatures&wire.ProtoReplyAck != 0

	d.info.MaxQueues = 1
	if d.info.ProtocolFeatures&wire.ProtoMQ != 0 {
		n, err := d.getU64(ctx, wire.GetQueueNum)
		if err != nil {
			return err
		}
		if n == 0 || n > 256 {
			return fmt.Errorf("back-end reports %d queues; want 1..256", n)
		}
		d.info.MaxQueues = int(n)
	}
	if opts.Queues > d.info.MaxQueues {
		return fmt.Errorf("%d queues requested but the back-end serves at most %d (start it with more queues or ask for fewer)", opts.Queues, d.info.MaxQueues)
	}
	if err := d.set(ctx, wire.SetOwner, nil); err != nil {
		return err
	}
	cfgReq := wire.Config{Data: make([]byte, configReadSize)}.Append(nil)
	p, err := d.get(ctx, wire.GetConfig, cfgReq)
	if err != nil {
		return err
	}
	cfg, err := wire.DecodeConfig(p)
	if err != nil {
		return fmt.Errorf("GET_CONFIG reply: %w", err)
	}
	if cfg.Offset != 0 || int(cfg.Size) != configReadSize {
		return fmt.Errorf("GET_CONFIG reply window is offset %d size %d, asked for 0/%d", cfg.Offset, cfg.Size, configReadSize)
	}
	if err := parseConfig(&d.info, cfg.Data); err != nil {
		return err
	}
	d.log.Debug("vhost-user-blk negotiated", "features", fmt.Sprintf("%#x", d.info.Features),
		"protocol", fmt.Sprintf("%#x", d.info.ProtocolFeatures), "max_queues", d.info.MaxQueues,
		"capacity", d.info.Capacity, "blk_size", d.info.BlockSize)
	return nil
}

// start is QEMU's vhost_dev_start: features, memory table, then per ring
// NUM, BASE, ADDR, KICK, CALL, and finally ENABLE for every ring.
func (d *Device) start(ctx context.Context, opts Options) error {
	if err := d.set(ctx, wire.SetFeatures, wire.AppendU64(nil, d.info.Features)); err != nil {
		return err
	}
	qsize := 4
	for qsize < opts.QueueDepth*descPerReq {
		qsize *= 2
	}
	ds, as, us := ringLayout(qsize)
	perQueue := alignUp(ds, 4096) + alignUp(as, 4096) + alignUp(us, 4096) +
		alignUp(16*opts.QueueDepth, 4096) + alignUp(opts.QueueDepth, 4096) + opts.QueueDepth*opts.MaxIO
	mem, err := newGuestMemory(perQueue*opts.Queues + 4096)
	if err != nil {
		return err
	}
	d.mem = mem
	for i := 0; i < opts.Queues; i++ {
		q, err := newQueue(d, i, qsize, opts)
		if err != nil {
			return err
		}
		d.queues = append(d.queues, q)
	}
	region := wire.MemRegion{GuestAddr: guestBase, Size: uint64(len(mem.mem)), UserAddr: mem.base()}
	if err := d.set(ctx, wire.SetMemTable, wire.AppendMemTable(nil, []wire.MemRegion{region}), mem.fd); err != nil {
		return err
	}
	for _, q := range d.queues {
		idx := uint32(q.index)
		if err := d.set(ctx, wire.SetVringNum, wire.VringState{Index: idx, Num: uint32(qsize)}.Append(nil)); err != nil {
			return err
		}
		if err := d.set(ctx, wire.SetVringBase, wire.VringState{Index: idx, Num: 0}.Append(nil)); err != nil {
			return err
		}
		addr := wire.VringAddr{Index: idx, Desc: mem.userAddr(q.ring.desc), Used: mem.userAddr(q.ring.used), Avail: mem.userAddr(q.ring.avail)}
		if err := d.set(ctx, wire.SetVringAddr, addr.Append(nil)); err != nil {
			return err
		}
		if err := d.set(ctx, wire.SetVringKick, wire.VringFD{Index: uint8(idx)}.Append(nil), q.kickFD); err != nil {
			return err
		}
		if err := d.set(ctx, wire.SetVringCall, wire.VringFD{Index: uint8(idx)}.Append(nil), q.callFD); err != nil {
			return err
		}
	}
	for _, q := range d.queues {
		if err := d.set(ctx, wire.SetVringEnable, wire.VringState{Index: uint32(q.index), Num: 1}.Append(nil)); err != nil {
			return err
		}
	}
	d.started = true
	return nil
}

// Close stops the rings the way QEMU does (disable, then GET_VRING_BASE,
// which makes the back-end drain and stop each ring) and releases the
// socket, eventfds and guest memory. No queue may be in use. It checks that
// the back-end consumed exactly what we published.
func (d *Device) Close() error {
	var first error
	if d.started && !d.aborted.Load() {
		ctx := context.Background()
		for _, q := range d.queues {
			if err := d.set(ctx, wire.SetVringEnable, wire.VringState{Index: uint32(q.index), Num: 0}.Append(nil)); err != nil && first == nil {
				first = fmt.Errorf("disable queue %d: %w", q.index, err)
			}
		}
		for _, q := range d.queues {
			p, err := d.get(ctx, wire.GetVringBase, wire.VringState{Index: uint32(q.index)}.Append(nil))
			if err == nil {
				var st wire.VringState
				st, err = wire.DecodeVringState(p)
				if err == nil && (st.Index != uint32(q.index) || uint16(st.Num) != q.ring.published) {
					err = fmt.Errorf("back-end stopped at avail index %d of ring %d, we published %d", st.Num, st.Index, q.ring.published)
				}
			}
			if err != nil && first == nil {
				first = fmt.Errorf("stop queue %d: %w", q.index, err)
			}
		}
	}
	d.started = false
	if err := d.teardown(); err != nil && first == nil {
		first = err
	}
	return first
}

func (d *Device) teardown() error {
	var first error
	if d.conn != nil {
		if err := d.conn.Close(); err != nil {
			first = fmt.Errorf("close vhost-user socket: %w", err)
		}
		d.conn = nil
	}
	for _, q := range d.queues {
		q.close()
	}
	if d.mem != nil {
		if err := d.mem.close(); err != nil && first == nil {
			first = err
		}
		d.mem = nil
	}
	return first
}

func closeFD(fd *int) {
	if *fd >= 0 {
		unix.Close(*fd)
		*fd = -1
	}
}
