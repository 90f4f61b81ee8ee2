package store

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"slices"
	"sync/atomic"
)

// The intent log closes the window between a write's completion and the
// journal commit that maps it (up to 50 ms, or until a FLUSH). The journal
// alone keeps every *flushed* write across a machine crash, which is all
// virtio-blk promises. But when only the back-end process dies, the guest
// keeps running and has already read back what it wrote: losing those
// writes would show it older data without any crash on its side. So every
// map change is also written, before the write is acknowledged, to memory
// that outlives the process but not the machine (a shared file mapping:
// the page cache keeps it after the process is gone). Open replays it when
// the machine is the same boot and ignores it otherwise.
//
// Layout (little endian), all in the caller's memory:
//
//	header, 4096 bytes:
//	  0  magic "VBINTENT" (written last on attach, cleared first)
//	  8  version u32, 12 slots per region u32
//	  16 store uuid [16]
//	  32 boot id length u8, 33 boot id [63]
//	  96 covered epoch u64: every record of this epoch or older is in the
//	     durable journal
//	  104 durable journal seq u64, 112 max journal seq u64: the journal's
//	     last entry at open must lie between them, or another process wrote
//	     the store since and the log is stale
//	two regions, each: epoch u64 (padded to 64 bytes), then slots of 32
//	bytes: seq u64 (epoch<<32 | slot+1: the order records were made in), vol
//	u32, lblock u32, entry u64, pad u32, crc u32. The crc covers the slot's
//	first 28 bytes and the region's epoch, so a slot left from an older
//	epoch in the same region does not count.
//
// Epoch e uses region e%2. A commit switches to epoch e+1 before it cuts
// the records it journals, so every record of epoch e is in that cut (and
// some of e+1 may be too: replaying those again is harmless, records are
// absolute and later ones follow them in sequence order). Region (e+1)%2
// last held epoch e-1, which the previous commit covered.
const (
	intentMagic      = "VBINTENT"
	intentVersion    = 1
	intentHeaderSize = 4096
	intentRegionHdr  = 64
	intentSlotSize   = 32

	ihVersion    = 8
	ihSlots      = 12
	ihUUID       = 16
	ihBootLen    = 32
	ihBoot       = 33
	ihBootMax    = 63
	ihCovered    = 96
	ihDurableSeq = 104
	ihMaxSeq     = 112
)

// MinIntentSize is the smallest intent memory Options.Intent accepts.
const MinIntentSize = intentHeaderSize + 2*(intentRegionHdr+4*intentSlotSize)

// IntentLog is memory that survives the store's process but not its
// machine: a MAP_SHARED mapping of a file (see OpenPath), or a plain slice
// the simulator keeps across a simulated process crash.
type IntentLog struct {
	Mem []byte
	// Boot identifies the machine boot (Linux: /proc/sys/kernel/random/
	// boot_id). A log written under another boot may have lost any part of
	// itself and is ignored.
	Boot string
}

// A writer takes a slot with one atomic add on state (epoch<<32 | slots
// taken in it), which also is the record's sequence number: epochs only
// grow, and two writes to one block are ordered by the block's stripe.
// No lock: a writer appends under its stripe lock, and the commit that
// switches away from an epoch cuts every stripe after the switch, so no
// writer of epoch e-1 is left when epoch e+1 reuses its region. Header
// fields are written by commits, one at a time.
type intentLog struct {
	mem   []byte // nil: no intent log
	slots uint64 // per region
	state atomic.Uint64
	full  atomic.Uint64 // writes acknowledged only after a commit because the region was full
}

func intentSlots(n int) uint64 {
	return uint64((n-intentHeaderSize)/2-intentRegionHdr) / intentSlotSize
}

func (l *intentLog) region(epoch uint64) []byte {
	size := intentRegionHdr + l.slots*intentSlotSize
	off := intentHeaderSize + (epoch%2)*size
	return l.mem[off : off+size]
}

func slotCRC(slot []byte, epoch uint64) uint32 {
	var e [8]byte
	binary.LittleEndian.PutUint64(e[:], epoch)
	return crc32.Update(crc32.Checksum(slot[:28], crcTable), crcTable, e[:])
}

// add records a map change. It reports false when there is no room: the
// caller then acknowledges the write only once a commit made it durable.
// A store without an intent log reports true.
func (l *intentLog) add(r record) bool {
	if l.mem == nil {
		return true
	}
	seq := l.state.Add(1)
	epoch, i := seq>>32, seq&(1<<32-1)-1
	if i >= l.slots {
		l.full.Add(1)
		return false
	}
	reg := l.region(epoch)
	b := reg[intentRegionHdr+i*intentSlotSize : intentRegionHdr+(i+1)*intentSlotSize]
	le := binary.LittleEndian
	le.PutUint64(b[0:], seq)
	le.PutUint32(b[8:], r.vol)
	le.PutUint32(b[12:], r.lblock)
	le.PutUint64(b[16:], r.entry)
	le.PutUint32(b[24:], 0)
	le.PutUint32(b[28:], slotCRC(b, epoch))
	return true
}

