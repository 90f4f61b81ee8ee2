package e2e

import (
	"bytes"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/virtblk/virtblk/hack/vmtest"

	"github.com/virtblk/virtblk/internal/testenv"
)

// These tests boot the tiny TCG guest with a vhost-user-blk-pci disk served
// by the real virtblkd binary on a preallocated raw image, as QEMU runs it
// under libvirt: shared memfd guest RAM, a reconnecting chardev, 2 queues.

const (
	vuImageSize = 64 << 20
	vuMiB       = 1 << 20
)

// vuDaemon is one virtblkd process.
type vuDaemon struct {
	cmd  *exec.Cmd
	log  *testenv.Buffer
	done chan struct{}
}

func vuStart(t *testing.T, bin, sock, img string, extra ...string) *vuDaemon {
	t.Helper()
	args := append([]string{"serve", "--socket", sock, "--file", img, "--queues", "2", "--serial", "virtblk-e2e"}, extra...)
	return vuSpawn(t, bin, sock, args...)
}

// vuSpawn runs bin with args (a virtblkd, or a server built like it) and
// waits until it serves sock: QEMU's vhost-user-blk realize needs the
// back-end listening. The test fails if the process exits first or does
// not listen within 30 s; cleanup kills it.
func vuSpawn(t *testing.T, bin, sock string, args ...string) *vuDaemon {
	t.Helper()
	d := &vuDaemon{log: new(testenv.Buffer), done: make(chan struct{})}
	d.cmd = exec.Command(bin, args...)
	d.cmd.Stderr = d.log
	d.cmd.Stdout = d.cmd.Stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		<-d.done
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 && strings.Contains(d.logs(), "serving") {
			return d
		}
		select {
		case <-d.done:
			t.Fatalf("%s exited at start:\n%s", filepath.Base(bin), d.logs())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen on %s within 30s:\n%s", filepath.Base(bin), sock, d.logs())
		}
	}
}

func (d *vuDaemon) logs() string { return d.log.String() }

// stop sends SIGTERM and requires a clean exit 0.
func (d *vuDaemon) stop(t *testing.T) {
	t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("virtblkd did not exit within 60s of SIGTERM:\n%s", d.logs())
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("virtblkd exited %d after SIGTERM:\n%s", code, d.logs())
	}
}

var vuQueueStopRE = regexp.MustCompile(`msg="queue stopped" queue=(\d+) requests=(\d+)`)

// requestsPerQueue sums the per-worker request counts virtblkd logs when a
// worker stops.
func vuRequestsPerQueue(logs string) map[int]int {
	m := map[int]int{}
	for _, s := range vuQueueStopRE.FindAllStringSubmatch(logs, -1) {
		q, _ := strconv.Atoi(s[1])
		n, _ := strconv.Atoi(s[2])
		m[q] += n
	}
	return m
}

// vuImage creates a preallocated raw image (a real extent-backed file, as
// the benchmark and KubeVirt PVCs use).
func vuImage(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, vuImageSize); err != nil {
		t.Fatalf("preallocate %s: %v", p, err)
	}
	// Non-zero content so reads of discarded ranges prove the discard.
	junk := bytes.Repeat([]byte{0x5a}, vuImageSize)
	if _, err := f.WriteAt(junk, 0); err != nil {
		t.Fatal(err)
	}
	return p
}

func vuQEMUArgs(sock string) []string {
	return []string{
		"-object", "memory-backend-memfd,id=mem,size=512M,share=on",
		"-numa", "node,memdev=mem",
		"-chardev", "socket,id=c0,path=" + sock + ",reconnect=1",
		"-device", "vhost-user-blk-pci,chardev=c0,num-queues=2,queue-size=128",
	}
}

