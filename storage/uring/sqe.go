//go:build linux

package uring

import "unsafe"

// Prep helpers fill every field of an SQE, so a recycled entry carries no
// stale state into the next operation. Addresses must point at memory the
// Go runtime does not manage (see the package doc).

// PrepNop prepares a no-op that completes with Res 0.
func (s *SQE) PrepNop(userData uint64) {
	*s = SQE{Opcode: OpNop, Fd: -1, UserData: userData}
}

// PrepRead reads len(buf) bytes at off into buf.
func (s *SQE) PrepRead(fd int, buf []byte, off uint64, userData uint64) {
	s.prepRW(OpRead, fd, Addr(buf), uint32(len(buf)), off, userData)
}

// PrepWrite writes buf at off.
func (s *SQE) PrepWrite(fd int, buf []byte, off uint64, userData uint64) {
	s.prepRW(OpWrite, fd, Addr(buf), uint32(len(buf)), off, userData)
}

// PrepReadv reads at off into the buffers described by iov, an iovec array
// in mmap'd memory (Iovecs) that must stay untouched until completion.
func (s *SQE) PrepReadv(fd int, iov []Iovec, off uint64, userData uint64) {
	s.prepRW(OpReadv, fd, iovAddr(iov), uint32(len(iov)), off, userData)
}

// PrepWritev writes the buffers described by iov at off.
func (s *SQE) PrepWritev(fd int, iov []Iovec, off uint64, userData uint64) {
	s.prepRW(OpWritev, fd, iovAddr(iov), uint32(len(iov)), off, userData)
}

// PrepReadFixed reads into buf, which must lie inside registered buffer
// bufIndex.
func (s *SQE) PrepReadFixed(fd int, buf []byte, off uint64, bufIndex uint16, userData uint64) {
	s.prepRW(OpReadFixed, fd, Addr(buf), uint32(len(buf)), off, userData)
	s.BufIndex = bufIndex
}

// PrepWriteFixed writes buf, which must lie inside registered buffer
// bufIndex.
func (s *SQE) PrepWriteFixed(fd int, buf []byte, off uint64, bufIndex uint16, userData uint64) {
	s.prepRW(OpWriteFixed, fd, Addr(buf), uint32(len(buf)), off, userData)
	s.BufIndex = bufIndex
}

// PrepFsync syncs the whole file; flags may be FsyncDatasync.
func (s *SQE) PrepFsync(fd int, flags uint32, userData uint64) {
	*s = SQE{Opcode: OpFsync, Fd: int32(fd), OpFlags: flags, UserData: userData}
}

// PrepFallocate is fallocate(fd, mode, off, length). The kernel ABI puts the
// length in Addr and the mode in Len.
func (s *SQE) PrepFallocate(fd int, mode uint32, off, length uint64, userData uint64) {
	*s = SQE{Opcode: OpFallocate, Fd: int32(fd), Off: off, Addr: length, Len: mode, UserData: userData}
}

// PrepBlockDiscard discards length bytes at off on a block device opened
// for writing (BLOCK_URING_CMD_DISCARD; the kernel ABI puts the command in
// the offset field, the start in Addr and the length in Addr3). Kernels
// before 6.12 complete it with -EOPNOTSUPP.
func (s *SQE) PrepBlockDiscard(fd int, off, length uint64, userData uint64) {
	*s = SQE{Opcode: OpUringCmd, Fd: int32(fd), Addr: off, Addr3: length, UserData: userData}
	// cmd_op is the first 32-bit half of the offset field in memory order.
	*(*uint32)(unsafe.Pointer(&s.Off)) = BlockCmdDiscard
}

// SetFlags sets IOSQE_* flags (e.g. SQEFixedFile when fd is an index into
// the registered file table) after a Prep call.
func (s *SQE) SetFlags(flags uint8) { s.Flags |= flags }

func (s *SQE) prepRW(op uint8, fd int, addr uint64, n uint32, off uint64, userData uint64) {
	*s = SQE{Opcode: op, Fd: int32(fd), Off: off, Addr: addr, Len: n, UserData: userData}
}

func iovAddr(iov []Iovec) uint64 {
	if cap(iov) == 0 {
		return 0
	}
	return uint64(uintptrOf(iov))
}
