package config

import (
	"fmt"
	"path/filepath"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
)

// Annotation keys of the serve mode (docs/serve.md).
const (
	// KeyServe names the VMI disks virtblk serves from its store, with
	// their sizes: "data:10Gi,logs:2Gi".
	KeyServe = Prefix + "serve"
	// KeyStore is the store file inside the sidecar container.
	KeyStore = Prefix + "store"
	// KeyMetricsPort is the TCP port of the back-end's Prometheus endpoint.
	KeyMetricsPort = Prefix + "metrics-port"
)

// Limits of the serve mode.
const (
	// MaxServedDisks bounds virtblk.io/serve: each served disk is a socket
	// and a set of queue workers in the sidecar.
	MaxServedDisks = 64
	// MaxVolumeBytes is the largest volume the store holds (2^32-1 blocks of
	// 4 KiB).
	MaxVolumeBytes = uint64(1<<32-1) * VolumeBlockSize
	// VolumeBlockSize is the store's block: volume sizes are rounded up to it.
	VolumeBlockSize = 4096
	// maxDiskNameLen is a DNS label's length, which KubeVirt enforces on
	// disk names; longer names would not fit a unix socket path either.
	maxDiskNameLen  = 63
	maxStorePathLen = 4096
	// virtioSerialBytes is the size of virtio-blk's GET_ID answer.
	virtioSerialBytes = 20
)

// ServePlan is what virtblk.io/serve and its companions ask for: disks of
// the VMI that the sidecar serves over vhost-user-blk from volumes of one
// store.
type ServePlan struct {
	// Disks are the served disks in VMI spec order.
	Disks []ServedDisk
	// Store is the store file path from virtblk.io/store; empty means the
	// sidecar's default.
	Store string
	// MetricsPort is virtblk.io/metrics-port; 0 means not set.
	MetricsPort int
}

// ServedDisk is one disk redirected to virtblk's back-end.
type ServedDisk struct {
	// Name is the VMI disk name; it is also the store volume name and the
	// socket's file name.
	Name string
	// Alias is the disk's <alias name> in the domain ("ua-<name>").
	Alias string
	// Size is the volume size in bytes, a multiple of VolumeBlockSize.
	Size uint64
	// Queues is the virtqueue count: virtblk.io/queues or one per vCPU.
	Queues int
	// Serial is the VMI disk's serial, cut to virtio-blk's 20 bytes as
	// QEMU does; the back-end answers GET_ID with it because libvirt
	// refuses <serial> on a vhost-user disk.
	Serial string
}

// serveEntry is one "name:size" of virtblk.io/serve.
type serveEntry struct {
	name string
	size uint64
}

func parseServe(s *settings, key, _, raw string) *Error {
	fix := "list VMI disk names with sizes in Kubernetes quantity syntax, separated by commas, e.g. \"data:10Gi,logs:2Gi\""
	var out []serveEntry
	seen := map[string]bool{}
	parts := strings.Split(raw, ",")
	if len(parts) > MaxServedDisks {
		return &Error{key, raw, fmt.Sprintf("%d disks is more than the limit of %d", len(parts), MaxServedDisks), fix}
	}
	for _, part := range parts {
		part = strings.TrimSpace(part)
		name, sizeStr, ok := strings.Cut(part, ":")
		name, sizeStr = strings.TrimSpace(name), strings.TrimSpace(sizeStr)
		if !ok || name == "" || sizeStr == "" {
			return &Error{key, raw, fmt.Sprintf("%q is not disk:size", part), fix}
		}
		if !ValidDiskName(name) {
			return &Error{key, raw, fmt.Sprintf("disk name %q is not a DNS label (lower-case letters, digits and '-', at most %d characters)", name, maxDiskNameLen), fix}
		}
		if seen[name] {
			return &Error{key, raw, fmt.Sprintf("disk %q is listed twice", name), fix}
		}
		seen[name] = true
		size, problem := parseVolumeSize(sizeStr)
		if problem != "" {
			return &Error{key, raw, fmt.Sprintf("size of disk %q: %s", name, problem), fix}
		}
		out = append(out, serveEntry{name: name, size: size})
	}
	s.serve = &setting[[]serveEntry]{key: key, raw: raw, v: out}
	return nil
}

// parseVolumeSize reads a Kubernetes quantity and rounds it up to the
// store's block size, so "10G" (not a multiple of 4 KiB) still works.
func parseVolumeSize(v string) (uint64, string) {
	q, err := resource.ParseQuantity(v)
	if err != nil {
		return 0, fmt.Sprintf("%q is not a quantity (%v)", v, err)
	}
	if q.Sign() <= 0 {
		return 0, fmt.Sprintf("%q must be more than zero", v)
	}
	// Value rounds fractions up and saturates at MaxInt64, which is above
	// the limit anyway.
	n, ok := q.AsInt64()
	if !ok {
		n = q.Value()
	}
	if n <= 0 || uint64(n) > MaxVolumeBytes {
		return 0, fmt.Sprintf("%q is more than the store's limit of 16Ti per volume", v)
	}
	size := (uint64(n) + VolumeBlockSize - 1) / VolumeBlockSize * VolumeBlockSize
	if size > MaxVolumeBytes {
		return 0, fmt.Sprintf("%q is more than the store's limit of 16Ti per volume", v)
	}
	return size, ""
}

// ValidDiskName accepts what KubeVirt accepts for a disk name (a DNS-1123
// label). It also keeps the name safe as a file name and a store volume name.
func ValidDiskName(name string) bool {
	if name == "" || len(name) > maxDiskNameLen {
		return false
	}
	for i, c := range name {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(name)-1:
		default:
			return false
		}
	}
	return true
}

