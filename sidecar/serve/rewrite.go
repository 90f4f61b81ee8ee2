// Package serve owns the sidecar's serve mode: disks named in
// virtblk.io/serve are served by a vhost-user-blk back-end running inside
// the hook sidecar process, from volumes of one virtblk store on the
// hookSidecars PVC. It has two halves: Rewrite, a pure function that
// points those disks of the domain XML at the back-end's sockets, and Hook,
// which also makes sure the store, the volumes and one server per disk are
// up (idempotently) and stops them cleanly on Shutdown. docs/serve.md is
// the user-facing contract.
package serve

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"

	"libvirt.org/go/libvirtxml"

	"github.com/virtblk/virtblk/domainxml"
	"github.com/virtblk/virtblk/sidecar"
	"github.com/virtblk/virtblk/sidecar/config"
)

// VhostSubdir is the directory under the hooks directory that holds the
// vhost-user sockets. It must be a directory: virt-launcher dials every
// non-directory entry of a sidecar's hooks directory as a hook socket.
const VhostSubdir = "vhost"

// SocketPath is where disk's vhost-user socket lives under hooksDir (the
// sidecar's view, or QEMU's view of the same directory).
func SocketPath(hooksDir, disk string) string {
	return filepath.Join(hooksDir, VhostSubdir, disk+".sock")
}

// RewriteOptions are the fixed inputs of Rewrite besides the domain.
type RewriteOptions struct {
	// ComputeHooksDir is the sidecar's hooks directory as QEMU in the
	// compute container sees it: /var/run/kubevirt-hooks/$CONTAINER_NAME.
	ComputeHooksDir string
	// ReconnectSeconds is QEMU's reconnect interval for the socket; it is
	// what lets a guest survive a restart of the sidecar.
	ReconnectSeconds uint
}

// Rewrite turns every disk of plan into a vhost-user disk on its socket
// (as QEMU sees it) and makes guest memory shareable. It is a pure
// function of its inputs: it rebuilds each served disk from scratch, so
// KubeVirt's lossy re-feed of its output (a vhostuser disk with an empty
// <source>) converges to the same XML.
func Rewrite(domainXML []byte, plan *config.ServePlan, opt RewriteOptions) ([]byte, []slog.Attr, error) {
	if plan == nil || len(plan.Disks) == 0 {
		return domainXML, nil, nil
	}
	dom, err := domainxml.ParseDomain(domainXML)
	if err != nil {
		return nil, nil, err
	}
	names := make([]string, 0, len(plan.Disks))
	for _, d := range plan.Disks {
		err := domainxml.ToVhostUser(dom, d.Alias, domainxml.VhostUserOptions{
			SocketPath:       SocketPath(opt.ComputeHooksDir, d.Name),
			ReconnectSeconds: opt.ReconnectSeconds,
			Queues:           uint(d.Queues),
		})
		if err != nil {
			return nil, nil, fmt.Errorf("serve disk %s: %w", d.Name, err)
		}
		if err := setQueueSize(dom, d.Alias); err != nil {
			return nil, nil, err
		}
		names = append(names, fmt.Sprintf("%s:queues=%d", d.Name, d.Queues))
	}
	if err := domainxml.EnsureSharedMemory(dom); err != nil {
		return nil, nil, err
	}
	out, err := domainxml.MarshalDomain(dom)
	if err != nil {
		return nil, nil, err
	}
	out, err = domainxml.KeepKubeVirtDiskExtras(domainXML, out)
	if err != nil {
		return nil, nil, err
	}
	return out, []slog.Attr{slog.String("served", strings.Join(names, " "))}, nil
}

// RenderHook is the serve mode's XML rewrite alone, without starting any
// server: what `virtblk-hook render` shows for a VMI with virtblk.io/serve.
type RenderHook struct{ Options RewriteOptions }

// Name implements sidecar.Hook.
func (RenderHook) Name() string { return "serve" }

// Shutdown implements sidecar.Hook; nothing runs.
func (RenderHook) Shutdown(context.Context) error { return nil }

// DefineDomain implements sidecar.Hook.
func (r RenderHook) DefineDomain(_ context.Context, call *sidecar.Call, domainXML []byte) ([]byte, []slog.Attr, error) {
	out, attrs, err := Rewrite(domainXML, call.Config.Serve, r.Options)
	if err != nil {
		return nil, nil, &sidecar.InvalidInputError{Err: err}
	}
	return out, attrs, nil
}

// setQueueSize pins the served disk's virtqueue size to QueueSize, the size
// its back-end device is built with (see QueueSize).
func setQueueSize(dom *libvirtxml.Domain, alias string) error {
	for i := range dom.Devices.Disks {
		d := &dom.Devices.Disks[i]
		if d.Alias != nil && d.Alias.Name == alias && d.Driver != nil {
			qs := uint(QueueSize)
			d.Driver.QueueSize = &qs
			return nil
		}
	}
	return fmt.Errorf("serve disk %s: no driver after the vhost-user rewrite", alias)
}
