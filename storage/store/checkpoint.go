package store

import (
	"encoding/binary"
	"fmt"
	"slices"
)

// encodeCheckpoint serializes the captured volumes. A leaf shared by several
// volumes is written once and referenced by its index.
func encodeCheckpoint(seq uint64, nextID uint32, vols []capturedVol) []byte {
	ids := map[*leaf]uint32{}
	var order []*leaf
	for _, v := range vols {
		v.t.forEachLeaf(func(_ uint32, l *leaf) {
			if _, ok := ids[l]; !ok {
				ids[l] = uint32(len(order))
				order = append(order, l)
			}
		})
	}
	b := binary.LittleEndian.AppendUint32(nil, ckptMagic)
	b = binary.LittleEndian.AppendUint64(b, seq)
	b = binary.LittleEndian.AppendUint32(b, nextID)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(vols)))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(order)))
	for _, l := range order {
		at := len(b)
		b = binary.LittleEndian.AppendUint16(b, 0)
		var n uint16
		for i := range l.e {
			if e := l.e[i].Load(); e != 0 {
				b = append(b, byte(i))
				b = binary.LittleEndian.AppendUint64(b, e)
				n++
			}
		}
		binary.LittleEndian.PutUint16(b[at:], n)
	}
	for _, v := range vols {
		b = binary.LittleEndian.AppendUint32(b, v.id)
		ro := byte(0)
		if v.readOnly {
			ro = 1
		}
		b = append(b, ro)
		b = binary.LittleEndian.AppendUint32(b, v.src)
		b = binary.LittleEndian.AppendUint64(b, v.size)
		b = append(b, byte(len(v.name)))
		b = append(b, v.name...)
		at := len(b)
		b = binary.LittleEndian.AppendUint32(b, 0)
		var n uint32
		v.t.forEachLeaf(func(li uint32, l *leaf) {
			b = binary.LittleEndian.AppendUint32(b, li)
			b = binary.LittleEndian.AppendUint32(b, ids[l])
			n++
		})
		binary.LittleEndian.PutUint32(b[at:], n)
	}
	return b
}

// decodedCkpt is a checkpoint loaded into fresh trees. Leaf and block
// reference counts are computed afterwards by recountRefs.
type decodedCkpt struct {
	seq    uint64
	nextID uint32
	vols   []*volume
}

// decodeCheckpoint parses a checkpoint blob whose checksum already matched.
// It still validates every field, since a checksum only proves the bytes are
// what was written, not that the writer was right.
func decodeCheckpoint(b []byte, dataBlocks uint32) (*decodedCkpt, error) {
	r := &reader{b: b}
	if r.u32() != ckptMagic {
		return nil, fmt.Errorf("bad checkpoint magic")
	}
	d := &decodedCkpt{seq: r.u64(), nextID: r.u32()}
	nv, nl := r.u32(), r.u32()
	if r.err || nv > maxVolumes || uint64(nl) > uint64(len(b))/2 {
		return nil, fmt.Errorf("bad checkpoint counts: %d volumes, %d leaves", nv, nl)
	}
	leaves := make([]*leaf, nl)
	for i := range leaves {
		l := new(leaf)
		n := int(r.u16())
		if n > leafEntries {
			return nil, fmt.Errorf("leaf %d: %d entries", i, n)
		}
		for range n {
			idx, e := r.u8(), r.u64()
			if p := entryBlock(e); p == 0 || p >= dataBlocks {
				return nil, fmt.Errorf("leaf %d: entry %d maps block %d outside the data zone", i, idx, p)
			}
			l.e[idx].Store(e)
		}
		leaves[i] = l
	}
	seen := map[uint32]bool{}
	names := map[string]bool{}
	for range nv {
		v := &volume{id: r.u32(), readOnly: r.u8() == 1, src: r.u32(), t: new(tree)}
		v.size.Store(r.u64())
		v.name = string(r.take(int(r.u8())))
		if r.err || v.id == 0 || v.id >= d.nextID || seen[v.id] || names[v.name] || validName(v.name) != nil || validSize(v.size.Load()) != nil {
			return nil, fmt.Errorf("bad volume %d %q in checkpoint", v.id, v.name)
		}
		seen[v.id], names[v.name] = true, true
		n := r.u32()
		if uint64(n) > uint64(len(b)) {
			return nil, fmt.Errorf("volume %q: %d leaves", v.name, n)
		}
		prev := int64(-1)
		for range n {
			li, id := r.u32(), r.u32()
			if r.err || id >= nl || li >= 1<<24 || int64(li) <= prev || uint64(li)<<leafBits >= (v.size.Load()+blockSize-1)/blockSize+leafEntries {
				return nil, fmt.Errorf("volume %q: bad leaf reference %d -> %d", v.name, li, id)
			}
			prev = int64(li)
			v.t.leafSlot(li, true).Store(leaves[id])
		}
		d.vols = append(d.vols, v)
	}
	if r.err {
		return nil, fmt.Errorf("checkpoint truncated")
	}
	slices.SortFunc(d.vols, func(a, b *volume) int { return int(a.id) - int(b.id) })
	return d, nil
}
