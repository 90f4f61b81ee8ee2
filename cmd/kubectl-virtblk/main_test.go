package main

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseArgs(t *testing.T) {
	var stderr bytes.Buffer
	a, err := parseArgs([]string{"inspect", "db", "-n", "prod", "--kubeconfig", "/k", "--context", "c"}, &stderr)
	if err != nil || a.command != "inspect" || a.vm != "db" || a.namespace != "prod" || a.kubeconfig != "/k" || a.context != "c" {
		t.Errorf("parseArgs = %+v, %v", a, err)
	}
	a, err = parseArgs([]string{"--namespace=ns", "qemu-cmdline", "db", "--match", "iothread"}, &stderr)
	if err != nil || a.command != "qemu-cmdline" || a.match != "iothread" || a.namespace != "ns" {
		t.Errorf("parseArgs = %+v, %v", a, err)
	}
	for _, bad := range [][]string{
		{},
		{"inspect"},
		{"inspect", "a", "b"},
		{"dumpxml", "db"},
		{"inspect", "db", "--match", "x"},
		{"inspect", "db", "--bogus"},
	} {
		if _, err := parseArgs(bad, &stderr); err == nil {
			t.Errorf("parseArgs(%q) accepted", bad)
		}
	}
	stderr.Reset()
	if _, err := parseArgs([]string{"-h"}, &stderr); !errors.Is(err, errUsage) || !strings.Contains(stderr.String(), "qemu-cmdline VM") {
		t.Errorf("-h: %v\n%s", err, stderr.String())
	}
}

// TestRunBadKubeconfig: a missing kubeconfig is reported as such, before
// any cluster access.
func TestRunBadKubeconfig(t *testing.T) {
	var out, errb bytes.Buffer
	err := run(context.Background(), []string{"inspect", "db", "--kubeconfig", filepath.Join(t.TempDir(), "none")}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "load kubeconfig") {
		t.Errorf("err = %v", err)
	}
}
