package store

import (
	"bytes"
	"errors"
	"testing"

	"github.com/virtblk/virtblk/storage/sim"
)

// TestJournalOverflow writes more records between two flushes than the
// journal ring can hold while keeping the previous checkpoint replayable.
// The commit then goes through a checkpoint that disallows fallback; data
// must survive a crash, and a corrupt current checkpoint must now refuse
// to open instead of falling back to a checkpoint the journal no longer
// covers.
func TestJournalOverflow(t *testing.T) {
	d := sim.New(sim.Options{Seed: 3, Size: 32 << 20})
	o := Options{Pump: d.Step, CommitRecords: 1 << 30}
	if err := Format(d, FormatOptions{JournalSlots: 8, SlotSize: 4096}, o); err != nil {
		t.Fatal(err)
	}
	s, err := Open(d, o)
	if err != nil {
		t.Fatal(err)
	}
	const blocks = 3000
	if err := s.CreateVolume("v", blocks*blockSize); err != nil {
		t.Fatal(err)
	}
	v, _ := s.Volume("v")
	want := make([]byte, blocks*blockSize)
	for b := range blocks {
		buf := bytes.Repeat([]byte{byte(b), byte(b >> 8), 0x5a, 0xa5}, blockSize/4)
		copy(want[b*blockSize:], buf)
		if err := waitIO(o.Pump, func(done func(error)) { v.WriteAt(buf, uint64(b)*blockSize, done) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if s.c.sb.Current.Flags&ckptNoFallback == 0 {
		t.Fatalf("3000 records in an 8-slot journal did not commit through a checkpoint: %+v", s.c.sb.Current)
	}
	// A few more writes go through the journal again.
	for b := range 10 {
		buf := bytes.Repeat([]byte{0xee, byte(b)}, blockSize/2)
		copy(want[b*blockSize:], buf)
		if err := waitIO(o.Pump, func(done func(error)) { v.WriteAt(buf, uint64(b)*blockSize, done) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if s.c.nextSeq-1 == s.c.sb.Current.Seq {
		t.Fatal("the last writes were not journaled after the checkpoint")
	}
	d.Crash()
	s, err = Open(d, o)
	if err != nil {
		t.Fatal(err)
	}
	v, _ = s.Volume("v")
	got := make([]byte, len(want))
	if err := waitIO(o.Pump, func(done func(error)) { v.ReadAt(got, 0, done) }); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("data after crash differs (err %v)", err)
	}
	if s.c.sb.Current.Flags&ckptNoFallback == 0 {
		t.Fatal("the no-fallback flag was lost")
	}
	d.FlipBit(s.geo.CkptOff[s.c.sb.Current.Area]+64, 0)
	if _, err := Open(d, o); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("open with a corrupt no-fallback checkpoint: %v", err)
	}
}

// TestLostHeaderOfNewestEntry: the header of the newest committed entry is
// lost (a misdirected or lost write) and the entry superseded one of its
// own blocks. Open must still replay it, which needs that block intact:
// blocks an entry frees are reused only after the next entry commits.
func TestLostHeaderOfNewestEntry(t *testing.T) {
	d := sim.New(sim.Options{Seed: 4, Size: 8 << 20})
	o := Options{Pump: d.Step}
	if err := Format(d, FormatOptions{JournalSlots: 16, SlotSize: 8192}, o); err != nil {
		t.Fatal(err)
	}
	s, err := Open(d, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateVolume("v", 64*blockSize); err != nil {
		t.Fatal(err)
	}
	v, _ := s.Volume("v")
	write := func(lb uint64, b byte) {
		t.Helper()
		buf := bytes.Repeat([]byte{b}, blockSize)
		if err := waitIO(o.Pump, func(done func(error)) { v.WriteAt(buf, lb*blockSize, done) }); err != nil {
			t.Fatal(err)
		}
	}
	write(1, 1)
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	write(5, 2) // superseded in the same entry
	write(5, 3)
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	newest := s.c.nextSeq - 1
	// Later writes, completed but never committed: they would take the
	// superseded block if it were free already.
	for lb := uint64(10); lb < 20; lb++ {
		write(lb, 9)
	}
	d.Crash()
	d.CorruptSector(s.geo.headerOffset(newest))
	s, err = Open(d, o)
	if err != nil {
		t.Fatal(err)
	}
	v, _ = s.Volume("v")
	got := make([]byte, blockSize)
	if err := waitIO(o.Pump, func(done func(error)) { v.ReadAt(got, 5*blockSize, done) }); err != nil || got[0] != 3 {
		t.Fatalf("flushed write lost after its header was: err %v, byte %d", err, got[0])
	}
}
