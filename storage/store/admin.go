package store

import (
	"errors"
	"fmt"
	"slices"
)

// Errors of admin operations.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	ErrInvalid  = errors.New("invalid argument")
	ErrBusy     = errors.New("in use")
)

const maxVolumeBytes = uint64(1<<32-1) * blockSize

// VolumeInfo describes a volume or snapshot.
type VolumeInfo struct {
	ID       uint32 `json:"id"`
	Name     string `json:"name"`
	Size     uint64 `json:"size"`
	Snapshot bool   `json:"snapshot"`
	// Source is the volume a snapshot was taken of, or the snapshot a clone
	// was made from ("" for a plain volume).
	Source string `json:"source,omitempty"`
	// MappedBlocks counts mapped 4 KiB blocks (shared ones included).
	MappedBlocks uint64 `json:"mapped_blocks"`
}

func validName(name string) error {
	if name == "" || len(name) > maxNameLen {
		return fmt.Errorf("name %q: must be 1 to %d characters: %w", name, maxNameLen, ErrInvalid)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("name %q: use only letters, digits, '-', '_' and '.': %w", name, ErrInvalid)
		}
	}
	return nil
}

func validSize(size uint64) error {
	if size == 0 || size%blockSize != 0 || size > maxVolumeBytes {
		return fmt.Errorf("size %d: must be a non-zero multiple of 4096 up to 16 TiB: %w", size, ErrInvalid)
	}
	return nil
}

func (s *Store) publish(f func(vt *volTable)) {
	vt := s.table().clone()
	f(vt)
	s.vols.Store(vt)
}

// createVolume, shareVolume, deleteVolume and resizeVolume change the
// in-memory state; both the live operations and journal replay use them so
// replay rebuilds exactly what the live store had.
func (s *Store) createVolume(id uint32, name string, size uint64) error {
	vt := s.table()
	if err := validName(name); err != nil {
		return err
	}
	if err := validSize(size); err != nil {
		return err
	}
	if vt.byName[name] != nil || vt.byID[id] != nil || id == 0 {
		return fmt.Errorf("volume %q (id %d): %w", name, id, ErrExists)
	}
	if len(vt.byID) >= maxVolumes {
		return fmt.Errorf("volume %q: at most %d volumes and snapshots: %w", name, maxVolumes, ErrNoSpace)
	}
	v := &volume{id: id, name: name, t: new(tree)}
	v.size.Store(size)
	s.publish(func(vt *volTable) {
		vt.byID[id], vt.byName[name] = v, v
		vt.nextID = max(vt.nextID, id+1)
	})
	return nil
}

func (s *Store) shareVolume(kind uint8, id, srcID uint32, name string) error {
	vt := s.table()
	if err := validName(name); err != nil {
		return err
	}
	src := vt.byID[srcID]
	if src == nil {
		return fmt.Errorf("source %d: %w", srcID, ErrNotFound)
	}
	if kind == recSnapshot && src.readOnly {
		return fmt.Errorf("%q is a snapshot; snapshot a volume or a clone: %w", src.name, ErrInvalid)
	}
	if kind == recClone && !src.readOnly {
		return fmt.Errorf("%q is not a snapshot; clones are made from snapshots: %w", src.name, ErrInvalid)
	}
	if vt.byName[name] != nil || vt.byID[id] != nil || id == 0 {
		return fmt.Errorf("%q (id %d): %w", name, id, ErrExists)
	}
	if len(vt.byID) >= maxVolumes {
		return fmt.Errorf("%q: at most %d volumes and snapshots: %w", name, maxVolumes, ErrNoSpace)
	}
	if err := s.reserveRefs(src.t.countLeaves()); err != nil {
		return fmt.Errorf("%q: metadata area full: %w", name, err)
	}
	t, _ := src.t.share()
	v := &volume{id: id, name: name, t: t, readOnly: kind == recSnapshot, src: srcID}
	v.size.Store(src.size.Load())
	s.publish(func(vt *volTable) {
		vt.byID[id], vt.byName[name] = v, v
		vt.nextID = max(vt.nextID, id+1)
	})
	return nil
}

func (s *Store) deleteVolume(id uint32, sink *blockSink) error {
	v := s.table().byID[id]
	if v == nil {
		return fmt.Errorf("volume %d: %w", id, ErrNotFound)
	}
	v.deleted.Store(true)
	s.releaseTree(v.t, sink)
	s.publish(func(vt *volTable) {
		delete(vt.byID, id)
		delete(vt.byName, v.name)
	})
	return nil
}

func (s *Store) resizeVolume(id uint32, size uint64) error {
	v := s.table().byID[id]
	if v == nil {
		return fmt.Errorf("volume %d: %w", id, ErrNotFound)
	}
	if err := validSize(size); err != nil {
		return err
	}
	if size < v.size.Load() {
		return fmt.Errorf("volume %q: shrinking from %d to %d bytes is not supported: %w", v.name, v.size.Load(), size, ErrInvalid)
	}
	if v.readOnly {
		return fmt.Errorf("%q is a snapshot: %w", v.name, ErrInvalid)
	}
	v.size.Store(size)
	return nil
}

