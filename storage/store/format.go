// Package store owns the virtblk block store: many thin volumes, snapshots
// and clones in one file or block device, with crash-consistent metadata
// (superblock quorum, redundant-header journal, checkpoints) and checksummed
// data. docs/on-disk-format.md describes the format and the fault model.
//
// The core talks to storage through the small asynchronous Disk interface so
// the same code runs on the simulated disk of storage/sim (one goroutine, from
// a seed) and on a real file or device.
package store

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

const (
	sectorSize     = 512
	blockSize      = 4096
	superCopies    = 4
	superQuorum    = 2 // open quorum; the write quorum is all copies
	superZoneBytes = superCopies * blockSize
	// ckptAreas: a new checkpoint goes to the area neither the current nor
	// the previous checkpoint uses, so writing it never destroys either.
	ckptAreas      = 3
	bodyHeaderSize = 64
	formatVersion  = 1

	// leafBits is the fan-out of every level of the block-map tree.
	leafBits    = 8
	leafEntries = 1 << leafBits
	// leafEncodedMax bounds one leaf in a checkpoint (id, count, entries).
	leafEncodedMax = 4 + 2 + leafEntries*9
)

var (
	superMagic  = [8]byte{'V', 'B', 'L', 'K', 'S', 'T', 'R', '1'}
	bodyMagic   = uint32(0x4a424f44) // "DOBJ"
	headerMagic = uint32(0x4a48445a)
	ckptMagic   = uint32(0x434b5054)
	crcTable    = crc32.MakeTable(crc32.Castagnoli)
)

// ErrCorrupt marks metadata that failed verification beyond what the
// redundancy can repair. Errors wrapping it name the structure and offset.
var ErrCorrupt = errors.New("store metadata corrupt")

// ErrNoSpace: no free data block or no room in the checkpoint area.
var ErrNoSpace = errors.New("store is full")

type sum128 [16]byte

func checksum(parts ...[]byte) sum128 {
	h := sha256.New()
	for _, p := range parts {
		h.Write(p)
	}
	var s sum128
	copy(s[:], h.Sum(nil))
	return s
}

// dataCRC seeds the CRC with the physical block number so a block written to
// the wrong place fails its check even when the bytes are identical.
func dataCRC(pblock uint32, data []byte) uint32 {
	var seed [4]byte
	binary.LittleEndian.PutUint32(seed[:], pblock)
	c := crc32.Update(0, crcTable, seed[:])
	return crc32.Update(c, crcTable, data)
}

func makeEntry(pblock, crc uint32) uint64 { return uint64(pblock)<<32 | uint64(crc) }
func entryBlock(e uint64) uint32          { return uint32(e >> 32) }
func entryCRC(e uint64) uint32            { return uint32(e) }

// Geometry is where each zone lives. All offsets are multiples of blockSize.
type Geometry struct {
	DiskSize     uint64
	JournalSlots uint32 // N
	SlotSize     uint32 // S, bytes per journal body
	CkptSize     uint64 // C, bytes per checkpoint area
	HeaderOff    uint64
	BodyOff      [2]uint64 // two copies of the body ring
	CkptOff      [ckptAreas]uint64
	DataOff      uint64
	DataBlocks   uint32 // D, including the unused block 0
}

// FormatOptions size the metadata zones. Zero fields take defaults.
type FormatOptions struct {
	// Defaults: 2048 slots of 8 KiB (16 MiB per body ring). A commit takes
	// at least one slot, and a checkpoint (which rewrites the whole map) is
	// due every JournalSlots/4 entries, so many small slots keep a
	// FLUSH-heavy workload from checkpointing every few dozen FLUSHes.
	JournalSlots uint32
	SlotSize     uint32
	// UUID identifies the store; zero means random (the simulator sets it so
	// a seed reproduces the disk byte for byte).
	UUID [16]byte
	// CkptSize per area; default room for DataBlocks/64+16 leaves (4x what
	// a fully written store needs) and twice as many leaf references.
	CkptSize uint64
}

func roundUp(v, to uint64) uint64 { return (v + to - 1) / to * to }

