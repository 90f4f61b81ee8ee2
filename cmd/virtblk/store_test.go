package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/storage/store"
)

// buildVirtblk builds the command once per test binary run.
func buildVirtblk(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "virtblk")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

type result struct {
	code           int
	stdout, stderr string
}

func runBin(t *testing.T, bin string, args ...string) result {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{code, o.String(), e.String()}
}

func TestStoreCLI(t *testing.T) {
	bin := buildVirtblk(t)
	dir := t.TempDir()
	st := filepath.Join(dir, "s.store")
	ok := func(args ...string) result {
		t.Helper()
		r := runBin(t, bin, args...)
		if r.code != 0 {
			t.Fatalf("virtblk %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
		}
		return r
	}
	fails := func(code int, want string, args ...string) {
		t.Helper()
		r := runBin(t, bin, args...)
		if r.code != code || !strings.Contains(r.stderr+r.stdout, want) {
			t.Fatalf("virtblk %s: exit %d, output %q; want exit %d mentioning %q", strings.Join(args, " "), r.code, r.stderr+r.stdout, code, want)
		}
	}

	ok("store", "create", "--store", st, "--size", "96M")
	fails(1, "already exists", "store", "create", "--store", st, "--size", "96M")
	fails(2, "--size is required", "store", "create", "--store", filepath.Join(dir, "x"))
	fails(1, "size \"4Q\"", "store", "create", "--store", filepath.Join(dir, "x"), "--size", "4Q")
	fails(2, "unknown command", "frobnicate")

	ok("volume", "create", "--store", st, "--name", "vm1", "--size", "16M")
	fails(1, "already exists", "volume", "create", "--store", st, "--name", "vm1", "--size", "16M")
	fails(1, "multiple of 4096", "volume", "create", "--store", st, "--name", "odd", "--size", "1000")
	fails(2, "--name is required", "volume", "create", "--store", st, "--size", "1G")

	// Import a raw image with a hole: zero blocks stay unallocated.
	raw := make([]byte, 3<<20)
	rand.Read(raw[:1<<20])
	rand.Read(raw[2<<20:])
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	r := ok("import", "--store", st, "--name", "imported", "--from", img)
	if !strings.Contains(r.stdout, "256 zero blocks left unallocated") {
		t.Fatalf("import output %q", r.stdout)
	}
	if r.stderr != "" {
		t.Fatalf("import drew progress on a non-terminal stderr: %q", r.stderr)
	}

	ok("snapshot", "create", "--store", st, "--volume", "imported", "--name", "gold")
	ok("clone", "--store", st, "--snapshot", "gold", "--name", "vm2")
	fails(1, "not a snapshot", "clone", "--store", st, "--snapshot", "vm1", "--name", "vm3")
	ok("volume", "resize", "--store", st, "--name", "vm1", "--size", "32M")
	fails(1, "shrinking", "volume", "resize", "--store", st, "--name", "vm1", "--size", "8M")

	var vols []store.VolumeInfo
	if err := json.Unmarshal([]byte(ok("volume", "list", "--store", st, "-o", "json").stdout), &vols); err != nil {
		t.Fatal(err)
	}
	got := map[string]store.VolumeInfo{}
	for _, v := range vols {
		got[v.Name] = v
	}
	if len(vols) != 3 || got["vm1"].Size != 32<<20 || got["imported"].MappedBlocks != 512 || got["vm2"].Source != "gold" {
		t.Fatalf("volume list: %+v", vols)
	}
	table := ok("volume", "list", "--store", st).stdout
	if !strings.Contains(table, "NAME") || !strings.Contains(table, "clone") {
		t.Fatalf("volume list table:\n%s", table)
	}
	snaps := ok("snapshot", "list", "--store", st, "--volume", "imported").stdout
	if !strings.Contains(snaps, "gold") {
		t.Fatalf("snapshot list:\n%s", snaps)
	}

	// The imported data reads back through the store, and the store is
	// locked against a second opener meanwhile.
	s := openCLIStore(t, st)
	fails(1, "open in another process", "volume", "list", "--store", st)
	v, err := s.Volume("vm2")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(raw))
	ch := make(chan error, 1)
	v.ReadAt(buf, 0, func(err error) { ch <- err })
	if err := <-ch; err != nil || !bytes.Equal(buf, raw) {
		t.Fatalf("clone contents differ from the imported image (err %v)", err)
	}
	closeCLIStore(t, s)

	r = ok("fsck", "--store", st)
	if !strings.Contains(r.stdout, "clean") {
		t.Fatalf("fsck: %q", r.stdout)
	}
	var stats map[string]any
	if err := json.Unmarshal([]byte(ok("stats", "--store", st, "-o", "json").stdout), &stats); err != nil {
		t.Fatal(err)
	}
	if stats["UsedBlocks"].(float64) != 512 {
		t.Fatalf("stats: %v", stats)
	}
	if !strings.Contains(ok("stats", "--store", st).stdout, "used blocks") {
		t.Fatal("stats table")
	}

	// Rot one data block: fsck must fail and name it.
	corruptFirstDataBlock(t, st)
	r = runBin(t, bin, "fsck", "--store", st, "-o", "json")
	if r.code != 1 || !strings.Contains(r.stdout, `"checksum"`) || !strings.Contains(r.stdout, `"clean": false`) {
		t.Fatalf("fsck on a corrupt store: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}

	fails(1, "is a volume", "snapshot", "delete", "--store", st, "--name", "vm1")
	ok("snapshot", "delete", "--store", st, "--name", "gold")
	ok("volume", "delete", "--store", st, "--name", "vm2")
	fails(1, "not found", "volume", "delete", "--store", st, "--name", "vm2")

	// Damage three superblock copies: every command refuses with the cause.
	f, err := os.OpenFile(st, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 4096, 8192} {
		f.WriteAt(bytes.Repeat([]byte{0xff}, 512), off)
	}
	f.Close()
	fails(1, "no superblock quorum", "volume", "list", "--store", st)
}

type cliStore struct {
	*store.Store
	d store.DiskCloser
}

func openCLIStore(t *testing.T, path string) cliStore {
	t.Helper()
	d, _, err := store.OpenDisk(path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := store.Open(d, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return cliStore{s, d}
}

func closeCLIStore(t *testing.T, s cliStore) {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.d.Close(); err != nil {
		t.Fatal(err)
	}
}

// corruptFirstDataBlock flips a byte in the first mapped data block.
func corruptFirstDataBlock(t *testing.T, path string) {
	t.Helper()
	s := openCLIStore(t, path)
	g := s.Geometry()
	closeCLIStore(t, s)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Imported blocks are allocated from the start of the data zone;
	// block 0 is reserved, so block 1 is the first data block.
	b := make([]byte, 1)
	off := int64(g.DataOff) + 4096 + 17
	f.ReadAt(b, off)
	b[0] ^= 0x40
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}
