package frontend

import (
	"encoding/binary"
	"fmt"
)

// Virtio and virtio-blk feature bits the front-end understands.
const (
	FeatureBlkSegMax      = uint64(1) << 2
	FeatureBlkRO          = uint64(1) << 5
	FeatureBlkBlkSize     = uint64(1) << 6
	FeatureBlkFlush       = uint64(1) << 9
	FeatureBlkTopology    = uint64(1) << 10
	FeatureBlkConfigWCE   = uint64(1) << 11
	FeatureBlkMQ          = uint64(1) << 12
	FeatureBlkDiscard     = uint64(1) << 13
	FeatureBlkWriteZeroes = uint64(1) << 14
	FeatureRingEventIdx   = uint64(1) << 29
	FeatureVersion1       = uint64(1) << 32
)

// Request types (VIRTIO_BLK_T_*).
const (
	TypeIn          uint32 = 0
	TypeOut         uint32 = 1
	TypeFlush       uint32 = 4
	TypeGetID       uint32 = 8
	TypeDiscard     uint32 = 11
	TypeWriteZeroes uint32 = 13
)

// Status bytes (VIRTIO_BLK_S_*). StatusNone is what the front-end puts in the
// status byte before submitting, so a back-end that completes a request
// without writing its status is caught instead of read as success.
const (
	StatusOK     byte = 0
	StatusIOErr  byte = 1
	StatusUnsupp byte = 2
	StatusNone   byte = 0xff
)

// SectorSize is the virtio-blk addressing unit, whatever blk_size is.
const SectorSize = 512

// WriteZeroesFlagUnmap lets the device deallocate a write-zeroes range.
const WriteZeroesFlagUnmap uint32 = 1

// configReadSize is how much of struct virtio_blk_config we ask for: up to
// and including write_zeroes_may_unmap and its padding. Every back-end built
// on a 2020+ virtio_blk.h serves at least this much.
const configReadSize = 60

// Info is what the back-end told us about the disk: the negotiated features
// and the fields of its virtio-blk config space that those features make
// valid. Zero means "not offered".
type Info struct {
	Features         uint64 // negotiated virtio features
	ProtocolFeatures uint64 // negotiated vhost-user protocol features
	MaxQueues        int    // GET_QUEUE_NUM (1 without the MQ protocol feature)
	Capacity         uint64 // bytes (config capacity is in 512-byte sectors)
	BlockSize        uint32 // logical block size in bytes (512 if BLK_SIZE is not offered)
	SegMax           uint32
	NumQueues        uint16 // config num_queues (MQ)
	Writeback        bool   // config writeback (CONFIG_WCE)
	ReadOnly         bool
	Flush            bool
	// Discard and write-zeroes limits, in 512-byte sectors.
	Discard               bool
	MaxDiscardSectors     uint32
	MaxDiscardSeg         uint32
	DiscardAlignment      uint32
	WriteZeroes           bool
	MaxWriteZeroesSectors uint32
	MaxWriteZeroesSeg     uint32
	WriteZeroesMayUnmap   bool
}

// parseConfig fills the config-space fields of info from raw config bytes.
// cfg comes from the back-end and is not trusted: short windows are an
// error, never an out-of-range read.
func parseConfig(info *Info, cfg []byte) error {
	if len(cfg) < 36 {
		return fmt.Errorf("virtio-blk config is %d bytes, need at least 36", len(cfg))
	}
	le := binary.LittleEndian
	f := info.Features
	info.Capacity = le.Uint64(cfg[0:]) * SectorSize
	if le.Uint64(cfg[0:]) > (1<<64-1)/SectorSize {
		return fmt.Errorf("virtio-blk capacity %d sectors overflows 64 bits of bytes", le.Uint64(cfg[0:]))
	}
	info.BlockSize = SectorSize
	if f&FeatureBlkSegMax != 0 {
		info.SegMax = le.Uint32(cfg[12:])
	}
	if f&FeatureBlkBlkSize != 0 {
		bs := le.Uint32(cfg[20:])
		if bs < SectorSize || bs > 64<<10 || bs&(bs-1) != 0 {
			return fmt.Errorf("virtio-blk blk_size %d is not a power of two in 512..65536", bs)
		}
		info.BlockSize = bs
	}
	if f&FeatureBlkConfigWCE != 0 {
		info.Writeback = cfg[32] != 0
	}
	if f&FeatureBlkMQ != 0 {
		info.NumQueues = le.Uint16(cfg[34:])
	}
	info.ReadOnly = f&FeatureBlkRO != 0
	info.Flush = f&FeatureBlkFlush != 0
	if f&FeatureBlkDiscard != 0 {
		if len(cfg) < 48 {
			return fmt.Errorf("virtio-blk config is %d bytes, DISCARD needs 48", len(cfg))
		}
		info.Discard = true
		info.MaxDiscardSectors = le.Uint32(cfg[36:])
		info.MaxDiscardSeg = le.Uint32(cfg[40:])
		info.DiscardAlignment = le.Uint32(cfg[44:])
	}
	if f&FeatureBlkWriteZeroes != 0 {
		if len(cfg) < 57 {
			return fmt.Errorf("virtio-blk config is %d bytes, WRITE_ZEROES needs 57", len(cfg))
		}
		info.WriteZeroes = true
		info.MaxWriteZeroesSectors = le.Uint32(cfg[48:])
		info.MaxWriteZeroesSeg = le.Uint32(cfg[52:])
		info.WriteZeroesMayUnmap = cfg[56] != 0
	}
	return nil
}

// putReqHeader writes the 16-byte virtio-blk request header.
func putReqHeader(b []byte, typ uint32, sector uint64) {
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint32(b[4:], 0)
	binary.LittleEndian.PutUint64(b[8:], sector)
}

// PutSegment writes one discard/write-zeroes segment (16 bytes) into b.
func PutSegment(b []byte, sector uint64, sectors uint32, flags uint32) {
	binary.LittleEndian.PutUint64(b[0:], sector)
	binary.LittleEndian.PutUint32(b[8:], sectors)
	binary.LittleEndian.PutUint32(b[12:], flags)
}
