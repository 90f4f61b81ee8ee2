package store

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/storage/sim"
)

type intentRig struct {
	t *testing.T
	d *sim.Disk
	o Options
	s *Store
}

func newIntentRig(t *testing.T, slots int) *intentRig {
	t.Helper()
	d := sim.New(sim.Options{Seed: 9, Size: 16 << 20, LatencyMax: 4, LoseUnflushed: 1})
	// No commit by record count: only Sync, FLUSH or a full intent region
	// commits, so the tests decide what is durable.
	o := Options{Pump: d.Step, CommitRecords: 1 << 30,
		Intent: &IntentLog{Mem: make([]byte, intentHeaderSize+2*(intentRegionHdr+intentSlotSize*slots)), Boot: "boot-a"}}
	if err := Format(d, FormatOptions{JournalSlots: 16, SlotSize: 8192}, o); err != nil {
		t.Fatal(err)
	}
	r := &intentRig{t: t, d: d, o: o}
	r.open()
	if err := r.s.CreateVolume("v", 64*blockSize); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *intentRig) open() {
	r.t.Helper()
	s, err := Open(r.d, r.o)
	if err != nil {
		r.t.Fatal(err)
	}
	r.s = s
}

func blockOf(tag byte) []byte { return bytes.Repeat([]byte{tag, 0x3c, ^tag, 0xc3}, blockSize/4) }

func (r *intentRig) write(lb int, tag byte) {
	r.t.Helper()
	v, err := r.s.Volume("v")
	if err != nil {
		r.t.Fatal(err)
	}
	if err := waitIO(r.o.Pump, func(done func(error)) { v.WriteAt(blockOf(tag), uint64(lb)*blockSize, done) }); err != nil {
		r.t.Fatal(err)
	}
}

func (r *intentRig) read(lb int) []byte {
	r.t.Helper()
	v, err := r.s.Volume("v")
	if err != nil {
		r.t.Fatal(err)
	}
	buf := make([]byte, blockSize)
	if err := waitIO(r.o.Pump, func(done func(error)) { v.ReadAt(buf, uint64(lb)*blockSize, done) }); err != nil {
		r.t.Fatal(err)
	}
	return buf
}

// An acknowledged write the journal never saw survives the death of the
// process, but not of the machine (it was never flushed).
func TestIntentSurvivesProcessCrash(t *testing.T) {
	r := newIntentRig(t, 64)
	r.write(1, 1)
	if err := r.s.Sync(); err != nil {
		t.Fatal(err)
	}
	r.write(1, 2) // overwrite: the new block and the freed old one
	r.write(5, 3)
	seq := r.s.c.durableSeq.Load()
	r.d.ProcessCrash()
	r.open()
	if got := r.read(1); !bytes.Equal(got, blockOf(2)) {
		t.Fatalf("block 1 after process crash: %x..., want the acknowledged overwrite", got[:4])
	}
	if got := r.read(5); !bytes.Equal(got, blockOf(3)) {
		t.Fatalf("block 5 after process crash: %x...", got[:4])
	}
	if r.s.c.durableSeq.Load() == seq {
		t.Fatal("Open did not journal the replayed records before wiping the log")
	}
	// The replayed state is durable now: a machine crash keeps it.
	r.d.Crash()
	r.o.Intent.Boot = "boot-b"
	r.open()
	if got := r.read(1); !bytes.Equal(got, blockOf(2)) {
		t.Fatalf("block 1 after process then machine crash: %x...", got[:4])
	}
	if rep := r.s.Repairs(); len(rep) != 0 {
		t.Fatalf("unexpected repairs: %v", rep)
	}
}

// After a machine crash the log's memory may hold anything; with another
// boot id it is ignored, and unflushed writes are simply gone.
func TestIntentIgnoredAfterMachineCrash(t *testing.T) {
	r := newIntentRig(t, 64)
	r.write(2, 7)
	if err := r.s.Sync(); err != nil {
		t.Fatal(err)
	}
	r.write(2, 8)
	r.d.Crash() // LoseUnflushed=1: the overwrite's data is gone too
	r.o.Intent.Boot = "boot-b"
	r.open()
	if got := r.read(2); !bytes.Equal(got, blockOf(7)) {
		t.Fatalf("block 2 after machine crash: %x..., want the flushed value", got[:4])
	}
}

