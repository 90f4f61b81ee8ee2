package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/blkio/guestmem"
	"github.com/virtblk/virtblk/blkio/inflight"
	"github.com/virtblk/virtblk/blkio/vhostuser/wire"
	"github.com/virtblk/virtblk/blkio/virtq"
)

// Ring feature bits the server itself reads from the acked set.
const (
	featIndirect = uint64(1) << 28
	featEventIdx = uint64(1) << 29
	featVersion1 = uint64(1) << 32
)

// ProtocolFeatures are the protocol features the server offers.
const ProtocolFeatures = wire.ProtoMQ | wire.ProtoReplyAck | wire.ProtoConfig |
	wire.ProtoInflightSHMFD | wire.ProtoConfigureMemSlots | wire.ProtoResetDevice

// MaxMemSlots is the GET_MAX_MEM_SLOTS answer (KVM's 512 minus reserved,
// as libvhost-user and rust-vmm answer).
const MaxMemSlots = 509

// MaxRingSize is the largest split ring served: QEMU's VIRTQUEUE_MAX_SIZE,
// which also bounds what libvhost-user and rust-vmm front-ends build.
const MaxRingSize = 1024

// Options tune a Server.
type Options struct {
	Log *slog.Logger
	// Poll is the busy-poll window each queue worker spins before sleeping.
	Poll time.Duration
}

// Server serves one device to one front-end at a time.
type Server struct {
	be   Backend
	opts Options
	log  *slog.Logger
}

// NewServer returns a server for be.
func NewServer(be Backend, opts Options) *Server {
	l := opts.Log
	if l == nil {
		l = slog.Default()
	}
	return &Server{be: be, opts: opts, log: l}
}

// Serve accepts front-ends on ln one after another until ctx is done. Each
// connection is served to its end; then the device waits for the next one
// (QEMU reconnects with the same state it kept). On cancellation the active
// connection's queues drain their in-flight I/O before Serve returns.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	var mu sync.Mutex
	var active *net.UnixConn
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		if active != nil {
			active.Close()
		}
		mu.Unlock()
	})
	defer stop()
	for {
		uc, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept vhost-user front-end: %w", err)
		}
		mu.Lock()
		active = uc
		mu.Unlock()
		if ctx.Err() != nil {
			uc.Close()
			return nil
		}
		s.log.Info("front-end connected")
		err = s.ServeConn(wire.NewConn(uc))
		mu.Lock()
		active = nil
		mu.Unlock()
		if err != nil && ctx.Err() == nil {
			s.log.Warn("front-end connection ended with an error", "err", err)
		} else {
			s.log.Info("front-end disconnected")
		}
	}
}

// ServeConn runs the protocol on one connection until it closes, then stops
// every queue (draining in-flight I/O), releases guest memory and closes c.
func (s *Server) ServeConn(c *wire.Conn) error {
	st := newConnState(s)
	defer c.Close()
	defer st.teardown()
	for {
		m, err := c.Recv()
		if err != nil {
			if errors.Is(err, wire.ErrClosed) || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("receive: %w", err)
		}
		if m.IsReply() {
			m.CloseFDs()
			return fmt.Errorf("%w: front-end sent a reply flag on %v", wire.ErrMalformed, m.Request)
		}
		if err := wire.CheckPayload(m.Request, m.Payload); err != nil {
			m.CloseFDs()
			return err
		}
		reply, herr := st.handle(&m)
		m.CloseFDs() // whatever the handler did not take
		if herr != nil {
			s.log.Warn("request failed", "request", m.Request.String(), "err", herr)
		} else if s.log.Enabled(context.Background(), slog.LevelDebug) {
			s.log.Debug("request", "request", m.Request.String(), "payload", fmt.Sprintf("%x", m.Payload))
		}
		switch {
		case reply != nil:
			if err := c.SendReply(m.Request, reply.payload, reply.fds...); err != nil {
				return err
			}
			for _, fd := range reply.closeAfter {
				unix.Close(fd)
			}
		case m.NeedReply() && st.protoAcked&wire.ProtoReplyAck != 0:
			var v uint64
			if herr != nil {
				v = 1
			}
			if err := c.SendReply(m.Request, wire.AppendU64(nil, v)); err != nil {
				return err
			}
		}
		if errors.Is(herr, errFatal) {
			return herr
		}
	}
}

