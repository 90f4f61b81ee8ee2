package testenv

import (
	"fmt"
	"strings"
	"testing"
)

// fakeTB records what Missing does instead of stopping the test.
type fakeTB struct {
	testing.TB
	fatal, skip string
}

func (f *fakeTB) Helper()                        {}
func (f *fakeTB) Fatalf(format string, a ...any) { f.fatal = fmt.Sprintf(format, a...) }
func (f *fakeTB) Skipf(format string, a ...any)  { f.skip = fmt.Sprintf(format, a...) }

func TestMissingFailsUnderCI(t *testing.T) {
	t.Setenv("CI", "true")
	f := &fakeTB{TB: t}
	Missing(f, "no %s", "qemu")
	if !strings.Contains(f.fatal, "no qemu") || f.skip != "" {
		t.Fatalf("under CI=true Missing must fail, got fatal=%q skip=%q", f.fatal, f.skip)
	}
	t.Setenv("CI", "")
	f = &fakeTB{TB: t}
	Missing(f, "no qemu")
	if f.fatal != "" || !strings.Contains(f.skip, "no qemu") {
		t.Fatalf("outside CI Missing must skip, got fatal=%q skip=%q", f.fatal, f.skip)
	}
}
