package e2e

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"
)

// This file is the pure core of the store crash test: the self-describing
// sector format the writer puts on disk and the model of what each 4 KiB
// block may contain after a crash. No I/O, so it is tested directly.

const (
	scSector      = 512
	scBlock       = 4096
	scSectorsPerB = scBlock / scSector
)

var scMagic = [8]byte{'V', 'B', 'C', 'R', 'A', 'S', 'H', '1'}

var scCRC = crc32.MakeTable(crc32.Castagnoli)

// scSectorInfo is what one sector says about itself.
type scSectorInfo struct {
	Tag    uint64 // which volume (test run) wrote it
	LBA    uint64 // 4 KiB block index
	Sector uint32 // sector within the block
	Gen    uint64 // write sequence number, unique per write request
}

func (s scSectorInfo) String() string {
	return fmt.Sprintf("tag=%#x lba=%d sector=%d gen=%d", s.Tag, s.LBA, s.Sector, s.Gen)
}

// scEncodeBlock fills b (one 4 KiB block) with lba's content for write gen:
// every sector carries the tag, its LBA and index, gen, filler derived from
// all of them, and a CRC32C of the rest of the sector.
func scEncodeBlock(b []byte, tag, lba, gen uint64) {
	for s := 0; s < scSectorsPerB; s++ {
		scEncodeSector(b[s*scSector:(s+1)*scSector], tag, lba, uint32(s), gen)
	}
}

func scEncodeSector(p []byte, tag, lba uint64, sector uint32, gen uint64) {
	copy(p[0:8], scMagic[:])
	binary.LittleEndian.PutUint64(p[8:], tag)
	binary.LittleEndian.PutUint64(p[16:], lba)
	binary.LittleEndian.PutUint32(p[24:], sector)
	binary.LittleEndian.PutUint32(p[28:], 0)
	binary.LittleEndian.PutUint64(p[32:], gen)
	x := tag ^ lba*0x9e3779b97f4a7c15 ^ gen<<17 ^ uint64(sector)<<56 | 1
	for i := 40; i < 504; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(p[i:], x)
	}
	binary.LittleEndian.PutUint32(p[504:], 0)
	binary.LittleEndian.PutUint32(p[508:], crc32.Checksum(p[:508], scCRC))
}

var (
	errSCZero    = errors.New("all zero")
	errSCGarbage = errors.New("garbage")
)

// scDecodeSector parses one sector read back from the disk. It returns
// errSCZero for an all-zero sector and an error wrapping errSCGarbage for
// anything that is not a sector this test wrote intact.
func scDecodeSector(p []byte) (scSectorInfo, error) {
	if len(p) != scSector {
		return scSectorInfo{}, fmt.Errorf("%w: sector of %d bytes", errSCGarbage, len(p))
	}
	if !bytes.Equal(p[:8], scMagic[:]) {
		if bytes.Count(p, []byte{0}) == scSector {
			return scSectorInfo{}, errSCZero
		}
		return scSectorInfo{}, fmt.Errorf("%w: bad magic % x", errSCGarbage, p[:8])
	}
	if got, want := binary.LittleEndian.Uint32(p[508:]), crc32.Checksum(p[:508], scCRC); got != want {
		return scSectorInfo{}, fmt.Errorf("%w: self-checksum %#x, content sums to %#x", errSCGarbage, got, want)
	}
	info := scSectorInfo{
		Tag:    binary.LittleEndian.Uint64(p[8:]),
		LBA:    binary.LittleEndian.Uint64(p[16:]),
		Sector: binary.LittleEndian.Uint32(p[24:]),
		Gen:    binary.LittleEndian.Uint64(p[32:]),
	}
	// The filler is a function of the header: a sector whose CRC matches
	// but whose body is not what the writer produces is still garbage.
	var want [scSector]byte
	scEncodeSector(want[:], info.Tag, info.LBA, info.Sector, info.Gen)
	if !bytes.Equal(p, want[:]) {
		return scSectorInfo{}, fmt.Errorf("%w: content does not match its header (%v)", errSCGarbage, info)
	}
	return info, nil
}

