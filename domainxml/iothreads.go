package domainxml

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// Limits on what a plan may ask for. They keep a hostile or mistyped value
// from producing megabytes of XML, and match what QEMU can realise.
const (
	// MaxQueues is QEMU's VIRTIO_QUEUE_MAX: no virtio device has more.
	MaxQueues = 1024
	// MaxIOThreads bounds the domain's total IOThread count (KubeVirt's own
	// plus the pool), which we enumerate in <iothreadids>.
	MaxIOThreads = 4096
)

// ApplyIOThreads rewrites dom so that the planned disks' virtqueues are
// spread over a pool of plan.PoolSize IOThreads. It is a pure function of
// (dom, plan): it rebuilds the whole desired state every time, so running it
// on its own output, or on KubeVirt's lossy re-parse of its output, gives the
// same result (see docs/domainxml.md).
//
// Pool ids: R is the highest IOThread id still referenced by a disk outside
// the plan or by a controller; those ids keep their meaning and the pool is
// R+1..R+PoolSize. <iothreads> becomes R+PoolSize and <iothreadids> lists
// 1..R+PoolSize. An empty plan (no disks, PoolSize 0) changes nothing.
//
// On error dom may be partly modified; callers discard it.
func ApplyIOThreads(dom *libvirtxml.Domain, plan IOThreadPlan) (Report, error) {
	if dom == nil {
		return Report{}, errors.New("apply iothread plan: no domain")
	}
	if plan.PoolSize == 0 && len(plan.Disks) == 0 {
		return Report{}, nil
	}
	if err := plan.validate(); err != nil {
		return Report{}, err
	}
	planned, err := findPlannedDisks(dom, plan)
	if err != nil {
		return Report{}, err
	}

	kept, err := keptIOThreads(dom, planned)
	if err != nil {
		return Report{}, err
	}
	pool := uint(plan.PoolSize)
	total := kept + pool
	if total > MaxIOThreads {
		return Report{}, fmt.Errorf("apply iothread plan: KubeVirt's IOThread ids go up to %d, plus a pool of %d exceeds the limit of %d IOThreads; lower virtblk.io/iothreads", kept, pool, MaxIOThreads)
	}
	rep := Report{KeptIOThreads: kept, IOThreads: total}
	for id := kept + 1; id <= total; id++ {
		rep.PoolIDs = append(rep.PoolIDs, id)
	}

	setIOThreadIDs(dom, kept, total, plan.Polling)
	// Each disk's round-robin starts where the previous disk's ended, so
	// many single-queue disks spread over the pool instead of all landing
	// on its first IOThread. Plan order is the VMI's disk order, the same on
	// every call, so this stays deterministic.
	var start uint
	for _, dp := range plan.Disks {
		disk := planned[dp.Alias]
		dr := mapDisk(disk, dp, kept, pool, start)
		start = (start + uint(dp.Queues)) % pool
		dr.Dev = diskDev(disk)
		rep.Disks = append(rep.Disks, dr)
	}
	setPins(dom, kept, total, plan.CPUSet)
	if err := Check(dom, plan); err != nil {
		return Report{}, err
	}
	return rep, nil
}

// RewriteIOThreads is ApplyIOThreads from domain XML bytes to domain XML
// bytes, for the hook server.
func RewriteIOThreads(domXML []byte, plan IOThreadPlan) ([]byte, Report, error) {
	dom, err := ParseDomain(domXML)
	if err != nil {
		return nil, Report{}, err
	}
	rep, err := ApplyIOThreads(dom, plan)
	if err != nil {
		return nil, Report{}, err
	}
	out, err := MarshalDomain(dom)
	if err != nil {
		return nil, Report{}, err
	}
	out, err = KeepKubeVirtDiskExtras(domXML, out)
	if err != nil {
		return nil, Report{}, err
	}
	return out, rep, nil
}

func (p IOThreadPlan) validate() error {
	if p.PoolSize < 1 {
		return fmt.Errorf("iothread plan: pool size %d; it must be at least 1 when disks are mapped", p.PoolSize)
	}
	if p.PoolSize > MaxIOThreads {
		return fmt.Errorf("iothread plan: pool size %d is above the limit of %d", p.PoolSize, MaxIOThreads)
	}
	if p.CPUSet != "" {
		if _, err := ParseCPUSet(p.CPUSet); err != nil {
			return fmt.Errorf("iothread plan: %w", err)
		}
	}
	seen := map[string]bool{}
	for _, d := range p.Disks {
		if d.Alias == "" {
			return errors.New("iothread plan: a disk has an empty alias; KubeVirt aliases are \"ua-<disk name>\"")
		}
		if seen[d.Alias] {
			return fmt.Errorf("iothread plan: disk %s is listed twice", d.Alias)
		}
		seen[d.Alias] = true
		if d.Queues < 1 || d.Queues > MaxQueues {
			return fmt.Errorf("iothread plan: disk %s: %d queues; it must be between 1 and %d", d.Alias, d.Queues, MaxQueues)
		}
		if d.QueueMap != nil {
			if len(d.QueueMap) != d.Queues {
				return fmt.Errorf("iothread plan: disk %s: queue map has %d entries for %d queues; give one pool IOThread per queue", d.Alias, len(d.QueueMap), d.Queues)
			}
			for q, t := range d.QueueMap {
				if t < 0 || t >= p.PoolSize {
					return fmt.Errorf("iothread plan: disk %s: queue %d maps to pool IOThread %d, outside the pool 0..%d", d.Alias, q, t, p.PoolSize-1)
				}
			}
		}
	}
	return nil
}

