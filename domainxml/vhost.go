package domainxml

import (
	"errors"
	"fmt"
	"path/filepath"

	"libvirt.org/go/libvirtxml"
)

// maxUnixPath is sun_path's size (108) minus the terminating NUL: QEMU
// cannot connect to a longer path.
const maxUnixPath = 107

// VhostUserOptions describe the vhost-user-blk back-end a disk is pointed at.
type VhostUserOptions struct {
	// SocketPath is the back-end's listening unix socket as QEMU sees it
	// (absolute; in KubeVirt under /var/run/kubevirt-hooks/<container>/).
	SocketPath string
	// ReconnectSeconds lets QEMU reconnect after the back-end restarts;
	// 0 turns reconnection off.
	ReconnectSeconds uint
	// Queues sets <driver queues>; 0 keeps the disk's current value.
	Queues uint
}

// ToVhostUser turns the disk with alias into <disk type='vhostuser'> served
// by the socket in opt. It rebuilds the whole disk element from what it is
// given, so it converges when KubeVirt hands back the disk with an empty
// <source> (its model drops the vhost-user source type, path and reconnect).
//
// libvirt rejects block-layer settings on vhost-user disks
// (virDomainDiskVhostUserValidate): the data path runs in the back-end, not
// in QEMU's block layer. So the driver keeps only name, type, queues,
// queue_size and the virtio transport options, and the disk drops backing
// store, encryption, readonly, shareable, transient, serial, wwn, vendor,
// product, auth, geometry, blockio, iotune and throttle filters. Target,
// alias, address, boot order and model are kept. Serial, read-only and block
// sizes become the back-end's job. Call EnsureSharedMemory as well.
func ToVhostUser(dom *libvirtxml.Domain, alias string, opt VhostUserOptions) error {
	if opt.SocketPath == "" || !filepath.IsAbs(opt.SocketPath) {
		return fmt.Errorf("vhost-user disk %s: socket path %q must be absolute", alias, opt.SocketPath)
	}
	if len(opt.SocketPath) > maxUnixPath {
		return fmt.Errorf("vhost-user disk %s: socket path %q is %d bytes, more than a unix socket address holds (%d); use a shorter directory", alias, opt.SocketPath, len(opt.SocketPath), maxUnixPath)
	}
	if opt.Queues > MaxQueues {
		return fmt.Errorf("vhost-user disk %s: %d queues is above the limit of %d", alias, opt.Queues, MaxQueues)
	}
	d, err := redirectTarget(dom, alias, "vhost-user")
	if err != nil {
		return err
	}
	unix := &libvirtxml.DomainChardevSourceUNIX{Path: opt.SocketPath}
	if opt.ReconnectSeconds > 0 {
		t := opt.ReconnectSeconds
		unix.Reconnect = &libvirtxml.DomainChardevSourceReconnect{Enabled: "yes", Timeout: &t}
	}
	d.Source = &libvirtxml.DomainDiskSource{VHostUser: &libvirtxml.DomainDiskSourceVHostUser{UNIX: unix}}
	d.Snapshot = "no"

	drv := libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"}
	if old := d.Driver; old != nil {
		drv.Queues = old.Queues
		drv.QueueSize = old.QueueSize
		drv.EventIDX = old.EventIDX
		drv.IOMMU = old.IOMMU
		drv.ATS = old.ATS
		drv.Packed = old.Packed
		drv.PagePerVQ = old.PagePerVQ
	}
	if opt.Queues > 0 {
		q := opt.Queues
		drv.Queues = &q
	}
	d.Driver = &drv

	d.Auth = nil
	d.BackingStore = nil
	d.Geometry = nil
	d.BlockIO = nil
	d.Mirror = nil
	d.IOTune = nil
	d.ThrottleFilters = nil
	d.ReadOnly = nil
	d.Shareable = nil
	d.Transient = nil
	d.Serial = ""
	d.WWN = ""
	d.Vendor = ""
	d.Product = ""
	d.Encryption = nil
	return nil
}