// computeGeometry lays out the zones of a store of size bytes.
func computeGeometry(size uint64, o FormatOptions) (Geometry, error) {
	g := Geometry{DiskSize: size, JournalSlots: o.JournalSlots, SlotSize: o.SlotSize}
	if g.JournalSlots == 0 {
		g.JournalSlots = 2048
	}
	if g.SlotSize == 0 {
		g.SlotSize = 8 << 10
	}
	if g.JournalSlots < 8 || g.SlotSize < 4096 || g.SlotSize%blockSize != 0 {
		return g, fmt.Errorf("journal geometry %d slots x %d bytes: need >= 8 slots of a multiple of 4096 bytes", g.JournalSlots, g.SlotSize)
	}
	g.HeaderOff = superZoneBytes
	g.BodyOff[0] = g.HeaderOff + roundUp(uint64(g.JournalSlots)*sectorSize, blockSize)
	g.BodyOff[1] = g.BodyOff[0] + uint64(g.JournalSlots)*uint64(g.SlotSize)
	fixed := g.BodyOff[1] + uint64(g.JournalSlots)*uint64(g.SlotSize)
	if size < fixed+64*blockSize {
		return g, fmt.Errorf("store size %d too small: need at least %d bytes", size, fixed+64*blockSize)
	}
	approxBlocks := (size - fixed) / blockSize
	g.CkptSize = o.CkptSize
	if g.CkptSize == 0 {
		leaves := int64(approxBlocks/64 + 16)
		g.CkptSize = uint64(ckptBytes(leaves, 2*leaves))
	}
	g.CkptSize = roundUp(g.CkptSize, blockSize)
	for a := range ckptAreas {
		g.CkptOff[a] = fixed + uint64(a)*g.CkptSize
	}
	g.DataOff = fixed + ckptAreas*g.CkptSize
	if size < g.DataOff+16*blockSize {
		return g, fmt.Errorf("store size %d too small for its metadata (%d bytes)", size, g.DataOff)
	}
	blocks := (size - g.DataOff) / blockSize
	if blocks > 1<<32-1 {
		return g, fmt.Errorf("store size %d too large: at most 16 TiB of data", size)
	}
	g.DataBlocks = uint32(blocks)
	return g, nil
}

func (g Geometry) validate() error {
	want, err := computeGeometry(g.DiskSize, FormatOptions{JournalSlots: g.JournalSlots, SlotSize: g.SlotSize, CkptSize: g.CkptSize})
	if err != nil {
		return err
	}
	if want != g {
		return fmt.Errorf("geometry is inconsistent: %+v, expected %+v", g, want)
	}
	return nil
}

func (g Geometry) headerOffset(seq uint64) uint64 {
	return g.HeaderOff + (seq%uint64(g.JournalSlots))*sectorSize
}
func (g Geometry) bodyOffset(copy int, seq uint64) uint64 {
	return g.BodyOff[copy] + (seq%uint64(g.JournalSlots))*uint64(g.SlotSize)
}
func (g Geometry) blockOffset(pblock uint32) uint64 {
	return g.DataOff + uint64(pblock)*blockSize
}

// ckptRef points at one checkpoint blob.
type ckptRef struct {
	Area  uint8 // 0 to ckptAreas-1
	Flags uint8 // ckptNoFallback
	Seq   uint64
	Size  uint64
	Sum   sum128
}

const ckptNoFallback = 1

type superblock struct {
	Copy     uint16
	Sequence uint64
	Parent   sum128
	UUID     [16]byte
	Geo      Geometry
	Current  ckptRef
	Previous ckptRef
}

const superEncodedSize = 8 + 4 + 2 + 8 + 16 + 16 + 8 + 4 + 4 + 8 + 8 + 16 + ckptAreas*8 + 8 + 4 + 2*(1+1+8+8+16) + 16

func putRef(b []byte, r ckptRef) []byte {
	b = append(b, r.Area, r.Flags)
	b = binary.LittleEndian.AppendUint64(b, r.Seq)
	b = binary.LittleEndian.AppendUint64(b, r.Size)
	return append(b, r.Sum[:]...)
}