// errFatal marks a handler error after which the connection cannot go on.
var errFatal = errors.New("fatal")

type reply struct {
	payload    []byte
	fds        []int
	closeAfter []int
}

func u64Reply(v uint64) *reply { return &reply{payload: wire.AppendU64(nil, v)} }

type vring struct {
	num      uint16
	addr     wire.VringAddr
	addrSet  bool
	base     uint16
	kick     int
	call     int
	errFD    int
	enabled  bool
	q        *virtq.Queue // kept across stop/start so indices survive
	runner   Runner
	done     chan struct{}
	recovery bool // run inflight recovery at the next start
}

type connState struct {
	s          *Server
	log        *slog.Logger
	acked      uint64
	featSet    bool
	protoAcked uint64
	mem        *guestmem.Memory
	vrings     []vring
	// inflight region
	infMap   []byte
	infNumQ  uint16
	infQSize uint16
}

func newConnState(s *Server) *connState {
	st := &connState{s: s, log: s.log, vrings: make([]vring, s.be.NumQueues())}
	for i := range st.vrings {
		st.vrings[i] = vring{kick: -1, call: -1, errFD: -1}
	}
	return st
}

func closeFD(fd *int) {
	if *fd >= 0 {
		unix.Close(*fd)
		*fd = -1
	}
}

func (st *connState) teardown() {
	for i := range st.vrings {
		st.stopRing(i)
		v := &st.vrings[i]
		closeFD(&v.kick)
		closeFD(&v.call)
		closeFD(&v.errFD)
	}
	for _, r := range st.mem.Regions() {
		r.Unmap()
	}
	st.mem = nil
	if st.infMap != nil {
		unix.Munmap(st.infMap)
		st.infMap = nil
	}
}

func (st *connState) ring(idx uint32) (*vring, error) {
	if idx >= uint32(len(st.vrings)) {
		return nil, fmt.Errorf("vring %d: device has %d queues", idx, len(st.vrings))
	}
	return &st.vrings[idx], nil
}

