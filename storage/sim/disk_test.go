package sim

import (
	"bytes"
	"errors"
	"testing"
)

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func run(t *testing.T, d *Disk) {
	t.Helper()
	for d.Step() {
	}
}

func TestFlushSurvivesCrashUnflushedLost(t *testing.T) {
	d := New(Options{Seed: 1, Size: 1 << 16, LoseUnflushed: 1})
	var order []string
	d.Write(0, fill(1, 4096), func(err error) { order = append(order, "w1") })
	run(t, d)
	d.Flush(func(error) { order = append(order, "f") })
	// Submitted after the flush: not covered by it.
	d.Write(4096, fill(2, 512), func(error) { order = append(order, "w2") })
	run(t, d)
	if len(order) != 3 {
		t.Fatalf("callbacks %v", order)
	}
	d.Crash()
	got := make([]byte, 4608)
	d.Read(0, got, func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	})
	run(t, d)
	if !bytes.Equal(got[:4096], fill(1, 4096)) {
		t.Fatal("flushed write lost")
	}
	if !bytes.Equal(got[4096:], make([]byte, 512)) {
		t.Fatal("unflushed write survived with LoseUnflushed=1")
	}
}

func TestCrashDropsPendingAndTears(t *testing.T) {
	d := New(Options{Seed: 2, Size: 1 << 20, TornWrite: 1})
	called := false
	for i := range 64 {
		d.Write(uint64(i)*8192, fill(0xab, 8192), func(error) { called = true })
	}
	d.Crash()
	if called || d.Pending() != 0 {
		t.Fatal("crash must drop in-flight operations without calling back")
	}
	img := d.Image()
	var some, all int
	for i := range 64 {
		n := 0
		for s := range 16 {
			if img[i*8192+s*512] == 0xab && img[i*8192+s*512+511] == 0xab {
				n++
			}
		}
		if n > 0 {
			some++
		}
		if n == 16 {
			all++
		}
	}
	if some == 0 || all == 64 || d.Faults["torn"] != 64 {
		t.Fatalf("torn writes: %d partly and %d fully persisted, faults %v", some, all, d.Faults)
	}
}

func TestLatentErrorAndRewrite(t *testing.T) {
	d := New(Options{Seed: 3, Size: 1 << 16})
	d.SetLatent(1024)
	var err error
	d.Read(0, make([]byte, 4096), func(e error) { err = e })
	run(t, d)
	if !errors.Is(err, ErrLatent) || !d.Faulted(1024, 1) || d.Faulted(0, 1024) {
		t.Fatalf("latent read: %v", err)
	}
	d.Write(1024, fill(5, 512), func(error) {})
	d.Read(0, make([]byte, 4096), func(e error) { err = e })
	run(t, d)
	if err != nil {
		t.Fatalf("rewritten sector still fails: %v", err)
	}
}

func TestSameSeedSameRun(t *testing.T) {
	img := func() []byte {
		d := New(Options{Seed: 9, Size: 1 << 20, LatencyMax: 50, FaultRanges: [][2]uint64{{0, 1 << 20}},
			Misdirect: 0.1, BitRot: 0.1, LatentError: 0.1, TornWrite: 0.5, LoseUnflushed: 0.5})
		for i := range 200 {
			d.Write(uint64(i%100)*4096, fill(byte(i), 4096), func(error) {})
			if i%7 == 0 {
				d.Flush(func(error) {})
			}
			if i%3 == 0 {
				d.Step()
			}
		}
		d.Crash()
		return d.Image()
	}
	if !bytes.Equal(img(), img()) {
		t.Fatal("the same seed produced different disks")
	}
}

func TestProcessCrashKeepsCompletedWrites(t *testing.T) {
	d := New(Options{Seed: 3, Size: 1 << 16, LoseUnflushed: 1})
	d.Write(0, fill(7, 4096), func(error) {})
	run(t, d)
	called := false
	d.Write(4096, fill(9, 4096), func(error) { called = true })
	d.ProcessCrash()
	if called || d.Pending() != 0 {
		t.Fatalf("in-flight write: callback ran %v, %d still pending", called, d.Pending())
	}
	got := make([]byte, 8192)
	d.Read(0, got, func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	})
	run(t, d)
	if !bytes.Equal(got[:4096], fill(7, 4096)) {
		t.Fatal("completed unflushed write lost in a process crash")
	}
	for i := 4096; i < 8192; i += SectorSize {
		if s := got[i : i+SectorSize]; !bytes.Equal(s, fill(9, SectorSize)) && !bytes.Equal(s, make([]byte, SectorSize)) {
			t.Fatalf("sector %d of the in-flight write holds neither old nor new data", i/SectorSize)
		}
	}
	// Still only in the volatile cache: a machine crash now loses it.
	d.Crash()
	d.Read(0, got[:4096], func(error) {})
	run(t, d)
	if !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatal("unflushed write survived a machine crash with LoseUnflushed=1")
	}
}