// switchEpoch starts a new epoch before a commit cuts its records and
// returns the epoch the commit will cover. maxSeq is the last journal
// sequence the commit may write.
func (l *intentLog) switchEpoch(maxSeq uint64) uint64 {
	old := l.state.Load() >> 32
	binary.LittleEndian.PutUint64(l.region(old+1), old+1)
	binary.LittleEndian.PutUint64(l.mem[ihMaxSeq:], maxSeq)
	l.state.Store((old + 1) << 32)
	return old
}

// covered records that every record of epoch e is durable in the journal,
// whose last entry is now durableSeq.
func (l *intentLog) covered(e, durableSeq uint64) {
	le := binary.LittleEndian
	le.PutUint64(l.mem[ihDurableSeq:], durableSeq)
	le.PutUint64(l.mem[ihMaxSeq:], max(durableSeq, le.Uint64(l.mem[ihMaxSeq:])))
	if e > le.Uint64(l.mem[ihCovered:]) {
		le.PutUint64(l.mem[ihCovered:], e)
	}
}

// attach wipes mem and starts an empty log for this store and boot, whose
// journal ends at durableSeq.
func (l *intentLog) attach(mem []byte, uuid [16]byte, boot string, durableSeq uint64) {
	copy(mem[:8], make([]byte, 8)) // invalid until complete
	clear(mem[8:])
	le := binary.LittleEndian
	l.mem, l.slots = mem, intentSlots(len(mem))
	le.PutUint32(mem[ihVersion:], intentVersion)
	le.PutUint32(mem[ihSlots:], uint32(l.slots))
	copy(mem[ihUUID:], uuid[:])
	mem[ihBootLen] = byte(len(boot))
	copy(mem[ihBoot:ihBoot+ihBootMax], boot)
	le.PutUint64(mem[ihDurableSeq:], durableSeq)
	le.PutUint64(mem[ihMaxSeq:], durableSeq)
	le.PutUint64(l.region(1), 1)
	l.state.Store(1 << 32)
	copy(mem[:8], intentMagic)
}

// intentRecords returns the records a previous process logged and the
// journal did not yet cover, in the order they were made, or why the log
// does not apply to this store as recovered (journal ending at lastSeq).
// A log from another boot or store, or one left before the journal moved on
// without it, is not an error: its records are simply not replayed.
func intentRecords(mem []byte, uuid [16]byte, boot string, lastSeq uint64) ([]record, string) {
	if len(mem) < MinIntentSize || string(mem[:8]) != intentMagic {
		return nil, "" // never attached, or wiped
	}
	le := binary.LittleEndian
	if v := le.Uint32(mem[ihVersion:]); v != intentVersion {
		return nil, fmt.Sprintf("intent log version %d, want %d", v, intentVersion)
	}
	if [16]byte(mem[ihUUID:ihUUID+16]) != uuid {
		return nil, "intent log belongs to another store"
	}
	bl := int(mem[ihBootLen])
	if bl > ihBootMax || string(mem[ihBoot:ihBoot+bl]) != boot {
		return nil, "intent log is from another machine boot; its records were never flushed"
	}
	durable, maxSeq := le.Uint64(mem[ihDurableSeq:]), le.Uint64(mem[ihMaxSeq:])
	if lastSeq < durable || lastSeq > maxSeq {
		return nil, fmt.Sprintf("intent log expects the journal to end between %d and %d, it ends at %d: the store was written without it", durable, maxSeq, lastSeq)
	}
	slots := uint64(le.Uint32(mem[ihSlots:]))
	l := intentLog{mem: mem, slots: slots}
	if slots == 0 || slots != intentSlots(len(mem)) {
		return nil, fmt.Sprintf("intent log has %d slots per region, its %d bytes hold %d", slots, len(mem), intentSlots(len(mem)))
	}
	covered := le.Uint64(mem[ihCovered:])
	type seqRec struct {
		seq uint64
		r   record
	}
	var out []seqRec
	for _, base := range []uint64{0, 1} {
		reg := l.region(base)
		epoch := le.Uint64(reg)
		if epoch%2 != base || epoch <= covered {
			continue
		}
		for i := range slots {
			b := reg[intentRegionHdr+i*intentSlotSize : intentRegionHdr+(i+1)*intentSlotSize]
			seq := le.Uint64(b)
			if seq == 0 || le.Uint32(b[28:]) != slotCRC(b, epoch) {
				continue
			}
			out = append(out, seqRec{seq, record{kind: recSet, vol: le.Uint32(b[8:]), lblock: le.Uint32(b[12:]), entry: le.Uint64(b[16:])}})
		}
	}
	slices.SortFunc(out, func(a, b seqRec) int {
		switch {
		case a.seq < b.seq:
			return -1
		case a.seq > b.seq:
			return 1
		}
		return 0
	})
	recs := make([]record, len(out))
	for i, o := range out {
		recs[i] = o.r
	}
	return recs, ""
}
