// Command virtblkd is virtblk's vhost-user-blk back-end: it serves one
// virtual disk to a QEMU front-end over a unix socket, with one I/O worker
// per virtqueue, and survives front-end and back-end restarts (QEMU
// reconnects; in-flight requests are resubmitted from the inflight region).
//
//	virtblkd serve --socket PATH --file IMG [--queues N] [--queue-size N]
//	               [--read-only] [--serial ID] [--poll-us N] [--log-level L]
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
	"syscall"
	"time"

	"github.com/virtblk/virtblk/blkio/vhostblk"
	"github.com/virtblk/virtblk/blkio/vhostuser"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/storage"
	"github.com/virtblk/virtblk/storage/rawvol"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

const usage = `usage: virtblkd serve --socket PATH --file IMG [flags]

Serves IMG as a vhost-user-blk device on the unix socket PATH.
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
	socket    string
	file      string
	queues    int
	queueSize int
	readOnly  bool
	serial    string
	pollUs    int
	level     slog.Level
}

func parseServe(args []string, stderr io.Writer) (serveConfig, error) {
	var c serveConfig
	fs := flag.NewFlagSet("virtblkd serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.socket, "socket", "", "unix socket path to listen on (required)")
	fs.StringVar(&c.file, "file", "", "raw image file or block device to serve (required)")
	fs.IntVar(&c.queues, "queues", 1, "number of virtqueues (1-64); QEMU's num-queues must not exceed it")
	fs.IntVar(&c.queueSize, "queue-size", 256, "largest virtqueue size (power of two, 2-1024)")
	fs.BoolVar(&c.readOnly, "read-only", false, "serve the disk read-only")
	fs.StringVar(&c.serial, "serial", "", "disk serial (GET_ID), at most 20 bytes")
	fs.IntVar(&c.pollUs, "poll-us", 0, "busy-poll each queue this many microseconds before sleeping (0 = off)")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	switch {
	case c.socket == "":
		return c, errors.New("--socket PATH is required")
	case c.file == "":
		return c, errors.New("--file IMG is required")
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

func serve(ctx context.Context, c serveConfig, log *slog.Logger) error {
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
	srv := vhostuser.NewServer(vhostblk.New(dev), vhostuser.Options{Log: log, Poll: time.Duration(c.pollUs) * time.Microsecond})
	if err := srv.Serve(ctx, ln); err != nil {
		return err
	}
	log.Info("stopped: in-flight I/O drained")
	return nil
}

// listen binds the socket, replacing a stale socket file left by a process
// that died (SIGKILL leaves it behind) but refusing to steal a live one.
func listen(path string) (*net.UnixListener, error) {
	addr := &net.UnixAddr{Name: path, Net: "unix"}
	ln, err := net.ListenUnix("unix", addr)
	if err == nil {
		return ln, nil
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	fi, serr := os.Lstat(path)
	if serr != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("listen on %s: the path exists and is not a socket; remove it or choose another --socket", path)
	}
	if conn, derr := net.DialTimeout("unix", path, time.Second); derr == nil {
		conn.Close()
		return nil, fmt.Errorf("listen on %s: another process is serving this socket; stop it first", path)
	}
	if rerr := os.Remove(path); rerr != nil {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, rerr)
	}
	ln, err = net.ListenUnix("unix", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return ln, nil
}
