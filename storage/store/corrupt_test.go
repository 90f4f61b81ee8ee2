package store

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/storage"
	"github.com/virtblk/virtblk/storage/sim"
)

// corruptFixture is a store with volumes, a snapshot, at least two
// checkpoints and committed journal entries after the newest checkpoint.
type corruptFixture struct {
	disk *sim.Disk
	opts Options
	geo  Geometry
	data map[string][]byte // expected contents per volume
	cur  ckptRef
	prev ckptRef
	last uint64 // last committed journal sequence
}

func newCorruptFixture(t *testing.T) *corruptFixture {
	t.Helper()
	d := sim.New(sim.Options{Seed: 7, Size: 8 << 20})
	f := &corruptFixture{disk: d, opts: Options{Pump: d.Step}, data: map[string][]byte{}}
	if err := Format(d, FormatOptions{JournalSlots: 16, SlotSize: 8192}, f.opts); err != nil {
		t.Fatal(err)
	}
	s, err := Open(d, f.opts)
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(s.CreateVolume("a", 64*blockSize))
	must(s.CreateVolume("b", 32*blockSize))
	f.data["a"] = make([]byte, 64*blockSize)
	f.data["b"] = make([]byte, 32*blockSize)
	for round := range 14 {
		for _, name := range []string{"a", "b"} {
			v, _ := s.Volume(name)
			off := uint64(round*3%int(v.Size()/blockSize)) * blockSize
			buf := bytes.Repeat([]byte{byte(round + 1), name[0]}, blockSize/2)
			must(waitIO(f.opts.Pump, func(done func(error)) { v.WriteAt(buf, off, done) }))
			copy(f.data[name][off:], buf)
		}
		if round == 5 {
			must(s.Snapshot("a", "a-snap"))
			f.data["a-snap"] = bytes.Clone(f.data["a"])
		}
		must(s.Sync())
	}
	f.geo, f.cur, f.prev, f.last = s.geo, s.c.sb.Current, s.c.sb.Previous, s.c.nextSeq-1
	if f.cur.Seq == 0 || f.prev.Seq == 0 || f.last <= f.cur.Seq {
		t.Fatalf("fixture needs two checkpoints and a journal tail: current %d previous %d last %d", f.cur.Seq, f.prev.Seq, f.last)
	}
	return f
}

// check opens the store and verifies every volume's contents.
func (f *corruptFixture) check(t *testing.T) *Store {
	t.Helper()
	s, err := Open(f.disk, f.opts)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	for name, want := range f.data {
		v, err := s.Volume(name)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		if err := waitIO(f.opts.Pump, func(done func(error)) { v.ReadAt(got, 0, done) }); err != nil {
			t.Fatalf("read %s: %v", name, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("volume %s differs after repair", name)
		}
	}
	return s
}

func TestCorruptionRepaired(t *testing.T) {
	cases := []struct {
		name   string
		damage func(f *corruptFixture)
		repair string // substring of the repair note
	}{
		{"superblock copy bit flip", func(f *corruptFixture) { f.disk.FlipBit(0, 100) }, "copy 0"},
		{"superblock copy sector", func(f *corruptFixture) { f.disk.CorruptSector(2 * blockSize) }, "copy 2"},
		{"superblock misdirected copy", func(f *corruptFixture) { f.disk.CopySector(blockSize, 3*blockSize) }, "holds copy 1"},
		{"superblock two copies lost", func(f *corruptFixture) {
			f.disk.CorruptSector(0)
			f.disk.SetLatent(blockSize)
		}, "copy 1"},
		{"journal header bit flip", func(f *corruptFixture) { f.disk.FlipBit(f.geo.headerOffset(f.last), 40) }, "header"},
		{"journal header sector", func(f *corruptFixture) { f.disk.CorruptSector(f.geo.headerOffset(f.cur.Seq + 1)) }, "header"},
		{"journal header misdirected", func(f *corruptFixture) {
			f.disk.CopySector(f.geo.headerOffset(f.last), f.geo.headerOffset(f.cur.Seq+1))
		}, "header"},
		{"journal body bit flip", func(f *corruptFixture) { f.disk.FlipBit(f.geo.bodyOffset(0, f.last)+100, 3) }, "body copy 0"},
		{"journal body sector", func(f *corruptFixture) { f.disk.CorruptSector(f.geo.bodyOffset(1, f.cur.Seq+1)) }, "body copy 1"},
		{"journal body misdirected", func(f *corruptFixture) {
			f.disk.CopySector(f.geo.bodyOffset(0, f.cur.Seq), f.geo.bodyOffset(0, f.last))
		}, "body copy 0"},
		{"journal body latent error", func(f *corruptFixture) { f.disk.SetLatent(f.geo.bodyOffset(1, f.last)) }, "body copy 1"},
		{"journal header and one body copy", func(f *corruptFixture) {
			f.disk.CorruptSector(f.geo.headerOffset(f.last))
			f.disk.FlipBit(f.geo.bodyOffset(0, f.last)+70, 1)
		}, "body copy 0"},
		{"current checkpoint bit flip", func(f *corruptFixture) { f.disk.FlipBit(f.geo.CkptOff[f.cur.Area], 300) }, "previous checkpoint"},
		{"current checkpoint latent error", func(f *corruptFixture) { f.disk.SetLatent(f.geo.CkptOff[f.cur.Area] + 512) }, "previous checkpoint"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newCorruptFixture(t)
			tc.damage(f)
			s := f.check(t)
			notes := strings.Join(s.Repairs(), "\n")
			if !strings.Contains(notes, tc.repair) {
				t.Fatalf("repairs %q do not mention %q", notes, tc.repair)
			}
			if err := s.Sync(); err != nil {
				t.Fatal(err)
			}
			// The repair is durable: a second open finds nothing to fix.
			s2 := f.check(t)
			if r := s2.Repairs(); len(r) != 0 {
				t.Fatalf("second open still repairs: %v", r)
			}
		})
	}
}

