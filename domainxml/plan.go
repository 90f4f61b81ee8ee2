// Package domainxml owns virtblk's edits to libvirt domain XML: the IOThread
// pool and virtqueue->IOThread mapping on virtio-blk disks, and the redirect
// of a disk to a vhost-user-blk socket or a vDPA device. Every function is
// pure: it reads and returns libvirtxml values and does no I/O.
package domainxml

// IOThreadPlan is what the user asked for: a pool of IOThreads that virtblk
// adds to the domain, and the disks whose virtqueues are spread over it.
type IOThreadPlan struct {
	// PoolSize is the number of IOThreads in virtblk's pool (>= 1).
	PoolSize int
	// CPUSet pins every pool IOThread (<cputune><iothreadpin>), in libvirt
	// cpuset syntax ("2-5", "0,2,4-6"). Empty means no pinning.
	CPUSet string
	// Polling sets the pool IOThreads' <poll max grow shrink>; nil leaves
	// QEMU's defaults.
	Polling *Polling
	// Disks are the disks to map.
	Disks []DiskPlan
}

// Polling is an IOThread's adaptive polling window (libvirt >= 9.4).
type Polling struct {
	MaxNS  uint
	Grow   uint
	Shrink uint
}

// DiskPlan maps one disk's virtqueues onto the pool.
type DiskPlan struct {
	// Alias is the disk's <alias name=...>: KubeVirt names every VMI disk
	// "ua-<disk name>", and the alias survives KubeVirt's lossy re-feed.
	Alias string
	// Queues is the number of virtqueues (>= 1).
	Queues int
	// QueueMap, if not nil, has one entry per queue: the pool IOThread that
	// serves it, counted from 0 within the pool (not a libvirt id). Nil
	// means round-robin: queue q goes to pool thread (start+q) % PoolSize,
	// where start is the total queue count of the disks before it in the plan.
	QueueMap []int
}

// Report says what ApplyIOThreads did, for one structured log line.
type Report struct {
	// KeptIOThreads is R: IOThread ids 1..R stay KubeVirt's because disks
	// outside the plan (or controllers) still reference them.
	KeptIOThreads uint
	// PoolIDs are the libvirt ids of virtblk's pool, R+1..R+PoolSize.
	PoolIDs []uint
	// IOThreads is the domain's <iothreads> count after the rewrite.
	IOThreads uint
	// Disks lists every planned disk in plan order.
	Disks []DiskReport
}

// DiskReport is the mapping written to one disk.
type DiskReport struct {
	Alias  string
	Dev    string // <target dev>, e.g. "vdb"
	Queues int
	// Threads lists, per pool IOThread that got at least one queue, the
	// queues it serves, in IOThread id order.
	Threads []ThreadQueues
}

// ThreadQueues is one IOThread and the virtqueues mapped onto it.
type ThreadQueues struct {
	ID     uint
	Queues []uint
}
