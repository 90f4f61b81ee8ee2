// Command virtblkd is virtblk's vhost-user-blk back-end: it serves one
// virtual disk to a QEMU front-end over a unix socket, with one I/O worker
// per virtqueue, and survives front-end and back-end restarts (QEMU
// reconnects; in-flight requests are resubmitted from the inflight region).
//
//	virtblkd serve --socket PATH --file IMG [--queues N] [--queue-size N]
//	               [--read-only] [--serial ID] [--poll-us N] [--log-level L]
//	               [--metrics-addr ADDR] [--cpuprofile FILE]
//	virtblkd serve --store FILE --volume NAME=SOCKET [--volume NAME=SOCKET...]
//	               [same flags]
//	virtblkd serve --store FILE --volume NAME --socket PATH [same flags]
//
// In store mode one daemon serves several volumes of one virtblk store,
// each on its own socket, with the flags above applying to every one.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/virtblk/virtblk/blkio/metrics"
	"github.com/virtblk/virtblk/blkio/vhostblk"
	"github.com/virtblk/virtblk/blkio/vhostuser"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/storage"
	"github.com/virtblk/virtblk/storage/rawvol"

	"github.com/virtblk/virtblk/internal/unixsock"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

const usage = `usage: virtblkd serve --socket PATH --file IMG [flags]
       virtblkd serve --store FILE --volume NAME=SOCKET [--volume NAME=SOCKET...] [flags]

Serves IMG, or volumes of a virtblk store, as vhost-user-blk devices on
unix sockets.
Run "virtblkd serve -h" for the flags.
`

