// Package hooktest holds test helpers shared by the sidecar's unit tests and
// the virtblk-hook end-to-end test: realistic inputs (domain XML fixtures,
// a VMI JSON with chosen annotations) and a reader for the mapping a
// rewritten domain carries. It is imported by tests only.
package hooktest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"testing"

	"libvirt.org/go/libvirtxml"
)

// repoRoot is found from this file's location so that tests in any package
// can read the shared fixtures.
func repoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("hooktest: cannot locate source file")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Domain returns domainxml/testdata/<name>.xml, a KubeVirt-generated domain.
func Domain(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "domainxml", "testdata", name+".xml"))
	if err != nil {
		t.Fatalf("read domain fixture: %v", err)
	}
	return b
}

// VMIPath is the VMI JSON fixture matching Domain("block-multiqueue"): disks
// rootdisk, data and scratch (all virtio), 8 vCPUs, and the annotations
// virtblk.io/iothreads "4", virtblk.io/disks "data,scratch",
// virtblk.io/queue-map.data "1,1,2,2,3,3,4,4".
func VMIPath(t testing.TB) string {
	return filepath.Join(repoRoot(t), "sidecar", "testdata", "vmi-fio-runner.json")
}

// VMI returns the VMI fixture with its virtblk.io/ annotations replaced by
// ann (nil or empty: none at all). Other annotations stay.
func VMI(t testing.TB, ann map[string]string) []byte {
	t.Helper()
	b, err := os.ReadFile(VMIPath(t))
	if err != nil {
		t.Fatalf("read VMI fixture: %v", err)
	}
	if ann == nil {
		ann = map[string]string{}
	}
	var vmi map[string]any
	if err := json.Unmarshal(b, &vmi); err != nil {
		t.Fatalf("decode VMI fixture: %v", err)
	}
	meta := vmi["metadata"].(map[string]any)
	old := meta["annotations"].(map[string]any)
	merged := map[string]any{}
	for k, v := range old {
		if len(k) < len("virtblk.io/") || k[:len("virtblk.io/")] != "virtblk.io/" {
			merged[k] = v
		}
	}
	for k, v := range ann {
		merged[k] = v
	}
	meta["annotations"] = merged
	out, err := json.Marshal(vmi)
	if err != nil {
		t.Fatalf("encode VMI: %v", err)
	}
	return out
}

// Mapping is what a rewritten domain says about IOThreads: the domain's
// IOThread count and, per disk alias, the IOThread id serving each queue
// (index = queue id).
type Mapping struct {
	IOThreads uint
	Disks     map[string][]uint
}

// ReadMapping parses domain XML and extracts its Mapping. Disks without a
// <queue> mapping are left out.
func ReadMapping(t testing.TB, domainXML []byte) Mapping {
	t.Helper()
	dom := &libvirtxml.Domain{}
	if err := dom.Unmarshal(string(domainXML)); err != nil {
		t.Fatalf("parse domain XML: %v", err)
	}
	m := Mapping{IOThreads: dom.IOThreads, Disks: map[string][]uint{}}
	if dom.Devices == nil {
		return m
	}
	for _, d := range dom.Devices.Disks {
		if d.Alias == nil || d.Driver == nil || d.Driver.IOThreads == nil {
			continue
		}
		type qt struct{ q, t uint }
		var qs []qt
		for _, th := range d.Driver.IOThreads.IOThread {
			for _, q := range th.Queues {
				qs = append(qs, qt{q.ID, th.ID})
			}
		}
		if len(qs) == 0 {
			continue
		}
		sort.Slice(qs, func(i, j int) bool { return qs[i].q < qs[j].q })
		threads := make([]uint, len(qs))
		for i, x := range qs {
			if x.q != uint(i) {
				t.Fatalf("disk %s: queue ids %v are not 0..n-1", d.Alias.Name, qs)
			}
			threads[i] = x.t
		}
		m.Disks[d.Alias.Name] = threads
	}
	return m
}
