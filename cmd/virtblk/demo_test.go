package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// The demo is the README's main job: it must run end to end on the embedded
// default and report a converged mapping and a clean store.
func TestDemo(t *testing.T) {
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"demo", "--dir", t.TempDir(), "--runtime", "300ms"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errOut.String())
	}
	for _, want := range []string{
		"all three calls give the same mapping",
		"vdb  ua-data      queues=8 | iothread 2: queues 0,1 | iothread 3: queues 2,3 | iothread 4: queues 4,5 | iothread 5: queues 6,7",
		"iothread=1 (KubeVirt's)",
		"read back through the other queue: identical",
		"errors 0",
		"data blocks checked: clean",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}
