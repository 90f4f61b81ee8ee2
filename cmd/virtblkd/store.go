package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/virtblk/virtblk/blkio/metrics"
	"github.com/virtblk/virtblk/blkio/vhostblk"
	"github.com/virtblk/virtblk/blkio/vhostuser"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/storage/store"
)

// volumeSpec is one --volume NAME[=SOCKET].
type volumeSpec struct{ name, socket string }

// volumeFlags collects repeated --volume flags.
type volumeFlags []volumeSpec

func (v *volumeFlags) String() string {
	parts := make([]string, 0, len(*v))
	for _, s := range *v {
		if s.socket == "" {
			parts = append(parts, s.name)
		} else {
			parts = append(parts, s.name+"="+s.socket)
		}
	}
	return strings.Join(parts, ",")
}

func (v *volumeFlags) Set(s string) error {
	name, sock, hasSock := strings.Cut(s, "=")
	if name == "" || (hasSock && sock == "") {
		return fmt.Errorf("want NAME or NAME=SOCKET, got %q", s)
	}
	*v = append(*v, volumeSpec{name: name, socket: sock})
	return nil
}

// storeTargets resolves the store volumes to serve and their sockets: a
// volume given without =SOCKET takes --socket, which only one may do.
func storeTargets(c serveConfig) ([]volumeSpec, error) {
	if len(c.volumes) == 0 {
		return nil, errors.New("--store needs at least one --volume NAME (or NAME=SOCKET)")
	}
	out := make([]volumeSpec, 0, len(c.volumes))
	names, socks := map[string]bool{}, map[string]bool{}
	usedSocket := false
	for _, v := range c.volumes {
		if v.socket == "" {
			if c.socket == "" {
				return nil, fmt.Errorf("--volume %s has no socket: give --volume %s=SOCKET or --socket PATH", v.name, v.name)
			}
			if usedSocket {
				return nil, fmt.Errorf("--volume %s: only one volume can take --socket; give the others as NAME=SOCKET", v.name)
			}
			usedSocket = true
			v.socket = c.socket
		}
		if names[v.name] {
			return nil, fmt.Errorf("--volume %s is given twice", v.name)
		}
		if socks[v.socket] {
			return nil, fmt.Errorf("socket %s is given to two volumes", v.socket)
		}
		names[v.name], socks[v.socket] = true, true
		out = append(out, v)
	}
	if c.socket != "" && !usedSocket {
		return nil, errors.New("--socket is unused: every --volume names its own socket; drop --socket")
	}
	if c.serial != "" && len(out) > 1 {
		return nil, errors.New("--serial applies to one disk; with several volumes each serves its name as serial")
	}
	return out, nil
}

// serialFor is what GET_ID answers: --serial, else the volume name (cut
// to virtio-blk's 20 bytes).
func serialFor(c serveConfig, name string) string {
	if c.serial != "" {
		return c.serial
	}
	if len(name) > virtioblk.IDBytes {
		return name[:virtioblk.IDBytes]
	}
	return name
}

// serveStore serves volumes of one store, each on its own socket, until
// ctx ends; then every server drains its in-flight I/O and the store is
// flushed and closed.
func serveStore(ctx context.Context, c serveConfig, log *slog.Logger) (err error) {
	targets, err := storeTargets(c)
	if err != nil {
		return err
	}
	s, closeStore, err := store.OpenPath(c.store, store.Options{Logger: log})
	if err != nil {
		return err
	}
	var vols []*store.BlockVolume
	defer func() {
		for _, v := range vols {
			v.Close()
		}
		if cerr := closeStore(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("close store %s: %w", c.store, cerr))
		} else {
			log.Info("store flushed and closed", "store", c.store)
		}
	}()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var reg *metrics.Registry
	if c.metricsAddr != "" {
		reg = metrics.NewRegistry()
		ml, err := metrics.Listen(c.metricsAddr)
		if err != nil {
			return err
		}
		mdone := make(chan struct{})
		go func() {
			defer close(mdone)
			if err := metrics.ServeListener(ctx, ml, reg, log); err != nil {
				log.Error("metrics server failed; I/O goes on without it", "err", err)
			}
		}()
		defer func() { cancel(); <-mdone }()
	}

	var wg sync.WaitGroup
	errs := make(chan error, len(targets))
	start := func(t volumeSpec) error {
		bv, err := s.BlockVolume(t.name)
		if err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return fmt.Errorf("volume %s of %s: %w; list them with `virtblk volume list --store %s`, create it with `virtblk volume create --store %s --name %s --size SIZE`",
					t.name, c.store, err, c.store, c.store, t.name)
			}
			return fmt.Errorf("volume %s of %s: %w", t.name, c.store, err)
		}
		vols = append(vols, bv)
		dev, err := virtioblk.NewDevice(bv, virtioblk.Options{
			NumQueues: uint16(c.queues), QueueSize: uint16(c.queueSize), Serial: serialFor(c, t.name), ReadOnly: c.readOnly,
		})
		if err != nil {
			return fmt.Errorf("volume %s: %w", t.name, err)
		}
		backend := vhostblk.New(dev)
		if reg != nil {
			vs, err := metrics.NewVolume(metrics.VolumeOptions{
				Name: t.name, Socket: t.socket, Queues: c.queues,
				StoreChecksumFailures: func() uint64 { return s.Stats().ChecksumErrors },
				CapacityBytes:         bv.Size,
				AllocatedBytes:        bv.AllocatedBytes,
				StoreFreeBytes:        func() uint64 { return s.Stats().FreeBytes() },
			})
			if err == nil {
				err = reg.Add(vs)
			}
			if err != nil {
				return err
			}
			backend.Metrics = vs
		}
		ln, err := listen(t.socket)
		if err != nil {
			return err
		}
		ln.SetUnlinkOnClose(true)
		vlog := log.With("volume", t.name)
		vlog.Info("serving", "socket", t.socket, "store", c.store, "size", bv.Size(), "queues", c.queues,
			"queue_size", c.queueSize, "read_only", dev.Features()&virtioblk.FRO != 0, "poll_us", c.pollUs)
		srv := vhostuser.NewServer(backend, vhostuser.Options{Log: vlog, Poll: time.Duration(c.pollUs) * time.Microsecond})
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer ln.Close()
			if err := srv.Serve(ctx, ln); err != nil {
				errs <- fmt.Errorf("volume %s: %w", t.name, err)
				cancel() // one broken server stops the daemon
			}
		}()
		return nil
	}
	for _, t := range targets {
		if err := start(t); err != nil {
			cancel()
			wg.Wait()
			return err
		}
	}
	wg.Wait()
	close(errs)
	var all []error
	for e := range errs {
		all = append(all, e)
	}
	if len(all) == 0 {
		log.Info("stopped: in-flight I/O drained")
	}
	return errors.Join(all...)
}
