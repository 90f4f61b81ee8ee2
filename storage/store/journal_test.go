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
