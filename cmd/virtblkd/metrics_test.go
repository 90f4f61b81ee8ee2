package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
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

	"github.com/virtblk/virtblk/blkio/frontend"
)

// TestMain lets a test start this package's command as a real process: the
// test binary re-executes itself with VIRTBLKD_RUN_MAIN=1 and runs main.
func TestMain(m *testing.M) {
	if os.Getenv("VIRTBLKD_RUN_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stderr))
	}
	os.Exit(m.Run())
}

// startDaemon runs virtblkd serve as a child process and returns the
// metrics address it logged. The process is SIGTERMed (and must exit 0) at
// cleanup.
func startDaemon(t *testing.T, args ...string) (metricsAddr string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"serve"}, args...)...)
	cmd.Env = append(os.Environ(), "VIRTBLKD_RUN_MAIN=1")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 64)
	logDone := make(chan struct{})
	var log strings.Builder
	go func() {
		defer close(logDone)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			log.WriteString(sc.Text() + "\n")
			select {
			case lines <- sc.Text():
			default:
			}
		}
		close(lines)
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { <-logDone; done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("virtblkd did not exit cleanly on SIGTERM: %v\n%s", err, log.String())
			}
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			t.Errorf("virtblkd did not stop within 20s of SIGTERM")
		}
	})
	addrRE := regexp.MustCompile(`msg="metrics server listening" addr=(\S+)`)
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("virtblkd exited before serving metrics")
			}
			if m := addrRE.FindStringSubmatch(l); m != nil {
				return m[1]
			}
		case <-timeout:
			t.Fatalf("virtblkd logged no metrics address within 20s")
		}
	}
}

// scrape fetches /metrics and returns the samples by their full name with
// labels, e.g. `virtblk_requests_total{volume="d",queue="0",op="read"}`.
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: status %d, %v", resp.StatusCode, err)
	}
	out := map[string]float64{}
	for _, l := range strings.Split(string(body), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample line %q: %v", l, err)
		}
		out[l[:i]] = v
	}
	return out
}

// The daemon started with --metrics-addr counts the requests a front-end
// sends, per queue and op, with their bytes and errors.
func TestMetricsEndpointCountsRequests(t *testing.T) {
	if testing.Short() {
		t.Skip("starts virtblkd as a process")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "d.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	const size = 16 << 20
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "v.sock")
	addr := startDaemon(t, "--socket", sock, "--file", img, "--queues", "2", "--serial", "disk-m", "--metrics-addr", "127.0.0.1:0")
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 1000 {
			t.Fatal("no socket after 20s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dev, err := frontend.Dial(ctx, sock, frontend.Options{Queues: 2, QueueDepth: 8, MaxIO: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	q0, q1 := dev.Queues()[0], dev.Queues()[1]
	// Queue 0: eight 4 KiB writes in one batch, then a flush.
	batch(t, q0, 8, frontend.TypeOut, 4096, frontend.StatusOK)
	batch(t, q0, 1, frontend.TypeFlush, 0, frontend.StatusOK)
	// Queue 1: three 64 KiB reads, and one read past the end (IOERR).
	batch(t, q1, 3, frontend.TypeIn, 64<<10, frontend.StatusOK)
	if err := q1.Submit(0, frontend.TypeIn, size/frontend.SectorSize, 4096); err != nil {
		t.Fatal(err)
	}
	reapAll(t, q1, 1, frontend.StatusIOErr)

	m := scrape(t, addr)
	want := map[string]float64{
		`virtblk_requests_total{volume="disk-m",queue="0",op="write"}`:                      8,
		`virtblk_request_bytes_total{volume="disk-m",queue="0",op="write"}`:                 8 * 4096,
		`virtblk_requests_total{volume="disk-m",queue="0",op="flush"}`:                      1,
		`virtblk_requests_total{volume="disk-m",queue="0",op="read"}`:                       0,
		`virtblk_requests_total{volume="disk-m",queue="1",op="read"}`:                       4,
		`virtblk_request_bytes_total{volume="disk-m",queue="1",op="read"}`:                  3 * 64 << 10,
		`virtblk_request_errors_total{volume="disk-m",queue="1",op="read",status="ioerr"}`:  1,
		`virtblk_request_errors_total{volume="disk-m",queue="0",op="write",status="ioerr"}`: 0,
		`virtblk_requests_in_flight{volume="disk-m",queue="0"}`:                             0,
		`virtblk_requests_in_flight{volume="disk-m",queue="1"}`:                             0,
		`virtblk_request_duration_seconds_count{volume="disk-m",queue="1",op="read"}`:       4,
		`virtblk_volume_capacity_bytes{volume="disk-m"}`:                                    size,
		fmt.Sprintf(`virtblk_volume_info{volume="disk-m",socket=%q}`, sock):                 1,
	}
	for k, v := range want {
		got, ok := m[k]
		if !ok {
			t.Errorf("missing sample %s", k)
		} else if got != v {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
}

// batch submits n requests of typ with n bytes each on slots 0..n-1 and
// waits for all of them with the given status.
func batch(t *testing.T, q *frontend.Queue, n int, typ uint32, bytes int, status byte) {
	t.Helper()
	for s := 0; s < n; s++ {
		if err := q.Submit(s, typ, uint64(s*bytes/frontend.SectorSize), bytes); err != nil {
			t.Fatal(err)
		}
	}
	reapAll(t, q, n, status)
}

func reapAll(t *testing.T, q *frontend.Queue, n int, status byte) {
	t.Helper()
	if err := q.Kick(); err != nil {
		t.Fatal(err)
	}
	comps := make([]frontend.Completion, n)
	for done := 0; done < n; {
		k, err := q.Reap(comps, 1)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range comps[:k] {
			if c.Status != status {
				t.Fatalf("slot %d: status %d, want %d", c.Slot, c.Status, status)
			}
		}
		done += k
	}
}
