package e2e

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"libvirt.org/go/libvirtxml"

	"github.com/virtblk/virtblk/domainxml"
	"github.com/virtblk/virtblk/domainxml/kvsim"
	"github.com/virtblk/virtblk/hack/vmtest"
	"github.com/virtblk/virtblk/sidecar/hookapi/info"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha3"
	"github.com/virtblk/virtblk/sidecar/hooktest"
	"github.com/virtblk/virtblk/storage/store"

	"github.com/virtblk/virtblk/internal/testenv"
)

// TestServeSidecarGuest plays virt-launcher for a VMI whose data disk is
// served by virtblk from a store on the hook sidecar's PVC: the real
// virtblk-hook binary gets Info and three OnDefineDomain calls with
// KubeVirt's lossy re-feed between them, then QEMU boots the guest on the
// socket the defined XML names (the compute container's path mapped to the
// test's hooks directory), with the memory and queue settings of that XML.
// Half-way through the guest's I/O the sidecar is SIGKILLed and restarted,
// as the kubelet would; the guest must not notice beyond a stall. Then
// Shutdown, `virtblk fsck`, and the data is read back from the store.
func TestServeSidecarGuest(t *testing.T) {
	vmtest.RequireRoot(t)
	if testing.Short() {
		t.Skip("boots a guest")
	}
	bins := map[string]string{"virtblk-hook": testenv.Build(t, "./cmd/virtblk-hook"), "virtblk": testenv.Build(t, "./cmd/virtblk")}
	root, err := os.MkdirTemp("/tmp", "srv-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	hooksDir := filepath.Join(root, "hooks") // the hook-sidecar-0 slice of the emptyDir
	pvcDir := filepath.Join(root, "pvc")     // the hookSidecars pvc mount
	for _, d := range []string{hooksDir, pvcDir} {
		if err := os.MkdirAll(d, 0o777); err != nil {
			t.Fatal(err)
		}
	}
	storePath := filepath.Join(pvcDir, "store.vbs")
	const computeDir = "/var/run/kubevirt-hooks/hook-sidecar-0"

	side := srvStartHook(t, bins["virtblk-hook"], hooksDir, storePath)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn := srvDial(t, side.sock)

	res, err := info.NewInfoClient(conn).Info(ctx, &info.InfoParams{})
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	if res.GetName() == "" || !slicesContain(res.GetVersions(), "v1alpha3") {
		t.Fatalf("Info: %+v", res)
	}

	dom := hooktest.Domain(t, "block-multiqueue")
	port := srvFreePort(t)
	vmi := hooktest.VMI(t, map[string]string{"virtblk.io/serve": "data:64Mi", "virtblk.io/iothreads": "2",
		"virtblk.io/metrics-port": strconv.Itoa(port)})
	cb := v1alpha3.NewCallbacksClient(conn)
	outs, err := kvsim.DefineCalls(dom, 3, func(_ int, in []byte) ([]byte, error) {
		r, err := cb.OnDefineDomain(ctx, &v1alpha3.OnDefineDomainParams{DomainXML: in, Vmi: vmi})
		return r.GetDomainXML(), err
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, side.stderr.String())
	}
	for i := 1; i < 3; i++ {
		if a, b := srvCanonical(t, outs[0]), srvCanonical(t, outs[i]); !bytes.Equal(a, b) {
			t.Fatalf("define call %d differs from call 1 (beyond libvirt's addresses):\n%s\n---\n%s", i+1, a, b)
		}
	}
	if n := strings.Count(side.stderr.String(), `"msg":"serving disk"`); n != 1 {
		t.Fatalf("%d servers started over three define calls, want 1:\n%s", n, side.stderr.String())
	}

	// What QEMU gets from libvirt for the final define.
	final, err := domainxml.ParseDomain(outs[2])
	if err != nil {
		t.Fatal(err)
	}
	socket, queues, queueSize := srvVhostDisk(t, final, "ua-data")
	if want := computeDir + "/vhost/data.sock"; socket != want {
		t.Fatalf("disk socket %q, want %q", socket, want)
	}
	mb := final.MemoryBacking
	if mb == nil || mb.MemoryAccess == nil || mb.MemoryAccess.Mode != "shared" || mb.MemorySource == nil || mb.MemorySource.Type != "memfd" {
		t.Fatalf("memory backing %+v: vhost-user needs shared memfd memory", mb)
	}
	// The compute container's view of the emptyDir is our hooks dir.
	hostSock := filepath.Join(hooksDir, strings.TrimPrefix(socket, computeDir+"/"))
	if fi, err := os.Stat(hostSock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("no socket at %s: %v", hostSock, err)
	}

	rng := rand.New(rand.NewSource(11))
	p1, p2 := make([]byte, 1<<20), make([]byte, 1<<20)
	rng.Read(p1)
	rng.Read(p2)
	vm := vmtest.Start(t, vmtest.Config{
		Args: []string{
			"-object", "memory-backend-memfd,id=mem,size=512M,share=on",
			"-numa", "node,memdev=mem",
			"-chardev", "socket,id=vu0,path=" + hostSock + ",reconnect=1",
			"-device", "vhost-user-blk-pci,chardev=vu0,num-queues=" + strconv.Itoa(int(queues)) + ",queue-size=" + strconv.Itoa(int(queueSize)),
		},
		Script:  srvGuestScript,
		Files:   map[string][]byte{"/p1": p1, "/p2": p2},
		Memory:  "512M",
		CPUs:    2,
		Timeout: 8 * time.Minute,
	})
	if err := vm.WaitConsole("SERVE-PHASE1", 6*time.Minute); err != nil {
		t.Fatalf("guest phase 1: %v\n%s\nsidecar:\n%s", err, srvTail(vm.Console(), 4000), srvTail(side.stderr.String(), 4000))
	}
	// Crash the sidecar; the kubelet restarts the container, and the new
	// process gets no define call.
	side.kill()
	side = srvStartHook(t, bins["virtblk-hook"], hooksDir, storePath)
	out := vm.Wait()
	if out.ExitCode != 0 || !strings.Contains(out.Console, "SERVE-ALL-OK") {
		t.Fatalf("guest exit %d\n%s\nsidecar:\n%s", out.ExitCode, srvTail(out.Console, 4000), srvTail(side.stderr.String(), 4000))
	}
	for _, want := range []string{"restored servers after a restart", "front-end connected"} {
		if !strings.Contains(side.stderr.String(), want) {
			t.Errorf("restarted sidecar did not log %q:\n%s", want, side.stderr.String())
		}
	}

	// The restarted sidecar serves the metrics port again, with the
	// guest's phase-2 writes on it.
	resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !regexp.MustCompile(`virtblk_requests_total\{volume="data",queue="\d+",op="write"\} [1-9]`).Match(body) {
		t.Errorf("no write requests of volume data in the metrics:\n%s", body)
	}

	// virt-launcher's Shutdown after QEMU exits: the process exits 0.
	if _, err := v1alpha3.NewCallbacksClient(srvDial(t, side.sock)).Shutdown(ctx, &v1alpha3.ShutdownParams{}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if code := side.wait(t); code != 0 {
		t.Fatalf("sidecar exited %d after Shutdown:\n%s", code, side.stderr.String())
	}
	if !strings.Contains(side.stderr.String(), "store flushed and closed") {
		t.Errorf("no clean store close in the log:\n%s", side.stderr.String())
	}
	if _, err := os.Lstat(hostSock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("vhost-user socket left after Shutdown: %v", err)
	}

	fsck := exec.Command(bins["virtblk"], "fsck", "--store", storePath)
	if b, err := fsck.CombinedOutput(); err != nil {
		t.Fatalf("virtblk fsck: %v\n%s", err, b)
	} else {
		t.Logf("virtblk fsck:\n%s", b)
	}
	for _, c := range []struct {
		off  uint64
		want []byte
	}{{8 << 20, p1}, {16 << 20, p2}} {
		if got := srvReadVolume(t, storePath, "data", c.off, len(c.want)); !bytes.Equal(got, c.want) {
			t.Errorf("volume data at %d MiB is not what the guest wrote", c.off>>20)
		}
	}
}

const srvGuestScript = `set -e
fail() { echo "SERVE-FAIL: $*"; exit 1; }
[ -b /dev/vda ] || fail "no /dev/vda"
[ "$(cat /sys/block/vda/size)" = 131072 ] || fail "size $(cat /sys/block/vda/size), want 64 MiB"
[ "$(cat /sys/block/vda/serial)" = data-0001 ] || fail "serial $(cat /sys/block/vda/serial)"
echo "SERVE-MQ=$(ls /sys/block/vda/mq | wc -l)"
dd if=/p1 of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || fail "write p1"
dd if=/dev/vda of=/tmp/r1 bs=1M skip=8 count=1 iflag=direct 2>/dev/null || fail "read p1"
cmp /p1 /tmp/r1 || fail "p1 read back differs"
sync
echo SERVE-PHASE1
# The host kills and restarts the sidecar now; QEMU reconnects and the
# I/O below waits for it.
sleep 2
dd if=/p2 of=/dev/vda bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null || fail "write p2"
dd if=/dev/vda of=/tmp/r2 bs=1M skip=16 count=1 iflag=direct 2>/dev/null || fail "read p2"
cmp /p2 /tmp/r2 || fail "p2 read back differs"
dd if=/dev/vda of=/tmp/r1 bs=1M skip=8 count=1 iflag=direct 2>/dev/null || fail "re-read p1"
cmp /p1 /tmp/r1 || fail "p1 differs after the sidecar restart"
sync
dmesg | grep -i "I/O error" && fail "kernel logged I/O errors"
echo SERVE-ALL-OK
`

type srvHook struct {
	cmd     *exec.Cmd
	stderr  *testenv.Buffer
	sock    string
	exited  chan struct{}
	waitErr error
}

var srvHookSockRE = regexp.MustCompile(`^virtblk-[0-9a-f]{8}\.sock$`)

// srvStartHook runs virtblk-hook as KubeVirt runs it in hook-sidecar-0 and
// waits for its hook socket.
func srvStartHook(t *testing.T, bin, hooksDir, storePath string) *srvHook {
	t.Helper()
	p := &srvHook{stderr: &testenv.Buffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, "--hooks-dir", hooksDir, "--plugin-dir", "", "--store-default", storePath,
		"--store-size", "256Mi", "--log-level", "debug")
	p.cmd.Env = append(os.Environ(), "CONTAINER_NAME=hook-sidecar-0")
	p.cmd.Stderr = p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("virtblk-hook stderr:\n%s", srvTail(p.stderr.String(), 8000))
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for p.sock == "" {
		entries, _ := os.ReadDir(hooksDir)
		for _, e := range entries {
			// A crashed predecessor's socket stays behind: wait for a
			// new one that answers.
			if srvHookSockRE.MatchString(e.Name()) && strings.Contains(p.stderr.String(), e.Name()) {
				p.sock = filepath.Join(hooksDir, e.Name())
			}
		}
		select {
		case <-p.exited:
			t.Fatalf("virtblk-hook exited early (%v):\n%s", p.waitErr, p.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("hook socket did not appear:\n%s", p.stderr.String())
		}
	}
	return p
}

func (p *srvHook) kill() {
	select {
	case <-p.exited:
	default:
		p.cmd.Process.Kill()
		<-p.exited
	}
}

func (p *srvHook) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		t.Fatal("virtblk-hook did not exit")
	}
	var ee *exec.ExitError
	if errors.As(p.waitErr, &ee) {
		return ee.ExitCode()
	}
	if p.waitErr != nil {
		t.Fatalf("wait: %v", p.waitErr)
	}
	return 0
}

func srvDial(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// srvCanonical is kvsim.Canonical for tests.
func srvCanonical(t *testing.T, domXML []byte) []byte {
	t.Helper()
	out, err := kvsim.Canonical(domXML)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// srvVhostDisk returns the socket, queue count and queue size of a
// vhost-user disk, as libvirt would pass them to QEMU.
func srvVhostDisk(t *testing.T, dom *libvirtxml.Domain, alias string) (string, uint, uint) {
	t.Helper()
	for _, d := range dom.Devices.Disks {
		if d.Alias == nil || d.Alias.Name != alias {
			continue
		}
		if d.Source == nil || d.Source.VHostUser == nil || d.Source.VHostUser.UNIX == nil {
			t.Fatalf("disk %s is not a vhost-user disk: %+v", alias, d.Source)
		}
		if d.Driver == nil || d.Driver.Queues == nil || d.Driver.QueueSize == nil {
			t.Fatalf("disk %s has no queue count or queue size: %+v", alias, d.Driver)
		}
		return d.Source.VHostUser.UNIX.Path, *d.Driver.Queues, *d.Driver.QueueSize
	}
	t.Fatalf("no disk %s", alias)
	return "", 0, 0
}

// srvReadVolume reads n bytes at off of a store volume, through the store
// itself (a second, independent reader of what the sidecar wrote).
func srvReadVolume(t *testing.T, path, volume string, off uint64, n int) []byte {
	t.Helper()
	s, closeStore, err := store.OpenPath(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore()
	v, err := s.Volume(volume)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, n)
	done := make(chan error, 1)
	v.ReadAt(buf, off, func(err error) { done <- err })
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return buf
}

func srvFreePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func slicesContain(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func srvTail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}