// findPlannedDisks locates every planned disk by alias and checks that it
// can carry an IOThread mapping at all (a virtio-blk disk served by QEMU).
func findPlannedDisks(dom *libvirtxml.Domain, plan IOThreadPlan) (map[string]*libvirtxml.DomainDisk, error) {
	byAlias := map[string]*libvirtxml.DomainDisk{}
	var aliases []string
	if dom.Devices != nil {
		for i := range dom.Devices.Disks {
			d := &dom.Devices.Disks[i]
			a := diskAlias(d)
			if a == "" {
				continue
			}
			if byAlias[a] != nil {
				return nil, fmt.Errorf("domain has two disks with alias %s; cannot tell which to map", a)
			}
			byAlias[a] = d
			aliases = append(aliases, a)
		}
	}
	out := map[string]*libvirtxml.DomainDisk{}
	for _, dp := range plan.Disks {
		d := byAlias[dp.Alias]
		if d == nil {
			return nil, fmt.Errorf("disk %s not found in the domain (disks: %s); name a disk of the VMI", dp.Alias, strings.Join(aliases, ", "))
		}
		where := diskName(d)
		if dev := d.Device; dev != "" && dev != "disk" {
			return nil, fmt.Errorf("disk %s is a %s; only device=disk can map virtqueues to IOThreads", where, dev)
		}
		if bus := diskBus(d); bus != "virtio" {
			return nil, fmt.Errorf("disk %s is on bus %q; IOThread virtqueue mapping needs bus virtio", where, bus)
		}
		if d.Source != nil && d.Source.VHostUser != nil {
			return nil, fmt.Errorf("disk %s is a vhost-user disk; its queues are served by the back-end, not by QEMU IOThreads", where)
		}
		out[dp.Alias] = d
	}
	return out, nil
}

// keptIOThreads returns R, the highest IOThread id referenced by anything
// outside the plan. Those references are KubeVirt's and must stay valid.
func keptIOThreads(dom *libvirtxml.Domain, planned map[string]*libvirtxml.DomainDisk) (uint, error) {
	var r uint
	note := func(id uint, what string) error {
		if id > MaxIOThreads {
			return fmt.Errorf("%s references IOThread %d, above the limit of %d", what, id, MaxIOThreads)
		}
		if id > r {
			r = id
		}
		return nil
	}
	if dom.Devices == nil {
		return 0, nil
	}
	for i := range dom.Devices.Disks {
		d := &dom.Devices.Disks[i]
		if planned[diskAlias(d)] == d || d.Driver == nil {
			continue
		}
		if d.Source != nil && d.Source.VHostUser != nil {
			// QEMU IOThreads never serve a vhost-user disk and ToVhostUser
			// strips its references, so they must not pin the pool ids.
			continue
		}
		what := "disk " + diskName(d)
		if d.Driver.IOThread != nil {
			if err := note(*d.Driver.IOThread, what); err != nil {
				return 0, err
			}
		}
		if d.Driver.IOThreads != nil {
			for _, t := range d.Driver.IOThreads.IOThread {
				if err := note(t.ID, what); err != nil {
					return 0, err
				}
			}
		}
	}
	for _, c := range dom.Devices.Controllers {
		if c.Driver == nil {
			continue
		}
		what := fmt.Sprintf("controller %s index %s", c.Type, uintPtrString(c.Index))
		if err := note(c.Driver.IOThread, what); err != nil {
			return 0, err
		}
		if c.Driver.IOThreads != nil {
			for _, t := range c.Driver.IOThreads.IOThread {
				if err := note(t.ID, what); err != nil {
					return 0, err
				}
			}
		}
	}
	return r, nil
}

