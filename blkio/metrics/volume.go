package metrics

import (
	"fmt"
	"strconv"
	"strings"
)

// MaxQueues bounds the queues of one volume (virtio-blk allows up to 65535;
// nobody runs more than a few hundred, and each costs ~1.3 KiB here).
const MaxQueues = 1024

// VolumeOptions describe one served volume.
type VolumeOptions struct {
	// Name is the volume label. Required.
	Name string
	// Socket is the vhost-user socket path (reported by virtblk_volume_info).
	Socket string
	// Queues is the number of virtqueues, 1..MaxQueues.
	Queues int

	// Optional values read at scrape time from elsewhere. They are called
	// from the scraper's goroutine, concurrently with everything else, so
	// they must be cheap and safe for concurrent use. Nil means not exported.

	// StoreChecksumFailures is the backing store's count of blocks whose
	// checksum did not match (store.Stats().ChecksumErrors). It is
	// store-wide: volumes sharing a store report the same number.
	StoreChecksumFailures func() uint64
	// StoreFreeBytes is the space left for new blocks in the backing store
	// (store-wide, like StoreChecksumFailures). A thin store that runs out
	// fails writes to unmapped blocks with an I/O error.
	StoreFreeBytes func() uint64
	// AllocatedBytes is the space the volume occupies in its store.
	AllocatedBytes func() uint64
	// CapacityBytes is the size the guest sees.
	CapacityBytes func() uint64
}

// VolumeStats groups the queues of one volume.
type VolumeStats struct {
	name   string // as given
	label  string // `volume="…"`
	socket string // escaped value
	queues []*QueueStats

	storeChecksum func() uint64
	storeFree     func() uint64
	allocated     func() uint64
	capacity      func() uint64
}

// NewVolume makes the stats of one volume with its queues.
func NewVolume(o VolumeOptions) (*VolumeStats, error) {
	if o.Name == "" {
		return nil, fmt.Errorf("metrics volume: empty name: set VolumeOptions.Name to the volume's name")
	}
	if o.Queues < 1 || o.Queues > MaxQueues {
		return nil, fmt.Errorf("metrics volume %q: %d queues: must be 1..%d", o.Name, o.Queues, MaxQueues)
	}
	v := &VolumeStats{
		name:          o.Name,
		label:         `volume="` + escapeLabel(o.Name) + `"`,
		socket:        escapeLabel(o.Socket),
		queues:        make([]*QueueStats, o.Queues),
		storeChecksum: o.StoreChecksumFailures,
		allocated:     o.AllocatedBytes,
		storeFree:     o.StoreFreeBytes,
		capacity:      o.CapacityBytes,
	}
	for i := range v.queues {
		v.queues[i] = &QueueStats{index: i, label: v.label + `,queue="` + strconv.Itoa(i) + `"`}
	}
	return v, nil
}

// Name is the volume's name as given to NewVolume.
func (v *VolumeStats) Name() string { return v.name }

// NumQueues is the number of queues.
func (v *VolumeStats) NumQueues() int { return len(v.queues) }

// Queue returns queue i's stats, or nil if i is out of range.
func (v *VolumeStats) Queue(i int) *QueueStats {
	if i < 0 || i >= len(v.queues) {
		return nil
	}
	return v.queues[i]
}

// escapeLabel makes s a valid label value of the text format: UTF-8, with
// backslash, double quote and line feed escaped.
func escapeLabel(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if !strings.ContainsAny(s, "\\\"\n") {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch r {
		case '\\':
			b.WriteString(`\\`)
		case '"':
			b.WriteString(`\"`)
		case '\n':
			b.WriteString(`\n`)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
