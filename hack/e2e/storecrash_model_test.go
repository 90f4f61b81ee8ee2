package e2e

import (
	"errors"
	"strings"
	"testing"
)

func scBlockOf(tag, lba, gen uint64) []byte {
	b := make([]byte, scBlock)
	scEncodeBlock(b, tag, lba, gen)
	return b
}

func TestSCSectorRoundTrip(t *testing.T) {
	b := scBlockOf(7, 42, 9)
	for s := 0; s < scSectorsPerB; s++ {
		info, err := scDecodeSector(b[s*scSector : (s+1)*scSector])
		if err != nil {
			t.Fatal(err)
		}
		if want := (scSectorInfo{Tag: 7, LBA: 42, Sector: uint32(s), Gen: 9}); info != want {
			t.Fatalf("sector %d: %v, want %v", s, info, want)
		}
	}
	b[100] ^= 1
	if _, err := scDecodeSector(b[:scSector]); !errors.Is(err, errSCGarbage) {
		t.Fatalf("flipped bit: %v, want garbage", err)
	}
	if _, err := scDecodeSector(make([]byte, scSector)); !errors.Is(err, errSCZero) {
		t.Fatalf("zero sector: %v", err)
	}
}

// TestSCModel drives the model through a write/flush history and checks
// that it accepts exactly what a crash may leave behind.
func TestSCModel(t *testing.T) {
	const tag = 0x77
	m := newSCModel(tag, 4)
	// lba 0: gen 1 written, completed, flushed; gen 2 written and
	// completed after the flush was submitted; gen 3 submitted only.
	m.submitted(0, 1)
	m.completedWrite(0, 1)
	snap := m.flushSnapshot()
	m.submitted(0, 2)
	m.completedWrite(0, 2)
	m.flushed(snap)
	m.submitted(0, 3)
	// lba 1: gen 4 completed, never flushed.
	m.submitted(1, 4)
	m.completedWrite(1, 4)

	ok := []struct {
		lba  int
		data []byte
		gen  uint64
	}{
		{0, scBlockOf(tag, 0, 1), 1},
		{0, scBlockOf(tag, 0, 2), 2},
		{0, scBlockOf(tag, 0, 3), 3},
		{1, make([]byte, scBlock), 0},
		{1, scBlockOf(tag, 1, 4), 4},
		{2, make([]byte, scBlock), 0},
	}
	for _, c := range ok {
		g, err := m.check(c.lba, c.data)
		if err != nil || g != c.gen {
			t.Errorf("lba %d: gen %d, %v; want gen %d accepted", c.lba, g, err, c.gen)
		}
	}
	garbage := scBlockOf(tag, 0, 2)
	garbage[4000] ^= 0x10
	torn := scBlockOf(tag, 0, 2)
	copy(torn[scSector:], scBlockOf(tag, 0, 3)[scSector:])
	bad := []struct {
		name string
		lba  int
		data []byte
		want string
	}{
		{"zeroes after a flush", 0, make([]byte, scBlock), "zeroes"},
		{"another block's data", 0, scBlockOf(tag, 1, 4), "another place"},
		{"another volume's data", 0, scBlockOf(tag+1, 0, 2), "another place"},
		{"a value older than the flushed one", 0, scBlockOf(tag, 0, 0), "found gen 0"},
		{"a value never written here", 1, scBlockOf(tag, 1, 3), "found gen 3"},
		{"garbage", 0, garbage, "self-checksum"},
		{"a torn block", 0, torn, "torn"},
	}
	for _, c := range bad {
		if _, err := m.check(c.lba, c.data); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want one mentioning %q", c.name, err, c.want)
		}
	}
	// A later flush covering gen 3 makes older values unacceptable.
	m.completedWrite(0, 3)
	m.flushed(m.flushSnapshot())
	if _, err := m.check(0, scBlockOf(tag, 0, 2)); err == nil {
		t.Error("gen 2 accepted after gen 3 was flushed")
	}
	m.rebase(1, 4)
	if _, err := m.check(1, make([]byte, scBlock)); err == nil {
		t.Error("zeroes accepted after the baseline became gen 4")
	}
}

func FuzzSCDecodeSector(f *testing.F) {
	f.Add(scBlockOf(1, 2, 3)[:scSector])
	f.Add(make([]byte, scSector))
	f.Add([]byte("VBCRASH1"))
	f.Fuzz(func(t *testing.T, p []byte) {
		info, err := scDecodeSector(p)
		if err != nil {
			return
		}
		// Anything accepted is exactly what the writer produces.
		want := make([]byte, scSector)
		scEncodeSector(want, info.Tag, info.LBA, info.Sector, info.Gen)
		if string(want) != string(p) {
			t.Fatalf("accepted a sector the writer would not write: %v", info)
		}
	})
}