// setIOThreadIDs writes <iothreads> and <iothreadids>. Entries for kept ids
// keep whatever attributes they had; pool entries are entirely ours.
func setIOThreadIDs(dom *libvirtxml.Domain, kept, total uint, poll *Polling) {
	old := map[uint]libvirtxml.DomainIOThread{}
	if dom.IOThreadIDs != nil {
		for _, t := range dom.IOThreadIDs.IOThreads {
			if _, dup := old[t.ID]; !dup {
				old[t.ID] = t
			}
		}
	}
	ids := make([]libvirtxml.DomainIOThread, 0, total)
	for id := uint(1); id <= total; id++ {
		if t, ok := old[id]; ok && id <= kept {
			ids = append(ids, t)
			continue
		}
		t := libvirtxml.DomainIOThread{ID: id}
		if id > kept && poll != nil {
			maxNS, grow, shrink := poll.MaxNS, poll.Grow, poll.Shrink
			t.Poll = &libvirtxml.DomainIOThreadPoll{Max: &maxNS, Grow: &grow, Shrink: &shrink}
		}
		ids = append(ids, t)
	}
	dom.IOThreads = total
	dom.IOThreadIDs = &libvirtxml.DomainIOThreadIDs{IOThreads: ids}
	if total == 0 {
		dom.IOThreadIDs = nil
	}
}

// mapDisk writes one disk's <driver queues> and <iothreads> mapping.
func mapDisk(d *libvirtxml.DomainDisk, dp DiskPlan, kept, pool, start uint) DiskReport {
	byThread := map[uint][]uint{}
	for q := 0; q < dp.Queues; q++ {
		t := (start + uint(q)) % pool
		if dp.QueueMap != nil {
			t = uint(dp.QueueMap[q])
		}
		id := kept + 1 + t
		byThread[id] = append(byThread[id], uint(q))
	}
	tids := make([]uint, 0, len(byThread))
	for id := range byThread {
		tids = append(tids, id)
	}
	sort.Slice(tids, func(i, j int) bool { return tids[i] < tids[j] })

	threads := make([]libvirtxml.DomainDiskIOThread, 0, len(tids))
	rep := DiskReport{Alias: dp.Alias, Queues: dp.Queues}
	for _, id := range tids {
		qs := byThread[id]
		t := libvirtxml.DomainDiskIOThread{ID: id}
		for _, q := range qs {
			t.Queues = append(t.Queues, libvirtxml.DomainDiskIOThreadQueue{ID: q})
		}
		threads = append(threads, t)
		rep.Threads = append(rep.Threads, ThreadQueues{ID: id, Queues: qs})
	}
	if d.Driver == nil {
		d.Driver = &libvirtxml.DomainDiskDriver{}
	}
	q := uint(dp.Queues)
	d.Driver.Queues = &q
	d.Driver.IOThread = nil
	d.Driver.IOThreads = &libvirtxml.DomainDiskIOThreads{IOThread: threads}
	return rep
}

// setPins keeps <iothreadpin>s of kept ids, drops pins of ids that no
// longer exist, and, with a cpuset, pins every pool IOThread to it. Without
// a cpuset, existing pins on ids that are now pool ids are left alone: they
// still name existing IOThreads, and KubeVirt put them there (dedicated CPUs).
func setPins(dom *libvirtxml.Domain, kept, total uint, cpuset string) {
	if dom.CPUTune == nil {
		if cpuset == "" {
			return
		}
		dom.CPUTune = &libvirtxml.DomainCPUTune{}
	}
	pins := dom.CPUTune.IOThreadPin[:0:0]
	for _, p := range dom.CPUTune.IOThreadPin {
		switch {
		case p.IOThread > total:
			// The IOThread is gone; libvirt rejects a pin for it.
		case p.IOThread > kept && cpuset != "":
			// Replaced below.
		default:
			pins = append(pins, p)
		}
	}
	if cpuset != "" {
		for id := kept + 1; id <= total; id++ {
			pins = append(pins, libvirtxml.DomainCPUTuneIOThreadPin{IOThread: id, CPUSet: cpuset})
		}
	}
	dom.CPUTune.IOThreadPin = pins
	if len(pins) == 0 {
		dom.CPUTune.IOThreadPin = nil
	}
}

func diskAlias(d *libvirtxml.DomainDisk) string {
	if d.Alias == nil {
		return ""
	}
	return d.Alias.Name
}

func diskDev(d *libvirtxml.DomainDisk) string {
	if d.Target == nil {
		return ""
	}
	return d.Target.Dev
}

func diskBus(d *libvirtxml.DomainDisk) string {
	if d.Target == nil {
		return ""
	}
	return d.Target.Bus
}

// diskName is how errors name a disk: alias and guest device.
func diskName(d *libvirtxml.DomainDisk) string {
	a := diskAlias(d)
	if a == "" {
		a = "(no alias)"
	}
	dev := diskDev(d)
	if dev == "" {
		dev = "?"
	}
	return fmt.Sprintf("%s (target %s)", a, dev)
}

func uintPtrString(p *uint) string {
	if p == nil {
		return "?"
	}
	return fmt.Sprint(*p)
}
