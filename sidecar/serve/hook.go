package serve

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/virtblk/virtblk/blkio/metrics"
	"github.com/virtblk/virtblk/blkio/vhostblk"
	"github.com/virtblk/virtblk/blkio/vhostuser"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/sidecar"
	"github.com/virtblk/virtblk/sidecar/config"
	"github.com/virtblk/virtblk/storage/store"
)

// Defaults of Options.
const (
	// DefaultStorePath is the store file when neither virtblk.io/store nor
	// the command line names one: where the hookSidecars pvc is mounted.
	DefaultStorePath = "/var/lib/virtblk/store.vbs"
	// DefaultReconnectSeconds is QEMU's reconnect interval: how long guest
	// I/O waits at most after the sidecar comes back from a crash.
	DefaultReconnectSeconds = 1
	// DefaultQEMUGroup is the qemu group in virt-launcher.
	DefaultQEMUGroup = 107
	// QueueSize is the virtqueue size of every served disk: Rewrite
	// writes it into <driver queue_size>, and the back-end's device is
	// created with it. They must agree: the device advertises seg_max =
	// QueueSize-2, and the back-end refuses descriptor chains longer than
	// the ring QEMU actually set up, so a larger device size than the ring
	// (QEMU's default is 128) lets the guest build chains the back-end
	// breaks the queue on.
	QueueSize = 256
	// stateFile, in the socket directory, lists what the sidecar serves so
	// that a restarted sidecar serves it again: virt-launcher does not call
	// OnDefineDomain a second time for a running domain.
	stateFile = "serve-state.json"
	// restoreLockWait bounds how long Restore waits for a dead
	// predecessor's store lock to go away.
	restoreLockWait = 15 * time.Second
)

// Options configure a Hook.
type Options struct {
	// HooksDir is the sidecar's hooks directory; the sockets go in
	// HooksDir/vhost.
	HooksDir string
	// ComputeHooksDir is HooksDir as QEMU sees it, normally
	// /var/run/kubevirt-hooks/$CONTAINER_NAME.
	ComputeHooksDir string
	// DefaultStore is the store path when the VMI does not set
	// virtblk.io/store; empty means DefaultStorePath.
	DefaultStore string
	// StoreSize sizes a store the hook creates; 0 means the free space of
	// the file system holding it (StoreSizeFromFree).
	StoreSize uint64
	// ReconnectSeconds is written into the domain; 0 means
	// DefaultReconnectSeconds.
	ReconnectSeconds uint
	// QEMUGroup owns the socket directory and sockets; -1 grants world
	// access instead (see socket.go).
	QEMUGroup int
	// Poll is the back-end's per-queue busy-poll window.
	Poll time.Duration
	// Logger; nil discards.
	Logger *slog.Logger
}

// Hook is the serve mode as a sidecar.Hook. Put it before the IOThread
// hook: redirected disks must be vhost-user before the IOThread pool is
// laid out, so the pool ids do not depend on call order.
type Hook struct {
	opts Options
	log  *slog.Logger
	rw   RewriteOptions

	mu       sync.Mutex
	st       *openedStore
	servers  map[string]*server
	closed   bool
	openWarn bool

	// reg holds every served volume's stats; it is exported over HTTP
	// once a VMI sets virtblk.io/metrics-port.
	reg         *metrics.Registry
	metricsPort int
	stopMetrics func()
}

var _ sidecar.Hook = (*Hook)(nil)

// server is one running vhost-user-blk server for one disk.
type server struct {
	disk   config.ServedDisk
	socket string
	vol    *store.BlockVolume
	stats  *metrics.VolumeStats
	cancel context.CancelFunc
	done   chan struct{}
	err    error // Serve's result, valid once done is closed
}