func (st *connState) handle(m *wire.Message) (*reply, error) {
	be := st.s.be
	switch m.Request {
	case wire.GetFeatures:
		return u64Reply(be.Features() | wire.FeatureProtocolFeatures), nil
	case wire.SetFeatures:
		v, _ := wire.DecodeU64(m.Payload)
		offered := be.Features() | wire.FeatureProtocolFeatures
		if v&^offered != 0 {
			return nil, fmt.Errorf("SET_FEATURES %#x acks bits %#x that were not offered", v, v&^offered)
		}
		if v&featVersion1 == 0 {
			return nil, fmt.Errorf("SET_FEATURES %#x lacks VIRTIO_F_VERSION_1; legacy virtio is not supported", v)
		}
		st.acked, st.featSet = v, true
		be.Negotiated(v)
		if v&wire.FeatureProtocolFeatures == 0 {
			for i := range st.vrings {
				st.vrings[i].enabled = true
			}
		}
		return nil, nil
	case wire.GetProtocolFeatures:
		return u64Reply(ProtocolFeatures), nil
	case wire.SetProtocolFeatures:
		v, _ := wire.DecodeU64(m.Payload)
		st.protoAcked = v & ProtocolFeatures
		return nil, nil
	case wire.SetOwner:
		return nil, nil
	case wire.ResetOwner, wire.ResetDevice:
		st.reset()
		return nil, nil
	case wire.GetQueueNum:
		return u64Reply(uint64(be.NumQueues())), nil
	case wire.GetMaxMemSlots:
		return u64Reply(MaxMemSlots), nil
	case wire.GetConfig:
		c, _ := wire.DecodeConfig(m.Payload)
		out := wire.Config{Offset: c.Offset, Flags: c.Flags, Data: make([]byte, c.Size)}
		be.ReadConfig(c.Offset, out.Data)
		return &reply{payload: out.Append(nil)}, nil
	case wire.SetConfig:
		c, _ := wire.DecodeConfig(m.Payload)
		return nil, be.WriteConfig(c.Offset, c.Data)
	case wire.SetMemTable:
		return nil, st.setMemTable(m)
	case wire.AddMemReg:
		return nil, st.addMemReg(m)
	case wire.RemMemReg:
		return nil, st.remMemReg(m)
	case wire.SetVringNum:
		s, _ := wire.DecodeVringState(m.Payload)
		v, err := st.ring(s.Index)
		if err != nil {
			return nil, err
		}
		// The device's queue size is what the front-end offers the guest,
		// not a bound on the ring: QEMU 10 behind libvirt was seen handing
		// a 1024-entry ring to a device built with queue-size 256, and
		// libvhost-user takes any size. Refusing leaves the guest without
		// its disk, so any ring the front-end can build is served.
		if s.Num == 0 || s.Num&(s.Num-1) != 0 || s.Num > MaxRingSize {
			return nil, fmt.Errorf("SET_VRING_NUM %d for vring %d: need a power of two up to %d", s.Num, s.Index, MaxRingSize)
		}
		st.stopRing(int(s.Index))
		v.num, v.q = uint16(s.Num), nil
		return nil, nil
	case wire.SetVringBase:
		s, _ := wire.DecodeVringState(m.Payload)
		v, err := st.ring(s.Index)
		if err != nil {
			return nil, err
		}
		if s.Num > 0xffff {
			return nil, fmt.Errorf("SET_VRING_BASE %#x for vring %d: packed rings are not supported", s.Num, s.Index)
		}
		st.stopRing(int(s.Index))
		v.base, v.q = uint16(s.Num), nil
		return nil, nil
	case wire.SetVringAddr:
		a, _ := wire.DecodeVringAddr(m.Payload)
		v, err := st.ring(a.Index)
		if err != nil {
			return nil, err
		}
		if a.Flags&wire.VringFlagLog != 0 {
			return nil, fmt.Errorf("SET_VRING_ADDR vring %d asks for dirty logging, which is not offered", a.Index)
		}
		running := v.runner != nil
		st.stopRing(int(a.Index))
		if v.q != nil {
			v.base = v.q.LastAvail()
		}
		v.addr, v.addrSet, v.q = a, true, nil
		if running {
			return nil, st.maybeStart(int(a.Index))
		}
		return nil, nil
	case wire.GetVringBase:
		s, _ := wire.DecodeVringState(m.Payload)
		v, err := st.ring(s.Index)
		if err != nil {
			return nil, err
		}
		st.stopRing(int(s.Index))
		base := v.base
		if v.q != nil {
			base = v.q.LastAvail()
		}
		v.base, v.q = base, nil
		closeFD(&v.kick)
		closeFD(&v.call)
		return &reply{payload: wire.VringState{Index: s.Index, Num: uint32(base)}.Append(nil)}, nil
	case wire.SetVringKick, wire.SetVringCall, wire.SetVringErr:
		return nil, st.setVringFD(m)
	case wire.SetVringEnable:
		s, _ := wire.DecodeVringState(m.Payload)
		v, err := st.ring(s.Index)
		if err != nil {
			return nil, err
		}
		if s.Num > 1 {
			return nil, fmt.Errorf("SET_VRING_ENABLE vring %d: value %d is not 0 or 1", s.Index, s.Num)
		}
		v.enabled = s.Num == 1
		if !v.enabled {
			st.stopRing(int(s.Index))
			return nil, nil
		}
		return nil, st.maybeStart(int(s.Index))
	case wire.GetInflightFD:
		return st.getInflight(m)
	case wire.SetInflightFD:
		return nil, st.setInflight(m)
	case wire.SetBackendReqFD, wire.SetLogFD, wire.SetLogBase:
		return nil, fmt.Errorf("%v is not supported (feature not offered)", m.Request)
	}
	return nil, fmt.Errorf("unsupported request %v", m.Request)
}

