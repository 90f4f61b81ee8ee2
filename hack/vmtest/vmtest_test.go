package vmtest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/virtblk/virtblk/internal/testenv"
)

func TestBootEchoHello(t *testing.T) {
	for _, trixie := range []bool{false, true} {
		t.Run(fmt.Sprintf("trixie=%v", trixie), func(t *testing.T) {
			res := Run(t, Config{Script: "echo hello-from-$(uname -s)\nexit 3\n", Trixie: trixie})
			if !strings.Contains(res.Console, "hello-from-Linux") {
				t.Errorf("console lacks the script's output hello-from-Linux")
			}
			if !strings.Contains(res.Console, BootedMarker) {
				t.Errorf("console lacks %s", BootedMarker)
			}
			if res.ExitCode != 3 {
				t.Errorf("exit code = %d, want 3 (the script's exit status)", res.ExitCode)
			}
		})
	}
}

func TestBootNoScript(t *testing.T) {
	res := Run(t, Config{})
	if res.ExitCode != -1 {
		t.Errorf("exit code without a script = %d, want -1", res.ExitCode)
	}
}

// pattern is what the guest writes: a recognisable, position-dependent
// byte sequence (busybox sh generates the same bytes with printf).
func pattern(n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "virtblk-%07d\n", i)
	}
	return b.Bytes()[:n]
}

const (
	patOffset = 1 << 20
	patSize   = 64 << 10
)

// patternScript makes the guest write pattern(patSize) at patOffset of dev,
// read it back, compare, and print the device's blk-mq queue count. Each
// line is 16 bytes; 4096 lines fill 64 KiB.
func patternScript(dev string) string {
	return fmt.Sprintf(`set -e
test -b /dev/%[1]s || { echo "no /dev/%[1]s"; ls /sys/block; exit 10; }
i=0
while [ $i -lt 4096 ]; do printf 'virtblk-%%07d\n' $i; i=$((i+1)); done > /tmp/pat
dd if=/tmp/pat of=/dev/%[1]s bs=4096 seek=256 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/%[1]s of=/tmp/back bs=4096 skip=256 count=16 2>/dev/null
cmp /tmp/pat /tmp/back
echo "VBLK-MQ=$(ls /sys/block/%[1]s/mq | wc -l)"
`, dev)
}

func newImage(t *testing.T, size int64) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	return img
}

// checkPattern verifies from the host that the image holds the guest's
// pattern at patOffset and zeroes everywhere else we look.
func checkPattern(t *testing.T, img string) {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, patSize+4096)
	if _, err := f.ReadAt(got, patOffset); err != nil {
		t.Fatalf("read back image: %v", err)
	}
	if want := pattern(patSize); !bytes.Equal(got[:patSize], want) {
		t.Fatalf("image at %d does not hold the guest's pattern: got %q... want %q...", patOffset, got[:32], want[:32])
	}
	if !bytes.Equal(got[patSize:], make([]byte, 4096)) {
		t.Errorf("guest wrote past the pattern")
	}
	head := make([]byte, patOffset)
	if _, err := f.ReadAt(head, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(head, make([]byte, patOffset)) {
		t.Errorf("guest wrote before offset %d", patOffset)
	}
}

func TestVirtioDiskPattern(t *testing.T) {
	img := newImage(t, 16<<20)
	res := Run(t, Config{
		Args:   []string{"-drive", "file=" + img + ",if=virtio,format=raw,cache=none"},
		Script: patternScript("vda"),
	})
	if res.ExitCode != 0 {
		t.Fatalf("guest script failed with exit code %d", res.ExitCode)
	}
	checkPattern(t, img)
}

