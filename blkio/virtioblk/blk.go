// Package virtioblk owns the virtio-blk device model: the features it
// offers, its config space, parsing a request out of a descriptor chain,
// turning it into a storage.Request (or an immediate status), mapping
// storage errors to virtio-blk status bytes, and the per-virtqueue worker
// that runs the I/O loop. It never touches the vhost-user socket.
package virtioblk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/virtblk/virtblk/blkio/virtq"
	"github.com/virtblk/virtblk/storage"
)

// Virtio-blk feature bits.
const (
	FSizeMax     = uint64(1) << 1
	FSegMax      = uint64(1) << 2
	FRO          = uint64(1) << 5
	FBlkSize     = uint64(1) << 6
	FFlush       = uint64(1) << 9
	FTopology    = uint64(1) << 10
	FConfigWCE   = uint64(1) << 11
	FMQ          = uint64(1) << 12
	FDiscard     = uint64(1) << 13
	FWriteZeroes = uint64(1) << 14

	FIndirectDesc = uint64(1) << 28
	FEventIdx     = uint64(1) << 29
	FVersion1     = uint64(1) << 32
)

// Request types.
const (
	TIn          = 0
	TOut         = 1
	TFlush       = 4
	TFlushOut    = 5
	TGetID       = 8
	TDiscard     = 11
	TWriteZeroes = 13
)

// Status bytes.
const (
	SOK     = 0
	SIOErr  = 1
	SUnsupp = 2
)

const (
	headerSize  = 16
	segmentSize = 16
	// IDBytes is the GET_ID serial length.
	IDBytes = 20
	// ConfigSize is the size of struct virtio_blk_config we serve.
	ConfigSize = 96
	// WritebackOffset is the config byte the driver writes to switch cache
	// mode.
	WritebackOffset = 32

	flagUnmap = 1

	// Limits advertised in config space. One segment per discard and
	// write-zeroes request keeps the mapping to storage.Request 1:1.
	maxDiscardSectors = 1 << 22
	maxDiscardSeg     = 1
)

// Options configure a Device.
type Options struct {
	NumQueues uint16
	QueueSize uint16
	Serial    string
	ReadOnly  bool // forced read-only even if the volume is writable
}

// Device is one virtio-blk device over a storage.Volume. Everything but the
// writeback flag is fixed at creation, so workers read it without locks.
type Device struct {
	vol       storage.Volume
	opts      Options
	ro        bool
	blk       uint32
	capacity  uint64 // sectors
	serial    [IDBytes]byte
	serialLen int
	features  uint64
	writeback atomic.Bool
}

// NewDevice describes vol as a virtio-blk device.
func NewDevice(vol storage.Volume, o Options) (*Device, error) {
	if o.NumQueues == 0 || o.QueueSize == 0 || o.QueueSize&(o.QueueSize-1) != 0 || o.QueueSize > 1024 {
		return nil, fmt.Errorf("virtio-blk: %d queues of size %d: need >= 1 queue and a power-of-two size up to 1024", o.NumQueues, o.QueueSize)
	}
	if len(o.Serial) > IDBytes {
		return nil, fmt.Errorf("virtio-blk: serial %q is longer than %d bytes", o.Serial, IDBytes)
	}
	blk := vol.BlockSize()
	if blk < storage.SectorSize || blk&(blk-1) != 0 {
		return nil, fmt.Errorf("virtio-blk: volume block size %d is not a power of two >= 512", blk)
	}
	d := &Device{vol: vol, opts: o, ro: o.ReadOnly || vol.ReadOnly(), blk: blk, capacity: vol.Size() / storage.SectorSize}
	d.serialLen = copy(d.serial[:], o.Serial)
	d.features = FVersion1 | FIndirectDesc | FEventIdx | FSegMax | FBlkSize | FTopology | FFlush | FConfigWCE | FMQ
	if d.ro {
		d.features |= FRO
	} else {
		if vol.CanDiscard() {
			d.features |= FDiscard
		}
		if vol.CanWriteZeroes() {
			d.features |= FWriteZeroes
		}
	}
	// Writeback is the default once FLUSH is negotiated (spec 5.2.6.3).
	d.writeback.Store(true)
	return d, nil
}

// Features are the virtio feature bits the device offers.
func (d *Device) Features() uint64 { return d.features }

// NumQueues is the number of request queues.
func (d *Device) NumQueues() uint16 { return d.opts.NumQueues }

