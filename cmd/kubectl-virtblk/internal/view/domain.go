// Package view turns what kubectl-virtblk fetches from a virt-launcher pod
// (libvirt domain XML, QEMU's /proc cmdline, the back-end's Prometheus
// text) into tables for a person. It is pure: bytes in, values and text
// out, no cluster access, so every view is tested on real output.
package view

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// Domain is what `kubectl virtblk inspect` shows about one domain.
type Domain struct {
	Name  string
	VCPUs uint
	// IOThreads are the domain's IOThreads in id order, with their pinning.
	IOThreads []IOThread
	// SharedMemory is how guest memory is shared with vhost-user back-ends
	// ("memfd", "file", "hugepages"), empty if it is not shared.
	SharedMemory string
	Disks        []Disk
	// Warnings are inconsistencies a person debugging the VM wants to see,
	// e.g. a queue mapped to an IOThread the domain does not have.
	Warnings []string
}

// IOThread is one <iothreadids> entry (or an implicit id 1..N).
type IOThread struct {
	ID     uint
	CPUSet string // from <cputune><iothreadpin>; empty: not pinned
	Poll   string // e.g. "max=32768ns grow=2 shrink=2"; empty: QEMU default
}

// Disk is one <disk> of the domain.
type Disk struct {
	// Name is the VMI disk name (KubeVirt aliases disks "ua-<name>"), or
	// the alias as is.
	Name   string
	Target string
	Bus    string
	Device string // disk, cdrom, lun, floppy
	Type   string // file, block, vhostuser, vhostvdpa, network, ...
	Source string
	// Queues is <driver queues>; 0 when unset (QEMU then picks: one per
	// vCPU for virtio-blk-pci since QEMU 5.2).
	Queues uint
	// IOThread is <driver iothread>, the single IOThread serving every
	// queue; 0 when unset.
	IOThread uint
	// QueueMap is the explicit <driver><iothreads><iothread><queue> map:
	// QueueMap[q] is the IOThread id serving queue q (0: unmapped).
	QueueMap []uint
	// Pool lists <iothreads><iothread> entries without <queue> children:
	// QEMU spreads the queues over them itself.
	Pool []uint
}

// ParseDomain reads libvirt domain XML as `virsh dumpxml` prints it.
func ParseDomain(xml []byte) (*Domain, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(string(xml)); err != nil {
		return nil, fmt.Errorf("parse domain XML: %w", err)
	}
	if dom.Name == "" {
		return nil, errors.New("parse domain XML: no <name>; is this the output of virsh dumpxml?")
	}
	d := &Domain{Name: dom.Name}
	if dom.VCPU != nil {
		d.VCPUs = dom.VCPU.Value
	}
	d.IOThreads = ioThreads(&dom)
	known := map[uint]bool{}
	for _, t := range d.IOThreads {
		known[t.ID] = true
	}
	if mb := dom.MemoryBacking; mb != nil && mb.MemoryAccess != nil && mb.MemoryAccess.Mode == "shared" {
		switch {
		case mb.MemorySource != nil && mb.MemorySource.Type != "":
			d.SharedMemory = mb.MemorySource.Type
		case mb.MemoryHugePages != nil:
			d.SharedMemory = "hugepages"
		default:
			d.SharedMemory = "shared"
		}
	}
	if dom.Devices == nil {
		return d, nil
	}
	for i := range dom.Devices.Disks {
		disk := diskOf(&dom.Devices.Disks[i])
		d.Disks = append(d.Disks, disk)
		d.Warnings = append(d.Warnings, diskWarnings(disk, known, d.SharedMemory)...)
	}
	return d, nil
}