func vuTempDir(t *testing.T) string {
	// O_DIRECT needs a real filesystem; keep the socket path short.
	dir, err := os.MkdirTemp("/tmp", "vu-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

const vuGuestScript = `set -e
fail() { echo "VU-FAIL: $*"; exit 1; }
[ -b /dev/vda ] || fail "no /dev/vda"
nq=$(ls /sys/block/vda/mq | wc -l)
echo "VU-MQ=$nq"
[ "$nq" = 2 ] || fail "want 2 mq entries, have $nq"
echo "VU-SERIAL=$(cat /sys/block/vda/serial)"
[ "$(cat /sys/block/vda/serial)" = virtblk-e2e ] || fail "serial"
[ "$(cat /sys/block/vda/size)" = 131072 ] || fail "size $(cat /sys/block/vda/size)"

# 1. Pattern round trip (0-4 MiB), bypassing the page cache.
dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/r bs=1M count=4 iflag=direct 2>/dev/null
cmp /tmp/p /tmp/r || fail "pattern read back differs"
echo VU-PATTERN-OK

# 2. fio with verify on both queues: one job pinned to each vCPU, and
# blk-mq maps each CPU to its own hardware queue.
fio --name=verify --filename=/dev/vda --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
    --offset=8M --size=8M --offset_increment=8M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; fail "fio verify"; }
grep -q "err= 0" /tmp/fio.out || { cat /tmp/fio.out; fail "fio reported errors"; }
echo VU-FIO-OK

# 3. Discard 4-8 MiB, then it must read as zeroes.
blkdiscard -o 4194304 -l 4194304 /dev/vda || fail "blkdiscard"
dd if=/dev/zero of=/tmp/z bs=1M count=4 2>/dev/null
dd if=/dev/vda of=/tmp/d bs=1M skip=4 count=4 iflag=direct 2>/dev/null
cmp /tmp/z /tmp/d || fail "discarded range is not zero"
echo VU-DISCARD-OK

# 4. The host's pattern at 32 MiB, made durable with a flush.
dd if=/hostpattern of=/dev/vda bs=1M seek=32 conv=fsync 2>/dev/null || fail "write host pattern"
sync
echo VU-FLUSH-OK

# 5. Driver unbind/bind resets the device: QEMU stops the rings
# (GET_VRING_BASE), frees its inflight region and starts again; the data
# must still be there.
dev=$(basename $(readlink /sys/block/vda/device))
echo $dev > /sys/bus/virtio/drivers/virtio_blk/unbind
echo $dev > /sys/bus/virtio/drivers/virtio_blk/bind
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
dd if=/dev/vda of=/tmp/r2 bs=1M count=4 iflag=direct 2>/dev/null || fail "read after rebind"
cmp /tmp/p /tmp/r2 || fail "data differs after device reset"
echo VU-RESET-OK
dmesg | grep -i "I/O error" && fail "kernel logged I/O errors"
echo VU-ALL-OK
`

func TestVhostUserBlkGuest(t *testing.T) {
	vmtest.RequireRoot(t)
	bin := testenv.Build(t, "./cmd/virtblkd")
	dir := vuTempDir(t)
	img := vuImage(t, dir)
	sock := filepath.Join(dir, "vu.sock")
	d := vuStart(t, bin, sock, img)
	// vmtest fails the test itself on a guest timeout; the back-end's log
	// is what explains a stuck guest, so print it on any failure.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("virtblkd log:\n%s", vuTail(d.logs(), 8000))
		}
	})

	hostPattern := make([]byte, vuMiB)
	rand.New(rand.NewSource(42)).Read(hostPattern)
	res := vmtest.Run(t, vmtest.Config{
		Args:    vuQEMUArgs(sock),
		Script:  vuGuestScript,
		Files:   map[string][]byte{"/hostpattern": hostPattern},
		Memory:  "512M",
		CPUs:    2,
		Timeout: 8 * time.Minute,
	})
	if res.ExitCode != 0 || !strings.Contains(res.Console, "VU-ALL-OK") {
		t.Fatalf("guest script exit %d\nconsole:\n%s\nvirtblkd:\n%s", res.ExitCode, vuTail(res.Console, 4000), vuTail(d.logs(), 4000))
	}
	d.stop(t)

	per := vuRequestsPerQueue(d.logs())
	t.Logf("requests per queue: %v; worker stops: %d", per, strings.Count(d.logs(), `msg="queue stopped"`))
	if n := strings.Count(d.logs(), `msg="queue stopped"`); n < 4 {
		t.Errorf("the device reset should stop and restart both queues: %d worker stops logged", n)
	}
	if per[0] == 0 || per[1] == 0 {
		t.Errorf("both virtqueues must carry I/O, got %v\n%s", per, vuTail(d.logs(), 3000))
	}
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data[32*vuMiB:33*vuMiB], hostPattern) {
		t.Error("host pattern written by the guest is not in the image")
	}
	if !bytes.Equal(data[4*vuMiB:8*vuMiB], make([]byte, 4*vuMiB)) {
		t.Error("discarded range is not zero in the image")
	}
	if !bytes.Equal(data[40*vuMiB:41*vuMiB], bytes.Repeat([]byte{0x5a}, vuMiB)) {
		t.Error("untouched range changed")
	}
}