func (st *connState) reset() {
	for i := range st.vrings {
		st.stopRing(i)
		v := &st.vrings[i]
		closeFD(&v.kick)
		closeFD(&v.call)
		closeFD(&v.errFD)
		st.vrings[i] = vring{kick: -1, call: -1, errFD: -1}
	}
	st.acked, st.featSet = 0, false
}

func (st *connState) setVringFD(m *wire.Message) error {
	p, err := wire.DecodeVringFD(m.Payload)
	if err != nil {
		return err
	}
	v, err := st.ring(uint32(p.Index))
	if err != nil {
		return err
	}
	fd := -1
	if !p.NoFD {
		if fd, err = m.TakeFD(); err != nil {
			return err
		}
	} else if m.Request == wire.SetVringKick {
		return fmt.Errorf("SET_VRING_KICK vring %d without an fd: polling mode is not supported", p.Index)
	}
	running := v.runner != nil
	st.stopRing(int(p.Index))
	switch m.Request {
	case wire.SetVringKick:
		closeFD(&v.kick)
		v.kick = fd
		// A (re)started ring resumes from the inflight region: a new
		// back-end after a crash, or the same one after GET_VRING_BASE.
		v.recovery = true
		return st.maybeStart(int(p.Index))
	case wire.SetVringCall:
		closeFD(&v.call)
		v.call = fd
		if fd >= 0 {
			// Wake a guest that may wait for a completion whose interrupt
			// went to a previous back-end that died.
			var one [8]byte
			one[0] = 1
			unix.Write(fd, one[:])
		}
	case wire.SetVringErr:
		closeFD(&v.errFD)
		v.errFD = fd
	}
	if running {
		return st.maybeStart(int(p.Index))
	}
	return nil
}

// maybeStart starts ring i if it is fully configured and enabled.
func (st *connState) maybeStart(i int) error {
	v := &st.vrings[i]
	if v.runner != nil || !v.enabled || v.kick < 0 || !v.addrSet || v.num == 0 || st.mem == nil || !st.featSet {
		return nil
	}
	if v.q == nil {
		q, err := st.newQueue(i)
		if err != nil {
			return err
		}
		v.q = q
	}
	cfg := QueueConfig{Index: i, Queue: v.q, KickFD: v.kick, CallFD: v.call, ErrFD: v.errFD, Poll: st.s.opts.Poll, Log: st.log}
	if st.infMap != nil {
		if v.num > st.infQSize || uint16(i) >= st.infNumQ {
			return fmt.Errorf("vring %d of size %d does not fit the inflight region (%d queues of %d)", i, v.num, st.infNumQ, st.infQSize)
		}
		t, err := inflight.Open(st.infMap, st.infNumQ, uint16(i), st.infQSize)
		if err != nil {
			return err
		}
		cfg.Inflight = t
		if v.recovery {
			used := v.q.UsedIdx()
			heads := t.Recover(used)
			// Heads recorded in a region larger than this ring cannot be ours.
			valid := heads[:0]
			for _, h := range heads {
				if h < v.num {
					valid = append(valid, h)
				}
			}
			v.q.SetLastAvail(used + uint16(len(valid)))
			cfg.Resubmit = valid
			if len(valid) > 0 {
				st.log.Info("resubmitting in-flight requests from the previous back-end", "queue", i, "requests", len(valid))
			}
		}
	}
	v.recovery = false
	r, err := st.s.be.StartQueue(cfg)
	if err != nil {
		return fmt.Errorf("start queue %d: %w", i, err)
	}
	st.log.Debug("queue starting", "queue", i, "size", v.num, "last_avail", v.q.LastAvail())
	// From here until stopRing the worker owns v.q.
	v.runner, v.done = r, make(chan struct{})
	done := v.done
	go func() { r.Run(); close(done) }()
	return nil
}