func (s *server) running() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// New checks opts and returns a Hook that serves nothing yet.
func New(opts Options) (*Hook, error) {
	if opts.HooksDir == "" || !filepath.IsAbs(opts.HooksDir) {
		return nil, fmt.Errorf("serve: hooks directory %q must be an absolute path", opts.HooksDir)
	}
	if opts.ComputeHooksDir == "" || !filepath.IsAbs(opts.ComputeHooksDir) {
		return nil, fmt.Errorf("serve: compute-side hooks directory %q must be an absolute path (/var/run/kubevirt-hooks/$CONTAINER_NAME)", opts.ComputeHooksDir)
	}
	if opts.DefaultStore == "" {
		opts.DefaultStore = DefaultStorePath
	}
	if !filepath.IsAbs(opts.DefaultStore) {
		return nil, fmt.Errorf("serve: default store %q must be an absolute path", opts.DefaultStore)
	}
	if opts.ReconnectSeconds == 0 {
		opts.ReconnectSeconds = DefaultReconnectSeconds
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Hook{
		opts:    opts,
		log:     log.With("hook", "serve"),
		rw:      RewriteOptions{ComputeHooksDir: opts.ComputeHooksDir, ReconnectSeconds: opts.ReconnectSeconds},
		servers: map[string]*server{},
		reg:     metrics.NewRegistry(),
	}, nil
}

// Name implements sidecar.Hook.
func (h *Hook) Name() string { return "serve" }

// DefineDomain implements sidecar.Hook: it rewrites the served disks and
// makes sure their servers run. The XML depends only on the input; the
// servers are started at most once per disk, so the 2nd and 3rd define
// calls and the migration-target call find them running.
func (h *Hook) DefineDomain(ctx context.Context, call *sidecar.Call, domainXML []byte) ([]byte, []slog.Attr, error) {
	plan := call.Config.Serve
	if plan == nil {
		return domainXML, nil, nil
	}
	// Rewrite first: bad input must not start anything.
	out, attrs, err := Rewrite(domainXML, plan, h.rw)
	if err != nil {
		return nil, nil, &sidecar.InvalidInputError{Err: err}
	}
	started, err := h.ensure(plan)
	if err != nil {
		return nil, attrs, err
	}
	attrs = append(attrs, slog.Int("servers_started", started))
	return out, attrs, nil
}

// Restore starts serving what a previous run of the sidecar in this pod
// served, from the state file in the socket directory. A sidecar that
// crashed and was restarted by the kubelet gets no new OnDefineDomain call
// (the domain is already defined), but QEMU keeps reconnecting to the
// sockets; this brings them back. No state file means nothing to do.
func (h *Hook) Restore() error {
	b, err := os.ReadFile(filepath.Join(h.vhostDir(), stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("restore serve state: %w", err)
	}
	plan, err := decodeState(b)
	if err != nil {
		return fmt.Errorf("restore serve state %s: %w", filepath.Join(h.vhostDir(), stateFile), err)
	}
	// The crashed predecessor's store lock can outlive it for a moment (a
	// SIGKILLed process's io_uring keeps the file open until the kernel
	// tears the ring down), so a lock conflict is retried for a while.
	// The store reports it only as text, hence the string match.
	deadline := time.Now().Add(restoreLockWait)
	n, err := h.ensure(plan)
	for err != nil && strings.Contains(err.Error(), "open in another process") && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		n, err = h.ensure(plan)
	}
	if err != nil {
		return fmt.Errorf("restore serve state: %w", err)
	}
	h.log.Info("restored servers after a restart", "servers_started", n, "store", plan.Store)
	return nil
}

// decodeState parses and checks a state file. The socket directory is
// writable by QEMU's group, so the file is checked as strictly as the
// annotations it came from: disk names that are safe file names, sizes and
// queue counts within limits, a clean absolute store path.
func decodeState(b []byte) (*config.ServePlan, error) {
	var plan config.ServePlan
	if err := json.Unmarshal(b, &plan); err != nil {
		return nil, err
	}
	if len(plan.Disks) == 0 || len(plan.Disks) > config.MaxServedDisks {
		return nil, fmt.Errorf("%d disks; want 1 to %d", len(plan.Disks), config.MaxServedDisks)
	}
	if !filepath.IsAbs(plan.Store) || filepath.Clean(plan.Store) != plan.Store {
		return nil, fmt.Errorf("store path %q is not a clean absolute path", plan.Store)
	}
	if plan.MetricsPort < 0 || plan.MetricsPort > 65535 {
		return nil, fmt.Errorf("metrics port %d out of range", plan.MetricsPort)
	}
	seen := map[string]bool{}
	for _, d := range plan.Disks {
		switch {
		case !config.ValidDiskName(d.Name) || seen[d.Name]:
			return nil, fmt.Errorf("disk name %q is not a DNS label or repeats", d.Name)
		case d.Alias != config.AliasPrefix+d.Name:
			return nil, fmt.Errorf("disk %s: alias %q", d.Name, d.Alias)
		case d.Size == 0 || d.Size%config.VolumeBlockSize != 0 || d.Size > config.MaxVolumeBytes:
			return nil, fmt.Errorf("disk %s: size %d", d.Name, d.Size)
		case d.Queues < 1 || d.Queues > config.MaxQueues:
			return nil, fmt.Errorf("disk %s: %d queues", d.Name, d.Queues)
		case len(d.Serial) > 20:
			return nil, fmt.Errorf("disk %s: serial longer than 20 bytes", d.Name)
		}
		seen[d.Name] = true
	}
	return &plan, nil
}

func (h *Hook) vhostDir() string { return filepath.Join(h.opts.HooksDir, VhostSubdir) }

// ensure opens the store and starts a server for every disk of plan that
// has none running. It returns how many it started.
func (h *Hook) ensure(plan *config.ServePlan) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return 0, errors.New("serve: the sidecar is shutting down")
	}
	path := plan.Store
	if path == "" {
		path = h.opts.DefaultStore
	}
	if h.st == nil {
		st, created, err := openOrCreateStore(path, h.opts.StoreSize, h.log)
		if err != nil {
			return 0, err
		}
		h.st = st
		h.log.Info("store open", "store", path, "created", created, "size", st.s.Geometry().DiskSize)
	} else if h.st.path != path {
		return 0, fmt.Errorf("serve: store %s requested, but this sidecar already serves from %s; one sidecar serves one store", path, h.st.path)
	}
	if err := h.prepareDir(); err != nil {
		return 0, err
	}
	started := 0
	for _, d := range plan.Disks {
		if srv := h.servers[d.Name]; srv != nil {
			if srv.running() {
				h.checkRunning(srv, d)
				continue
			}
			// Its Serve failed; its queues are closed, so the volume
			// handle can go before a new server takes over.
			srv.vol.Close()
			h.reg.Remove(srv.stats)
			delete(h.servers, d.Name)
		}
		if err := h.start(d); err != nil {
			return started, err
		}
		started++
	}
	if err := h.startMetrics(plan.MetricsPort); err != nil {
		return started, err
	}
	if err := h.writeState(path); err != nil {
		return started, err
	}
	return started, nil
}

