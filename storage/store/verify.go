package store

import (
	"errors"
	"fmt"
	"slices"

	"github.com/virtblk/virtblk/storage"
)

// Finding is one problem Verify found.
type Finding struct {
	Kind     string `json:"kind"` // "checksum", "io", "map"
	Volume   string `json:"volume,omitempty"`
	Block    uint32 `json:"block"`
	Physical uint32 `json:"physical_block"`
	Offset   uint64 `json:"offset"`
	Detail   string `json:"detail"`
}

// Report is the result of Verify.
type Report struct {
	Volumes       int       `json:"volumes"`
	MappedEntries uint64    `json:"mapped_entries"`
	DataBlocks    uint64    `json:"data_blocks_checked"`
	Repairs       []string  `json:"repairs"`
	Findings      []Finding `json:"findings"`
}

// Clean reports whether nothing was found or repaired.
func (r Report) Clean() bool { return len(r.Findings) == 0 && len(r.Repairs) == 0 }

type blockUse struct {
	p      uint32
	crc    uint32
	volume string
	lb     uint32
}

// Verify reads every mapped data block once and checks its checksum, and
// checks that the map is consistent with the allocator. Metadata was
// verified by Open; what Open repaired is listed in Repairs.
func (s *Store) Verify(progress func(done, total uint64)) (Report, error) {
	rep := Report{Repairs: s.Repairs()}
	vt := s.table()
	ids := make([]uint32, 0, len(vt.byID))
	for id := range vt.byID {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	uses := map[uint32]blockUse{}
	for _, id := range ids {
		v := vt.byID[id]
		rep.Volumes++
		v.t.forEachLeaf(func(li uint32, l *leaf) {
			for i := range l.e {
				e := l.e[i].Load()
				if e == 0 {
					continue
				}
				rep.MappedEntries++
				lb := li<<leafBits | uint32(i)
				p := entryBlock(e)
				u, seen := uses[p]
				switch {
				case !seen:
					uses[p] = blockUse{p: p, crc: entryCRC(e), volume: v.name, lb: lb}
				case u.crc != entryCRC(e):
					rep.Findings = append(rep.Findings, Finding{Kind: "map", Volume: v.name, Block: lb, Physical: p,
						Offset: s.geo.blockOffset(p), Detail: fmt.Sprintf("also mapped by %q block %d with another checksum", u.volume, u.lb)})
				}
				if s.free[p/64].Load()&(1<<(p%64)) == 0 {
					rep.Findings = append(rep.Findings, Finding{Kind: "map", Volume: v.name, Block: lb, Physical: p,
						Offset: s.geo.blockOffset(p), Detail: "mapped block is marked free"})
				}
			}
		})
	}
	list := make([]blockUse, 0, len(uses))
	for _, u := range uses {
		list = append(list, u)
	}
	slices.SortFunc(list, func(a, b blockUse) int { return int(a.p) - int(b.p) })
	total := uint64(len(list))
	const batch = 32
	for start := 0; start < len(list); start += batch {
		part := list[start:min(start+batch, len(list))]
		errs := make([]error, len(part))
		err := s.wait(func(done func(error)) {
			all(len(part), func(i int, d func(error)) {
				u := part[i]
				buf := getBlock()
				s.disk.Read(s.geo.blockOffset(u.p), buf, func(err error) {
					if err == nil && dataCRC(u.p, buf) != u.crc {
						err = storage.ErrChecksum
					}
					putBlock(buf)
					errs[i] = err
					d(nil)
				})
			}, done)
		})
		if err != nil {
			return rep, err
		}
		for i, e := range errs {
			u := part[i]
			rep.DataBlocks++
			if e == nil {
				continue
			}
			kind := "io"
			if errors.Is(e, storage.ErrChecksum) {
				kind = "checksum"
				s.stats.csum.Add(1)
			}
			rep.Findings = append(rep.Findings, Finding{Kind: kind, Volume: u.volume, Block: u.lb, Physical: u.p,
				Offset: s.geo.blockOffset(u.p), Detail: e.Error()})
		}
		if progress != nil {
			progress(rep.DataBlocks, total)
		}
	}
	return rep, nil
}