func (st *connState) newQueue(i int) (*virtq.Queue, error) {
	v := &st.vrings[i]
	n := v.num
	desc, err := st.mem.UserSlice(v.addr.Desc, virtq.DescBytes(n))
	if err != nil {
		return nil, fmt.Errorf("vring %d descriptor table: %w", i, err)
	}
	avail, err := st.mem.UserSlice(v.addr.Avail, virtq.AvailBytes(n))
	if err != nil {
		return nil, fmt.Errorf("vring %d avail ring: %w", i, err)
	}
	used, err := st.mem.UserSlice(v.addr.Used, virtq.UsedBytes(n))
	if err != nil {
		return nil, fmt.Errorf("vring %d used ring: %w", i, err)
	}
	return virtq.New(virtq.Config{
		Size: n, Desc: desc, Avail: avail, Used: used, Mem: st.mem,
		EventIdx: st.acked&featEventIdx != 0, Indirect: st.acked&featIndirect != 0,
		// Indirect tables follow the device's seg_max, which can exceed the
		// ring size the front-end chose.
		MaxChain: virtq.MaxChainLimit,
	}, v.base)
}

// stopRing stops ring i's worker, waiting for its in-flight requests.
func (st *connState) stopRing(i int) {
	v := &st.vrings[i]
	if v.runner == nil {
		return
	}
	v.runner.Stop()
	<-v.done
	v.runner, v.done = nil, nil
}

// withQuiesced stops every running ring, runs f (which may replace guest
// memory), rebuilds ring translations and restarts the rings that ran.
func (st *connState) withQuiesced(f func() error) error {
	var was []int
	for i := range st.vrings {
		if st.vrings[i].runner != nil {
			was = append(was, i)
			st.stopRing(i)
		}
	}
	err := f()
	for i := range st.vrings {
		v := &st.vrings[i]
		if v.q != nil {
			// Ring addresses are translated through the memory table, so
			// rebuild the queue on the new table from where it stopped.
			v.base, v.q = v.q.LastAvail(), nil
		}
	}
	for _, i := range was {
		if serr := st.maybeStart(i); serr != nil && err == nil {
			err = serr
		}
	}
	return err
}

func (st *connState) setMemTable(m *wire.Message) error {
	specs, err := wire.DecodeMemTable(m.Payload)
	if err != nil {
		return err
	}
	if len(m.FDs) != len(specs) {
		return fmt.Errorf("SET_MEM_TABLE: %d regions but %d file descriptors", len(specs), len(m.FDs))
	}
	var regions []*guestmem.Region
	for i, sp := range specs {
		r, err := guestmem.MapRegion(m.FDs[i], guestmem.Spec(sp))
		if err != nil {
			for _, r := range regions {
				r.Unmap()
			}
			return err
		}
		regions = append(regions, r)
	}
	mem, err := guestmem.New(regions...)
	if err != nil {
		for _, r := range regions {
			r.Unmap()
		}
		return err
	}
	old := st.mem
	err = st.withQuiesced(func() error { st.mem = mem; return nil })
	for _, r := range old.Regions() {
		r.Unmap()
	}
	st.log.Info("guest memory mapped", "regions", len(regions))
	return err
}

func (st *connState) addMemReg(m *wire.Message) error {
	sp, _ := wire.DecodeSingleMemRegion(m.Payload)
	fd, err := m.TakeFD()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if len(st.mem.Regions()) >= MaxMemSlots {
		return fmt.Errorf("ADD_MEM_REG: all %d memory slots in use", MaxMemSlots)
	}
	r, err := guestmem.MapRegion(fd, guestmem.Spec(sp))
	if err != nil {
		return err
	}
	var mem *guestmem.Memory
	if st.mem == nil {
		mem, err = guestmem.New(r)
	} else {
		mem, err = st.mem.With(r)
	}
	if err != nil {
		r.Unmap()
		return err
	}
	return st.withQuiesced(func() error { st.mem = mem; return nil })
}