// QueueSize is the largest queue size.
func (d *Device) QueueSize() uint16 { return d.opts.QueueSize }

// Volume is the backing volume.
func (d *Device) Volume() storage.Volume { return d.vol }

// Writeback reports the cache mode (true = writeback).
func (d *Device) Writeback() bool { return d.writeback.Load() }

// Negotiated adjusts cache mode to the acked features: without CONFIG_WCE
// and FLUSH the driver assumes write-through (spec 5.2.6.3).
func (d *Device) Negotiated(acked uint64) {
	if acked&FFlush == 0 {
		d.writeback.Store(false)
	} else {
		d.writeback.Store(true)
	}
}

// Config returns the full config space.
func (d *Device) Config() [ConfigSize]byte {
	var c [ConfigSize]byte
	le := binary.LittleEndian
	le.PutUint64(c[0:], d.capacity)
	le.PutUint32(c[12:], uint32(d.opts.QueueSize)-2) // seg_max: header and status take a descriptor each
	le.PutUint32(c[20:], d.blk)
	c[24] = 0               // physical_block_exp
	c[25] = 0               // alignment_offset
	le.PutUint16(c[26:], 1) // min_io_size, in logical blocks
	le.PutUint32(c[28:], 0) // opt_io_size
	if d.writeback.Load() {
		c[WritebackOffset] = 1
	}
	le.PutUint16(c[34:], d.opts.NumQueues)
	sectorsPerBlock := d.blk / storage.SectorSize
	if d.features&FDiscard != 0 {
		le.PutUint32(c[36:], maxDiscardSectors)
		le.PutUint32(c[40:], maxDiscardSeg)
		le.PutUint32(c[44:], sectorsPerBlock)
	}
	if d.features&FWriteZeroes != 0 {
		le.PutUint32(c[48:], maxDiscardSectors)
		le.PutUint32(c[52:], maxDiscardSeg)
		c[56] = 1 // write_zeroes_may_unmap
	}
	return c
}

// ReadConfig copies config bytes [off, off+len(dst)); bytes past the end
// read as zero.
func (d *Device) ReadConfig(off uint32, dst []byte) {
	clear(dst)
	c := d.Config()
	if off < ConfigSize {
		copy(dst, c[off:])
	}
}

// WriteConfig applies a driver write. Only the writeback byte is writable.
func (d *Device) WriteConfig(off uint32, src []byte) error {
	if off == WritebackOffset && len(src) == 1 && src[0] <= 1 {
		d.writeback.Store(src[0] == 1)
		return nil
	}
	return fmt.Errorf("virtio-blk: config write of %d bytes at offset %d: only the writeback byte (offset %d) is writable", len(src), off, WritebackOffset)
}

// ErrMalformed means a chain cannot carry a virtio-blk request at all
// (no status byte), so the device cannot even report an error in-band.
var ErrMalformed = errors.New("malformed virtio-blk request")

// Request is a parsed request; its slices alias guest memory.
type Request struct {
	Type    uint32
	Sector  uint64
	Data    [][]byte // IN: writable data, OUT: readable data
	DataLen uint64
	Status  []byte // the status byte (len 1)
	// Written is what the device reports in the used entry on success.
	Written uint32
}

// gather copies up to len(dst) bytes from bufs starting at byte off.
func gather(dst []byte, bufs [][]byte, off uint64) int {
	n := 0
	for _, b := range bufs {
		if off >= uint64(len(b)) {
			off -= uint64(len(b))
			continue
		}
		n += copy(dst[n:], b[off:])
		off = 0
		if n == len(dst) {
			break
		}
	}
	return n
}

// appendRange appends the sub-slices of bufs covering [off, off+n).
func appendRange(dst [][]byte, bufs [][]byte, off, n uint64) [][]byte {
	for _, b := range bufs {
		if n == 0 {
			break
		}
		if off >= uint64(len(b)) {
			off -= uint64(len(b))
			continue
		}
		take := min(uint64(len(b))-off, n)
		dst = append(dst, b[off:off+take])
		n -= take
		off = 0
	}
	return dst
}

