package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/virtblk/virtblk/blkio/vhostblk"
	"github.com/virtblk/virtblk/blkio/vhostuser"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/storage/store"
)

// serveStore serves one store volume over vhost-user-blk in this process,
// wired the way cmd/virtblk's demo does it. It stands in for
// `virtblkd serve --store FILE --volume NAME` on trees where virtblkd
// cannot serve store volumes yet, so the crash test and the benchmark
// still drive a real separate process they can SIGKILL.
func serveStore(args []string) error {
	fs := flag.NewFlagSet("benchstore serve", flag.ContinueOnError)
	path := fs.String("store", "", "store file (required)")
	name := fs.String("volume", "", "volume name (required)")
	sock := fs.String("socket", "", "unix socket to listen on (required)")
	queues := fs.Int("queues", 2, "virtqueues")
	serial := fs.String("serial", "", "disk serial")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *path == "" || *name == "" || *sock == "" {
		return errors.New("serve: --store, --volume and --socket are required")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	st, closeStore, err := store.OpenPath(*path, store.Options{Logger: log})
	if err != nil {
		return err
	}
	vol, err := st.BlockVolume(*name)
	if err != nil {
		closeStore()
		return fmt.Errorf("store %s: %w", *path, err)
	}
	dev, err := virtioblk.NewDevice(vol, virtioblk.Options{NumQueues: uint16(*queues), QueueSize: 256, Serial: *serial})
	if err != nil {
		closeStore()
		return err
	}
	// A SIGKILLed predecessor leaves its socket file behind.
	os.Remove(*sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: *sock, Net: "unix"})
	if err != nil {
		closeStore()
		return fmt.Errorf("listen on %s: %w", *sock, err)
	}
	ln.SetUnlinkOnClose(true)
	log.Info("serving", "socket", *sock, "store", *path, "volume", *name, "size", vol.Size(), "queues", *queues)
	srv := vhostuser.NewServer(vhostblk.New(dev), vhostuser.Options{Log: log})
	serr := srv.Serve(ctx, ln)
	ln.Close()
	if err := vol.Close(); err != nil && serr == nil {
		serr = err
	}
	if err := closeStore(); err != nil && serr == nil {
		serr = err
	}
	log.Info("stopped")
	return serr
}
