package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/hack/vmtest"

	"github.com/virtblk/virtblk/internal/testenv"
)

// TestLibblkioFrontEnd drives virtblkd with a second, independent
// vhost-user-blk front-end: libblkio 1.5 (virtio-blk-vhost-user driver) as
// QEMU 10's blkio block driver, through qemu-io and qemu-img in the trixie
// root. It covers what a guest kernel does not: 512-byte writes inside a
// block, write-zeroes, discard, flush, and a whole-disk copy. Both a raw
// file and a store volume are served; afterwards the host checks the raw
// file byte for byte and fsck checks the store.
func TestLibblkioFrontEnd(t *testing.T) {
	run := vmtest.EnsureTrixie(t)
	dir := vuTempDir(t) // under /tmp, which trixie-run.sh mounts into the root
	virtblkd := testenv.Build(t, "./cmd/virtblkd")
	vb := testenv.Build(t, "./cmd/virtblk")

	// What the commands below leave on the disk, per byte range.
	const size = 64 << 20
	want := bytes.Repeat([]byte{0x5a}, size) // vuImage's fill
	set := func(off, n int, b byte) {
		for i := off; i < off+n; i++ {
			want[i] = b
		}
	}
	cmds := []string{
		"write -P 0x11 0 4k",
		"write -P 0x22 1M 1M",
		"write -P 0x33 5120 512", // one sector inside block 1: read-modify-write on a store
		"write -P 0x44 8M 128k",
		"aio_write -P 0x45 9M 64k",
		"aio_flush",
		"flush",
		"write -z 3M 128k",
		"discard 8M 64k",
		"read -P 0x11 0 4k",
		"read -P 0x33 5120 512",
		"read -P 0x22 1M 1M",
		"read -P 0 3M 128k",
		"read -P 0x44 8454144 64k", // 8M+64k: the half not discarded
		"read -P 0x45 9M 64k",
		"flush",
	}
	set(0, 4<<10, 0x11)
	set(1<<20, 1<<20, 0x22)
	set(5120, 512, 0x33)
	set(8<<20, 128<<10, 0x44)
	set(9<<20, 64<<10, 0x45)
	set(3<<20, 128<<10, 0)
	set(8<<20, 64<<10, 0) // discard: both back-ends read zeroes after it

	for _, target := range []string{"file", "store"} {
		t.Run(target, func(t *testing.T) {
			sock := filepath.Join(dir, target+".sock")
			var args []string
			var storePath, img string
			switch target {
			case "file":
				img = vuImage(t, dir)
				args = []string{"serve", "--socket", sock, "--file", img, "--queues", "2"}
			case "store":
				storePath = filepath.Join(dir, "libblkio.vbs")
				scVirtblk(t, vb, "store", "create", "--store", storePath, "--size", "256M")
				scVirtblk(t, vb, "volume", "create", "--store", storePath, "--name", "vol", "--size", "64M")
				args = []string{"serve", "--store", storePath, "--volume", "vol=" + sock, "--queues", "2"}
			}
			d := vuSpawn(t, virtblkd, sock, args...)
			opts := "driver=virtio-blk-vhost-user,path=" + sock + ",cache.direct=on"

			qio := []string{"qemu-io", "--image-opts", opts}
			for _, c := range cmds {
				qio = append(qio, "-c", c)
			}
			out, err := exec.Command(run, qio...).CombinedOutput()
			if err != nil || strings.Contains(string(out), "failed") || strings.Contains(string(out), "error") {
				t.Fatalf("qemu-io over libblkio: %v\n%s\nvirtblkd:\n%s", err, out, vuTail(d.logs(), 3000))
			}
			if n := strings.Count(string(out), "read "); n != 6 {
				t.Fatalf("qemu-io reported %d verified reads, want 6:\n%s", n, out)
			}

			// A whole-disk copy through libblkio (qemu-img's convert uses
			// large requests at depth), compared on the host.
			copyPath := filepath.Join(dir, target+"-copy.raw")
			out, err = exec.Command(run, "qemu-img", "convert", "-O", "raw", "--image-opts", opts, copyPath).CombinedOutput()
			if err != nil {
				t.Fatalf("qemu-img convert over libblkio: %v\n%s\nvirtblkd:\n%s", err, out, vuTail(d.logs(), 3000))
			}
			got, err := os.ReadFile(copyPath)
			if err != nil {
				t.Fatal(err)
			}
			exp := want
			if target == "store" {
				// A fresh thin volume reads zeroes where nothing was written.
				exp = make([]byte, size)
				copy(exp, want)
				for i := range exp {
					if want[i] == 0x5a {
						exp[i] = 0
					}
				}
			}
			if i := firstDiff(got, exp); i >= 0 {
				t.Fatalf("%s: byte %d of the copy is %#x, want %#x", target, i, got[i], exp[i])
			}
			d.stop(t)

			switch target {
			case "file":
				b, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(b, want); i >= 0 {
					t.Fatalf("image byte %d is %#x, want %#x", i, b[i], want[i])
				}
			case "store":
				out, err := exec.Command(vb, "fsck", "--store", storePath).CombinedOutput()
				if err != nil {
					t.Fatalf("fsck after libblkio I/O: %v\n%s", err, out)
				}
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}