// TestVhostUserBlkKillRestart SIGKILLs virtblkd while the guest runs fio
// with verify, restarts it on the same socket, and requires fio to finish
// without an I/O error: QEMU reconnects and the new process resubmits the
// requests the old one had in flight (INFLIGHT_SHMFD).
func TestVhostUserBlkKillRestart(t *testing.T) {
	vmtest.RequireRoot(t)
	bin := testenv.Build(t, "./cmd/virtblkd")
	dir := vuTempDir(t)
	img := vuImage(t, dir)
	sock := filepath.Join(dir, "vu.sock")
	d1 := vuStart(t, bin, sock, img)

	script := `set -e
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "VU-FAIL: mq"; exit 1; }
fio --name=kill --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 --rw=randwrite --bs=4k \
    --size=8M --offset_increment=8M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --loops=3 --group_reporting >/tmp/fio.out 2>&1 &
fio=$!
# Tell the host once writes are flowing, so it kills the back-end mid-I/O.
while [ "$(awk '{print $5}' /sys/block/vda/stat)" -lt 500 ]; do sleep 0.2; done
echo VU-IO-RUNNING
wait $fio || { cat /tmp/fio.out; echo "VU-FAIL: fio"; exit 1; }
grep -E "err=|IOPS" /tmp/fio.out || true
if dmesg | grep -i "I/O error"; then echo "VU-FAIL: kernel I/O errors"; exit 1; fi
echo VU-ALL-OK
`
	vm := vmtest.Start(t, vmtest.Config{
		Args: vuQEMUArgs(sock), Script: script, Memory: "512M", CPUs: 2, Timeout: 10 * time.Minute,
	})
	if err := vm.WaitConsole("VU-IO-RUNNING", 5*time.Minute); err != nil {
		t.Fatalf("guest I/O did not start: %v\n%s", err, vuTail(vm.Console(), 3000))
	}
	// Kill the back-end with fio's queue-depth-32 jobs in flight.
	d1.cmd.Process.Signal(syscall.SIGKILL)
	<-d1.done
	killedLogs := d1.logs()
	d2 := vuStart(t, bin, sock, img, "--log-level", "debug")
	res := vm.Wait()
	if res.ExitCode != 0 || !strings.Contains(res.Console, "VU-ALL-OK") {
		t.Fatalf("guest exit %d after back-end restart\nconsole:\n%s\nfirst virtblkd:\n%s\nsecond virtblkd:\n%s",
			res.ExitCode, vuTail(res.Console, 4000), vuTail(killedLogs, 2000), vuTail(d2.logs(), 4000))
	}
	d2.stop(t)
	if !strings.Contains(d2.logs(), "front-end connected") {
		t.Fatalf("QEMU never reconnected to the restarted virtblkd:\n%s", d2.logs())
	}
	t.Logf("restarted back-end: %v requests per queue; resubmitted: %v",
		vuRequestsPerQueue(d2.logs()), strings.Count(d2.logs(), "resubmitting in-flight"))
}

func vuTail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}
