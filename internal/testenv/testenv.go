// Package testenv owns how tests treat missing infrastructure (a tool, root,
// a device): skipped on a developer's machine, a failure in CI, where
// .ci/run installs everything the suite needs and sets CI=true.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
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
