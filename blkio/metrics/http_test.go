package metrics

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/virtblk/virtblk/internal/testenv"
)

func testRegistry(t testing.TB) *Registry {
	t.Helper()
	reg := NewRegistry()
	v := mustVolume(t, VolumeOptions{Name: "disk-0", Socket: "/var/run/virtblk/disk-0.sock", Queues: 2,
		StoreChecksumFailures: func() uint64 { return 0 }, AllocatedBytes: func() uint64 { return 4096 },
		CapacityBytes: func() uint64 { return 1 << 30 }})
	if err := reg.Add(v); err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		q := v.Queue(i % 2)
		q.Begin()
		q.Observe(Op(i%int(numOps)), 4096, time.Duration(i)*37*time.Microsecond, Status(i%4))
	}
	return reg
}

func get(t *testing.T, c *http.Client, method, url string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

func TestHandler(t *testing.T) {
	srv := httptest.NewServer(Handler(testRegistry(t), nil))
	defer srv.Close()
	c := srv.Client()

	resp, body := get(t, c, http.MethodGet, srv.URL+"/metrics")
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != ContentType {
		t.Fatalf("GET /metrics: %s %q", resp.Status, resp.Header.Get("Content-Type"))
	}
	x, err := parseExposition(body)
	if err != nil {
		t.Fatalf("%v\n%s", err, body)
	}
	if got, _ := x.find(nameRequests, "volume", "disk-0", "queue", "0", "op", "read"); got != 8 {
		t.Fatalf("requests read queue 0 = %v, want 8", got)
	}

	resp, body = get(t, c, http.MethodHead, srv.URL+"/metrics")
	if resp.StatusCode != 200 || body != "" || resp.ContentLength <= 0 {
		t.Fatalf("HEAD /metrics: %s len %d body %q", resp.Status, resp.ContentLength, body)
	}
	resp, _ = get(t, c, http.MethodPost, srv.URL+"/metrics")
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /metrics: %s", resp.Status)
	}
	resp, body = get(t, c, http.MethodGet, srv.URL+"/healthz")
	if resp.StatusCode != 200 || body != "ok\n" {
		t.Fatalf("GET /healthz: %s %q", resp.Status, body)
	}
	resp, _ = get(t, c, http.MethodGet, srv.URL+"/nope")
	if resp.StatusCode != 404 {
		t.Fatalf("GET /nope: %s", resp.Status)
	}
}

func TestServeListenerShutsDownWithContext(t *testing.T) {
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	errc := make(chan error, 1)
	go func() { errc <- ServeListener(ctx, ln, testRegistry(t), log) }()

	url := "http://" + ln.Addr().String()
	_, body := get(t, http.DefaultClient, http.MethodGet, url+"/metrics")
	if _, err := parseExposition(body); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Fatalf("Serve after cancel: %v", err)
	}
	if _, err := http.Get(url + "/healthz"); err == nil {
		t.Fatal("server still answers after shutdown")
	}
	if !strings.Contains(logs.String(), ln.Addr().String()) {
		t.Fatalf("log does not name the address:\n%s", logs.String())
	}
}

func TestServeErrors(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	addr := busy.Addr().String()
	for _, a := range []string{addr, "not-an-address", "127.0.0.1:99999", ""} {
		done := make(chan error, 1)
		go func() { done <- Serve(context.Background(), a, NewRegistry(), nil) }()
		err := <-done // must fail at once, not serve
		if err == nil {
			t.Fatalf("Serve(%q) succeeded", a)
		}
		if !strings.Contains(err.Error(), "--metrics-addr") || (a != "" && !strings.Contains(err.Error(), a)) {
			t.Errorf("Serve(%q): error does not name the address and flag: %v", a, err)
		}
	}
}

// TestPromtool checks the output with Prometheus's own linter (Debian
// package prometheus). Skipped only outside CI when promtool is missing.
func TestPromtool(t *testing.T) {
	path := testenv.Tool(t, "promtool", "prometheus")
	reg := testRegistry(t)
	odd := mustVolume(t, VolumeOptions{Name: "we\"ird\\name\nx\xff", Socket: "/tmp/\"s\"", Queues: 1})
	odd.Queue(0).Observe(OpFlush, 0, 3*time.Second, StatusOK)
	if err := reg.Add(odd); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := reg.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, "check", "metrics")
	cmd.Stdin = &buf
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}
