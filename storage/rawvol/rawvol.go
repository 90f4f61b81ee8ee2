//go:build linux

// Package rawvol is a storage.Volume backed by a raw image: a regular file
// or a block device, opened O_DIRECT and driven by one io_uring per queue.
// It owns the mapping from storage.Request to io_uring operations, the
// O_DIRECT alignment rules (with bounce buffers for misaligned memory), and
// retrying short transfers so a request never completes silently short.
package rawvol

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage"
	"github.com/virtblk/virtblk/storage/uring"
)

// Options configure Open.
type Options struct {
	// ReadOnly opens the image O_RDONLY; writes, discards and write-zeroes
	// then complete with storage.ErrReadOnly.
	ReadOnly bool
	// Logger receives open-time notices; nil means slog.Default().
	Logger *slog.Logger
}

// Volume is an open raw image. It is safe for concurrent use; each queue
// has its own ring, eventfd and buffers, so nothing is shared on the I/O
// path except the read-only fields below and a bounce counter.
type Volume struct {
	path     string
	fd       int
	size     uint64
	readOnly bool
	isBlock  bool
	// memAlign and ioAlign are the O_DIRECT rules: buffer addresses must
	// be multiples of memAlign; offsets and segment lengths of ioAlign.
	memAlign uint32
	ioAlign  uint32
	// punch: FALLOC_FL_PUNCH_HOLE works on this file or device.
	punch bool
	// blkDiscard: the device discards and the kernel takes asynchronous
	// discard commands (BLOCK_URING_CMD_DISCARD, Linux 6.12+).
	blkDiscard bool
	log        *slog.Logger

	bounces atomic.Uint64

	mu     sync.Mutex
	queues int
	closed bool
}

var _ storage.Volume = (*Volume)(nil)

// Open opens a raw image for direct I/O.
func Open(path string, opt Options) (*Volume, error) {
	log := opt.Logger
	if log == nil {
		log = slog.Default()
	}
	flags := unix.O_DIRECT | unix.O_CLOEXEC
	if opt.ReadOnly {
		flags |= unix.O_RDONLY
	} else {
		flags |= unix.O_RDWR
	}
	fd, err := openRetry(path, flags)
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			return nil, fmt.Errorf("open %s with O_DIRECT: %w: the filesystem does not support direct I/O; put the image on ext4, xfs or a block device", path, err)
		}
		if errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) && !opt.ReadOnly {
			return nil, fmt.Errorf("open %s read-write: %w (open it read-only if the guest must not write)", path, err)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	v := &Volume{path: path, fd: fd, readOnly: opt.ReadOnly, log: log}
	if err := v.probe(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	log.Info("raw volume opened", "path", path, "size", v.size, "block_size", v.BlockSize(),
		"mem_align", v.memAlign, "block_device", v.isBlock, "read_only", v.readOnly, "async_discard", v.blkDiscard,
		"discard", v.CanDiscard(), "write_zeroes", v.CanWriteZeroes())
	return v, nil
}

func openRetry(path string, flags int) (int, error) {
	for {
		fd, err := unix.Open(path, flags, 0)
		if err == unix.EINTR {
			continue
		}
		return fd, err
	}
}

// probe learns size, alignment and fallocate support.
func (v *Volume) probe() error {
	var st unix.Statx_t
	if err := unix.Statx(v.fd, "", unix.AT_EMPTY_PATH, unix.STATX_BASIC_STATS|unix.STATX_DIOALIGN, &st); err != nil {
		return fmt.Errorf("stat %s: %w", v.path, err)
	}
	var rawSize uint64
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		rawSize = st.Size
		v.memAlign, v.ioAlign = storage.SectorSize, storage.SectorSize
		if st.Mask&unix.STATX_DIOALIGN != 0 {
			if st.Dio_offset_align == 0 {
				return fmt.Errorf("open %s: the filesystem does not support direct I/O on this file; put the image on ext4, xfs or a block device", v.path)
			}
			v.memAlign, v.ioAlign = st.Dio_mem_align, st.Dio_offset_align
		}
		// Punching a hole past the end of the file changes nothing and
		// tells whether the filesystem can deallocate.
		if !v.readOnly {
			probeOff := int64(roundUp(rawSize, 1<<16))
			err := unix.Fallocate(v.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, probeOff, 1<<16)
			v.punch = err == nil
			if err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
				v.log.Warn("raw volume: punch-hole probe failed; discard disabled", "path", v.path, "err", err)
			}
		}
	case unix.S_IFBLK:
		v.isBlock = true
		var err error
		if rawSize, err = ioctlU64(v.fd, unix.BLKGETSIZE64); err != nil {
			return fmt.Errorf("size of block device %s (BLKGETSIZE64): %w", v.path, err)
		}
		lbs, err := unix.IoctlGetInt(v.fd, unix.BLKSSZGET)
		if err != nil {
			return fmt.Errorf("logical block size of %s (BLKSSZGET): %w", v.path, err)
		}
		v.ioAlign, v.memAlign = uint32(lbs), uint32(lbs)
		if st.Mask&unix.STATX_DIOALIGN != 0 && st.Dio_mem_align != 0 {
			v.memAlign = st.Dio_mem_align
		}
		// On a block device, PUNCH_HOLE is a zeroing that may unmap but
		// never falls back to writing zeroes: it works only where the
		// device has a write-zeroes command.
		v.punch = !v.readOnly && sysfsU64(st.Rdev_major, st.Rdev_minor, "queue/write_zeroes_max_bytes") > 0
		v.blkDiscard = !v.readOnly && sysfsU64(st.Rdev_major, st.Rdev_minor, "queue/discard_max_bytes") > 0 && probeBlockDiscard(v.fd)
	default:
		return fmt.Errorf("open %s: not a regular file or block device (mode %#o); pass a raw image file or a block device", v.path, st.Mode)
	}
	if v.ioAlign < storage.SectorSize || v.ioAlign&(v.ioAlign-1) != 0 || v.memAlign == 0 || v.memAlign&(v.memAlign-1) != 0 {
		return fmt.Errorf("open %s: unusable direct I/O alignment (offset %d, memory %d)", v.path, v.ioAlign, v.memAlign)
	}
	v.size = rawSize &^ uint64(v.ioAlign-1)
	if v.size != rawSize {
		v.log.Warn("raw volume: size is not a multiple of the block size; the tail is not visible to the guest",
			"path", v.path, "size", rawSize, "block_size", v.ioAlign, "usable", v.size)
	}
	return nil
}