// drainLocked moves v's queued records into the admin list, keeping them
// ahead of the admin record that follows. Caller holds admin and all of v's
// stripes.
func (s *Store) drainLocked(v *volume) {
	var n int64
	for i := range v.stripes {
		st := &v.stripes[i]
		s.admin.recs = append(s.admin.recs, st.recs...)
		s.admin.frees = append(s.admin.frees, st.frees...)
		n += int64(len(st.recs))
		st.recs, st.frees = nil, nil
	}
	s.pending.Add(-n)
}

func (s *Store) lookupName(name string) (*volume, error) {
	v := s.table().byName[name]
	if v == nil {
		return nil, fmt.Errorf("volume or snapshot %q: %w", name, ErrNotFound)
	}
	return v, nil
}

// CreateVolume creates an empty thin volume. Like every admin operation it
// is applied at once and durable after the next Sync or guest FLUSH; with an
// intent log it is durable when it returns, since the log holds only block
// map changes and those must find their volume after a process crash.
func (s *Store) CreateVolume(name string, size uint64) error {
	return s.durableAdmin(s.adminCreate(name, size))
}

func (s *Store) adminCreate(name string, size uint64) error {
	if err := s.failure(); err != nil {
		return err
	}
	s.admin.Lock()
	defer s.admin.Unlock()
	id := s.table().nextID
	if err := s.createVolume(id, name, size); err != nil {
		return fmt.Errorf("create volume: %w", err)
	}
	s.admin.recs = append(s.admin.recs, record{kind: recCreate, vol: id, size: size, name: name})
	return nil
}

// Snapshot takes a read-only, instant snapshot of a volume or clone.
func (s *Store) Snapshot(volName, name string) error {
	return s.share(recSnapshot, volName, name)
}

// Clone creates a writable volume from a snapshot.
func (s *Store) Clone(snapName, name string) error {
	return s.share(recClone, snapName, name)
}

func (s *Store) share(kind uint8, srcName, name string) error {
	return s.durableAdmin(s.adminShare(kind, srcName, name))
}

func (s *Store) adminShare(kind uint8, srcName, name string) error {
	what := map[uint8]string{recSnapshot: "snapshot", recClone: "clone"}[kind]
	if err := s.failure(); err != nil {
		return err
	}
	s.admin.Lock()
	defer s.admin.Unlock()
	src, err := s.lookupName(srcName)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	id := s.table().nextID
	src.lockAll()
	s.drainLocked(src)
	err = s.shareVolume(kind, id, src.id, name)
	src.unlockAll()
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	s.admin.recs = append(s.admin.recs, record{kind: kind, vol: id, src: src.id, name: name})
	return nil
}

// Delete removes a volume, snapshot or clone; blocks no one else references
// are freed once the deletion is durable.
func (s *Store) Delete(name string) error {
	return s.durableAdmin(s.adminDelete(name))
}

func (s *Store) adminDelete(name string) error {
	if err := s.failure(); err != nil {
		return err
	}
	s.admin.Lock()
	defer s.admin.Unlock()
	v, err := s.lookupName(name)
	if err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	if v.queues.Load() != 0 {
		return fmt.Errorf("delete %q: volume has open queues: %w", name, ErrBusy)
	}
	v.lockAll()
	s.drainLocked(v)
	err = s.deleteVolume(v.id, &s.admin.frees)
	v.unlockAll()
	if err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	s.admin.recs = append(s.admin.recs, record{kind: recDelete, vol: v.id})
	return nil
}

// Resize grows a volume.
func (s *Store) Resize(name string, size uint64) error {
	return s.durableAdmin(s.adminResize(name, size))
}

func (s *Store) adminResize(name string, size uint64) error {
	if err := s.failure(); err != nil {
		return err
	}
	s.admin.Lock()
	defer s.admin.Unlock()
	v, err := s.lookupName(name)
	if err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	if err := s.resizeVolume(v.id, size); err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	s.admin.recs = append(s.admin.recs, record{kind: recResize, vol: v.id, size: size})
	return nil
}

func (s *Store) durableAdmin(err error) error {
	if err != nil || s.in.mem == nil {
		return err
	}
	if err := s.Sync(); err != nil {
		return fmt.Errorf("applied but not durable: %w", err)
	}
	return nil
}

// List returns every volume, snapshot and clone ordered by id.
func (s *Store) List() []VolumeInfo {
	vt := s.table()
	out := make([]VolumeInfo, 0, len(vt.byID))
	for _, v := range vt.byID {
		vi := VolumeInfo{ID: v.id, Name: v.name, Size: v.size.Load(), Snapshot: v.readOnly}
		if v.src != 0 {
			if src := vt.byID[v.src]; src != nil {
				vi.Source = src.name
			} else {
				vi.Source = fmt.Sprintf("(deleted #%d)", v.src)
			}
		}
		vi.MappedBlocks = v.t.mapped()
		out = append(out, vi)
	}
	slices.SortFunc(out, func(a, b VolumeInfo) int { return int(a.ID) - int(b.ID) })
	return out
}
