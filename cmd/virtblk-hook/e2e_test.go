package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/virtblk/virtblk/domainxml/kvsim"
	"github.com/virtblk/virtblk/sidecar/hookapi/info"
	pluginsv1alpha1 "github.com/virtblk/virtblk/sidecar/hookapi/plugins/v1alpha1"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha1"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha2"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha3"
	"github.com/virtblk/virtblk/sidecar/hooktest"

	"github.com/virtblk/virtblk/internal/testenv"
)

// fixtureAnnotations match testdata/vmi-fio-runner.json.
var fixtureAnnotations = map[string]string{
	"virtblk.io/iothreads":      "4",
	"virtblk.io/disks":          "data,scratch",
	"virtblk.io/queue-map.data": "1,1,2,2,3,3,4,4",
}

// wantMapping is fixtureAnnotations applied to block-multiqueue.xml: the
// rootdisk keeps KubeVirt's IOThread 1, the pool is 2-5.
var wantMapping = hooktest.Mapping{
	IOThreads: 5,
	Disks: map[string][]uint{
		"ua-data":    {2, 2, 3, 3, 4, 4, 5, 5},
		"ua-scratch": {2, 3, 4, 5, 2, 3, 4, 5},
	},
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// binary builds virtblk-hook once per test run, into a temporary directory.
func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "virtblk-hook-e2e")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "virtblk-hook")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = errors.New("go build: " + err.Error() + "\n" + string(out))
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// shortDir is a fresh directory with a short path: unix socket paths are
// limited to 107 bytes and t.TempDir embeds the test name.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

type hookProcess struct {
	cmd                  *exec.Cmd
	stderr               *testenv.Buffer
	hookSock, pluginSock string
	exited               chan struct{}
	waitErr              error
}

// startHook runs the sidecar binary on fresh socket directories and waits
// until both sockets exist.
func startHook(t *testing.T) *hookProcess {
	t.Helper()
	hooksDir := shortDir(t)
	pluginDir := filepath.Join(shortDir(t), "virtblk")
	p := &hookProcess{stderr: &testenv.Buffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(binary(t), "--hooks-dir", hooksDir, "--plugin-dir", pluginDir, "--log-level", "debug")
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("virtblk-hook stderr:\n%s", p.stderr.String())
		}
	})
	p.pluginSock = filepath.Join(pluginDir, "virtblk.sock")
	deadline := time.Now().Add(60 * time.Second)
	for {
		entries, _ := os.ReadDir(hooksDir)
		if len(entries) == 1 {
			if _, err := os.Stat(p.pluginSock); err == nil {
				p.hookSock = filepath.Join(hooksDir, entries[0].Name())
				break
			}
		}
		select {
		case <-p.exited:
			t.Fatalf("virtblk-hook exited early (%v):\n%s", p.waitErr, p.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("sockets did not appear:\n%s", p.stderr.String())
		}
	}
	if !regexp.MustCompile(`^virtblk-[0-9a-f]{8}\.sock$`).MatchString(filepath.Base(p.hookSock)) {
		t.Fatalf("hook socket name %s", p.hookSock)
	}
	return p
}

