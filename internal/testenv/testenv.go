// Package testenv owns how tests treat missing infrastructure (a tool, root,
// a device): skipped on a developer's machine, a failure in CI, where
// .ci/run installs everything the suite needs and sets CI=true.
package testenv

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// InCI reports whether the tests run in CI (CI set, as .ci/run does).
func InCI() bool { return os.Getenv("CI") != "" }

// Missing skips t, or fails it in CI, because msg's infrastructure is absent.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("required test infrastructure missing in CI: %s", msg)
		return
	}
	t.Skipf("test infrastructure missing: %s", msg)
}

// Tool returns the path of the named binary, or reports it Missing with
// the Debian package that provides it.
func Tool(t testing.TB, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, "%s not found: apt-get install %s", name, pkg)
	}
	return p
}

// Root reports Missing unless the test runs as root.
func Root(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "must run as root: %s", why)
	}
}

// TrixieRoot is the Debian trixie root hack/trixie-root.sh builds (QEMU 10,
// libvirt 11; make test builds it before the tests): $VIRTBLK_TRIXIE or
// /var/cache/virtblk/trixie.
func TrixieRoot() string {
	if d := os.Getenv("VIRTBLK_TRIXIE"); d != "" {
		return d
	}
	return "/var/cache/virtblk/trixie"
}

// Build compiles a command of this module (pkg as "./cmd/virtblkd") into a
// temporary directory and returns the binary's path; the Go build cache
// makes building it again in another test cheap.
func Build(t testing.TB, pkg string) string {
	t.Helper()
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	bin := filepath.Join(t.TempDir(), filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", bin, pkg)
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(gomod)))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	return bin
}

// Buffer collects a child process's output while tests read it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
