package store

import (
	"encoding/binary"
	"fmt"
)

// Journal record kinds. Every record is an absolute operation, so replaying
// a record whose effect is already present changes nothing.
const (
	recSet uint8 = iota + 1
	recCreate
	recSnapshot
	recClone
	recDelete
	recResize
)

type record struct {
	kind   uint8
	vol    uint32 // target (set, delete, resize) or new id (create, snapshot, clone)
	src    uint32 // snapshot: source volume; clone: source snapshot
	lblock uint32
	entry  uint64
	size   uint64
	name   string
}

const maxNameLen = 64
const maxVolumes = 1024

func (r record) appendTo(b []byte) []byte {
	b = append(b, r.kind)
	b = binary.LittleEndian.AppendUint32(b, r.vol)
	switch r.kind {
	case recSet:
		b = binary.LittleEndian.AppendUint32(b, r.lblock)
		b = binary.LittleEndian.AppendUint64(b, r.entry)
	case recCreate, recSnapshot, recClone:
		b = binary.LittleEndian.AppendUint32(b, r.src)
		b = binary.LittleEndian.AppendUint64(b, r.size)
		b = append(b, byte(len(r.name)))
		b = append(b, r.name...)
	case recResize:
		b = binary.LittleEndian.AppendUint64(b, r.size)
	}
	return b
}

// maxRecordSize bounds one encoded record.
const maxRecordSize = 1 + 4 + 4 + 8 + 1 + maxNameLen

func decodeRecords(p []byte) ([]record, error) {
	var out []record
	r := &reader{b: p}
	for r.off < len(p) {
		at := r.off
		rec := record{kind: r.u8(), vol: r.u32()}
		switch rec.kind {
		case recSet:
			rec.lblock, rec.entry = r.u32(), r.u64()
		case recCreate, recSnapshot, recClone:
			rec.src, rec.size = r.u32(), r.u64()
			n := int(r.u8())
			if n > maxNameLen {
				return nil, fmt.Errorf("record at %d: name length %d", at, n)
			}
			rec.name = string(r.take(n))
		case recDelete:
		case recResize:
			rec.size = r.u64()
		default:
			return nil, fmt.Errorf("record at %d: unknown kind %d", at, rec.kind)
		}
		if r.err {
			return nil, fmt.Errorf("record at %d: truncated", at)
		}
		out = append(out, rec)
	}
	return out, nil
}
