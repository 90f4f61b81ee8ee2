package store

import (
	"testing"
)

// The decoders below parse bytes read from disk, which may be anything.
// They must never panic, and whatever they accept must re-encode the same.

func FuzzSuperblock(f *testing.F) {
	geo, err := computeGeometry(8<<20, FormatOptions{JournalSlots: 16, SlotSize: 8192})
	if err != nil {
		f.Fatal(err)
	}
	sb := superblock{Sequence: 3, Geo: geo, Current: ckptRef{Area: 1, Seq: 9, Size: 100}}
	f.Add(sb.encode())
	f.Add(make([]byte, sectorSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := decodeSuperblock(b)
		if err != nil {
			return
		}
		if got := s.encode(); string(got[:superEncodedSize]) != string(b[:superEncodedSize]) {
			t.Fatalf("accepted superblock does not re-encode to its bytes")
		}
	})
}

func FuzzJournal(f *testing.F) {
	recs := []record{
		{kind: recCreate, vol: 1, size: 1 << 20, name: "a"},
		{kind: recSet, vol: 1, lblock: 5, entry: makeEntry(7, 123)},
		{kind: recSnapshot, vol: 2, src: 1, name: "s"},
		{kind: recDelete, vol: 1},
		{kind: recResize, vol: 2, size: 2 << 20},
	}
	var payload []byte
	for _, r := range recs {
		payload = r.appendTo(payload)
	}
	body := encodeBody(5, 16, payload, 8192)
	f.Add(body, uint64(5))
	f.Add(ringHeader{Seq: 5, Size: 3}.encode(), uint64(5))
	f.Add(payload, uint64(0))
	f.Fuzz(func(t *testing.T, b []byte, seq uint64) {
		if h, ok := decodeRingHeader(b); ok {
			if string(h.encode()[:48]) != string(b[:48]) {
				t.Fatal("accepted header does not re-encode to its bytes")
			}
		}
		if p, _, ok := decodeBody(b, seq, 16); ok {
			_, _ = decodeRecords(p)
		}
		_, _ = bodyClaims(b, 16, seq%16)
		rs, err := decodeRecords(b)
		if err != nil {
			return
		}
		var again []byte
		for _, r := range rs {
			again = r.appendTo(again)
		}
		if string(again) != string(b) {
			t.Fatal("accepted records do not re-encode to their bytes")
		}
	})
}

func FuzzCheckpoint(f *testing.F) {
	t := new(tree)
	l := new(leaf)
	l.refs.Store(1)
	l.e[3].Store(makeEntry(9, 1))
	t.leafSlot(0, true).Store(l)
	blob := encodeCheckpoint(4, 3, []capturedVol{{id: 1, name: "v", size: 1 << 20, t: t}, {id: 2, name: "s", readOnly: true, src: 1, size: 1 << 20, t: t}})
	f.Add(blob)
	f.Add(encodeCheckpoint(0, 1, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := decodeCheckpoint(b, 1000)
		if err != nil {
			return
		}
		for _, v := range d.vols {
			v.t.forEachLeaf(func(_ uint32, l *leaf) {
				for i := range l.e {
					if e := l.e[i].Load(); e != 0 && (entryBlock(e) == 0 || entryBlock(e) >= 1000) {
						t.Fatalf("accepted out-of-range block %d", entryBlock(e))
					}
				}
			})
		}
	})
}