// encode returns the 512-byte sector of the superblock. The copy field sits
// outside the checksummed range so all copies share one checksum.
func (s *superblock) encode() []byte {
	b := make([]byte, 0, sectorSize)
	b = append(b, superMagic[:]...)
	b = binary.LittleEndian.AppendUint32(b, formatVersion)
	b = binary.LittleEndian.AppendUint16(b, s.Copy)
	body := len(b)
	b = binary.LittleEndian.AppendUint64(b, s.Sequence)
	b = append(b, s.Parent[:]...)
	b = append(b, s.UUID[:]...)
	g := s.Geo
	b = binary.LittleEndian.AppendUint64(b, g.DiskSize)
	b = binary.LittleEndian.AppendUint32(b, g.JournalSlots)
	b = binary.LittleEndian.AppendUint32(b, g.SlotSize)
	b = binary.LittleEndian.AppendUint64(b, g.CkptSize)
	b = binary.LittleEndian.AppendUint64(b, g.HeaderOff)
	b = binary.LittleEndian.AppendUint64(b, g.BodyOff[0])
	b = binary.LittleEndian.AppendUint64(b, g.BodyOff[1])
	for _, o := range g.CkptOff {
		b = binary.LittleEndian.AppendUint64(b, o)
	}
	b = binary.LittleEndian.AppendUint64(b, g.DataOff)
	b = binary.LittleEndian.AppendUint32(b, g.DataBlocks)
	b = putRef(b, s.Current)
	b = putRef(b, s.Previous)
	sum := checksum(b[:8+4], b[body:])
	b = append(b, sum[:]...)
	return append(b, make([]byte, sectorSize-len(b))...)
}

func (s *superblock) sum() sum128 {
	b := s.encode()
	var x sum128
	copy(x[:], b[superEncodedSize-16:superEncodedSize])
	return x
}

type reader struct {
	b   []byte
	off int
	err bool
}

func (r *reader) take(n int) []byte {
	if r.err || n < 0 || r.off+n > len(r.b) {
		r.err = true
		return make([]byte, max(n, 0))
	}
	v := r.b[r.off : r.off+n]
	r.off += n
	return v
}
func (r *reader) u8() uint8   { return r.take(1)[0] }
func (r *reader) u16() uint16 { return binary.LittleEndian.Uint16(r.take(2)) }
func (r *reader) u32() uint32 { return binary.LittleEndian.Uint32(r.take(4)) }
func (r *reader) u64() uint64 { return binary.LittleEndian.Uint64(r.take(8)) }
func (r *reader) s128() (s sum128) {
	copy(s[:], r.take(16))
	return s
}
func (r *reader) ref() ckptRef {
	return ckptRef{Area: r.u8(), Flags: r.u8(), Seq: r.u64(), Size: r.u64(), Sum: r.s128()}
}

// decodeSuperblock verifies and decodes one copy.
func decodeSuperblock(b []byte) (*superblock, error) {
	if len(b) < superEncodedSize {
		return nil, errors.New("short superblock")
	}
	r := &reader{b: b}
	var magic [8]byte
	copy(magic[:], r.take(8))
	if magic != superMagic {
		return nil, errors.New("bad magic")
	}
	if v := r.u32(); v != formatVersion {
		return nil, fmt.Errorf("unsupported format version %d", v)
	}
	s := &superblock{Copy: r.u16()}
	want := checksum(b[:12], b[14:superEncodedSize-16])
	var got sum128
	copy(got[:], b[superEncodedSize-16:superEncodedSize])
	if got != want {
		return nil, errors.New("checksum mismatch")
	}
	s.Sequence = r.u64()
	s.Parent = r.s128()
	copy(s.UUID[:], r.take(16))
	g := &s.Geo
	g.DiskSize, g.JournalSlots, g.SlotSize = r.u64(), r.u32(), r.u32()
	g.CkptSize, g.HeaderOff, g.BodyOff[0], g.BodyOff[1] = r.u64(), r.u64(), r.u64(), r.u64()
	for a := range g.CkptOff {
		g.CkptOff[a] = r.u64()
	}
	g.DataOff, g.DataBlocks = r.u64(), r.u32()
	s.Current, s.Previous = r.ref(), r.ref()
	if r.err {
		return nil, errors.New("truncated")
	}
	if err := g.validate(); err != nil {
		return nil, err
	}
	return s, nil
}

