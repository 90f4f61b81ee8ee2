package sidecar

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/virtblk/virtblk/sidecar/hooktest"
)

// FuzzDefine feeds arbitrary domain XML and annotations through the whole
// pipeline. It must never panic; without virtblk annotations the output is
// the input, and with them it is either an error or XML libvirtxml parses.
func FuzzDefine(f *testing.F) {
	for _, fixture := range []string{"block-multiqueue", "pci-defined", "mixed-sata-cdrom"} {
		f.Add(hooktest.Domain(f, fixture), "virtblk.io/iothreads=4")
	}
	f.Add(hooktest.Domain(f, "block-multiqueue"), "virtblk.io/iothreads=2\nvirtblk.io/disks=data\nvirtblk.io/queues=3\nvirtblk.io/queue-map.data=2,1,2")
	f.Add([]byte("<domain><devices><disk><alias name='ua-data'/></disk></devices></domain>"), "virtblk.io/iothreads=1")
	f.Add([]byte("not xml"), "")
	var base map[string]any
	if err := json.Unmarshal(hooktest.VMI(f, nil), &base); err != nil {
		f.Fatal(err)
	}
	h := NewHandler(nil, nil)
	f.Fuzz(func(t *testing.T, domainXML []byte, annotations string) {
		ann := map[string]any{}
		for _, line := range strings.Split(annotations, "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				ann[k] = v
			}
		}
		base["metadata"].(map[string]any)["annotations"] = ann
		vmi, err := json.Marshal(base)
		if err != nil {
			t.Fatal(err)
		}
		out, err := h.Define(context.Background(), "fuzz", "", domainXML, vmi)
		if err != nil {
			return
		}
		virtblk := false
		for k := range ann {
			virtblk = virtblk || strings.HasPrefix(k, "virtblk.io/")
		}
		if !virtblk {
			if !bytes.Equal(out, domainXML) {
				t.Fatal("no virtblk annotation, but the output differs from the input")
			}
			return
		}
		if err := (&libvirtxml.Domain{}).Unmarshal(string(out)); err != nil {
			t.Fatalf("output does not parse: %v\n%s", err, out)
		}
	})
}