// Parse splits a chain into header, data and status. r.Data reuses its
// backing array. A chain without a writable byte is ErrMalformed; a chain
// with a status byte but a short header gets status IOERR (ok=false).
func Parse(c *virtq.Chain, r *Request) (ok bool, err error) {
	r.Data = r.Data[:0]
	r.DataLen, r.Written = 0, 1
	if c.WriteLen == 0 {
		return false, fmt.Errorf("%w: chain %d has no writable status byte", ErrMalformed, c.Head)
	}
	last := c.Writable[len(c.Writable)-1]
	if len(last) == 0 { // cannot happen: empty buffers add no slices
		return false, fmt.Errorf("%w: chain %d ends in a zero-length buffer", ErrMalformed, c.Head)
	}
	r.Status = last[len(last)-1:]
	if c.ReadLen < headerSize {
		return false, nil
	}
	var h [headerSize]byte
	gather(h[:], c.Readable, 0)
	r.Type = binary.LittleEndian.Uint32(h[0:])
	r.Sector = binary.LittleEndian.Uint64(h[8:])
	switch r.Type {
	case TIn, TGetID:
		r.DataLen = c.WriteLen - 1
		r.Data = appendRange(r.Data, c.Writable, 0, r.DataLen)
	default:
		r.DataLen = c.ReadLen - headerSize
		r.Data = appendRange(r.Data, c.Readable, headerSize, r.DataLen)
	}
	return true, nil
}

// Prepare turns a parsed request into a storage request. When submit is
// false the request is finished: status is its status byte (GET_ID data has
// been written, r.Written set).
func (d *Device) Prepare(r *Request, sr *storage.Request) (submit bool, status byte) {
	sr.Bufs = sr.Bufs[:0]
	sr.Length, sr.Unmap = 0, false
	switch r.Type {
	case TIn, TOut:
		if r.Type == TOut && d.ro {
			return false, SIOErr
		}
		if !d.inRange(r.Sector, r.DataLen) {
			return false, SIOErr
		}
		sr.Op = storage.OpRead
		if r.Type == TOut {
			sr.Op = storage.OpWrite
		} else {
			r.Written = uint32(r.DataLen) + 1
		}
		sr.Offset = r.Sector * storage.SectorSize
		sr.Bufs = append(sr.Bufs, r.Data...)
		if r.DataLen == 0 {
			return false, SOK
		}
		return true, 0
	case TFlush, TFlushOut:
		sr.Op = storage.OpFlush
		return true, 0
	case TGetID:
		var id [IDBytes]byte
		copy(id[:], d.serial[:d.serialLen])
		n := uint64(0)
		for _, b := range r.Data {
			if n >= IDBytes {
				break
			}
			n += uint64(copy(b, id[n:]))
		}
		r.Written = uint32(n) + 1
		return false, SOK
	case TDiscard, TWriteZeroes:
		feat := FDiscard
		if r.Type == TWriteZeroes {
			feat = FWriteZeroes
		}
		if d.features&feat == 0 {
			if d.ro {
				return false, SIOErr
			}
			return false, SUnsupp
		}
		if r.DataLen != segmentSize*maxDiscardSeg {
			return false, SIOErr
		}
		var seg [segmentSize]byte
		gather(seg[:], r.Data, 0)
		sector := binary.LittleEndian.Uint64(seg[0:])
		num := binary.LittleEndian.Uint32(seg[8:])
		flags := binary.LittleEndian.Uint32(seg[12:])
		if flags&^flagUnmap != 0 || (r.Type == TDiscard && flags&flagUnmap != 0) {
			return false, SUnsupp
		}
		if num > maxDiscardSectors || !d.inRange(sector, uint64(num)*storage.SectorSize) {
			return false, SIOErr
		}
		if num == 0 {
			return false, SOK
		}
		sr.Op = storage.OpDiscard
		if r.Type == TWriteZeroes {
			sr.Op = storage.OpWriteZeroes
			sr.Unmap = flags&flagUnmap != 0
		}
		sr.Offset = sector * storage.SectorSize
		sr.Length = uint64(num) * storage.SectorSize
		return true, 0
	}
	return false, SUnsupp
}

// inRange checks that [sector, sector+n bytes) lies inside the disk and is
// aligned to the logical block size.
func (d *Device) inRange(sector, n uint64) bool {
	spb := uint64(d.blk / storage.SectorSize)
	if n%uint64(d.blk) != 0 || sector%spb != 0 {
		return false
	}
	return sector <= d.capacity && n/storage.SectorSize <= d.capacity-sector
}

// StatusOf maps a storage completion error to a status byte.
func StatusOf(err error) byte {
	switch {
	case err == nil:
		return SOK
	case errors.Is(err, storage.ErrUnsupported):
		return SUnsupp
	}
	return SIOErr
}