// ToVhostVDPA turns the disk with alias into <disk type='vhostvdpa'> on the
// vhost-vdpa character device devPath (/dev/vhost-vdpa-N), e.g. a VDUSE
// device bound to the vhost_vdpa bus. QEMU reaches it through its block
// layer (libblkio's virtio-blk-vhost-vdpa driver), so block-layer settings
// stay valid, with two exceptions: the device is a raw block device with no
// backing chain, and libblkio needs direct I/O, so the cache mode becomes
// 'none' unless it already bypasses the host page cache ('directsync').
// Needs shared memory too (EnsureSharedMemory).
func ToVhostVDPA(dom *libvirtxml.Domain, alias, devPath string) error {
	if devPath == "" || !filepath.IsAbs(devPath) {
		return fmt.Errorf("vDPA disk %s: device path %q must be absolute, like /dev/vhost-vdpa-0", alias, devPath)
	}
	d, err := redirectTarget(dom, alias, "vDPA")
	if err != nil {
		return err
	}
	d.Source = &libvirtxml.DomainDiskSource{VHostVDPA: &libvirtxml.DomainDiskSourceVHostVDPA{Dev: devPath}}
	if d.Driver == nil {
		d.Driver = &libvirtxml.DomainDiskDriver{}
	}
	d.Driver.Name = "qemu"
	d.Driver.Type = "raw"
	if d.Driver.Cache != "directsync" {
		d.Driver.Cache = "none"
	}
	// A qcow2-only option; meaningless and refused on a raw device.
	d.Driver.DiscardNoUnref = ""
	d.Driver.MetadataCache = nil
	d.BackingStore = nil
	d.Mirror = nil
	return nil
}

func redirectTarget(dom *libvirtxml.Domain, alias, kind string) (*libvirtxml.DomainDisk, error) {
	if dom == nil {
		return nil, fmt.Errorf("%s disk %s: no domain", kind, alias)
	}
	d := findDisk(dom, alias)
	if d == nil {
		return nil, fmt.Errorf("%s disk %s: not found in the domain; name a disk of the VMI", kind, alias)
	}
	if dev := d.Device; dev != "" && dev != "disk" {
		return nil, fmt.Errorf("%s disk %s: is a %s; only device=disk can be redirected", kind, diskName(d), dev)
	}
	if bus := diskBus(d); bus != "virtio" {
		return nil, fmt.Errorf("%s disk %s: bus %q; %s disks need bus virtio", kind, diskName(d), bus, kind)
	}
	return d, nil
}

// EnsureSharedMemory makes guest RAM shareable with a vhost-user or vDPA
// back-end: <memoryBacking> gets <access mode='shared'/> and an fd-backed
// source. With hugepages the existing source is kept (hugetlbfs files or
// memfd are both fd-backed); without, the source becomes memfd unless it
// already is 'file'. It fails if a NUMA cell asks for private memory,
// because that overrides the domain-wide setting for the cell's RAM.
func EnsureSharedMemory(dom *libvirtxml.Domain) error {
	if dom == nil {
		return errors.New("shared memory: no domain")
	}
	if dom.CPU != nil && dom.CPU.Numa != nil {
		for i, c := range dom.CPU.Numa.Cell {
			if c.MemAccess == "private" {
				return fmt.Errorf("shared memory: NUMA cell %d has memAccess='private'; vhost-user disks need shared guest memory, remove it", i)
			}
		}
	}
	mb := dom.MemoryBacking
	if mb == nil {
		mb = &libvirtxml.DomainMemoryBacking{}
		dom.MemoryBacking = mb
	}
	src := ""
	if mb.MemorySource != nil {
		src = mb.MemorySource.Type
	}
	switch {
	case mb.MemoryHugePages != nil && src != "anonymous":
		// hugetlbfs (no source) or memfd: both shareable.
	case src == "file" || src == "memfd":
	default:
		mb.MemorySource = &libvirtxml.DomainMemorySource{Type: "memfd"}
	}
	mb.MemoryAccess = &libvirtxml.DomainMemoryAccess{Mode: "shared"}
	return nil
}