func parseStore(s *settings, key, _, raw string) *Error {
	v := strings.TrimSpace(raw)
	fix := "give an absolute path of the store file inside the sidecar container, on the hookSidecars pvc mount, e.g. \"/var/lib/virtblk/store.vbs\""
	switch {
	case v == "":
		return &Error{key, raw, "value is empty", fix}
	case len(v) > maxStorePathLen:
		return &Error{key, raw, fmt.Sprintf("%d characters is more than the limit of %d", len(v), maxStorePathLen), fix}
	case !filepath.IsAbs(v):
		return &Error{key, raw, "not an absolute path", fix}
	case strings.HasSuffix(v, "/") || filepath.Clean(v) != v:
		return &Error{key, raw, "not a clean file path (trailing slash, \"..\" or repeated separators)", fix}
	case strings.ContainsRune(v, 0):
		return &Error{key, raw, "contains a NUL byte", fix}
	}
	s.store = &setting[string]{key: key, raw: raw, v: v}
	return nil
}

func parseMetricsPort(s *settings, key, _, raw string) *Error {
	n, e := parseCount(key, raw, 65535, "the TCP port (1-65535) of the back-end's Prometheus endpoint")
	if e != nil {
		return e
	}
	s.metricsPort = &setting[int]{key: key, raw: raw, v: n}
	return nil
}

// iothreadKeysGiven reports whether any annotation that only the IOThread
// mapping uses is set. virtblk.io/queues is shared by both modes.
func (p *parser) iothreadKeysGiven() bool {
	for k := range p.vmi.Annotations {
		switch {
		case k == KeyIOThreads, k == KeyDisks, k == KeyIOThreadCPUSet, k == KeyIOThreadPoll,
			strings.HasPrefix(k, KeyQueueMapPrefix):
			return true
		}
	}
	return false
}

// served reports whether disk name is in virtblk.io/serve.
func (p *parser) served(name string) bool {
	if p.s.serve == nil {
		return false
	}
	for _, e := range p.s.serve.v {
		if e.name == name {
			return true
		}
	}
	return false
}

// buildServePlan checks the serve annotations against the VMI. It returns
// nil when virtblk.io/serve is not given (and reports companions given
// without it).
func (p *parser) buildServePlan() *ServePlan {
	s := &p.s
	if s.serve == nil {
		_, given := p.vmi.Annotations[KeyServe]
		if given {
			return nil // its own error is recorded
		}
		for _, c := range []*setting[string]{s.store} {
			if c != nil {
				p.errs = append(p.errs, &Error{c.key, c.raw, "set without " + KeyServe,
					fmt.Sprintf("add %s: \"<disk>:<size>\" to serve disks from the store, or remove this annotation", KeyServe)})
			}
		}
		if s.metricsPort != nil {
			p.errs = append(p.errs, &Error{s.metricsPort.key, s.metricsPort.raw, "set without " + KeyServe,
				fmt.Sprintf("add %s: \"<disk>:<size>\" to serve disks from the store, or remove this annotation", KeyServe)})
		}
		return nil
	}
	sv := s.serve
	queues := 0
	_, queuesGiven := p.vmi.Annotations[KeyQueues]
	switch {
	case s.queues != nil:
		queues = s.queues.v
	case !queuesGiven:
		queues = min(VCPUs(p.vmi), MaxQueues)
	}
	sizes := map[string]uint64{}
	for _, e := range sv.v {
		sizes[e.name] = e.size
		d, ok := p.findDisk(e.name)
		switch {
		case !ok:
			p.errs = append(p.errs, &Error{sv.key, sv.raw, fmt.Sprintf("the VMI has no disk named %q", e.name),
				"list only names from spec.domain.devices.disks: " + p.diskNameList()})
		case !isVirtioDisk(d):
			p.errs = append(p.errs, &Error{sv.key, sv.raw, fmt.Sprintf("disk %q is %s, and only virtio disks can be served over vhost-user", e.name, describeDisk(d)),
				fmt.Sprintf("remove %q from the list, or set the disk's bus to virtio", e.name)})
		}
	}
	plan := &ServePlan{}
	// VMI order, so the plan (and the XML built from it) does not depend on
	// how the annotation lists the disks.
	done := map[string]bool{}
	for _, d := range p.vmi.Spec.Domain.Devices.Disks {
		size, ok := sizes[d.Name]
		if !ok || done[d.Name] || !isVirtioDisk(d) {
			continue
		}
		done[d.Name] = true
		serial := d.Serial
		if len(serial) > virtioSerialBytes {
			serial = serial[:virtioSerialBytes]
		}
		plan.Disks = append(plan.Disks, ServedDisk{Name: d.Name, Alias: AliasPrefix + d.Name, Size: size, Queues: queues, Serial: serial})
	}
	if s.store != nil {
		plan.Store = s.store.v
	}
	if s.metricsPort != nil {
		plan.MetricsPort = s.metricsPort.v
	}
	// A served disk is no longer QEMU's to map onto IOThreads.
	if s.disks != nil {
		for _, name := range s.disks.v {
			if p.served(name) {
				p.errs = append(p.errs, &Error{s.disks.key, s.disks.raw, fmt.Sprintf("disk %q is also served by virtblk (%s); a vhost-user disk's queues run in the back-end, not in QEMU IOThreads", name, KeyServe),
					fmt.Sprintf("remove %q from %s", name, KeyDisks)})
			}
		}
	}
	for _, name := range sortedKeys(s.queueMaps) {
		if p.served(name) {
			qm := s.queueMaps[name]
			p.errs = append(p.errs, &Error{qm.key, qm.raw, fmt.Sprintf("disk %q is served by virtblk (%s); its queues run in the back-end, not in QEMU IOThreads", name, KeyServe),
				"remove this annotation"})
		}
	}
	return plan
}
