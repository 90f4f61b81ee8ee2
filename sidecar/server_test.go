package sidecar

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/virtblk/virtblk/sidecar/hookapi/info"
	pluginsv1alpha1 "github.com/virtblk/virtblk/sidecar/hookapi/plugins/v1alpha1"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha3"
	"github.com/virtblk/virtblk/sidecar/hooktest"
)

// shortDir returns a fresh directory with a short path: unix socket paths
// are limited to 107 bytes and t.TempDir embeds the test name.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

type running struct {
	srv  *Server
	done chan error
}

func start(t *testing.T, ctx context.Context, opts Options) *running {
	t.Helper()
	srv, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	r := &running{srv: srv, done: make(chan error, 1)}
	go func() { r.done <- srv.Run(ctx) }()
	select {
	case <-srv.Ready():
	case err := <-r.done:
		t.Fatalf("Run returned before ready: %v", err)
	}
	t.Cleanup(func() {
		srv.Stop()
		<-r.done
	})
	return r
}

func (r *running) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("server did not stop")
		return nil
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

var hookSocketName = regexp.MustCompile(`^virtblk-[0-9a-f]{8}\.sock$`)

func TestServerServesBothSocketsAndStopsOnShutdown(t *testing.T) {
	hooksDir, pluginRoot := shortDir(t), shortDir(t)
	pluginDir := filepath.Join(pluginRoot, "virtblk") // created by the server
	log, buf := logBuffer()
	r := start(t, context.Background(), Options{
		HooksDir: SocketDir{Path: hooksDir}, PluginDir: SocketDir{Path: pluginDir}, Logger: log,
	})
	socks := r.srv.Sockets()
	if len(socks) != 2 || filepath.Dir(socks[0]) != hooksDir || !hookSocketName.MatchString(filepath.Base(socks[0])) ||
		socks[1] != filepath.Join(pluginDir, PluginSocketName) {
		t.Fatalf("sockets %v", socks)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	vmi := hooktest.VMI(t, map[string]string{"virtblk.io/iothreads": "4", "virtblk.io/disks": "data,scratch", "virtblk.io/queue-map.data": "1,1,2,2,3,3,4,4"})
	dom := hooktest.Domain(t, "block-multiqueue")
	for _, sock := range socks {
		conn := dial(t, sock)
		res, err := info.NewInfoClient(conn).Info(ctx, &info.InfoParams{})
		if err != nil || res.GetName() != "virtblk" {
			t.Fatalf("%s: Info = %v, %v", sock, res, err)
		}
		mr, err := pluginsv1alpha1.NewDomainHookServiceClient(conn).MutateDomain(ctx, &pluginsv1alpha1.MutateDomainRequest{
			DomainType: "libvirt", Domain: dom, Vmi: vmi,
			SidecarContext: &pluginsv1alpha1.SidecarContext{InvocationContext: "Boot"},
		})
		if err != nil {
			t.Fatalf("%s: MutateDomain: %v", sock, err)
		}
		if m := hooktest.ReadMapping(t, mr.GetDomain()); len(m.Disks) != 2 {
			t.Fatalf("%s: MutateDomain mapped %+v", sock, m)
		}
	}
	if _, err := v1alpha3.NewCallbacksClient(dial(t, socks[0])).Shutdown(ctx, &v1alpha3.ShutdownParams{}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := r.wait(t); err != nil {
		t.Fatalf("Run after Shutdown: %v", err)
	}
	for _, s := range socks {
		if _, err := os.Lstat(s); !os.IsNotExist(err) {
			t.Errorf("socket %s still exists after stop (%v)", s, err)
		}
	}
	var invocation bool
	for _, l := range buf.lines(t) {
		if l["msg"] == "define domain" && l["invocation"] == "Boot" && l["api"] == "plugin" {
			invocation = true
		}
	}
	if !invocation {
		t.Error("no define log line with api=plugin invocation=Boot")
	}
}

func TestServerStopsOnContextCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	r := start(t, ctx, Options{HooksDir: SocketDir{Path: shortDir(t)}})
	sock := r.srv.Sockets()[0]
	cancel()
	if err := r.wait(t); err != nil {
		t.Fatalf("Run after cancel: %v", err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

func TestUniqueHookSocketNames(t *testing.T) {
	dir := shortDir(t)
	a := start(t, context.Background(), Options{HooksDir: SocketDir{Path: dir}})
	b := start(t, context.Background(), Options{HooksDir: SocketDir{Path: dir}})
	if a.srv.Sockets()[0] == b.srv.Sockets()[0] {
		t.Fatalf("two servers share socket %s", a.srv.Sockets()[0])
	}
}

func TestPluginSocketStaleIsReplacedLiveIsRefused(t *testing.T) {
	dir := shortDir(t)
	path := filepath.Join(dir, PluginSocketName)
	// A socket file nobody listens on, as a killed process leaves it.
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	first := start(t, context.Background(), Options{PluginDir: SocketDir{Path: dir}})
	if got := first.srv.Sockets(); len(got) != 1 || got[0] != path {
		t.Fatalf("sockets %v", got)
	}

	second, err := New(Options{PluginDir: SocketDir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	err = second.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "another process is serving this socket") {
		t.Fatalf("second server on a live socket: %v", err)
	}
	// The first one still serves.
	if _, err := info.NewInfoClient(dial(t, path)).Info(context.Background(), &info.InfoParams{}); err != nil {
		t.Fatalf("first server after refused second: %v", err)
	}
}

func TestSocketDirErrors(t *testing.T) {
	if _, err := New(Options{}); err == nil {
		t.Fatal("New without directories succeeded")
	}
	file := filepath.Join(shortDir(t), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	blocked := filepath.Join(file, "virtblk") // cannot be created
	hooks := shortDir(t)

	srv, _ := New(Options{HooksDir: SocketDir{Path: hooks}, PluginDir: SocketDir{Path: blocked}})
	if err := srv.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "create plugin directory "+blocked) {
		t.Fatalf("required plugin dir: %v", err)
	}
	if entries, _ := os.ReadDir(hooks); len(entries) != 0 {
		t.Fatalf("hook socket left after failed start: %v", entries)
	}

	log, buf := logBuffer()
	r := start(t, context.Background(), Options{HooksDir: SocketDir{Path: hooks}, PluginDir: SocketDir{Path: blocked, Optional: true}, Logger: log})
	if n := len(r.srv.Sockets()); n != 1 {
		t.Fatalf("%d sockets, want the hook socket only", n)
	}
	if l := buf.lines(t); len(l) == 0 || l[0]["level"] != "WARN" || !strings.Contains(l[0]["error"].(string), blocked) {
		t.Fatalf("no warning naming %s: %v", blocked, l)
	}

	srv, _ = New(Options{HooksDir: SocketDir{Path: blocked, Optional: true}})
	if err := srv.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "no socket could be created") {
		t.Fatalf("all optional dirs failing: %v", err)
	}

	long := filepath.Join(shortDir(t), strings.Repeat("d", 100))
	srv, _ = New(Options{PluginDir: SocketDir{Path: long}})
	if err := srv.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "longer than the 107 a unix socket allows") {
		t.Fatalf("long path: %v", err)
	}
}
