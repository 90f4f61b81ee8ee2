package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage/uring"
)

// UringDisk is a Disk on an O_DIRECT file or block device driven by one
// io_uring from one goroutine locked to its thread. Other goroutines hand it
// operations through a short mutex-protected list and an eventfd; the ring
// goroutine keeps a read of that eventfd armed in the ring, so one wait in
// the kernel covers both new work and completions. Completion callbacks run
// on the ring goroutine.
type UringDisk struct {
	f    *os.File
	size uint64
	efd  int

	mu     sync.Mutex
	queue  []uringOp
	closed bool
	done   chan error
}

type uringOp struct {
	kind byte // 'r', 'w', 'f'
	off  uint64
	buf  []byte
	cb   func(error)
}

const (
	uringEntries = 256
	uringWakeTag = ^uint64(0)
)

// OpenUringDisk opens path with O_DIRECT and starts its ring.
func OpenUringDisk(path string) (*UringDisk, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s with O_DIRECT: %w", path, err)
	}
	if err := lockFile(f, path); err != nil {
		f.Close()
		return nil, err
	}
	end, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s: size: %w", path, err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s: eventfd: %w", path, err)
	}
	d := &UringDisk{f: f, size: uint64(end) &^ (blockSize - 1), efd: efd, done: make(chan error, 1)}
	ready := make(chan error, 1)
	go d.loop(ready)
	if err := <-ready; err != nil {
		unix.Close(efd)
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return d, nil
}

func (d *UringDisk) Size() uint64 { return d.size }

func (d *UringDisk) push(op uringOp) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		op.cb(errors.New("disk is closed"))
		return
	}
	d.queue = append(d.queue, op)
	d.mu.Unlock()
	one := [8]byte{1}
	_, _ = unix.Write(d.efd, one[:])
}

func (d *UringDisk) Read(off uint64, buf []byte, done func(error)) {
	d.push(uringOp{'r', off, buf, done})
}

func (d *UringDisk) Write(off uint64, buf []byte, done func(error)) {
	d.push(uringOp{'w', off, buf, done})
}

func (d *UringDisk) Flush(done func(error)) { d.push(uringOp{'f', 0, nil, done}) }

// Close stops the ring after every submitted operation has completed.
func (d *UringDisk) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	one := [8]byte{1}
	_, _ = unix.Write(d.efd, one[:])
	err := <-d.done
	unix.Close(d.efd)
	if cerr := d.f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (d *UringDisk) loop(ready chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r, err := uring.New(uringEntries, uring.Options{})
	if err != nil {
		ready <- err
		return
	}
	defer r.Close()
	ready <- nil
	fd := int(d.f.Fd())
	wakeBuf := make([]byte, 8)
	armed := false
	inflight := map[uint64]uringOp{}
	var next uint64
	var backlog []uringOp
	out := make([]uring.CQE, 64)
	for {
		if !armed {
			sqe := r.GetSQE()
			if sqe == nil {
				if _, err := r.Submit(); err != nil {
					d.done <- err
					return
				}
				continue
			}
			sqe.PrepRead(d.efd, wakeBuf, 0, uringWakeTag)
			armed = true
		}
		d.mu.Lock()
		backlog = append(backlog, d.queue...)
		d.queue = d.queue[:0]
		closing := d.closed
		d.mu.Unlock()
		for len(backlog) > 0 {
			sqe := r.GetSQE()
			if sqe == nil {
				break // submit below, the rest waits for room
			}
			op := backlog[0]
			backlog = backlog[1:]
			next++
			op.prep(sqe, fd, next)
			inflight[next] = op
		}
		if closing && len(inflight) == 0 && len(backlog) == 0 {
			d.done <- nil
			return
		}
		n, err := r.Wait(out, 1)
		if err != nil {
			d.done <- err
			return
		}
		for _, c := range out[:n] {
			if c.UserData == uringWakeTag {
				armed = false
				continue
			}
			op := inflight[c.UserData]
			delete(inflight, c.UserData)
			op.cb(uringResult(op, c.Res))
		}
	}
}

// prep fills sqe for op on fd.
func (op uringOp) prep(sqe *uring.SQE, fd int, tag uint64) {
	switch op.kind {
	case 'r':
		sqe.PrepRead(fd, op.buf, op.off, tag)
	case 'w':
		sqe.PrepWrite(fd, op.buf, op.off, tag)
	case 'f':
		sqe.PrepFsync(fd, uring.FsyncDatasync, tag)
	}
}

func uringResult(op uringOp, res int32) error {
	switch {
	case res < 0:
		return syscall.Errno(-res)
	case op.kind != 'f' && int(res) != len(op.buf):
		return fmt.Errorf("short %c of %d bytes at %d: %w", op.kind, res, op.off, io.ErrUnexpectedEOF)
	}
	return nil
}

// DiskCloser is a Disk backed by a file that must be closed.
type DiskCloser interface {
	Disk
	Close() error
}

// OpenDisk opens a store file or block device with io_uring and O_DIRECT.
// Where either is unavailable (io_uring disabled by sysctl or seccomp, a
// file system without O_DIRECT) it falls back to FileDisk and says so
// through the returned note.
func OpenDisk(path string) (DiskCloser, string, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil, "", fmt.Errorf("store %s does not exist; create it with `virtblk store create --store %s --size SIZE`", path, path)
	}
	d, err := OpenUringDisk(path)
	if err == nil {
		return d, "", nil
	}
	if errors.Is(err, ErrLocked) {
		return nil, "", err
	}
	fd, ferr := OpenFileDisk(path)
	if ferr != nil {
		return nil, "", ferr
	}
	note := fmt.Sprintf("io_uring disk unavailable (%v); using pread/pwrite", err)
	if !fd.Direct() {
		note += " without O_DIRECT"
	}
	return fd, note, nil
}