// scModel tracks, for every 4 KiB block of the test region, what it may
// hold after a crash. The writer never has two writes to one block in
// flight, so per block, completion order is submission order and a larger
// gen is a newer value.
//
//   - durable: the newest value whose write completed before a FLUSH that
//     was submitted after it and then completed (0 = the volume's initial
//     zeroes). It must survive.
//   - later: every gen submitted after durable, completed or not. Any of
//     them may have survived instead.
//   - completed: the newest completed gen, what a FLUSH submitted now
//     would make durable.
type scModel struct {
	tag       uint64
	durable   []uint64
	completed []uint64
	later     [][]uint64
}

func newSCModel(tag uint64, blocks int) *scModel {
	return &scModel{tag: tag, durable: make([]uint64, blocks), completed: make([]uint64, blocks), later: make([][]uint64, blocks)}
}

func (m *scModel) submitted(lba int, gen uint64) { m.later[lba] = append(m.later[lba], gen) }

func (m *scModel) completedWrite(lba int, gen uint64) {
	if gen > m.completed[lba] {
		m.completed[lba] = gen
	}
}

// flushSnapshot is taken just before a FLUSH is submitted: the writes it
// covers.
func (m *scModel) flushSnapshot() []uint64 { return slices.Clone(m.completed) }

// flushed records that the FLUSH with snapshot snap completed.
func (m *scModel) flushed(snap []uint64) {
	for l, g := range snap {
		if g <= m.durable[l] {
			continue
		}
		m.durable[l] = g
		keep := m.later[l][:0]
		for _, x := range m.later[l] {
			if x > g {
				keep = append(keep, x)
			}
		}
		m.later[l] = keep
	}
}

// allowed describes what lba may hold, for failure messages.
func (m *scModel) allowed(lba int) string {
	s := fmt.Sprintf("gen %d (flushed)", m.durable[lba])
	if m.durable[lba] == 0 {
		s = "zeroes (nothing flushed)"
	}
	if len(m.later[lba]) > 0 {
		s += fmt.Sprintf(" or a later write, gens %v", m.later[lba])
	}
	return s
}

// check judges one block read back after a restart and returns the gen it
// holds (0 for zeroes). virtio-blk itself promises no atomicity beyond a
// sector, but the store maps whole 4 KiB blocks and every write here is
// 4 KiB-aligned, so sectors of one block holding different writes is a
// failure too.
func (m *scModel) check(lba int, b []byte) (gen uint64, err error) {
	for s := 0; s < scSectorsPerB; s++ {
		info, derr := scDecodeSector(b[s*scSector : (s+1)*scSector])
		var g uint64
		switch {
		case errors.Is(derr, errSCZero):
			if m.durable[lba] != 0 {
				return 0, fmt.Errorf("lba %d sector %d: read zeroes; expected %s", lba, s, m.allowed(lba))
			}
		case derr != nil:
			return 0, fmt.Errorf("lba %d sector %d: %v; expected %s", lba, s, derr, m.allowed(lba))
		case info.Tag != m.tag || info.LBA != uint64(lba) || info.Sector != uint32(s):
			return 0, fmt.Errorf("lba %d sector %d: holds another place's data (%v); expected tag=%#x and %s", lba, s, info, m.tag, m.allowed(lba))
		default:
			g = info.Gen
			if g != m.durable[lba] && !slices.Contains(m.later[lba], g) {
				return 0, fmt.Errorf("lba %d sector %d: found gen %d; expected %s", lba, s, g, m.allowed(lba))
			}
		}
		if s == 0 {
			gen = g
		} else if g != gen {
			return 0, fmt.Errorf("lba %d: torn block, sector 0 holds gen %d and sector %d gen %d; expected all of one of %s", lba, gen, s, g, m.allowed(lba))
		}
	}
	return gen, nil
}

// rebase makes what was read back (and then flushed) the new baseline.
func (m *scModel) rebase(lba int, gen uint64) {
	m.durable[lba], m.completed[lba], m.later[lba] = gen, gen, nil
}