func (st *connState) remMemReg(m *wire.Message) error {
	sp, _ := wire.DecodeSingleMemRegion(m.Payload)
	if st.mem == nil {
		return fmt.Errorf("REM_MEM_REG gpa %#x: no memory mapped", sp.GuestAddr)
	}
	mem, gone, err := st.mem.Without(guestmem.Spec(sp))
	if err != nil {
		return err
	}
	err = st.withQuiesced(func() error { st.mem = mem; return nil })
	gone.Unmap()
	return err
}

func (st *connState) getInflight(m *wire.Message) (*reply, error) {
	d, _ := wire.DecodeInflight(m.Payload)
	be := st.s.be
	if d.NumQueues == 0 || d.QueueSize == 0 || d.NumQueues > be.NumQueues() || d.QueueSize > MaxRingSize {
		return nil, fmt.Errorf("GET_INFLIGHT_FD for %d queues of size %d: the device has %d queues of up to %d", d.NumQueues, d.QueueSize, be.NumQueues(), MaxRingSize)
	}
	// QEMU asks for its queue-size property, but the ring the guest ends up
	// with can be larger (see SET_VRING_NUM), and a head beyond the region
	// could not be tracked. The region is ours to lay out (the front-end
	// only keeps it), so every queue gets room for the largest ring: 16 KiB
	// per queue. setInflight recognises the layout by the region's size.
	layout := uint16(MaxRingSize)
	size := inflight.RegionSize(d.NumQueues, layout)
	fd, err := unix.MemfdCreate("vhost-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("GET_INFLIGHT_FD: memfd: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("GET_INFLIGHT_FD: size %d: %w", size, err)
	}
	// The front-end keeps this memory for our successor; sealing stops
	// anyone from shrinking it under a mapping.
	unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL)
	if err := st.mapInflight(fd, size, 0, d.NumQueues, layout); err != nil {
		unix.Close(fd)
		return nil, err
	}
	out := wire.Inflight{MmapSize: size, MmapOffset: 0, NumQueues: d.NumQueues, QueueSize: layout}
	return &reply{payload: out.Append(nil), fds: []int{fd}, closeAfter: []int{fd}}, nil
}

func (st *connState) setInflight(m *wire.Message) error {
	d, _ := wire.DecodeInflight(m.Payload)
	fd, err := m.TakeFD()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if d.NumQueues == 0 || d.QueueSize == 0 || d.QueueSize > MaxRingSize || d.MmapSize < inflight.RegionSize(d.NumQueues, d.QueueSize) {
		return fmt.Errorf("SET_INFLIGHT_FD: %d bytes for %d queues of size %d is inconsistent", d.MmapSize, d.NumQueues, d.QueueSize)
	}
	// QEMU passes back its own queue size, not the one getInflight laid
	// the region out for; a region big enough for MaxRingSize queues is
	// one of ours. A smaller one (another back-end's) keeps its size, and
	// inflight.Open checks each queue header agrees.
	layout := d.QueueSize
	if d.MmapSize >= inflight.RegionSize(d.NumQueues, MaxRingSize) {
		layout = MaxRingSize
	}
	return st.mapInflight(fd, d.MmapSize, d.MmapOffset, d.NumQueues, layout)
}

func (st *connState) mapInflight(fd int, size, off uint64, numQ, qsize uint16) error {
	if size > 1<<30 || off > 1<<40 || off%uint64(unix.Getpagesize()) != 0 {
		return fmt.Errorf("inflight region of %d bytes at offset %d: out of range", size, off)
	}
	if err := guestmem.CheckFDSize(fd, off+size); err != nil {
		return fmt.Errorf("inflight region: %w", err)
	}
	b, err := unix.Mmap(fd, int64(off), int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map inflight region: %w", err)
	}
	return st.withQuiesced(func() error {
		if st.infMap != nil {
			unix.Munmap(st.infMap)
		}
		st.infMap, st.infNumQ, st.infQSize = b, numQ, qsize
		for i := range st.vrings {
			st.vrings[i].recovery = true
		}
		return nil
	})
}
