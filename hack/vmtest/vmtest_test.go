package vmtest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestBootEchoHello(t *testing.T) {
	res := Run(t, Config{Script: "echo hello-from-$(uname -s)\nexit 3\n"})
	if !strings.Contains(res.Console, "hello-from-Linux") {
		t.Errorf("console lacks the script's output hello-from-Linux")
	}
	if !strings.Contains(res.Console, BootedMarker) {
		t.Errorf("console lacks %s", BootedMarker)
	}
	if res.ExitCode != 3 {
		t.Errorf("exit code = %d, want 3 (the script's exit status)", res.ExitCode)
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

func TestVirtioDiskPattern(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	const offset = 1 << 20
	const size = 64 << 10
	// Each line is 16 bytes; 4096 lines fill 64 KiB.
	script := `set -e
test -b /dev/vda || { echo "no /dev/vda"; ls /sys/block; exit 10; }
i=0
while [ $i -lt 4096 ]; do printf 'virtblk-%07d\n' $i; i=$((i+1)); done > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/back bs=4096 skip=256 count=16 2>/dev/null
cmp /tmp/pat /tmp/back
echo "queues: $(ls /sys/block/vda/mq | wc -l)"
`
	res := Run(t, Config{
		Args:   []string{"-drive", "file=" + img + ",if=virtio,format=raw,cache=none"},
		Script: script,
	})
	if res.ExitCode != 0 {
		t.Fatalf("guest script failed with exit code %d", res.ExitCode)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, size+4096)
	if _, err := f.ReadAt(got, offset); err != nil {
		t.Fatalf("read back image: %v", err)
	}
	if want := pattern(size); !bytes.Equal(got[:size], want) {
		t.Fatalf("image at %d does not hold the guest's pattern: got %q... want %q...", offset, got[:32], want[:32])
	}
	if !bytes.Equal(got[size:], make([]byte, 4096)) {
		t.Errorf("guest wrote past the pattern")
	}
	head := make([]byte, offset)
	if _, err := f.ReadAt(head, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(head, make([]byte, offset)) {
		t.Errorf("guest wrote before offset %d", offset)
	}
}

func TestWriteCPIOListsWithCpioTool(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		Missing(t, "cpio not installed (hack/host-deps.sh)")
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

// fakeTB records what Missing does instead of stopping the test.
type fakeTB struct {
	testing.TB
	fatal, skip string
}

func (f *fakeTB) Helper()                         {}
func (f *fakeTB) Fatalf(format string, a ...any) { f.fatal = fmt.Sprintf(format, a...) }
func (f *fakeTB) Skipf(format string, a ...any)  { f.skip = fmt.Sprintf(format, a...) }

func TestMissingFailsUnderCI(t *testing.T) {
	t.Setenv("CI", "true")
	f := &fakeTB{TB: t}
	Missing(f, "no %s", "qemu")
	if !strings.Contains(f.fatal, "no qemu") || f.skip != "" {
		t.Fatalf("under CI=true Missing must fail, got fatal=%q skip=%q", f.fatal, f.skip)
	}
	t.Setenv("CI", "")
	f = &fakeTB{TB: t}
	Missing(f, "no qemu")
	if f.fatal != "" || !strings.Contains(f.skip, "no qemu") {
		t.Fatalf("outside CI Missing must skip, got fatal=%q skip=%q", f.fatal, f.skip)
	}
}
