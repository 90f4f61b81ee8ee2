package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseServeErrors(t *testing.T) {
	cases := map[string][]string{
		"no socket":      {"--file", "x"},
		"no file":        {"--socket", "s"},
		"queues 0":       {"--socket", "s", "--file", "x", "--queues", "0"},
		"queue size 100": {"--socket", "s", "--file", "x", "--queue-size", "100"},
		"long serial":    {"--socket", "s", "--file", "x", "--serial", strings.Repeat("a", 21)},
		"bad level":      {"--socket", "s", "--file", "x", "--log-level", "loud"},
		"stray arg":      {"--socket", "s", "--file", "x", "extra"},
	}
	for name, args := range cases {
		if _, err := parseServe(args, io.Discard); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	c, err := parseServe([]string{"--socket", "s", "--file", "x", "--queues", "4", "--poll-us", "50", "--log-level", "debug"}, io.Discard)
	if err != nil || c.queues != 4 || c.pollUs != 50 || c.level != slog.LevelDebug {
		t.Fatalf("%+v %v", c, err)
	}
	var out bytes.Buffer
	if code := run([]string{"bogus"}, &out); code != 2 || !strings.Contains(out.String(), "usage") {
		t.Fatalf("unknown command: code %d %q", code, out.String())
	}
}

func TestListenStaleAndLiveSockets(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "s.sock")
	// A socket file left behind by a killed process.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	ln2, err := listen(p)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	// While ln2 serves, a second listen must refuse to steal the path.
	if _, err := listen(p); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("live socket: %v", err)
	}
	ln2.Close()
	f := filepath.Join(dir, "plain")
	os.WriteFile(f, nil, 0o600)
	if _, err := listen(f); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("regular file: %v", err)
	}
}

// serve with a real image: starts, listens, and exits cleanly when the
// context ends (what SIGTERM does).
func TestServeStopsOnCancel(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "d.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "v.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	c := serveConfig{socket: sock, file: img, queues: 2, queueSize: 128}
	go func() { done <- serve(ctx, c, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("serve exited early: %v", err)
		default:
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after a clean stop: %v", err)
	}
	// A missing image is a clear error.
	c.file = filepath.Join(dir, "missing.img")
	if err := serve(context.Background(), c, slog.New(slog.NewTextHandler(io.Discard, nil))); err == nil || !strings.Contains(err.Error(), "missing.img") {
		t.Fatalf("missing image: %v", err)
	}
}
