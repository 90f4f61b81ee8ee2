package serve

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage/store"
)

// Store sizing when the sidecar creates the store (docs/serve.md).
const (
	// minStoreBytes is the smallest store worth creating: the metadata
	// zones alone take ~17 MiB with the default geometry.
	minStoreBytes = 64 << 20
	// reserveBytes is left free on the PVC's file system besides 1/64 of
	// it, for the file system's own metadata.
	reserveBytes = 64 << 20
	// maxStoreBytes keeps the store within 2^32 data blocks of 4 KiB.
	maxStoreBytes = 16<<40 - 1<<30
)

// StoreSizeFromFree is the size the sidecar gives a new store when none is
// configured: the PVC's free space less 1/64 and 64 MiB, in whole 4 KiB
// blocks, at most 16 TiB - 1 GiB. ok is false when less than 64 MiB would
// be left.
func StoreSizeFromFree(free uint64) (size uint64, ok bool) {
	if free <= reserveBytes {
		return 0, false
	}
	size = free - free/64 - reserveBytes
	size = min(size, maxStoreBytes) &^ (4096 - 1)
	return size, size >= minStoreBytes
}

// freeBytes is the space an unprivileged process may still use on dir's
// file system.
func freeBytes(dir string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return st.Bavail * uint64(st.Bsize), nil
}

// openedStore is the open store and what closes it with its disk and
// intent log.
type openedStore struct {
	path  string
	s     *store.Store
	close func() error
}

// openOrCreateStore opens the store at path, creating and formatting it
// first when the file does not exist. Creation goes through path.new and a
// rename, so a crash half-way never leaves an unformatted file where the
// next start would take it for a damaged store.
func openOrCreateStore(path string, size uint64, log *slog.Logger) (*openedStore, bool, error) {
	created := false
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		if err := createStore(path, size, log); err != nil {
			return nil, false, err
		}
		created = true
	} else if err != nil {
		return nil, false, fmt.Errorf("store %s: %w", path, err)
	}
	s, closeStore, err := store.OpenPath(path, store.Options{Logger: log})
	if err != nil {
		if errors.Is(err, store.ErrLocked) {
			return nil, false, err
		}
		return nil, false, fmt.Errorf("%w; check it with `virtblk fsck --store %s`", err, path)
	}
	for _, r := range s.Repairs() {
		log.Warn("store repaired on open", "store", path, "repair", r)
	}
	return &openedStore{path: path, s: s, close: closeStore}, created, nil
}

func createStore(path string, size uint64, log *slog.Logger) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("create store directory %s: %w", dir, err)
	}
	if size == 0 {
		free, err := freeBytes(dir)
		if err != nil {
			return fmt.Errorf("size new store %s: %w", path, err)
		}
		var ok bool
		size, ok = StoreSizeFromFree(free)
		if !ok {
			return fmt.Errorf("create store %s: only %d bytes free in %s; mount a larger PVC there (at least 128Mi) or set --store-size", path, free, dir)
		}
	}
	size &^= 4096 - 1
	tmp := path + ".new"
	// A leftover from a crash during an earlier creation holds nothing.
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove leftover %s: %w", tmp, err)
	}
	if err := store.CreateFile(tmp, size); err != nil {
		return err
	}
	fail := func(err error) error {
		os.Remove(tmp)
		return err
	}
	d, note, err := store.OpenDisk(tmp)
	if err != nil {
		return fail(fmt.Errorf("create store %s: %w", path, err))
	}
	if note != "" {
		log.Warn("store I/O fallback", "store", tmp, "note", note)
	}
	ferr := store.Format(d, store.FormatOptions{}, store.Options{Logger: log})
	if cerr := d.Close(); ferr == nil {
		ferr = cerr
	}
	if ferr != nil {
		return fail(fmt.Errorf("format store %s: %w", path, ferr))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("create store %s: %w", path, err))
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("create store %s: %w", path, err)
	}
	log.Info("created store", "store", path, "size", size)
	return nil
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// ensureVolume makes the named volume exist with at least size bytes: it
// creates it, grows it when the annotation grew, and never shrinks it. It
// reports what it did ("created", "grown", "kept") for the log.
func ensureVolume(s *store.Store, name string, size uint64) (string, uint64, error) {
	for _, v := range s.List() {
		if v.Name != name {
			continue
		}
		switch {
		case v.Snapshot:
			return "", 0, fmt.Errorf("store entry %q is a snapshot, not a volume; rename the disk or delete the snapshot (virtblk snapshot delete)", name)
		case v.Size < size:
			if err := s.Resize(name, size); err != nil {
				return "", 0, fmt.Errorf("grow volume %s from %d to %d bytes: %w", name, v.Size, size, err)
			}
			return "grown", size, nil
		default:
			// A smaller annotation never shrinks a volume: that would
			// cut off data the guest may have written.
			return "kept", v.Size, nil
		}
	}
	if err := s.CreateVolume(name, size); err != nil {
		return "", 0, fmt.Errorf("create volume %s of %d bytes: %w", name, size, err)
	}
	return "created", size, nil
}