// TestVhostUserBlkQSD boots the guest (host QEMU) on a vhost-user-blk-pci
// disk with 2 queues served by trixie's qemu-storage-daemon: the setup
// virtblkd's tests use, with a known-good back-end.
func TestVhostUserBlkQSD(t *testing.T) {
	run := EnsureTrixie(t)
	img := newImage(t, 16<<20)
	sock := filepath.Join(filepath.Dir(img), "vhost.sock")
	qsd := exec.Command(run, "qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=disk0,filename="+img,
		"--export", "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,num-queues=2,addr.type=unix,addr.path="+sock)
	var qsdOut bytes.Buffer
	qsd.Stdout = &qsdOut
	qsd.Stderr = &qsdOut
	if err := qsd.Start(); err != nil {
		t.Fatalf("start qemu-storage-daemon: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- qsd.Wait() }()
	t.Cleanup(func() {
		qsd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("qemu-storage-daemon output:\n%s", qsdOut.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if st, err := os.Stat(sock); err == nil && st.Mode()&os.ModeSocket != 0 {
			break
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("qemu-storage-daemon exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-storage-daemon did not create %s", sock)
		}
		time.Sleep(50 * time.Millisecond)
	}
	res := Run(t, Config{
		Args: []string{
			"-object", "memory-backend-memfd,id=mem,size=512M,share=on",
			"-numa", "node,memdev=mem",
			"-chardev", "socket,id=c0,path=" + sock,
			"-device", "vhost-user-blk-pci,chardev=c0,num-queues=2",
		},
		Script: patternScript("vda"),
	})
	if res.ExitCode != 0 {
		t.Fatalf("guest script failed with exit code %d", res.ExitCode)
	}
	if !strings.Contains(res.Console, "VBLK-MQ=2") {
		t.Errorf("guest did not report 2 blk-mq queues on the vhost-user disk")
	}
	checkPattern(t, img)
}

func TestWriteCPIOListsWithCpioTool(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		testenv.Missing(t, "cpio not installed (hack/install-deps.sh)")
	}
	var buf bytes.Buffer
	files := map[string][]byte{"/test.sh": []byte("echo hi\n"), "/etc/fio/job.fio": []byte("[job]\nrw=read\n"), "odd": {1, 2, 3}}
	if err := writeCPIO(&buf, files); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d not 4-byte aligned", buf.Len())
	}
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-id", "--quiet")
	cmd.Dir = dir
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -id rejected our archive: %v\n%s", err, out)
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%s not extracted: %v", name, err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	st, err := os.Stat(filepath.Join(dir, "test.sh"))
	if err != nil || st.Mode().Perm()&0o100 == 0 {
		t.Errorf("test.sh not executable: %v %v", st, err)
	}
}

func TestWriteCPIORejectsEmptyPath(t *testing.T) {
	if err := writeCPIO(&bytes.Buffer{}, map[string][]byte{"/": nil}); err == nil {
		t.Fatal("writeCPIO accepted the root directory as a file name")
	}
}

func TestParseExit(t *testing.T) {
	cases := []struct {
		in   string
		code int
		ok   bool
	}{
		{"VIRTBLK-BOOTED\nhello\nVIRTBLK-TEST-EXIT=0\n[ 4.2] reboot: Power down\n", 0, true},
		{"VIRTBLK-TEST-EXIT=127\r\n", 127, true},
		{"VIRTBLK-TEST-EXIT=none\n", -1, true},
		{"script printed VIRTBLK-TEST-EXIT=5\nVIRTBLK-TEST-EXIT=1\n", 1, true},
		{"Kernel panic - not syncing\n", 0, false},
		{"VIRTBLK-TEST-EXIT=\n", 0, false},
		{"VIRTBLK-TEST-EXIT=99999999999999999999999\n", 0, false},
	}
	for _, c := range cases {
		code, ok := ParseExit(c.in)
		if code != c.code || ok != c.ok {
			t.Errorf("ParseExit(%q) = %d, %v; want %d, %v", c.in, code, ok, c.code, c.ok)
		}
	}
}

func FuzzParseExit(f *testing.F) {
	f.Add("VIRTBLK-TEST-EXIT=0\n")
	f.Add("VIRTBLK-TEST-EXIT=none")
	f.Add("VIRTBLK-TEST-EXIT=-1")
	f.Add("\x00VIRTBLK-TEST-EXIT=42VIRTBLK-TEST-EXIT=7")
	f.Fuzz(func(t *testing.T, s string) {
		code, ok := ParseExit(s)
		if !ok && code != 0 {
			t.Fatalf("not ok but code %d", code)
		}
		if ok && code < -1 {
			t.Fatalf("negative code %d", code)
		}
		if ok != strings.Contains(s, exitMarker) && ok {
			t.Fatalf("ok without marker in %q", s)
		}
	})
}