// A log left by a crashed process must not be replayed once the store was
// opened and written without it: its records may name blocks reused since.
func TestIntentStaleAfterForeignWrites(t *testing.T) {
	r := newIntentRig(t, 64)
	r.write(3, 1)
	if err := r.s.Sync(); err != nil {
		t.Fatal(err)
	}
	r.write(3, 2)
	r.d.ProcessCrash()
	saved := r.o.Intent
	r.o.Intent = nil
	r.open() // another tool, no intent log: block 3 falls back to tag 1
	for lb := range 10 {
		r.write(lb+10, byte(40+lb))
	}
	r.write(3, 9)
	if err := r.s.Close(); err != nil {
		t.Fatal(err)
	}
	r.o.Intent = saved
	r.open()
	if got := r.read(3); !bytes.Equal(got, blockOf(9)) {
		t.Fatalf("block 3: %x..., the stale log was replayed over newer writes", got[:4])
	}
	for lb := range 10 {
		if got := r.read(lb + 10); !bytes.Equal(got, blockOf(byte(40+lb))) {
			t.Fatalf("block %d: %x...", lb+10, got[:4])
		}
	}
}

// When the active region is full a write is acknowledged only after a
// commit made it durable, so even a machine crash keeps it.
func TestIntentFullRegionWaitsForCommit(t *testing.T) {
	r := newIntentRig(t, 4)
	for lb := range 12 {
		r.write(lb, byte(lb+1))
	}
	if r.s.in.full.Load() == 0 {
		t.Fatal("12 writes into 4-slot regions never found a region full")
	}
	if n := r.s.in.full.Load(); n != 2 {
		t.Fatalf("%d writes found the region full, want 2 (the 5th and the 10th)", n)
	}
	r.d.Crash()
	r.o.Intent.Boot = "boot-b"
	r.open()
	// The 5th and 10th writes waited for commits that carried every write
	// before them; the last two were only logged, and the log is gone
	// with the machine.
	for lb := range 12 {
		want := blockOf(byte(lb + 1))
		if lb >= 10 {
			want = make([]byte, blockSize)
		}
		if got := r.read(lb); !bytes.Equal(got, want) {
			t.Fatalf("block %d after machine crash: %x..., want %x...", lb, got[:4], want[:4])
		}
	}
}

func TestIntentRecordsRejects(t *testing.T) {
	var uuid [16]byte
	uuid[0] = 1
	mem := make([]byte, MinIntentSize)
	var l intentLog
	l.attach(mem, uuid, "boot", 5)
	l.add(record{kind: recSet, vol: 1, lblock: 2, entry: makeEntry(3, 4)})
	if recs, why := intentRecords(mem, uuid, "boot", 5); why != "" || len(recs) != 1 || recs[0].lblock != 2 || recs[0].entry != makeEntry(3, 4) {
		t.Fatalf("own log: %v %q", recs, why)
	}
	for name, c := range map[string]struct {
		uuid    [16]byte
		boot    string
		lastSeq uint64
	}{
		"other store":       {[16]byte{2}, "boot", 5},
		"other boot":        {uuid, "boot2", 5},
		"journal moved on":  {uuid, "boot", 5 + 1},
		"journal went back": {uuid, "boot", 4},
	} {
		if recs, why := intentRecords(mem, c.uuid, c.boot, c.lastSeq); why == "" || recs != nil {
			t.Errorf("%s: replayed %v", name, recs)
		}
	}
	mem[ihBoot+1] ^= 1 // inside the boot id
	if recs, _ := intentRecords(mem, uuid, "boot", 5); recs != nil {
		t.Error("damaged header replayed")
	}
	mem[ihBoot+1] ^= 1
	// A damaged slot is skipped, not replayed as something else.
	l.region(1)[intentRegionHdr+17] ^= 0x10
	if recs, why := intentRecords(mem, uuid, "boot", 5); why != "" || len(recs) != 0 {
		t.Fatalf("damaged slot: %v %q", recs, why)
	}
}

