package store

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrLocked: the store is open in another process.
var ErrLocked = errors.New("store is open in another process")

// IntentFileSize is the size of a new intent log file: two regions of
// about 65,000 records each, more than the writes between two commits.
const IntentFileSize = 4 << 20

// lockWait is how long OpenPath retries a held store lock. A SIGKILLed
// owner's io_uring keeps the file (and its flock) open until the kernel
// tears the ring down, a moment after the process is gone.
const lockWait = 5 * time.Second

// IntentPath is where OpenPath keeps the intent log of the store at path:
// beside a store file, or under /run/virtblk for a block device (a device
// node's directory is no place for files).
func IntentPath(path string) string {
	if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeDevice != 0 {
		abs, _ := filepath.Abs(path)
		return filepath.Join("/run/virtblk", strings.ReplaceAll(strings.TrimPrefix(abs, "/"), "/", "_")+".intent")
	}
	return path + ".intent"
}

// OpenPath opens the store file or block device at path the way every
// long-lived owner should: io_uring with O_DIRECT (falling back as OpenDisk
// does, logged), its intent log at IntentPath(path) so acknowledged writes
// survive a crash of this process, and a short wait for a killed
// predecessor's lock. close syncs and closes the store, then the disk and
// the log.
func OpenPath(path string, o Options) (s *Store, close func() error, err error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	d, note, err := OpenDisk(path)
	for deadline := time.Now().Add(lockWait); errors.Is(err, ErrLocked) && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		d, note, err = OpenDisk(path)
	}
	if err != nil {
		return nil, nil, err
	}
	if note != "" {
		o.Logger.Warn("store I/O fallback", "store", path, "note", note)
	}
	ipath := IntentPath(path)
	mem, created, err := mapIntent(ipath, path)
	if err != nil {
		d.Close()
		return nil, nil, fmt.Errorf("open store %s: %w", path, err)
	}
	boot, err := bootID()
	if err != nil {
		unix.Munmap(mem)
		if created {
			os.Remove(ipath)
		}
		d.Close()
		return nil, nil, fmt.Errorf("open store %s: %w", path, err)
	}
	o.Intent = &IntentLog{Mem: mem, Boot: boot}
	s, err = Open(d, o)
	if err != nil {
		unix.Munmap(mem)
		if created {
			os.Remove(ipath) // not a store we can open: leave nothing beside it
		}
		d.Close()
		return nil, nil, fmt.Errorf("open store %s: %w", path, err)
	}
	return s, func() error {
		err := s.Close()
		if cerr := d.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close store %s: %w", path, cerr)
		}
		if merr := unix.Munmap(mem); err == nil && merr != nil {
			err = fmt.Errorf("unmap intent log %s: %w", ipath, merr)
		}
		return err
	}, nil
}

// mapIntent maps the intent log file shared, creating it when missing. An
// existing file keeps its size: shrinking it would drop records a crashed
// predecessor left. A new file gets the store file's owner and permission
// bits, so whoever may open the store (say the sidecar as uid 107, after an
// admin made the store as root) may open its log.
func mapIntent(path, storePath string) (mem []byte, created bool, err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, false, fmt.Errorf("intent log directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err == nil {
		created = true
		var st unix.Stat_t
		if unix.Stat(storePath, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
			f.Chmod(os.FileMode(st.Mode & 0o660))
			if os.Geteuid() == 0 {
				f.Chown(int(st.Uid), int(st.Gid))
			}
		}
	} else if errors.Is(err, os.ErrExist) {
		f, err = os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return nil, false, fmt.Errorf("intent log: %w", err)
	}
	defer f.Close()
	fail := func(err error) ([]byte, bool, error) {
		if created {
			os.Remove(path)
		}
		return nil, false, err
	}
	fi, err := f.Stat()
	if err != nil {
		return fail(fmt.Errorf("intent log %s: %w", path, err))
	}
	size := fi.Size()
	if size < MinIntentSize {
		size = IntentFileSize
		if err := f.Truncate(size); err != nil {
			return fail(fmt.Errorf("intent log %s: size it to %d bytes: %w", path, size, err))
		}
	}
	if size > 1<<30 {
		return fail(fmt.Errorf("intent log %s is %d bytes, more than 1 GiB; delete it if the store is not running", path, size))
	}
	mem, err = unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail(fmt.Errorf("map intent log %s: %w", path, err))
	}
	return mem, created, nil
}

// bootID names this boot of the machine: an intent log written under
// another one is not trusted.
func bootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("read the boot id the intent log needs: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
