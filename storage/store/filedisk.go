package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// FileDisk is a Disk on a file or block device opened with O_DIRECT, so no
// page cache can hide a write error from a later fsync. I/O runs on a pool
// of goroutines doing pread/pwrite; completions call back from them.
type FileDisk struct {
	f      *os.File
	size   uint64
	direct bool
	work   chan func()
	wg     sync.WaitGroup
	once   sync.Once
	mu     sync.RWMutex
	closed bool
}

const fileDiskWorkers = 16

// CreateFile creates (or truncates) a store file of size bytes.
func CreateFile(path string, size uint64) error {
	if size%blockSize != 0 {
		return fmt.Errorf("create %s: size %d is not a multiple of 4096", path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	return nil
}

// OpenFileDisk opens path for a store. Without O_DIRECT support (tmpfs) it
// falls back to buffered I/O with fdatasync, which Direct reports.
func OpenFileDisk(path string) (*FileDisk, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	direct := true
	if errors.Is(err, unix.EINVAL) {
		direct = false
		f, err = os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
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
	d := &FileDisk{f: f, size: uint64(end) &^ (blockSize - 1), direct: direct, work: make(chan func(), 256)}
	for range fileDiskWorkers {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			for fn := range d.work {
				fn()
			}
		}()
	}
	return d, nil
}

func (d *FileDisk) Size() uint64 { return d.size }

// Direct reports whether the file is open with O_DIRECT.
func (d *FileDisk) Direct() bool { return d.direct }

// submit never blocks: completions submit follow-up I/O from worker
// goroutines, and a full channel must not deadlock them.
func (d *FileDisk) submit(fn func()) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		go fn() // the file is closed: the operation fails with EBADF
		return
	}
	select {
	case d.work <- fn:
	default:
		go fn()
	}
}

func (d *FileDisk) Read(off uint64, buf []byte, done func(error)) {
	d.submit(func() {
		n, err := d.f.ReadAt(buf, int64(off))
		if err == nil && n != len(buf) {
			err = io.ErrUnexpectedEOF
		}
		done(err)
	})
}

func (d *FileDisk) Write(off uint64, buf []byte, done func(error)) {
	d.submit(func() {
		_, err := d.f.WriteAt(buf, int64(off))
		done(err)
	})
}

func (d *FileDisk) Flush(done func(error)) {
	d.submit(func() { done(unix.Fdatasync(int(d.f.Fd()))) })
}

// Close stops the workers and closes the file. No operation may be
// outstanding.
func (d *FileDisk) Close() error {
	var err error
	d.once.Do(func() {
		d.mu.Lock()
		d.closed = true
		d.mu.Unlock()
		close(d.work)
		d.wg.Wait()
		err = d.f.Close()
	})
	return err
}

// lockFile takes an exclusive advisory lock: two processes opening one
// store would each believe they own its free blocks.
func lockFile(f *os.File, path string) error {
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return fmt.Errorf("store %s: %w (or another handle); close it first", path, ErrLocked)
	}
	if err != nil {
		return fmt.Errorf("lock %s: %w", path, err)
	}
	return nil
}
