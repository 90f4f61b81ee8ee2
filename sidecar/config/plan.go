package config

import (
	"fmt"
	"sort"
	"strings"

	k8sv1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/virtblk/virtblk/domainxml"
)

// AliasPrefix is what KubeVirt puts before a VMI disk name to make the
// disk's <alias name>.
const AliasPrefix = "ua-"

type parser struct {
	vmi  *kubevirtv1.VirtualMachineInstance
	s    settings
	errs Errors
}

// buildIOThreadPlan checks the parsed settings against each other and the
// VMI spec, and returns the plan (nil when anything is wrong).
func (p *parser) buildIOThreadPlan() *domainxml.IOThreadPlan {
	s := &p.s
	_, poolGiven := p.vmi.Annotations[KeyIOThreads]
	if !poolGiven {
		p.errs = append(p.errs, &Error{KeyIOThreads, "", "missing, but other virtblk.io/ annotations are set",
			fmt.Sprintf("add %s: \"<pool size>\" (e.g. \"4\") to turn IOThread mapping on, or remove the other virtblk.io/ annotations", KeyIOThreads)})
	}
	// The checks below run even when an annotation they depend on was
	// malformed (its error is already recorded), so that one round of fixes
	// is enough; a check that needs the missing value is skipped.
	pool := 0 // unknown
	if s.poolSize != nil {
		pool = s.poolSize.v
	}
	_, queuesGiven := p.vmi.Annotations[KeyQueues]
	queues := 0 // unknown
	switch {
	case s.queues != nil:
		queues = s.queues.v
	case !queuesGiven:
		queues = min(VCPUs(p.vmi), MaxQueues)
	}

	disks := p.selectDisks()
	selected := map[string]bool{}
	for _, name := range disks {
		selected[name] = true
	}
	plan := &domainxml.IOThreadPlan{PoolSize: pool}
	for _, name := range disks {
		dp := domainxml.DiskPlan{Alias: AliasPrefix + name, Queues: queues}
		if qm, ok := s.queueMaps[name]; ok {
			dp.QueueMap = p.checkQueueMap(qm, queues, pool)
		}
		plan.Disks = append(plan.Disks, dp)
	}
	// Maps for disks that are not mapped at all.
	for _, name := range sortedKeys(s.queueMaps) {
		if selected[name] || p.served(name) {
			continue // a served disk's map is reported by buildServePlan
		}
		qm := s.queueMaps[name]
		d, exists := p.findDisk(name)
		switch {
		case !exists:
			p.errs = append(p.errs, &Error{qm.key, qm.raw, fmt.Sprintf("the VMI has no disk named %q", name),
				"rename the annotation after one of the VMI's disks: " + p.diskNameList()})
		case !isVirtioDisk(d):
			// selectDisks already reported it when it was listed in
			// virtblk.io/disks.
			if !p.listed(name) {
				p.errs = append(p.errs, &Error{qm.key, qm.raw, fmt.Sprintf("disk %q is %s, and only virtio disks can be mapped", name, describeDisk(d)),
					"remove this annotation, or set the disk's bus to virtio"})
			}
		case !p.listed(name):
			p.errs = append(p.errs, &Error{qm.key, qm.raw, fmt.Sprintf("disk %q is not in %s", name, KeyDisks),
				fmt.Sprintf("add %q to %s, or remove this annotation", name, KeyDisks)})
		}
	}
	if len(disks) == 0 && s.disks == nil && pool > 0 {
		p.errs = append(p.errs, &Error{KeyIOThreads, s.poolSize.raw, "the VMI has no virtio disk to map",
			"give a disk bus: virtio in spec.domain.devices.disks, or remove the virtblk.io/ annotations"})
	}
	if len(p.errs) > 0 {
		return nil
	}
	if s.cpuset != nil {
		plan.CPUSet = s.cpuset.v
	}
	if s.poll != nil {
		poll := s.poll.v
		plan.Polling = &poll
	}
	return plan
}

// selectDisks returns the names of the disks to map, in VMI spec order.
func (p *parser) selectDisks() []string {
	var out []string
	if p.s.disks == nil {
		for _, d := range p.vmi.Spec.Domain.Devices.Disks {
			// A served disk becomes vhost-user: QEMU IOThreads never
			// serve its queues.
			if isVirtioDisk(d) && !p.served(d.Name) {
				out = append(out, d.Name)
			}
		}
		return out
	}
	ds := p.s.disks
	wanted := map[string]bool{}
	for _, name := range ds.v {
		d, ok := p.findDisk(name)
		switch {
		case !ok:
			p.errs = append(p.errs, &Error{ds.key, ds.raw, fmt.Sprintf("the VMI has no disk named %q", name),
				"list only names from spec.domain.devices.disks: " + p.diskNameList()})
		case !isVirtioDisk(d):
			p.errs = append(p.errs, &Error{ds.key, ds.raw, fmt.Sprintf("disk %q is %s, and only virtio disks can be mapped", name, describeDisk(d)),
				fmt.Sprintf("remove %q from the list, or set the disk's bus to virtio", name)})
		default:
			wanted[name] = true
		}
	}
	for _, d := range p.vmi.Spec.Domain.Devices.Disks {
		if wanted[d.Name] {
			out = append(out, d.Name)
			delete(wanted, d.Name) // a VMI with duplicate names maps once
		}
	}
	return out
}

