package unixsock

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestListen(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "s.sock")
	ln, err := Listen(p)
	if err != nil {
		t.Fatal(err)
	}
	// A live socket is not stolen.
	if _, err := Listen(p); !errors.Is(err, ErrInUse) {
		t.Fatalf("second listen on a live socket: %v, want ErrInUse", err)
	}
	// A stale one (its server gone, the file left) is replaced.
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Lstat(p); err != nil {
		t.Fatalf("stale socket file missing: %v", err)
	}
	ln, err = Listen(p)
	if err != nil {
		t.Fatalf("listen over a stale socket: %v", err)
	}
	c, err := net.Dial("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	ln.Close()
	// A file that is not a socket is refused, not removed.
	f := filepath.Join(dir, "plain")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(f); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen on a plain file: %v", err)
	}
	if _, err := os.Stat(f); err != nil {
		t.Fatalf("plain file removed: %v", err)
	}
}