func FuzzIntentRecords(f *testing.F) {
	var uuid [16]byte
	mem := make([]byte, MinIntentSize)
	var l intentLog
	l.attach(mem, uuid, "b", 0)
	for i := range 3 {
		l.add(record{kind: recSet, vol: 1, lblock: uint32(i), entry: makeEntry(uint32(i+1), 7)})
	}
	f.Add(append([]byte(nil), mem...))
	f.Add(make([]byte, MinIntentSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		recs, why := intentRecords(b, uuid, "b", 0)
		if why != "" && recs != nil {
			t.Fatal("records with a refusal")
		}
		for _, r := range recs {
			if r.kind != recSet {
				t.Fatalf("kind %d", r.kind)
			}
		}
	})
}

// OpenPath keeps the log beside a store file, with the store's owner and
// mode, and a second open of the same store replays nothing stale.
func TestOpenPathIntentFile(t *testing.T) {
	p := formattedFile(t, 64<<20)
	if err := os.Chmod(p, 0o640); err != nil {
		t.Fatal(err)
	}
	s, closeStore, err := OpenPath(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateVolume("v", 1<<20); err != nil {
		t.Fatal(err)
	}
	v, _ := s.Volume("v")
	if err := waitIO(nil, func(done func(error)) { v.WriteAt(blockOf(5), 0, done) }); err != nil {
		t.Fatal(err)
	}
	// A second opener is refused while the first holds the store.
	if _, _, err := OpenDisk(p); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
	if err := closeStore(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(IntentPath(p))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o640 || fi.Size() != IntentFileSize {
		t.Fatalf("intent file mode %v size %d, want 0640 and %d", fi.Mode().Perm(), fi.Size(), IntentFileSize)
	}
	s, closeStore, err = OpenPath(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore()
	v, _ = s.Volume("v")
	got := make([]byte, blockSize)
	if err := waitIO(nil, func(done func(error)) { v.ReadAt(got, 0, done) }); err != nil || !bytes.Equal(got, blockOf(5)) {
		t.Fatalf("reopen: %v, data intact %v", err, bytes.Equal(got, blockOf(5)))
	}
}

// Opening something that is not a store leaves no intent file beside it,
// and a missing store says how to make one.
func TestOpenPathRefusals(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.vbs")
	if err := os.WriteFile(junk, make([]byte, 64<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := OpenPath(junk, Options{}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("open of a zeroed file: %v, want ErrCorrupt", err)
	}
	if _, err := os.Stat(IntentPath(junk)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("intent file left beside a file that is not a store: %v", err)
	}
	missing := filepath.Join(dir, "missing.vbs")
	if _, _, err := OpenPath(missing, Options{}); err == nil || !strings.Contains(err.Error(), "virtblk store create") {
		t.Fatalf("open of a missing store: %v, want a hint to create it", err)
	}
}

// Admin operations are durable on return with an intent log (they Sync);
// under a steady stream of writes, commits follow each other without a
// gap, and a Sync must still return (it waits for its own commit, not for
// a quiet store).
func TestAdminDurableUnderSteadyWrites(t *testing.T) {
	p := formattedFile(t, 128<<20)
	s, closeStore, err := OpenPath(p, Options{CommitRecords: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore()
	if err := s.CreateVolume("busy", 16<<20); err != nil {
		t.Fatal(err)
	}
	v, _ := s.Volume("busy")
	stop := make(chan struct{})
	const writers = 16
	done := make(chan error, writers)
	for w := range writers {
		go func() {
			buf := blockOf(byte(w))
			for i := 0; ; i++ {
				select {
				case <-stop:
					done <- nil
					return
				default:
				}
				if err := waitIO(nil, func(d func(error)) { v.WriteAt(buf, uint64((w*256+i%256))*blockSize, d) }); err != nil {
					done <- err
					return
				}
			}
		}()
	}
	for i := range 5 {
		if err := s.CreateVolume(fmt.Sprintf("v%d", i), 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	for range writers {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

// formattedFile makes a formatted store file of size bytes in a temp dir.
func formattedFile(t *testing.T, size uint64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "s.vbs")
	if err := CreateFile(p, size); err != nil {
		t.Fatal(err)
	}
	d, _, err := OpenDisk(p)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := Format(d, FormatOptions{}, Options{}); err != nil {
		t.Fatal(err)
	}
	return p
}