// startMetrics serves the Prometheus endpoint on port (all addresses of the
// pod, where Prometheus scrapes) once; 0 means not asked for.
func (h *Hook) startMetrics(port int) error {
	switch {
	case port == 0:
		return nil
	case h.metricsPort == port:
		return nil
	case h.metricsPort != 0:
		h.log.Warn("metrics already served on another port; virtblk.io/metrics-port applies at the next VM start", "port", h.metricsPort, "wanted_port", port)
		return nil
	}
	ln, err := metrics.Listen(fmt.Sprintf(":%d", port))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := metrics.ServeListener(ctx, ln, h.reg, h.log); err != nil {
			h.log.Error("metrics server failed; I/O goes on without it", "error", err.Error())
		}
	}()
	h.metricsPort = port
	h.stopMetrics = func() { cancel(); <-done }
	return nil
}

// checkRunning handles a define call for a disk already served. Its size
// and queue count cannot change under a running device; the annotation
// cannot change during a pod's life either, so this only logs.
func (h *Hook) checkRunning(srv *server, d config.ServedDisk) {
	if d.Size > srv.vol.Size() || d.Queues != srv.disk.Queues {
		h.log.Warn("disk already served with other settings; they apply at the next VM start",
			"disk", d.Name, "size", srv.vol.Size(), "wanted_size", d.Size, "queues", srv.disk.Queues, "wanted_queues", d.Queues)
	}
}

// prepareDir creates the socket directory with access for QEMU's group.
func (h *Hook) prepareDir() error {
	dir := h.vhostDir()
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	fell, err := grant(dir, h.opts.QEMUGroup, dirMode, dirModeOpen)
	if err != nil {
		return err
	}
	if fell && !h.openWarn {
		h.openWarn = true
		h.log.Warn("cannot give the socket directory to QEMU's group; made it world-accessible inside the pod", "dir", dir, "group", h.opts.QEMUGroup)
	}
	return nil
}