// ringHeader is the redundant journal header stored apart from the body.
type ringHeader struct {
	Seq     uint64
	Size    uint32
	BodySum sum128
}

func (h ringHeader) encode() []byte {
	b := alignedBuf(sectorSize)[:0]
	b = binary.LittleEndian.AppendUint32(b, headerMagic)
	b = binary.LittleEndian.AppendUint64(b, h.Seq)
	b = binary.LittleEndian.AppendUint32(b, h.Size)
	b = append(b, h.BodySum[:]...)
	s := checksum(b)
	b = append(b, s[:]...)
	return append(b, make([]byte, sectorSize-len(b))...)
}

func decodeRingHeader(b []byte) (ringHeader, bool) {
	r := &reader{b: b}
	if r.u32() != headerMagic {
		return ringHeader{}, false
	}
	h := ringHeader{Seq: r.u64(), Size: r.u32(), BodySum: r.s128()}
	s := r.s128()
	if r.err || s != checksum(b[:32]) {
		return ringHeader{}, false
	}
	return h, true
}

// encodeBody builds a journal body for seq holding payload.
func encodeBody(seq uint64, slots uint32, payload []byte, slotSize uint32) []byte {
	n := roundUp(uint64(bodyHeaderSize+len(payload)), blockSize)
	b := alignedBuf(int(n))[:bodyHeaderSize]
	binary.LittleEndian.PutUint32(b[0:], bodyMagic)
	binary.LittleEndian.PutUint64(b[4:], seq)
	binary.LittleEndian.PutUint32(b[12:], uint32(seq%uint64(slots)))
	binary.LittleEndian.PutUint32(b[16:], uint32(len(payload)))
	ps := checksum(payload)
	copy(b[20:36], ps[:])
	hs := checksum(b[:36])
	copy(b[36:52], hs[:])
	b = append(b, payload...)
	return b[:n]
}

// decodeBody verifies a body read from the slot of seq; it returns the
// payload, or ok=false if the slot does not hold a valid body for seq.
func decodeBody(b []byte, seq uint64, slots uint32) (payload []byte, bodySum sum128, ok bool) {
	if len(b) < bodyHeaderSize || binary.LittleEndian.Uint32(b[0:]) != bodyMagic {
		return nil, bodySum, false
	}
	var hs, ps sum128
	copy(hs[:], b[36:52])
	if hs != checksum(b[:36]) {
		return nil, bodySum, false
	}
	if binary.LittleEndian.Uint64(b[4:]) != seq || binary.LittleEndian.Uint32(b[12:]) != uint32(seq%uint64(slots)) {
		return nil, bodySum, false
	}
	size := binary.LittleEndian.Uint32(b[16:])
	if uint64(size) > uint64(len(b)-bodyHeaderSize) {
		return nil, bodySum, false
	}
	copy(ps[:], b[20:36])
	payload = b[bodyHeaderSize : bodyHeaderSize+int(size)]
	if ps != checksum(payload) {
		return nil, bodySum, false
	}
	return payload, checksum(b[:bodyHeaderSize+int(size)]), true
}

// bodySeq peeks at the sequence a body claims, whether valid or not, for
// the "no later entry" check.
func bodyClaims(b []byte, slots uint32, slot uint64) (uint64, bool) {
	if len(b) < bodyHeaderSize || binary.LittleEndian.Uint32(b[0:]) != bodyMagic {
		return 0, false
	}
	seq := binary.LittleEndian.Uint64(b[4:])
	if seq%uint64(slots) != slot {
		return 0, false
	}
	_, _, ok := decodeBody(b, seq, slots)
	return seq, ok
}
