package domainxml

import (
	"fmt"

	"libvirt.org/go/libvirtxml"
)

// Rules that Check enforces. They restate libvirt's own validation of
// IOThread mappings (domain_validate.c, qemu_validate.c) so that a mistake
// surfaces in the hook, naming the disk, instead of as a failed VM start.
const (
	RuleDiskExists        = "a planned disk must exist"
	RuleVirtioBus         = "IOThread mapping needs bus virtio"
	RuleIOThreadXorList   = "driver 'iothread' attribute can't be used together with 'iothreads'"
	RuleQueuesSet         = "explicit queue mapping needs driver 'queues'"
	RuleIOThreadIDValid   = "IOThread ids must be > 0"
	RuleIOThreadDefined   = "IOThread must be defined in <iothreadids>"
	RuleIOThreadOnce      = "an IOThread may appear only once per disk"
	RuleAllOrNone         = "queue mapping must be given for all IOThreads or none"
	RuleQueueInRange      = "queue id must be below 'queues'"
	RuleQueueOnce         = "every queue must be mapped exactly once"
	RuleIOThreadIDsUnique = "<iothreadids> ids must be unique"
	RuleIOThreadsCount    = "<iothreads> must equal the number of <iothreadids>"
	RulePinDefined        = "<iothreadpin> must name a defined IOThread"
	RulePinCPUSet         = "<iothreadpin> cpuset must parse"
)

// RuleError is a broken rule. Alias and Dev are empty for domain-level rules.
type RuleError struct {
	Alias  string
	Dev    string
	Rule   string
	Detail string
}

func (e *RuleError) Error() string {
	if e.Alias == "" && e.Dev == "" {
		return fmt.Sprintf("domain: %s: %s", e.Rule, e.Detail)
	}
	dev := e.Dev
	if dev == "" {
		dev = "?"
	}
	return fmt.Sprintf("disk %s (target %s): %s: %s", e.Alias, dev, e.Rule, e.Detail)
}

// Check verifies what ApplyIOThreads produces for plan: the domain's
// IOThread ids and pins, every planned disk's mapping, and that every other
// disk's IOThread reference still exists. It deliberately checks nothing
// else: real KubeVirt XML is not schema-valid elsewhere (empty <bios/>, a
// non-libvirt name attribute on block sources) and libvirt accepts it.
func Check(dom *libvirtxml.Domain, plan IOThreadPlan) error {
	ids := map[uint]bool{}
	if dom.IOThreadIDs != nil {
		for _, t := range dom.IOThreadIDs.IOThreads {
			if t.ID == 0 {
				return &RuleError{Rule: RuleIOThreadIDValid, Detail: "<iothreadids> has id 0"}
			}
			if ids[t.ID] {
				return &RuleError{Rule: RuleIOThreadIDsUnique, Detail: fmt.Sprintf("id %d is listed twice", t.ID)}
			}
			ids[t.ID] = true
		}
		if dom.IOThreads != uint(len(ids)) {
			return &RuleError{Rule: RuleIOThreadsCount, Detail: fmt.Sprintf("<iothreads> is %d, <iothreadids> lists %d", dom.IOThreads, len(ids))}
		}
	} else {
		// Without <iothreadids> libvirt numbers the IOThreads 1..N.
		for id := uint(1); id <= dom.IOThreads && id <= MaxIOThreads; id++ {
			ids[id] = true
		}
	}
	if dom.CPUTune != nil {
		parsed := map[string]bool{} // a pool shares one cpuset: parse it once
		for _, p := range dom.CPUTune.IOThreadPin {
			if !ids[p.IOThread] {
				return &RuleError{Rule: RulePinDefined, Detail: fmt.Sprintf("pin for IOThread %d", p.IOThread)}
			}
			if parsed[p.CPUSet] {
				continue
			}
			if _, err := ParseCPUSet(p.CPUSet); err != nil {
				return &RuleError{Rule: RulePinCPUSet, Detail: fmt.Sprintf("IOThread %d: %v", p.IOThread, err)}
			}
			parsed[p.CPUSet] = true
		}
	}

	planned := map[string]bool{}
	for _, dp := range plan.Disks {
		planned[dp.Alias] = true
		d := findDisk(dom, dp.Alias)
		if d == nil {
			return &RuleError{Alias: dp.Alias, Rule: RuleDiskExists, Detail: "no disk has this alias"}
		}
		if err := checkMapping(d, ids); err != nil {
			return err
		}
	}
	if dom.Devices != nil {
		for i := range dom.Devices.Disks {
			d := &dom.Devices.Disks[i]
			if planned[diskAlias(d)] || d.Driver == nil || d.Driver.IOThread == nil {
				continue
			}
			// An unplanned disk's reference is KubeVirt's; id 0 was never
			// valid, so only a reference we could have broken is checked.
			if id := *d.Driver.IOThread; id != 0 && !ids[id] {
				return &RuleError{Alias: diskAlias(d), Dev: diskDev(d), Rule: RuleIOThreadDefined, Detail: fmt.Sprintf("iothread='%d'", id)}
			}
		}
	}
	return nil
}