// start opens (or creates) the disk's volume and starts its server.
func (h *Hook) start(d config.ServedDisk) error {
	s := h.st.s
	what, size, err := ensureVolume(s, d.Name, d.Size)
	if err != nil {
		return err
	}
	if what != "kept" {
		// The volume must exist after a crash before QEMU writes to it.
		if err := s.Sync(); err != nil {
			return fmt.Errorf("sync store after %s volume %s: %w", what, d.Name, err)
		}
	}
	if what == "kept" && size > d.Size {
		h.log.Info("volume is larger than the annotation asks; volumes are never shrunk", "disk", d.Name, "size", size, "annotation_size", d.Size)
	}
	vol, err := s.BlockVolume(d.Name)
	if err != nil {
		return fmt.Errorf("open volume %s: %w", d.Name, err)
	}
	dev, err := virtioblk.NewDevice(vol, virtioblk.Options{NumQueues: uint16(d.Queues), QueueSize: QueueSize, Serial: d.Serial})
	if err != nil {
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	sock := SocketPath(h.opts.HooksDir, d.Name)
	ln, err := listen(sock)
	if err != nil {
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	// Unlink only the socket this listener bound.
	ln.SetUnlinkOnClose(true)
	if _, err := grant(sock, h.opts.QEMUGroup, socketMode, socketModeOpen); err != nil {
		ln.Close()
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	st := h.st.s
	stats, err := metrics.NewVolume(metrics.VolumeOptions{
		Name: d.Name, Socket: sock, Queues: d.Queues,
		StoreChecksumFailures: func() uint64 { return st.Stats().ChecksumErrors },
		CapacityBytes:         vol.Size,
		AllocatedBytes:        vol.AllocatedBytes,
		StoreFreeBytes:        func() uint64 { return st.Stats().FreeBytes() },
	})
	if err == nil {
		err = h.reg.Add(stats)
	}
	if err != nil {
		ln.Close()
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	backend := vhostblk.New(dev)
	backend.Metrics = stats
	log := h.log.With("disk", d.Name)
	ctx, cancel := context.WithCancel(context.Background())
	srv := &server{disk: d, socket: sock, vol: vol, stats: stats, cancel: cancel, done: make(chan struct{})}
	vs := vhostuser.NewServer(backend, vhostuser.Options{Log: log, Poll: h.opts.Poll})
	go func() {
		defer close(srv.done)
		defer ln.Close()
		srv.err = vs.Serve(ctx, ln)
		if srv.err != nil {
			log.Error("vhost-user server stopped; the next define call restarts it", "error", srv.err.Error())
		}
	}()
	h.servers[d.Name] = srv
	log.Info("serving disk", "socket", sock, "volume", what, "size", size, "queues", d.Queues)
	return nil
}

// writeState records what is served, for Restore after a crash. It writes
// only when the content changes, through a rename so a crash never leaves
// half a file.
func (h *Hook) writeState(storePath string) error {
	plan := config.ServePlan{Store: storePath, MetricsPort: h.metricsPort}
	for _, name := range sortedNames(h.servers) {
		plan.Disks = append(plan.Disks, h.servers[name].disk)
	}
	b, err := json.MarshalIndent(plan, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(h.vhostDir(), stateFile)
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, b) {
		return nil
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write serve state: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write serve state: %w", err)
	}
	return nil
}

// Shutdown implements sidecar.Hook: it stops every server (each drains its
// in-flight requests), then flushes and closes the store. After a clean
// shutdown there is nothing to restore, so the state file goes too.
func (h *Hook) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	for _, srv := range h.servers {
		srv.cancel()
	}
	if h.stopMetrics != nil {
		h.stopMetrics()
	}
	var errs []error
	for _, name := range sortedNames(h.servers) {
		srv := h.servers[name]
		select {
		case <-srv.done:
		case <-ctx.Done():
			// Closing the store now would race in-flight I/O; leave it
			// to crash recovery, which is what it is for.
			return fmt.Errorf("serve: server for disk %s did not stop in time (%w); store left to crash recovery", name, context.Cause(ctx))
		}
		if err := srv.vol.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close volume %s: %w", name, err))
		}
	}
	if h.st != nil {
		if err := h.st.close(); err != nil {
			errs = append(errs, fmt.Errorf("close store %s: %w", h.st.path, err))
		} else {
			h.log.Info("store flushed and closed", "store", h.st.path)
		}
	}
	if len(errs) == 0 {
		if err := os.Remove(filepath.Join(h.vhostDir(), stateFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove serve state: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Sockets returns the sidecar-side socket path of every running server, by
// disk name.
func (h *Hook) Sockets() map[string]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string]string{}
	for name, srv := range h.servers {
		if srv.running() {
			out[name] = srv.socket
		}
	}
	return out
}

func sortedNames(m map[string]*server) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}
