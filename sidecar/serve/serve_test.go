package serve

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	goio "io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/virtblk/virtblk/blkio/frontend"
	"github.com/virtblk/virtblk/domainxml"
	"github.com/virtblk/virtblk/domainxml/kvsim"
	"github.com/virtblk/virtblk/sidecar"
	"github.com/virtblk/virtblk/sidecar/config"
	"github.com/virtblk/virtblk/sidecar/hooktest"
	"github.com/virtblk/virtblk/storage/store"

	"github.com/virtblk/virtblk/internal/testenv"
)

// dialEnv makes the test binary a tiny client that connects to the socket
// it names and exits 0 on success, 3 on EACCES: the permission test runs it
// as uid 107 with no capabilities, as QEMU runs in virt-launcher.
const dialEnv = "VIRTBLK_SERVE_TEST_DIAL"

func TestMain(m *testing.M) {
	if path := os.Getenv(dialEnv); path != "" {
		c, err := net.Dial("unix", path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			if errors.Is(err, syscall.EACCES) {
				os.Exit(3)
			}
			os.Exit(1)
		}
		c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const computeDir = "/var/run/kubevirt-hooks/hook-sidecar-0"

// The pipeline virtblk-hook runs: serve, then IOThreads, on KubeVirt's
// converter output, with KubeVirt's lossy re-feed between the three
// define calls. Every call must give the same XML.
func TestRewriteConvergesUnderRefeed(t *testing.T) {
	original := hooktest.Domain(t, "block-multiqueue")
	vmi := hooktest.VMI(t, map[string]string{
		config.KeyServe:     "data:1Gi",
		config.KeyIOThreads: "2",
	})
	h := sidecar.NewHandler([]sidecar.Hook{
		RenderHook{Options: RewriteOptions{ComputeHooksDir: computeDir, ReconnectSeconds: 1}},
		sidecar.IOThreadHook{},
	}, nil)
	ctx := context.Background()
	outs, err := kvsim.DefineCalls(original, 3, func(_ int, in []byte) ([]byte, error) {
		return h.Define(ctx, "v1alpha3", "", in, vmi)
	})
	if err != nil {
		t.Fatal(err)
	}
	// libvirt adds PCI addresses and root ports between calls; apart from
	// those, every call must define the same domain.
	for i := 1; i < 3; i++ {
		if a, b := canonical(t, outs[0]), canonical(t, outs[i]); !bytes.Equal(a, b) {
			t.Fatalf("call %d output differs from call 1:\n%s\n---\n%s", i+1, a, b)
		}
	}
	dom, err := domainxml.ParseDomain(outs[2])
	if err != nil {
		t.Fatal(err)
	}
	checkServedDisk(t, dom, "ua-data", computeDir+"/vhost/data.sock", 8)
	// The other disks are QEMU's, mapped onto the pool.
	m := hooktest.ReadMapping(t, outs[2])
	if len(m.Disks["ua-rootdisk"]) != 8 || len(m.Disks["ua-scratch"]) != 8 {
		t.Errorf("rootdisk and scratch should be mapped with 8 queues: %+v", m)
	}
	if _, ok := m.Disks["ua-data"]; ok {
		t.Errorf("served disk got an IOThread mapping: %+v", m)
	}
}

// canonical is kvsim.Canonical for tests.
func canonical(t *testing.T, domXML []byte) []byte {
	t.Helper()
	out, err := kvsim.Canonical(domXML)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func checkServedDisk(t *testing.T, dom *libvirtxml.Domain, alias, socket string, queues uint) {
	t.Helper()
	var disk *libvirtxml.DomainDisk
	for i := range dom.Devices.Disks {
		if d := &dom.Devices.Disks[i]; d.Alias != nil && d.Alias.Name == alias {
			disk = d
		}
	}
	if disk == nil {
		t.Fatalf("no disk %s", alias)
	}
	if disk.Source == nil || disk.Source.VHostUser == nil || disk.Source.VHostUser.UNIX == nil {
		t.Fatalf("disk %s is not a vhost-user disk: %+v", alias, disk.Source)
	}
	u := disk.Source.VHostUser.UNIX
	if u.Path != socket {
		t.Errorf("socket %q, want %q", u.Path, socket)
	}
	if u.Reconnect == nil || u.Reconnect.Enabled != "yes" {
		t.Errorf("no reconnect on %s", alias)
	}
	drv := disk.Driver
	if drv == nil || drv.Queues == nil || *drv.Queues != queues {
		t.Errorf("driver %+v, want %d queues", drv, queues)
	}
	if drv == nil || drv.QueueSize == nil || *drv.QueueSize != QueueSize {
		t.Errorf("driver %+v: want queue_size %d, the back-end device's", drv, QueueSize)
	}
	if drv != nil && (drv.IOThread != nil || drv.IOThreads != nil || drv.Cache != "" || drv.ErrorPolicy != "" || drv.Discard != "" || drv.IO != "") {
		t.Errorf("driver keeps attributes libvirt rejects on vhost-user: %+v", drv)
	}
	if disk.Serial != "" {
		t.Errorf("serial %q kept; libvirt rejects it on vhost-user", disk.Serial)
	}
	mb := dom.MemoryBacking
	if mb == nil || mb.MemoryAccess == nil || mb.MemoryAccess.Mode != "shared" || mb.MemorySource == nil || mb.MemorySource.Type != "memfd" {
		t.Errorf("memory backing not shared memfd: %+v", mb)
	}
}

func TestRewriteErrors(t *testing.T) {
	dom := hooktest.Domain(t, "block-multiqueue")
	plan := &config.ServePlan{Disks: []config.ServedDisk{{Name: "nope", Alias: "ua-nope", Size: 4096, Queues: 1}}}
	if _, _, err := Rewrite(dom, plan, RewriteOptions{ComputeHooksDir: computeDir}); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("missing disk: %v", err)
	}
	long := "/" + strings.Repeat("x", 100)
	plan.Disks[0] = config.ServedDisk{Name: "data", Alias: "ua-data", Size: 4096, Queues: 1}
	if _, _, err := Rewrite(dom, plan, RewriteOptions{ComputeHooksDir: long}); err == nil || !strings.Contains(err.Error(), "unix socket") {
		t.Errorf("long path: %v", err)
	}
	if _, _, err := Rewrite([]byte("<domain"), plan, RewriteOptions{ComputeHooksDir: computeDir}); err == nil {
		t.Error("broken XML accepted")
	}
	if out, _, err := Rewrite(dom, nil, RewriteOptions{}); err != nil || !bytes.Equal(out, dom) {
		t.Errorf("nil plan changed the domain: %v", err)
	}
}

func TestStoreSizeFromFree(t *testing.T) {
	for _, tc := range []struct {
		free, want uint64
		ok         bool
	}{
		{0, 0, false},
		{64 << 20, 0, false},
		{100 << 20, 0, false}, // 100Mi - 1.5Mi - 64Mi < 64Mi
		{1 << 30, (1<<30 - (1<<30)/64 - 64<<20), true},
		{1<<30 + 123, (1<<30 + 123 - (1<<30+123)/64 - 64<<20) &^ 4095, true},
		{1 << 50, 16<<40 - 1<<30, true},
	} {
		got, ok := StoreSizeFromFree(tc.free)
		if ok != tc.ok || (ok && got != tc.want) {
			t.Errorf("StoreSizeFromFree(%d) = %d, %v; want %d, %v", tc.free, got, ok, tc.want, tc.ok)
		}
		if ok && (got%4096 != 0 || got > tc.free) {
			t.Errorf("StoreSizeFromFree(%d) = %d: not aligned or above free space", tc.free, got)
		}
	}
}

// env is one sidecar's directories: the hooks dir (the emptyDir slice) and
// the "PVC" holding the store.
type env struct {
	hooks, pvc string
}

func newEnv(t *testing.T) env {
	t.Helper()
	// Short paths: a unix socket path holds 107 bytes. /tmp, not t.TempDir
	// alone, so that uid 107 can traverse it like kubelet's emptyDir (0777).
	root, err := os.MkdirTemp("/tmp", "serve-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	e := env{hooks: filepath.Join(root, "hooks"), pvc: filepath.Join(root, "pvc")}
	for _, d := range []string{root, e.hooks} {
		if err := os.MkdirAll(d, 0o777); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, 0o777); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func (e env) hook(t *testing.T) *Hook {
	t.Helper()
	h, err := New(Options{
		HooksDir: e.hooks, ComputeHooksDir: computeDir,
		DefaultStore: filepath.Join(e.pvc, "store.vbs"), StoreSize: 256 << 20,
		QEMUGroup: DefaultQEMUGroup,
	})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func servePlan(size string) *config.Config {
	sz := map[string]uint64{"1Gi": 1 << 30, "2Gi": 2 << 30, "512Mi": 512 << 20}[size]
	return &config.Config{Serve: &config.ServePlan{Disks: []config.ServedDisk{
		{Name: "data", Alias: "ua-data", Size: sz, Queues: 2, Serial: "data-0001"},
	}}}
}

func define(t *testing.T, h *Hook, cfg *config.Config) []byte {
	t.Helper()
	dom := hooktest.Domain(t, "block-multiqueue")
	out, _, err := h.DefineDomain(context.Background(), &sidecar.Call{Config: cfg}, dom)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// rq runs one request on slot 0 and waits for it.
func rq(t *testing.T, q *frontend.Queue, typ uint32, sector uint64, n int) {
	t.Helper()
	c, err := q.Do(typ, sector, n)
	if err != nil {
		t.Fatal(err)
	}
	if c.Status != frontend.StatusOK {
		t.Fatalf("request type %d at sector %d: status %d", typ, sector, c.Status)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func dial(t *testing.T, sock string) *frontend.Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dev, err := frontend.Dial(ctx, sock, frontend.Options{Queues: 2, QueueDepth: 4})
	if err != nil {
		t.Fatal(err)
	}
	return dev
}

// The hook creates the store and volume on first use, starts exactly one
// server however often define is called, serves real I/O, and on Shutdown
// leaves a clean store with the data in it.
func TestHookServesFromStore(t *testing.T) {
	e := newEnv(t)
	h := e.hook(t)
	port := freePort(t)
	cfg := servePlan("1Gi")
	cfg.Serve.MetricsPort = port
	out1 := define(t, h, cfg)
	out2 := define(t, h, cfg)
	if !bytes.Equal(out1, out2) {
		t.Fatal("two calls with the same input gave different XML")
	}
	socks := h.Sockets()
	sock := filepath.Join(e.hooks, "vhost", "data.sock")
	if len(socks) != 1 || socks["data"] != sock {
		t.Fatalf("sockets %v, want data at %s", socks, sock)
	}

	dev := dial(t, sock)
	info := dev.Info()
	if info.Capacity != 1<<30 || info.NumQueues != 2 || !info.Flush {
		t.Fatalf("device info %+v", info)
	}
	pattern := make([]byte, 64<<10)
	rand.New(rand.NewSource(7)).Read(pattern)
	q := dev.Queues()[1]
	copy(q.Buffer(0), pattern)
	rq(t, q, frontend.TypeOut, 2048, len(pattern))
	rq(t, q, frontend.TypeFlush, 0, 0)
	clear(q.Buffer(0))
	rq(t, q, frontend.TypeIn, 2048, len(pattern))
	if !bytes.Equal(q.Buffer(0)[:len(pattern)], pattern) {
		t.Fatal("read back differs")
	}
	rq(t, q, frontend.TypeGetID, 0, 20)
	if got := string(bytes.TrimRight(q.Buffer(0)[:20], "\x00")); got != "data-0001" {
		t.Errorf("serial %q, want data-0001", got)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	// The volume's requests are on the metrics port.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := goio.ReadAll(resp.Body)
	resp.Body.Close()
	// The 64 KiB pattern at sector 2048 maps 16 blocks of a thin volume.
	for _, want := range []string{`virtblk_requests_total{volume="data",queue="1",op="write"} 1`, `virtblk_volume_capacity_bytes{volume="data"} 1073741824`,
		`virtblk_volume_allocated_bytes{volume="data"} 65536`, `virtblk_store_free_bytes{volume="data"} `} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}

	state := filepath.Join(e.hooks, "vhost", stateFile)
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("no state file while serving: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := h.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(state); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file left after a clean shutdown: %v", err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after shutdown: %v", err)
	}
	if _, _, err := h.DefineDomain(ctx, &sidecar.Call{Config: servePlan("1Gi")}, hooktest.Domain(t, "block-multiqueue")); err == nil {
		t.Error("define after shutdown started servers")
	}

	got := readVolume(t, filepath.Join(e.pvc, "store.vbs"), "data", 2048*512, len(pattern))
	if !bytes.Equal(got, pattern) {
		t.Fatal("data not in the store after shutdown")
	}
}

// readVolume opens the store on its own, verifies every checksum and
// returns n bytes of volume at off.
func readVolume(t *testing.T, path, volume string, off uint64, n int) []byte {
	t.Helper()
	s, closeStore, err := store.OpenPath(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore()
	rep, err := s.Verify(nil)
	if err != nil || !rep.Clean() {
		t.Fatalf("store not clean: %+v %v", rep, err)
	}
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

// Volumes grow with the annotation and are never shrunk; a restarted
// sidecar reuses the store.
func TestVolumeGrowsNeverShrinks(t *testing.T) {
	e := newEnv(t)
	sizes := []struct {
		ann  string
		want uint64
	}{{"1Gi", 1 << 30}, {"2Gi", 2 << 30}, {"512Mi", 2 << 30}}
	for _, s := range sizes {
		h := e.hook(t)
		define(t, h, servePlan(s.ann))
		dev := dial(t, filepath.Join(e.hooks, "vhost", "data.sock"))
		if got := dev.Info().Capacity; got != s.want {
			t.Errorf("annotation %s: capacity %d, want %d", s.ann, got, s.want)
		}
		dev.Close()
		if err := h.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
}

// A sidecar restarted in the same pod (after a crash) serves again what
// the state file lists, without a define call.
func TestRestoreAfterRestart(t *testing.T) {
	e := newEnv(t)
	h := e.hook(t)
	define(t, h, servePlan("1Gi"))
	sock := filepath.Join(e.hooks, "vhost", "data.sock")
	dev := dial(t, sock)
	q := dev.Queues()[0]
	copy(q.Buffer(0), bytes.Repeat([]byte("restore!"), 512))
	rq(t, q, frontend.TypeOut, 0, 4096)
	rq(t, q, frontend.TypeFlush, 0, 0)
	dev.Close()
	state, err := os.ReadFile(filepath.Join(e.hooks, "vhost", stateFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	// What a crash leaves: the state file (and a stale socket file).
	if err := os.WriteFile(filepath.Join(e.hooks, "vhost", stateFile), state, 0o600); err != nil {
		t.Fatal(err)
	}
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	h2 := e.hook(t)
	if err := h2.Restore(); err != nil {
		t.Fatal(err)
	}
	defer h2.Shutdown(context.Background())
	dev = dial(t, sock)
	defer dev.Close()
	q = dev.Queues()[1]
	rq(t, q, frontend.TypeIn, 0, 4096)
	if !bytes.Equal(q.Buffer(0)[:4096], bytes.Repeat([]byte("restore!"), 512)) {
		t.Fatal("restored server serves other data")
	}
}

func TestRestoreWithoutState(t *testing.T) {
	e := newEnv(t)
	h := e.hook(t)
	if err := h.Restore(); err != nil {
		t.Fatal(err)
	}
	if len(h.Sockets()) != 0 {
		t.Fatal("restore without state started servers")
	}
	if _, err := os.Stat(filepath.Join(e.pvc, "store.vbs")); !errors.Is(err, os.ErrNotExist) {
		t.Error("restore without state created a store")
	}
	if err := os.MkdirAll(filepath.Join(e.hooks, "vhost"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.hooks, "vhost", stateFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := h.Restore(); err == nil {
		t.Error("corrupt state file accepted")
	}
}

// QEMU runs as uid/gid 107 with every capability dropped: it must be able
// to connect, and another unprivileged user must not.
func TestSocketPermissionsForQEMU(t *testing.T) {
	testenv.Root(t, "switching to uid 107")
	e := newEnv(t)
	h := e.hook(t)
	define(t, h, servePlan("1Gi"))
	defer h.Shutdown(context.Background())
	sock := filepath.Join(e.hooks, "vhost", "data.sock")
	for _, p := range []struct {
		path string
		mode os.FileMode
	}{{filepath.Dir(sock), dirMode}, {sock, socketMode}} {
		fi, err := os.Stat(p.path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != p.mode {
			t.Errorf("%s mode %v, want %v", p.path, fi.Mode().Perm(), p.mode)
		}
		if gid := fi.Sys().(*syscall.Stat_t).Gid; gid != DefaultQEMUGroup {
			t.Errorf("%s group %d, want %d", p.path, gid, DefaultQEMUGroup)
		}
	}

	// A copy of this test binary that uid 107 can execute.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(filepath.Dir(e.hooks), "dialer")
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(uid uint32) int {
		cmd := exec.Command(bin)
		cmd.Env = append(os.Environ(), dialEnv+"="+sock)
		// A non-root uid without ambient capabilities runs with an empty
		// capability set, as QEMU does in virt-launcher.
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{}}}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Logf("uid %d: exit %d: %s", uid, ee.ExitCode(), out)
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatalf("run dialer as uid %d: %v", uid, err)
		}
		return 0
	}
	if code := run(107); code != 0 {
		t.Errorf("uid 107 cannot connect (exit %d)", code)
	}
	if code := run(4242); code != 3 {
		t.Errorf("uid 4242 connect: exit %d, want 3 (EACCES)", code)
	}
}
