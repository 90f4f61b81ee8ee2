// Package e2e holds virtblk's end-to-end proofs against real libvirt and
// QEMU (the trixie root built by hack/trixie-root.sh). This file and
// qemucmd.go are the pure parts: turning a KubeVirt domain into one that
// boots the tiny test guest on a plain machine, and reading what QEMU was
// actually told. The tests drive libvirtd and QEMU.
package e2e

import (
	"errors"
	"fmt"
	"sort"

	"libvirt.org/go/libvirtxml"
)

// TestGuest is what a KubeVirt domain is pointed at so it boots here.
type TestGuest struct {
	Name      string            // domain name (unique per test run)
	Kernel    string            // vmlinux path, visible to libvirtd
	Initrd    string            // initrd path, visible to libvirtd
	Cmdline   string            // kernel command line
	BIOS      string            // firmware ROM (qboot), visible to libvirtd
	MemoryMiB uint              // guest memory
	Console   string            // file receiving the serial console
	DiskFiles map[string]string // disk alias -> raw image path
	KeepDisks bool              // false: disks not in DiskFiles are removed
}

// AdaptForTestGuest rewrites a KubeVirt-generated domain so that libvirt can
// start it on a machine without a cluster and without usable KVM: TCG, the
// tiny guest's kernel and initrd, raw files behind every kept disk, a serial
// console into a file, and no devices that need cluster plumbing (tap
// interfaces, VNC/serial sockets under /var/run/kubevirt-private, the guest
// agent channel). IOThreads, disk drivers, queues and aliases stay as they
// are: they are what the proof is about.
func AdaptForTestGuest(dom *libvirtxml.Domain, g TestGuest) error {
	if dom == nil {
		return errors.New("adapt domain: no domain")
	}
	if dom.OS == nil || dom.OS.Type == nil {
		return errors.New("adapt domain: no <os><type>; is this a KubeVirt domain?")
	}
	if g.Name == "" || g.Kernel == "" || g.Initrd == "" || g.Console == "" {
		return errors.New("adapt domain: name, kernel, initrd and console are required")
	}
	dom.Type = "qemu" // TCG: /dev/kvm here cannot run a stock kernel
	dom.Name = g.Name
	// KubeVirt pins its own machine alias (pc-q35-rhel9.6.0) which upstream
	// QEMU lacks.
	dom.OS.Type.Machine = "q35"
	dom.OS.Kernel = g.Kernel
	dom.OS.Initrd = g.Initrd
	dom.OS.Cmdline = g.Cmdline
	dom.OS.BootDevices = nil
	if g.BIOS != "" {
		dom.OS.Loader = &libvirtxml.DomainLoader{Path: g.BIOS, Type: "rom", Readonly: "yes"}
	}
	// libvirt takes the domain UUID from <uuid> or generates one, and then
	// refuses a different sysinfo uuid: KubeVirt always sets both.
	if dom.UUID == "" && dom.SysInfo != nil {
		for _, si := range dom.SysInfo {
			if si.SMBIOS == nil || si.SMBIOS.System == nil {
				continue
			}
			for _, e := range si.SMBIOS.System.Entry {
				if e.Name == "uuid" {
					dom.UUID = e.Value
				}
			}
		}
	}
	mem := g.MemoryMiB
	if mem == 0 {
		mem = 512
	}
	dom.Memory = &libvirtxml.DomainMemory{Value: mem, Unit: "MiB"}
	dom.CurrentMemory = nil
	if dom.CPU == nil {
		dom.CPU = &libvirtxml.DomainCPU{}
	}
	// host-model needs a host CPU model libvirt can probe through KVM;
	// "maximum" is TCG's -cpu max.
	dom.CPU.Mode = "maximum"
	dom.CPU.Match = ""
	dom.CPU.Check = ""
	dom.CPU.Model = nil
	dom.CPU.Features = nil

	if dom.Devices == nil {
		dom.Devices = &libvirtxml.DomainDeviceList{}
	}
	d := dom.Devices
	d.Interfaces = nil
	d.Graphics = nil
	d.Videos = nil
	d.Channels = nil
	d.Consoles = nil
	d.Serials = []libvirtxml.DomainSerial{{
		Source: &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: g.Console}},
		Target: &libvirtxml.DomainSerialTarget{Port: new(uint)},
	}}

	var kept []libvirtxml.DomainDisk
	seen := map[string]bool{}
	for _, disk := range d.Disks {
		alias := diskAlias(disk)
		path, ok := g.DiskFiles[alias]
		if !ok {
			if g.KeepDisks {
				return fmt.Errorf("adapt domain: disk %q has no test image; add it to DiskFiles", alias)
			}
			continue
		}
		seen[alias] = true
		disk.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: path}}
		disk.Device = "disk"
		if disk.Driver != nil {
			disk.Driver.Type = "raw"
		}
		kept = append(kept, disk)
	}
	for alias := range g.DiskFiles {
		if !seen[alias] {
			return fmt.Errorf("adapt domain: DiskFiles names disk %q, which the domain does not have", alias)
		}
	}
	d.Disks = kept
	return nil
}

func diskAlias(disk libvirtxml.DomainDisk) string {
	if disk.Alias == nil {
		return ""
	}
	return disk.Alias.Name
}

// VQMapping is one disk's virtqueue->IOThread assignment as a set: QEMU
// IOThread object id ("iothread5") -> sorted queue ids. A nil queue list
// means "let QEMU distribute" (libvirt's <iothread> without <queue>).
type VQMapping map[string][]uint

// DiskMappings reads the IOThread mapping the domain XML asks for, per disk
// alias, with the disk's queue count. Disks without <iothreads> are absent.
func DiskMappings(dom *libvirtxml.Domain) (map[string]VQMapping, map[string]uint) {
	maps := map[string]VQMapping{}
	queues := map[string]uint{}
	if dom == nil || dom.Devices == nil {
		return maps, queues
	}
	for _, disk := range dom.Devices.Disks {
		if disk.Driver == nil || disk.Driver.IOThreads == nil {
			continue
		}
		alias := diskAlias(disk)
		m := VQMapping{}
		for _, it := range disk.Driver.IOThreads.IOThread {
			key := fmt.Sprintf("iothread%d", it.ID)
			var qs []uint
			for _, q := range it.Queues {
				qs = append(qs, q.ID)
			}
			sort.Slice(qs, func(i, j int) bool { return qs[i] < qs[j] })
			m[key] = qs
		}
		maps[alias] = m
		if disk.Driver.Queues != nil {
			queues[alias] = *disk.Driver.Queues
		}
	}
	return maps, queues
}
