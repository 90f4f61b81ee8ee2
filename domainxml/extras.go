package domainxml

import (
	"bytes"
	"fmt"

	"github.com/virtblk/virtblk/domainxml/internal/xmltree"
)

// kubevirtDiskExtras are KubeVirt-private children of <disk> that libvirt
// ignores and libvirtxml cannot carry. KubeVirt reads them back from the
// hook's output (it copies call #1's result into its own domain spec) for
// its disk-expansion logic, so a rewrite must not drop them.
var kubevirtDiskExtras = map[string]bool{"filesystemOverhead": true, "capacity": true}

// KeepKubeVirtDiskExtras copies KubeVirt's private <disk> children
// (<filesystemOverhead>, <capacity>) from original into rewritten, matching
// disks by alias. It returns rewritten unchanged when original has none,
// which is the common case. Call it on the final bytes whenever the domain
// went through libvirtxml; RewriteIOThreads does.
func KeepKubeVirtDiskExtras(original, rewritten []byte) ([]byte, error) {
	if !bytes.Contains(original, []byte("<filesystemOverhead")) && !bytes.Contains(original, []byte("<capacity")) {
		return rewritten, nil // fast path: nothing to keep
	}
	in, err := xmltree.Parse(original)
	if err != nil {
		return nil, fmt.Errorf("keep KubeVirt disk extras: original: %w", err)
	}
	extras := map[string][]*xmltree.Node{}
	if devs := in.Child("devices"); devs != nil {
		for _, d := range devs.All("disk") {
			alias := treeAlias(d)
			for _, c := range d.Children {
				if kubevirtDiskExtras[c.Name] && alias != "" {
					extras[alias] = append(extras[alias], c)
				}
			}
		}
	}
	if len(extras) == 0 {
		return rewritten, nil
	}
	out, err := xmltree.Parse(rewritten)
	if err != nil {
		return nil, fmt.Errorf("keep KubeVirt disk extras: rewritten: %w", err)
	}
	devs := out.Child("devices")
	if devs == nil {
		return rewritten, nil
	}
	for _, d := range devs.All("disk") {
		add := extras[treeAlias(d)]
		if len(add) == 0 {
			continue
		}
		d.Remove(func(c *xmltree.Node) bool { return kubevirtDiskExtras[c.Name] })
		for _, c := range add {
			d.Children = append(d.Children, c.Clone())
		}
	}
	return out.Marshal(), nil
}

func treeAlias(d *xmltree.Node) string {
	if a := d.Child("alias"); a != nil {
		v, _ := a.Attr("name")
		return v
	}
	return ""
}