// checkQueueMap converts a 1-based map to the plan's 0-based one. A zero
// queues or pool means that value is unknown because its own annotation is
// malformed; the checks that need it are skipped.
func (p *parser) checkQueueMap(qm queueMapSetting, queues, pool int) []int {
	bad := false
	if queues > 0 && len(qm.threads) != queues {
		p.errs = append(p.errs, &Error{qm.key, qm.raw,
			fmt.Sprintf("%d entries, but the disk has %d queues (%s)", len(qm.threads), queues, p.queuesSource()),
			fmt.Sprintf("give exactly %d entries, one per queue, or set %s to %d", queues, KeyQueues, len(qm.threads))})
		bad = true
	}
	for i, t := range qm.threads {
		if pool > 0 && t > pool {
			p.errs = append(p.errs, &Error{qm.key, qm.raw,
				fmt.Sprintf("entry %d names IOThread %d, but the pool has %d (%s)", i+1, t, pool, KeyIOThreads),
				fmt.Sprintf("use pool IOThread numbers from 1 to %d, or raise %s", pool, KeyIOThreads)})
			bad = true
			break
		}
	}
	if bad {
		return nil
	}
	out := make([]int, len(qm.threads))
	for i, t := range qm.threads {
		out[i] = t - 1
	}
	return out
}

func (p *parser) queuesSource() string {
	if p.s.queues != nil {
		return "from " + KeyQueues
	}
	return "one per vCPU, the default"
}

func (p *parser) listed(name string) bool {
	if p.s.disks == nil {
		return false
	}
	for _, n := range p.s.disks.v {
		if n == name {
			return true
		}
	}
	return false
}

func (p *parser) findDisk(name string) (kubevirtv1.Disk, bool) {
	for _, d := range p.vmi.Spec.Domain.Devices.Disks {
		if d.Name == name {
			return d, true
		}
	}
	return kubevirtv1.Disk{}, false
}

func (p *parser) diskNameList() string {
	disks := p.vmi.Spec.Domain.Devices.Disks
	if len(disks) == 0 {
		return "(the VMI has no disks)"
	}
	parts := make([]string, 0, len(disks))
	for _, d := range disks {
		parts = append(parts, fmt.Sprintf("%s (%s)", d.Name, describeDisk(d)))
	}
	return strings.Join(parts, ", ")
}

// isVirtioDisk reports whether KubeVirt renders d as a virtio-blk disk. An
// empty bus and a missing device type are KubeVirt's defaults for a virtio
// disk; the API server fills them in, but a VMI that skipped defaulting still
// means the same thing.
func isVirtioDisk(d kubevirtv1.Disk) bool {
	if d.CDRom != nil || d.LUN != nil {
		return false
	}
	if d.Disk == nil {
		return true
	}
	return d.Disk.Bus == "" || d.Disk.Bus == kubevirtv1.DiskBusVirtio
}

func describeDisk(d kubevirtv1.Disk) string {
	switch {
	case d.CDRom != nil:
		return "a cdrom"
	case d.LUN != nil:
		return "a lun"
	case d.Disk == nil || d.Disk.Bus == "":
		return "a virtio disk"
	default:
		return fmt.Sprintf("a %s disk", d.Disk.Bus)
	}
}

// VCPUs is the guest vCPU count as KubeVirt computes it for blockMultiQueue
// (vcpu.GetCPUTopology + CalculateRequestedVCPUs): sockets x cores x threads
// from spec.domain.cpu, each defaulting to 1; when none of the three is set,
// sockets come from the CPU limit, else the CPU request, rounded up. The
// result is at least 1.
func VCPUs(vmi *kubevirtv1.VirtualMachineInstance) int {
	sockets, cores, threads := uint64(1), uint64(1), uint64(1)
	cpu := vmi.Spec.Domain.CPU
	if cpu != nil {
		if cpu.Sockets != 0 {
			sockets = uint64(cpu.Sockets)
		}
		if cpu.Cores != 0 {
			cores = uint64(cpu.Cores)
		}
		if cpu.Threads != 0 {
			threads = uint64(cpu.Threads)
		}
	}
	if cpu == nil || (cpu.Sockets == 0 && cpu.Cores == 0 && cpu.Threads == 0) {
		res := vmi.Spec.Domain.Resources
		if q, ok := res.Limits[k8sv1.ResourceCPU]; ok {
			sockets = clampQuantity(q.Value())
		} else if q, ok := res.Requests[k8sv1.ResourceCPU]; ok {
			sockets = clampQuantity(q.Value())
		}
	}
	// Each factor is below 2^32, so the product of the first two fits; cap
	// before the third multiplication.
	n := sockets * cores
	if n > 1<<31 {
		n = 1 << 31
	}
	n *= threads
	if n > 1<<31 {
		n = 1 << 31
	}
	if n == 0 {
		return 1
	}
	return int(n)
}

// clampQuantity mirrors KubeVirt's uint32(q.Value()) for sane values and
// keeps absurd ones from wrapping.
func clampQuantity(v int64) uint64 {
	if v < 0 {
		return 0
	}
	if v > 1<<32-1 {
		return 1<<32 - 1
	}
	return uint64(v)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