func TestCorruptionRefused(t *testing.T) {
	cases := []struct {
		name   string
		damage func(f *corruptFixture)
		where  string // substring of the error naming the location
	}{
		{"three superblock copies", func(f *corruptFixture) {
			f.disk.FlipBit(0, 99)
			f.disk.CorruptSector(blockSize)
			f.disk.CopySector(0, 2*blockSize)
		}, "no superblock quorum"},
		{"journal body both copies bit flip", func(f *corruptFixture) {
			f.disk.FlipBit(f.geo.bodyOffset(0, f.last)+100, 3)
			f.disk.FlipBit(f.geo.bodyOffset(1, f.last)+200, 3)
		}, "both body copies"},
		{"journal body both copies misdirected", func(f *corruptFixture) {
			f.disk.CopySector(f.geo.bodyOffset(0, f.cur.Seq), f.geo.bodyOffset(0, f.last))
			f.disk.CorruptSector(f.geo.bodyOffset(1, f.last))
		}, "both body copies"},
		{"journal body latent error and bit flip", func(f *corruptFixture) {
			f.disk.SetLatent(f.geo.bodyOffset(0, f.last))
			f.disk.FlipBit(f.geo.bodyOffset(1, f.last)+64, 0)
		}, "both body copies"},
		{"journal entry lost in the middle", func(f *corruptFixture) {
			f.disk.CorruptSector(f.geo.bodyOffset(0, f.cur.Seq+1))
			f.disk.CorruptSector(f.geo.bodyOffset(1, f.cur.Seq+1))
			f.disk.CorruptSector(f.geo.headerOffset(f.cur.Seq + 1))
		}, "was committed after it"},
		{"both checkpoints", func(f *corruptFixture) {
			f.disk.FlipBit(f.geo.CkptOff[f.cur.Area]+8, 1)
			f.disk.FlipBit(f.geo.CkptOff[f.prev.Area]+8, 1)
		}, "previous checkpoint"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newCorruptFixture(t)
			tc.damage(f)
			_, err := Open(f.disk, f.opts)
			if err == nil {
				t.Fatal("open succeeded on a store with unrepairable metadata damage")
			}
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.where) {
				t.Fatalf("open error %q: want ErrCorrupt naming %q", err, tc.where)
			}
		})
	}
}

// TestCorruptData shows that damaged data is detected, reported by Verify
// and never returned.
func TestCorruptData(t *testing.T) {
	f := newCorruptFixture(t)
	s := f.check(t)
	v, _ := s.Volume("b")
	e := v.v.t.lookup(0)
	p := entryBlock(e)
	if p == 0 {
		t.Fatal("block 0 of b is not mapped")
	}
	f.disk.FlipBit(f.geo.blockOffset(p)+1000, 5)
	buf := make([]byte, blockSize)
	err := waitIO(f.opts.Pump, func(done func(error)) { v.ReadAt(buf, 0, done) })
	if !errors.Is(err, storage.ErrChecksum) {
		t.Fatalf("read of a rotted block: err %v, want ErrChecksum", err)
	}
	if s.Stats().ChecksumErrors == 0 {
		t.Fatal("checksum error not counted")
	}
	rep, err := s.Verify(nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Clean() || len(rep.Findings) != 1 || rep.Findings[0].Physical != p || rep.Findings[0].Kind != "checksum" {
		t.Fatalf("verify findings %+v, want one checksum finding at block %d", rep.Findings, p)
	}
	// A latent sector error on another block is an I/O error.
	p2 := entryBlock(v.v.t.lookup(3))
	f.disk.SetLatent(f.geo.blockOffset(p2))
	err = waitIO(f.opts.Pump, func(done func(error)) { v.ReadAt(buf, 3*blockSize, done) })
	if !errors.Is(err, storage.ErrIO) || errors.Is(err, storage.ErrChecksum) {
		t.Fatalf("read of an unreadable block: %v", err)
	}
	// Misdirected: another block's data copied over this one.
	p3 := entryBlock(v.v.t.lookup(6))
	for i := range uint64(8) {
		f.disk.CopySector(f.geo.blockOffset(p)+i*512, f.geo.blockOffset(p3)+i*512)
	}
	err = waitIO(f.opts.Pump, func(done func(error)) { v.ReadAt(buf, 6*blockSize, done) })
	if !errors.Is(err, storage.ErrChecksum) {
		t.Fatalf("read of a misdirected block: %v", err)
	}
	// Rewriting the block heals it: the new data goes to a fresh block.
	want := bytes.Repeat([]byte{9}, blockSize)
	if err := waitIO(f.opts.Pump, func(done func(error)) { v.WriteAt(want, 0, done) }); err != nil {
		t.Fatal(err)
	}
	if err := waitIO(f.opts.Pump, func(done func(error)) { v.ReadAt(buf, 0, done) }); err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("after rewrite: %v", err)
	}
}