// probeBlockDiscard asks the kernel for a zero-length discard command: a
// kernel that knows the command rejects the length (EINVAL), an older one
// the command (EOPNOTSUPP). Nothing is discarded either way.
func probeBlockDiscard(fd int) bool {
	r, err := uring.New(1, uring.Options{})
	if err != nil {
		return false
	}
	defer r.Close()
	r.GetSQE().PrepBlockDiscard(fd, 0, 0, 0)
	var c [1]uring.CQE
	if n, err := r.Wait(c[:], 1); err != nil || n != 1 {
		return false
	}
	return c[0].Res == -int32(unix.EINVAL)
}

func ioctlU64(fd int, req uint) (uint64, error) {
	var v uint64
	for {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&v)))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, errno
		}
		return v, nil
	}
}

func sysfsU64(major, minor uint32, attr string) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/%s", major, minor, attr))
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return n
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// Path is the image path given to Open.
func (v *Volume) Path() string { return v.path }

// Size is the usable size in bytes (the image size rounded down to the block size).
func (v *Volume) Size() uint64 { return v.size }

// BlockSize is the direct I/O block size: the device's logical block size,
// or the filesystem's direct I/O offset alignment for a file.
func (v *Volume) BlockSize() uint32 { return max(v.ioAlign, storage.SectorSize) }

// ReadOnly reports whether the volume was opened read-only.
func (v *Volume) ReadOnly() bool { return v.readOnly }

// CanDiscard reports whether Discard is offered: punch hole on a file, an
// asynchronous discard command or a punch hole on a block device.
func (v *Volume) CanDiscard() bool { return !v.readOnly && (v.punch || v.blkDiscard) }

// CanWriteZeroes reports whether WriteZeroes is offered. Files need punch
// hole support (the fallback when zero-range is missing); block devices
// always zero (the kernel writes zeroes if the device cannot).
func (v *Volume) CanWriteZeroes() bool { return !v.readOnly && (v.isBlock || v.punch) }

// Bounces counts reads and writes that went through a bounce buffer
// because guest memory was not aligned for O_DIRECT.
func (v *Volume) Bounces() uint64 { return v.bounces.Load() }

// OpenQueue creates a queue with its own io_uring of depth entries.
func (v *Volume) OpenQueue(depth int) (storage.Queue, error) {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return nil, fmt.Errorf("open queue on %s: volume is closed", v.path)
	}
	v.queues++
	v.mu.Unlock()
	q, err := newQueue(v, depth)
	if err != nil {
		v.queueClosed()
		return nil, fmt.Errorf("open queue on %s: %w", v.path, err)
	}
	return q, nil
}

func (v *Volume) queueClosed() {
	v.mu.Lock()
	v.queues--
	v.mu.Unlock()
}

// Close closes the image. Every queue must be closed first.
func (v *Volume) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil
	}
	if v.queues > 0 {
		return fmt.Errorf("close %s: %d queues still open; close them first", v.path, v.queues)
	}
	v.closed = true
	if err := unix.Close(v.fd); err != nil {
		return fmt.Errorf("close %s: %w", v.path, err)
	}
	return nil
}