func run(args []string, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "serve" {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cfg, err := parseServe(args[1:], stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "virtblkd: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := serve(ctx, cfg, log); err != nil {
		log.Error("virtblkd failed", "err", err)
		return 1
	}
	return 0
}

type serveConfig struct {
	socket string
	file   string
	// store and volumes select store mode (serveStore).
	store     string
	volumes   volumeFlags
	queues    int
	queueSize int
	readOnly  bool
	serial    string
	pollUs    int
	level     slog.Level
	// metricsAddr is the Prometheus listen address ("" = no metrics).
	metricsAddr string
	// cpuProfile is a file for a pprof CPU profile of the whole run.
	cpuProfile string
}

func parseServe(args []string, stderr io.Writer) (serveConfig, error) {
	var c serveConfig
	fs := flag.NewFlagSet("virtblkd serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.socket, "socket", "", "unix socket path to listen on (required with --file)")
	fs.StringVar(&c.file, "file", "", "raw image file or block device to serve (this or --store)")
	fs.StringVar(&c.store, "store", "", "virtblk store file or device whose volumes to serve (this or --file)")
	fs.Var(&c.volumes, "volume", "store volume to serve, NAME=SOCKET or NAME (on --socket); repeatable")
	fs.IntVar(&c.queues, "queues", 1, "number of virtqueues (1-64); QEMU's num-queues must not exceed it")
	fs.IntVar(&c.queueSize, "queue-size", 256, "largest virtqueue size (power of two, 2-1024)")
	fs.BoolVar(&c.readOnly, "read-only", false, "serve the disk read-only")
	fs.StringVar(&c.serial, "serial", "", "disk serial (GET_ID), at most 20 bytes")
	fs.IntVar(&c.pollUs, "poll-us", 0, "busy-poll each queue this many microseconds before sleeping (0 = off)")
	fs.StringVar(&c.metricsAddr, "metrics-addr", "", `serve Prometheus /metrics on this address, e.g. ":9090" or "127.0.0.1:0" (empty = off)`)
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a pprof CPU profile of the whole run to FILE (for performance work)")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	switch {
	case c.file != "" && c.store != "":
		return c, errors.New("--file and --store exclude each other: serve an image or store volumes")
	case c.file == "" && c.store == "":
		return c, errors.New("--file IMG or --store FILE is required")
	case c.store == "" && len(c.volumes) > 0:
		return c, errors.New("--volume needs --store FILE")
	case c.store == "" && c.socket == "":
		return c, errors.New("--socket PATH is required")
	case c.queues < 1 || c.queues > 64:
		return c, fmt.Errorf("--queues %d: must be 1..64", c.queues)
	case c.queueSize < 2 || c.queueSize > 1024 || c.queueSize&(c.queueSize-1) != 0:
		return c, fmt.Errorf("--queue-size %d: must be a power of two from 2 to 1024", c.queueSize)
	case len(c.serial) > virtioblk.IDBytes:
		return c, fmt.Errorf("--serial %q: at most %d bytes", c.serial, virtioblk.IDBytes)
	case c.pollUs < 0 || c.pollUs > 1000000:
		return c, fmt.Errorf("--poll-us %d: must be 0..1000000", c.pollUs)
	}
	if err := c.level.UnmarshalText([]byte(*level)); err != nil {
		return c, fmt.Errorf("--log-level %q: want debug, info, warn or error", *level)
	}
	if c.store != "" {
		if _, err := storeTargets(c); err != nil {
			return c, err
		}
	}
	return c, nil
}

// openVolume opens the disk the device serves. It is the one place that
// knows where volumes come from, so other sources (a block store volume)
// plug in here.
func openVolume(c serveConfig, log *slog.Logger) (storage.Volume, error) {
	v, err := rawvol.Open(c.file, rawvol.Options{ReadOnly: c.readOnly, Logger: log})
	if err != nil {
		return nil, err
	}
	return v, nil
}

// volumeName labels the disk in metrics: the serial if set, else the
// image's file name.
func volumeName(c serveConfig) string {
	if c.serial != "" {
		return c.serial
	}
	return filepath.Base(c.file)
}

func serve(ctx context.Context, c serveConfig, log *slog.Logger) error {
	if c.cpuProfile != "" {
		f, err := os.Create(c.cpuProfile)
		if err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("cpu profile %s: %w", c.cpuProfile, err)
		}
		defer pprof.StopCPUProfile()
	}
	if c.store != "" {
		return serveStore(ctx, c, log)
	}
	vol, err := openVolume(c, log)
	if err != nil {
		return err
	}
	defer vol.Close()
	dev, err := virtioblk.NewDevice(vol, virtioblk.Options{
		NumQueues: uint16(c.queues), QueueSize: uint16(c.queueSize), Serial: c.serial, ReadOnly: c.readOnly,
	})
	if err != nil {
		return err
	}
	ln, err := listen(c.socket)
	if err != nil {
		return err
	}
	// Unlink only the socket we bound: a successor may already own the path.
	ln.SetUnlinkOnClose(true)
	defer ln.Close()
	log.Info("serving", "socket", c.socket, "file", c.file, "size", vol.Size(), "block_size", vol.BlockSize(),
		"queues", c.queues, "queue_size", c.queueSize, "read_only", dev.Features()&virtioblk.FRO != 0, "poll_us", c.pollUs)
	backend := vhostblk.New(dev)
	if c.metricsAddr != "" {
		stopMetrics, err := startMetrics(ctx, c, backend, log)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}
	srv := vhostuser.NewServer(backend, vhostuser.Options{Log: log, Poll: time.Duration(c.pollUs) * time.Microsecond})
	if err := srv.Serve(ctx, ln); err != nil {
		return err
	}
	log.Info("stopped: in-flight I/O drained")
	return nil
}

// startMetrics opens the metrics port before serving (a bad address fails
// the start, not a later scrape) and wires the volume's per-queue stats
// into the backend. The returned stop ends the server and waits for it.
func startMetrics(ctx context.Context, c serveConfig, b *vhostblk.Backend, log *slog.Logger) (stop func(), err error) {
	vs, err := metrics.NewVolume(metrics.VolumeOptions{
		Name: volumeName(c), Socket: c.socket, Queues: c.queues,
		CapacityBytes: func() uint64 { return b.Volume().Size() },
	})
	if err != nil {
		return nil, err
	}
	reg := metrics.NewRegistry()
	if err := reg.Add(vs); err != nil {
		return nil, err
	}
	ml, err := metrics.Listen(c.metricsAddr)
	if err != nil {
		return nil, err
	}
	b.Metrics = vs
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := metrics.ServeListener(mctx, ml, reg, log); err != nil {
			log.Error("metrics server failed; I/O goes on without it", "err", err)
		}
	}()
	return func() { cancel(); <-done }, nil
}

// listen binds the socket (see unixsock.Listen) with virtblkd's hints.
func listen(path string) (*net.UnixListener, error) {
	ln, err := unixsock.Listen(path)
	if errors.Is(err, unixsock.ErrInUse) {
		return nil, fmt.Errorf("%w; stop it first or choose another --socket", err)
	}
	return ln, err
}