func checkMapping(d *libvirtxml.DomainDisk, ids map[uint]bool) error {
	fail := func(rule, format string, args ...any) error {
		return &RuleError{Alias: diskAlias(d), Dev: diskDev(d), Rule: rule, Detail: fmt.Sprintf(format, args...)}
	}
	if bus := diskBus(d); bus != "virtio" {
		return fail(RuleVirtioBus, "bus is %q", bus)
	}
	drv := d.Driver
	if drv == nil || drv.IOThreads == nil || len(drv.IOThreads.IOThread) == 0 {
		return fail(RuleQueueOnce, "the disk has no <iothreads> mapping")
	}
	if drv.IOThread != nil {
		return fail(RuleIOThreadXorList, "iothread='%d' is set next to <iothreads>", *drv.IOThread)
	}
	withQueues := 0
	for _, t := range drv.IOThreads.IOThread {
		if len(t.Queues) > 0 {
			withQueues++
		}
	}
	if withQueues == 0 {
		return nil // automatic distribution: nothing more to check
	}
	if withQueues != len(drv.IOThreads.IOThread) {
		return fail(RuleAllOrNone, "%d of %d IOThreads have <queue> children", withQueues, len(drv.IOThreads.IOThread))
	}
	if drv.Queues == nil || *drv.Queues == 0 {
		return fail(RuleQueuesSet, "queues is not set")
	}
	n := *drv.Queues
	seenThread := map[uint]bool{}
	seenQueue := make([]bool, min(n, MaxQueues+1))
	for _, t := range drv.IOThreads.IOThread {
		if t.ID == 0 {
			return fail(RuleIOThreadIDValid, "<iothread id='0'>")
		}
		if !ids[t.ID] {
			return fail(RuleIOThreadDefined, "IOThread %d", t.ID)
		}
		if seenThread[t.ID] {
			return fail(RuleIOThreadOnce, "IOThread %d is listed twice", t.ID)
		}
		seenThread[t.ID] = true
		for _, q := range t.Queues {
			if q.ID >= n || q.ID >= uint(len(seenQueue)) {
				return fail(RuleQueueInRange, "queue %d with queues='%d'", q.ID, n)
			}
			if seenQueue[q.ID] {
				return fail(RuleQueueOnce, "queue %d is mapped twice", q.ID)
			}
			seenQueue[q.ID] = true
		}
	}
	for q, ok := range seenQueue {
		if !ok {
			return fail(RuleQueueOnce, "queue %d is not mapped", q)
		}
	}
	if n > uint(len(seenQueue)) {
		return fail(RuleQueueInRange, "queues='%d' is above %d", n, MaxQueues)
	}
	return nil
}

func findDisk(dom *libvirtxml.Domain, alias string) *libvirtxml.DomainDisk {
	if dom.Devices == nil {
		return nil
	}
	for i := range dom.Devices.Disks {
		if diskAlias(&dom.Devices.Disks[i]) == alias {
			return &dom.Devices.Disks[i]
		}
	}
	return nil
}
