package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/virtblk/virtblk/sidecar"
	servemode "github.com/virtblk/virtblk/sidecar/serve"
)

// serveFlags configure the serve mode (virtblk.io/serve, docs/serve.md).
type serveFlags struct {
	computeDir *string
	store      *string
	storeSize  *string
	qemuGroup  *int
}

func addServeFlags(fs *flag.FlagSet) *serveFlags {
	return &serveFlags{
		computeDir: fs.String("compute-hooks-dir", "", "the hooks directory as QEMU in the compute container sees it, written into served disks' socket paths (default "+sidecar.DefaultHooksDir+"/$CONTAINER_NAME, or "+sidecar.DefaultHooksDir+" when CONTAINER_NAME is unset)"),
		store:      fs.String("store-default", servemode.DefaultStorePath, "store file for served disks when the VMI sets no virtblk.io/store"),
		storeSize:  fs.String("store-size", "", "size of a store the sidecar creates, as a quantity (e.g. 20Gi); default: the free space of its file system less 1/64 and 64Mi"),
		qemuGroup:  fs.Int("qemu-group", servemode.DefaultQEMUGroup, "group given access to the vhost-user socket directory and sockets (QEMU's); -1 makes them world-accessible inside the pod"),
	}
}

// computeHooksDir is where virt-launcher's compute container sees this
// sidecar's hooks directory: KubeVirt >= 1.6 mounts each sidecar's slice
// at hook-sidecar-<N> and tells the sidecar its name in CONTAINER_NAME.
func (f *serveFlags) computeHooksDir() string {
	if *f.computeDir != "" {
		return *f.computeDir
	}
	if name := os.Getenv("CONTAINER_NAME"); name != "" {
		return filepath.Join(sidecar.DefaultHooksDir, name)
	}
	return sidecar.DefaultHooksDir
}

// hooks returns the define pipeline: serve before IOThreads, so disks are
// redirected before the IOThread pool is laid out. Without a hooks
// directory (Plugin API only) there is nowhere QEMU can reach a socket, so
// the serve mode is off.
func (f *serveFlags) hooks(hooksDir string, log *slog.Logger) ([]sidecar.Hook, *servemode.Hook, error) {
	if hooksDir == "" {
		log.Warn("no hooks directory: disks in virtblk.io/serve cannot be served")
		return sidecar.DefaultHooks(), nil, nil
	}
	abs, err := filepath.Abs(hooksDir)
	if err != nil {
		return nil, nil, fmt.Errorf("--hooks-dir %q: %w", hooksDir, err)
	}
	var size uint64
	if *f.storeSize != "" {
		q, err := resource.ParseQuantity(*f.storeSize)
		if err != nil || q.Sign() <= 0 {
			return nil, nil, fmt.Errorf("--store-size %q: give a positive quantity such as 20Gi", *f.storeSize)
		}
		size = uint64(q.Value())
	}
	if *f.qemuGroup < -1 {
		return nil, nil, errors.New("--qemu-group: give a group id, or -1")
	}
	h, err := servemode.New(servemode.Options{
		HooksDir:        abs,
		ComputeHooksDir: f.computeHooksDir(),
		DefaultStore:    *f.store,
		StoreSize:       size,
		QEMUGroup:       *f.qemuGroup,
		Logger:          log,
	})
	if err != nil {
		return nil, nil, err
	}
	return []sidecar.Hook{h, sidecar.IOThreadHook{}}, h, nil
}

// renderHooks is the pipeline of `render` and the shim: the serve rewrite
// without servers (nothing could keep them running after the process
// exits), so the output shows what the sidecar would define.
func renderHooks() []sidecar.Hook {
	f := serveFlags{computeDir: new(string)}
	return []sidecar.Hook{
		servemode.RenderHook{Options: servemode.RewriteOptions{ComputeHooksDir: f.computeHooksDir(), ReconnectSeconds: servemode.DefaultReconnectSeconds}},
		sidecar.IOThreadHook{},
	}
}