// waitExit waits for the process and returns its exit code.
func (p *hookProcess) waitExit(t *testing.T) int {
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

func (p *hookProcess) assertSocketsRemoved(t *testing.T) {
	t.Helper()
	for _, s := range []string{p.hookSock, p.pluginSock} {
		if _, err := os.Lstat(s); !os.IsNotExist(err) {
			t.Errorf("socket %s still exists (%v)", s, err)
		}
	}
}

func dial(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestSidecarEndToEnd(t *testing.T) {
	p := startHook(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn := dial(t, p.hookSock)
	dom := hooktest.Domain(t, "block-multiqueue")
	vmi := hooktest.VMI(t, fixtureAnnotations)

	t.Run("Info", func(t *testing.T) {
		res, err := info.NewInfoClient(conn).Info(ctx, &info.InfoParams{})
		if err != nil {
			t.Fatal(err)
		}
		var points []string
		for _, hp := range res.GetHookPoints() {
			points = append(points, hp.GetName())
		}
		if res.GetName() != "virtblk" ||
			!reflect.DeepEqual(points, []string{"OnDefineDomain", "Shutdown"}) ||
			!reflect.DeepEqual(res.GetVersions(), []string{"v1alpha1", "v1alpha2", "v1alpha3"}) {
			t.Fatalf("Info = %v", res)
		}
	})

	t.Run("OnDefineDomain every version", func(t *testing.T) {
		r1, err := v1alpha1.NewCallbacksClient(conn).OnDefineDomain(ctx, &v1alpha1.OnDefineDomainParams{DomainXML: dom, Vmi: vmi})
		if err != nil {
			t.Fatalf("v1alpha1: %v", err)
		}
		r2, err := v1alpha2.NewCallbacksClient(conn).OnDefineDomain(ctx, &v1alpha2.OnDefineDomainParams{DomainXML: dom, Vmi: vmi})
		if err != nil {
			t.Fatalf("v1alpha2: %v", err)
		}
		r3, err := v1alpha3.NewCallbacksClient(conn).OnDefineDomain(ctx, &v1alpha3.OnDefineDomainParams{DomainXML: dom, Vmi: vmi})
		if err != nil {
			t.Fatalf("v1alpha3: %v", err)
		}
		for i, out := range [][]byte{r1.GetDomainXML(), r2.GetDomainXML(), r3.GetDomainXML()} {
			if m := hooktest.ReadMapping(t, out); !reflect.DeepEqual(m, wantMapping) {
				t.Errorf("v1alpha%d mapping %+v\nwant %+v", i+1, m, wantMapping)
			}
		}
		if !bytes.Equal(r1.GetDomainXML(), r3.GetDomainXML()) || !bytes.Equal(r2.GetDomainXML(), r3.GetDomainXML()) {
			t.Error("versions returned different XML for the same input")
		}
	})

	t.Run("three lossy calls", func(t *testing.T) {
		cb := v1alpha3.NewCallbacksClient(conn)
		call := func(in []byte) []byte {
			t.Helper()
			r, err := cb.OnDefineDomain(ctx, &v1alpha3.OnDefineDomainParams{DomainXML: in, Vmi: vmi})
			if err != nil {
				t.Fatal(err)
			}
			return r.GetDomainXML()
		}
		out1 := call(dom)
		in2, err := kvsim.Refeed(dom, out1)
		if err != nil {
			t.Fatal(err)
		}
		if m := hooktest.ReadMapping(t, in2); len(m.Disks) != 0 {
			t.Fatalf("re-feed kept <queue> mappings %+v; the simulation is not lossy", m)
		}
		out2 := call(in2)
		in3, err := kvsim.RefeedAddingRootPorts(dom, out2, 3)
		if err != nil {
			t.Fatal(err)
		}
		out3 := call(in3)
		for i, out := range [][]byte{out1, out2, out3} {
			if m := hooktest.ReadMapping(t, out); !reflect.DeepEqual(m, wantMapping) {
				t.Errorf("call %d mapping %+v\nwant %+v", i+1, m, wantMapping)
			}
		}
	})

	t.Run("MutateDomain on both sockets", func(t *testing.T) {
		for _, sock := range []string{p.hookSock, p.pluginSock} {
			r, err := pluginsv1alpha1.NewDomainHookServiceClient(dial(t, sock)).MutateDomain(ctx, &pluginsv1alpha1.MutateDomainRequest{
				DomainType: "libvirt", Domain: dom, Vmi: vmi,
				SidecarContext: &pluginsv1alpha1.SidecarContext{InvocationContext: "Boot"},
			})
			if err != nil {
				t.Fatalf("%s: %v", sock, err)
			}
			if m := hooktest.ReadMapping(t, r.GetDomain()); !reflect.DeepEqual(m, wantMapping) {
				t.Errorf("%s: mapping %+v", sock, m)
			}
		}
	})

	t.Run("invalid annotation", func(t *testing.T) {
		bad := hooktest.VMI(t, map[string]string{
			"virtblk.io/iothreads": "4", "virtblk.io/queues": "0", "virtblk.io/disks": "data,cdrom0",
		})
		_, err := v1alpha3.NewCallbacksClient(conn).OnDefineDomain(ctx, &v1alpha3.OnDefineDomainParams{DomainXML: dom, Vmi: bad})
		st := status.Convert(err)
		if st.Code() != codes.InvalidArgument {
			t.Fatalf("code %v (%v), want InvalidArgument", st.Code(), err)
		}
		for _, want := range []string{
			"virtblk.io annotations: 2 problems",
			`annotation virtblk.io/disks="data,cdrom0": the VMI has no disk named "cdrom0"; fix: list only names from spec.domain.devices.disks: rootdisk (a virtio disk), data (a virtio disk), scratch (a virtio disk)`,
			`annotation virtblk.io/queues="0": must be at least 1; fix: set it to a whole number from 1 to 1024`,
		} {
			if !strings.Contains(st.Message(), want) {
				t.Errorf("message %q\nlacks %q", st.Message(), want)
			}
		}
	})

	t.Run("no annotation is byte-identical", func(t *testing.T) {
		for _, fixture := range []string{"block-multiqueue", "mixed-sata-cdrom", "supplemental-pool"} {
			in := hooktest.Domain(t, fixture)
			r, err := v1alpha3.NewCallbacksClient(conn).OnDefineDomain(ctx, &v1alpha3.OnDefineDomainParams{DomainXML: in, Vmi: hooktest.VMI(t, nil)})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(r.GetDomainXML(), in) {
				t.Errorf("%s: output differs from input", fixture)
			}
		}
	})

	t.Run("Shutdown exits 0 and removes sockets", func(t *testing.T) {
		if _, err := v1alpha3.NewCallbacksClient(conn).Shutdown(ctx, &v1alpha3.ShutdownParams{}); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if code := p.waitExit(t); code != 0 {
			t.Fatalf("exit code %d\n%s", code, p.stderr.String())
		}
		p.assertSocketsRemoved(t)
		logs := p.stderr.String()
		for _, want := range []string{`"msg":"serving"`, `"msg":"define domain","call":1,"api":"v1alpha1"`, `"disks_changed":2`, `"iothreads":5`, `"queues":16`, `"api":"plugin","invocation":"Boot"`, `"reason":"shutdown requested"`, `"msg":"stopped"`} {
			if !strings.Contains(logs, want) {
				t.Errorf("logs lack %s", want)
			}
		}
	})
}

func TestSidecarSIGTERM(t *testing.T) {
	p := startHook(t)
	if _, err := info.NewInfoClient(dial(t, p.hookSock)).Info(context.Background(), &info.InfoParams{}); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.waitExit(t); code != 0 {
		t.Fatalf("exit code %d after SIGTERM\n%s", code, p.stderr.String())
	}
	p.assertSocketsRemoved(t)
}

func TestSidecarBadFlagsAndDirs(t *testing.T) {
	bin := binary(t)
	file := filepath.Join(shortDir(t), "f")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--bogus"}, 2, "flag provided but not defined: -bogus"},
		{[]string{"--log-level", "loud"}, 2, `--log-level "loud": use debug, info, warn or error`},
		{[]string{"serve-please"}, 2, `unknown command "serve-please"`},
		{[]string{"--hooks-dir", "", "--plugin-dir", ""}, 2, "no socket directory"},
		// A directory the user named must work.
		{[]string{"--hooks-dir", filepath.Join(file, "x"), "--plugin-dir", ""}, 1, "create hooks directory " + filepath.Join(file, "x")},
	}
	for _, tc := range cases {
		cmd := exec.Command(bin, tc.args...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != tc.code || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v: err %v, stderr %q; want exit %d and %q", tc.args, err, stderr.String(), tc.code, tc.want)
		}
	}
}

func runBinary(t *testing.T, bin string, stdin []byte, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

func TestRender(t *testing.T) {
	bin := binary(t)
	domPath := filepath.Join("..", "..", "domainxml", "testdata", "block-multiqueue.xml")
	vmiPath := hooktest.VMIPath(t)
	out, stderr, code := runBinary(t, bin, nil, "render", "--domain", domPath, "--vmi", vmiPath)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if m := hooktest.ReadMapping(t, []byte(out)); !reflect.DeepEqual(m, wantMapping) {
		t.Fatalf("render mapping %+v", m)
	}

	// The VMI from stdin, without annotations: the domain comes back as is.
	in, err := os.ReadFile(domPath)
	if err != nil {
		t.Fatal(err)
	}
	out, stderr, code = runBinary(t, bin, hooktest.VMI(t, nil), "render", "--domain", domPath, "--vmi", "-")
	if code != 0 || out != string(in) {
		t.Fatalf("no-annotation render: exit %d, identical %v, stderr %s", code, out == string(in), stderr)
	}

	// An invalid annotation: exit 1 with the message.
	badVMI := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(badVMI, hooktest.VMI(t, map[string]string{"virtblk.io/iothreads": "4", "virtblk.io/queue-map.data": "1,2"}), 0o644); err != nil {
		t.Fatal(err)
	}
	out, stderr, code = runBinary(t, bin, nil, "render", "--domain", domPath, "--vmi", badVMI)
	if code != 1 || out != "" || !strings.Contains(stderr, `annotation virtblk.io/queue-map.data="1,2": 2 entries, but the disk has 8 queues (one per vCPU, the default)`) {
		t.Fatalf("bad annotation: exit %d, stdout %q, stderr %s", code, out, stderr)
	}

	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"render"}, 2, "both --domain FILE and --vmi FILE are required"},
		{[]string{"render", "--domain", domPath}, 2, "both --domain FILE and --vmi FILE are required"},
		{[]string{"render", "--domain", "-", "--vmi", "-"}, 2, "only one of --domain and --vmi can read stdin"},
		{[]string{"render", "--domain", domPath, "--vmi", vmiPath, "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"render", "--domain", "/nonexistent.xml", "--vmi", vmiPath}, 1, "read domain XML: open /nonexistent.xml"},
	} {
		_, stderr, code := runBinary(t, bin, nil, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.code, tc.want)
		}
	}
	if out, _, code := runBinary(t, bin, nil, "help"); code != 0 || !strings.Contains(out, "virtblk-hook render --domain FILE --vmi FILE") {
		t.Errorf("help: exit %d, %q", code, out)
	}
}

// TestShimContract runs the binary under the name KubeVirt's sidecar-shim
// executes, with the argument layout it uses.
func TestShimContract(t *testing.T) {
	dir := t.TempDir()
	shimBin := filepath.Join(dir, "onDefineDomain")
	if err := os.Symlink(binary(t), shimBin); err != nil {
		t.Fatal(err)
	}
	dom := hooktest.Domain(t, "block-multiqueue")
	out, stderr, code := runBinary(t, shimBin, nil, "--vmi", string(hooktest.VMI(t, fixtureAnnotations)), "--domain", string(dom))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if m := hooktest.ReadMapping(t, []byte(out)); !reflect.DeepEqual(m, wantMapping) {
		t.Fatalf("shim mapping %+v", m)
	}
	out, _, code = runBinary(t, shimBin, nil, "--vmi", string(hooktest.VMI(t, nil)), "--domain", string(dom))
	if code != 0 || out != string(dom) {
		t.Fatalf("shim without annotations: exit %d, identical %v", code, out == string(dom))
	}
	_, stderr, code = runBinary(t, shimBin, nil, "--vmi", "{}")
	if code != 2 || !strings.Contains(stderr, "usage: onDefineDomain --vmi <VMI JSON> --domain <domain XML>") {
		t.Fatalf("shim usage: exit %d, %q", code, stderr)
	}
	_, stderr, code = runBinary(t, shimBin, nil, "--vmi", string(hooktest.VMI(t, map[string]string{"virtblk.io/iothreads": "x"})), "--domain", string(dom))
	if code != 1 || !strings.Contains(stderr, `annotation virtblk.io/iothreads="x": not a whole number`) {
		t.Fatalf("shim bad annotation: exit %d, %q", code, stderr)
	}
}