func ioThreads(dom *libvirtxml.Domain) []IOThread {
	pins := map[uint]string{}
	if dom.CPUTune != nil {
		for _, p := range dom.CPUTune.IOThreadPin {
			pins[p.IOThread] = p.CPUSet
		}
	}
	var out []IOThread
	if dom.IOThreadIDs != nil && len(dom.IOThreadIDs.IOThreads) > 0 {
		for _, t := range dom.IOThreadIDs.IOThreads {
			out = append(out, IOThread{ID: t.ID, CPUSet: pins[t.ID], Poll: pollOf(t.Poll)})
		}
	} else {
		// Without <iothreadids>, libvirt numbers the threads 1..N.
		for id := uint(1); id <= dom.IOThreads; id++ {
			out = append(out, IOThread{ID: id, CPUSet: pins[id]})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func pollOf(p *libvirtxml.DomainIOThreadPoll) string {
	if p == nil {
		return ""
	}
	var parts []string
	add := func(name string, v *uint, unit string) {
		if v != nil {
			parts = append(parts, fmt.Sprintf("%s=%d%s", name, *v, unit))
		}
	}
	add("max", p.Max, "ns")
	add("grow", p.Grow, "")
	add("shrink", p.Shrink, "")
	return strings.Join(parts, " ")
}

func diskOf(x *libvirtxml.DomainDisk) Disk {
	d := Disk{Device: x.Device}
	if d.Device == "" {
		d.Device = "disk"
	}
	if x.Alias != nil {
		d.Name = strings.TrimPrefix(x.Alias.Name, "ua-")
	}
	if x.Target != nil {
		d.Target, d.Bus = x.Target.Dev, x.Target.Bus
	}
	d.Type, d.Source = sourceOf(x.Source)
	if drv := x.Driver; drv != nil {
		if drv.Queues != nil {
			d.Queues = *drv.Queues
		}
		if drv.IOThread != nil {
			d.IOThread = *drv.IOThread
		}
		if drv.IOThreads != nil {
			d.QueueMap, d.Pool = queueMap(drv.IOThreads, d.Queues)
		}
	}
	return d
}

// maxShownQueues bounds the queue map built from untrusted XML: virtio-blk
// has at most 1024 queues, so a larger queue id is reported, not allocated.
const maxShownQueues = 1024

func queueMap(its *libvirtxml.DomainDiskIOThreads, queues uint) (qmap, pool []uint) {
	n := queues
	for _, t := range its.IOThread {
		for _, q := range t.Queues {
			if q.ID < maxShownQueues && q.ID+1 > n {
				n = q.ID + 1
			}
		}
	}
	for _, t := range its.IOThread {
		if len(t.Queues) == 0 {
			pool = append(pool, t.ID)
			continue
		}
		if qmap == nil {
			qmap = make([]uint, min(n, maxShownQueues))
		}
		for _, q := range t.Queues {
			if q.ID < uint(len(qmap)) {
				qmap[q.ID] = t.ID
			}
		}
	}
	return qmap, pool
}

func sourceOf(s *libvirtxml.DomainDiskSource) (typ, src string) {
	if s == nil {
		return "-", ""
	}
	switch {
	case s.File != nil:
		return "file", s.File.File
	case s.Block != nil:
		return "block", s.Block.Dev
	case s.VHostUser != nil:
		if u := s.VHostUser.UNIX; u != nil {
			src = u.Path
			if r := u.Reconnect; r != nil && r.Enabled == "yes" && r.Timeout != nil {
				src += fmt.Sprintf(" (reconnect %ds)", *r.Timeout)
			}
		}
		return "vhostuser", src
	case s.VHostVDPA != nil:
		return "vhostvdpa", s.VHostVDPA.Dev
	case s.Network != nil:
		return "network", strings.Trim(s.Network.Protocol+":"+s.Network.Name, ":")
	case s.Volume != nil:
		return "volume", s.Volume.Pool + "/" + s.Volume.Volume
	case s.NVME != nil:
		return "nvme", ""
	case s.Dir != nil:
		return "dir", s.Dir.Dir
	}
	return "-", ""
}

func diskWarnings(d Disk, known map[uint]bool, shared string) []string {
	var w []string
	name := d.Name
	if name == "" {
		name = d.Target
	}
	check := func(id uint, what string) {
		if id != 0 && !known[id] {
			w = append(w, fmt.Sprintf("disk %s: %s uses IOThread %d, which the domain does not define", name, what, id))
		}
	}
	check(d.IOThread, "driver iothread")
	for _, id := range d.Pool {
		check(id, "driver iothreads pool")
	}
	for q, id := range d.QueueMap {
		if id == 0 {
			w = append(w, fmt.Sprintf("disk %s: queue %d is not mapped to any IOThread (libvirt requires every queue exactly once)", name, q))
			continue
		}
		check(id, "queue "+strconv.Itoa(q))
	}
	if d.Queues != 0 && d.QueueMap != nil && uint(len(d.QueueMap)) > d.Queues {
		w = append(w, fmt.Sprintf("disk %s: queue map names queue %d but the disk has %d queues", name, len(d.QueueMap)-1, d.Queues))
	}
	if d.Type == "vhostuser" && shared == "" {
		w = append(w, fmt.Sprintf("disk %s: vhost-user disk but guest memory is not shared (<memoryBacking><access mode='shared'/>): QEMU will refuse to start", name))
	}
	if d.IOThread != 0 && (d.QueueMap != nil || d.Pool != nil) {
		w = append(w, fmt.Sprintf("disk %s: both driver iothread and <iothreads>; libvirt rejects this", name))
	}
	return w
}
