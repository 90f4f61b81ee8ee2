//go:build linux

package uring

import "unsafe"

// Kernel ABI of io_uring (include/uapi/linux/io_uring.h). Only what the
// binding uses is mirrored; the numbers are part of the stable kernel ABI.

// Opcodes (enum io_uring_op).
const (
	OpNop        uint8 = 0
	OpReadv      uint8 = 1
	OpWritev     uint8 = 2
	OpFsync      uint8 = 3
	OpReadFixed  uint8 = 4
	OpWriteFixed uint8 = 5
	OpFallocate  uint8 = 17
	OpRead       uint8 = 22
	OpWrite      uint8 = 23
	OpUringCmd   uint8 = 46
)

// BlockCmdDiscard is BLOCK_URING_CMD_DISCARD (_IO(0x12, 0)), an
// asynchronous discard on a block device through OpUringCmd (Linux 6.12+).
const BlockCmdDiscard uint32 = 0x12<<8 | 0

// SQE flags (IOSQE_*).
const (
	SQEFixedFile      uint8 = 1 << 0
	SQEIODrain        uint8 = 1 << 1
	SQEIOLink         uint8 = 1 << 2
	SQEIOHardlink     uint8 = 1 << 3
	SQEAsync          uint8 = 1 << 4
	SQECQESkipSuccess uint8 = 1 << 6
)

// FsyncDatasync makes an OpFsync behave like fdatasync(2).
const FsyncDatasync uint32 = 1

// Setup flags (IORING_SETUP_*).
const (
	SetupIOPoll    uint32 = 1 << 0
	SetupSQPoll    uint32 = 1 << 1
	SetupCQSize    uint32 = 1 << 3
	SetupClamp     uint32 = 1 << 4
	SetupSubmitAll uint32 = 1 << 7
)

// Feature bits reported by io_uring_setup (IORING_FEAT_*).
const (
	FeatSingleMmap uint32 = 1 << 0
	FeatNoDrop     uint32 = 1 << 1
	FeatExtArg     uint32 = 1 << 8
)

// io_uring_enter flags.
const (
	enterGetEvents uint32 = 1 << 0
)

// SQ ring flags written by the kernel.
const (
	sqNeedWakeup uint32 = 1 << 0
	sqCQOverflow uint32 = 1 << 1
)

// mmap offsets of the three ring areas.
const (
	offSQRing uint64 = 0
	offCQRing uint64 = 0x8000000
	offSQEs   uint64 = 0x10000000
)

// io_uring_register opcodes.
const (
	regBuffers      = 0
	regUnregBuffers = 1
	regFiles        = 2
	regUnregFiles   = 3
	regEventFD      = 4
	regUnregEventFD = 5
)

// sqringOffsets mirrors struct io_sqring_offsets.
type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

// cqringOffsets mirrors struct io_cqring_offsets.
type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

// params mirrors struct io_uring_params.
type params struct {
	sqEntries    uint32
	cqEntries    uint32
	flags        uint32
	sqThreadCPU  uint32
	sqThreadIdle uint32
	features     uint32
	wqFD         uint32
	resv         [3]uint32
	sqOff        sqringOffsets
	cqOff        cqringOffsets
}

// SQE mirrors struct io_uring_sqe (64 bytes). GetSQE hands out pointers into
// the kernel-shared SQE array; the Prep* methods fill every field. Fields
// that hold addresses are plain integers on purpose: the kernel reads them,
// the garbage collector must not, and they may only point at memory that
// is not managed by Go (see the package doc).
type SQE struct {
	Opcode      uint8
	Flags       uint8
	Ioprio      uint16
	Fd          int32
	Off         uint64 // file offset (or addr2)
	Addr        uint64 // buffer / iovec array address, or the length of a fallocate
	Len         uint32 // byte count, iovec count, or the mode of a fallocate
	OpFlags     uint32 // rw_flags, fsync_flags, ...
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	FileIndex   uint32 // splice_fd_in / file_index
	Addr3       uint64
	_           uint64
}

// CQE mirrors struct io_uring_cqe (16 bytes). Res is the operation's
// result: a byte count or zero on success, a negative errno on failure.
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// Iovec mirrors struct iovec with an integer base, so an iovec array can
// live in mmap'd memory without holding Go pointers.
type Iovec struct {
	Base uint64
	Len  uint64
}

// Compile-time layout checks: a mismatch here would corrupt kernel I/O.
var (
	_ [64 - unsafe.Sizeof(SQE{})]struct{}
	_ [unsafe.Sizeof(SQE{}) - 64]struct{}
	_ [16 - unsafe.Sizeof(CQE{})]struct{}
	_ [unsafe.Sizeof(CQE{}) - 16]struct{}
	_ [120 - unsafe.Sizeof(params{})]struct{}
	_ [unsafe.Sizeof(params{}) - 120]struct{}
	_ [16 - unsafe.Sizeof(Iovec{})]struct{}
	_ [unsafe.Sizeof(Iovec{}) - 16]struct{}
)
