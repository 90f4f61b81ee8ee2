// Package kvsim simulates what KubeVirt's virt-launcher feeds a hook on its
// second and third OnDefineDomain calls, so that hook code can be tested for
// convergence without a cluster. It owns no production logic.
//
// The model (see ../../shared/reference/kubevirt-hooks.md, sections 2.5 and
// 5.7, in the virtblk workspace):
//
//   - Call #2 gets KubeVirt's original domain for every top-level element
//     and, for <devices>, what libvirt stored after call #1's define,
//     re-parsed through KubeVirt's own Go model (api.DomainSpec), which
//     drops what it does not model.
//   - Call #3 (KubeVirt >= v1.8) gets call #2's output through the same
//     model, plus extra pcie-root-port controllers.
//
// Approximations, all deliberate:
//
//   - libvirt's define is reduced to what matters for disks: every virtio
//     disk without an <address> gets a PCI address on a new pcie-root-port
//     (and a pcie-root is added if missing). Other devices are not addressed,
//     and libvirt's other defaults are not filled in.
//   - KubeVirt's model is applied to <disk> only, with the field lists of
//     reference section 5.7: <driver> keeps cache, error_policy, io, name,
//     type, iothread, queues, discard, iommu and <iothreads><iothread id>
//     (no <queue>); <source> keeps dev, file, startupPolicy, protocol, name
//     and the host/reservations/slices/dataStore children (so a vhost-user
//     source comes back empty). Other disk children and other devices pass
//     through unchanged, although KubeVirt's model may drop some of them too.
//   - Attribute and element order follow the input, not KubeVirt's struct
//     order; consumers must not depend on order anyway.
package kvsim

import (
	"fmt"
	"strconv"

	"github.com/virtblk/virtblk/domainxml/internal/xmltree"
)

// Refeed returns the domain XML of hook call #2: the top level of original
// (KubeVirt's own domain, what call #1 received), with the <devices> of
// defined (what call #1 returned and libvirt defined) after libvirt's
// address assignment and KubeVirt's lossy model.
func Refeed(original, defined []byte) ([]byte, error) {
	return refeed(original, defined, 0)
}

// RefeedAddingRootPorts is Refeed plus n empty pcie-root-port controllers,
// like the input of call #3 (pass call #2's output as defined).
func RefeedAddingRootPorts(original, defined []byte, n int) ([]byte, error) {
	if n < 0 || n > 64 {
		return nil, fmt.Errorf("kvsim: %d root ports; want 0..64", n)
	}
	return refeed(original, defined, n)
}

func refeed(original, defined []byte, rootPorts int) ([]byte, error) {
	orig, err := parseDomain("original", original)
	if err != nil {
		return nil, err
	}
	def, err := parseDomain("defined", defined)
	if err != nil {
		return nil, err
	}
	devs := def.Child("devices")
	if devs == nil {
		devs = &xmltree.Node{Name: "devices"}
	}
	devs = devs.Clone()
	libvirtDefine(devs)
	for _, c := range devs.Children {
		if c.Name == "disk" {
			kubevirtDisk(c)
		}
	}
	for i := 0; i < rootPorts; i++ {
		addRootPort(devs)
	}

	out := orig.Clone()
	replaced := false
	for i, c := range out.Children {
		if c.Name == "devices" {
			out.Children[i] = devs
			replaced = true
			break
		}
	}
	if !replaced {
		out.Children = append(out.Children, devs)
	}
	return out.Marshal(), nil
}

// DefineCalls plays virt-launcher's three OnDefineDomain calls against
// define: call 1 gets original, call 2 Refeed(original, output 1), call 3
// RefeedAddingRootPorts(original, output 2, rootPorts). It returns the
// three outputs.
func DefineCalls(original []byte, rootPorts int, define func(call int, in []byte) ([]byte, error)) ([][]byte, error) {
	in := original
	var outs [][]byte
	for call := 1; call <= 3; call++ {
		out, err := define(call, in)
		if err != nil {
			return outs, fmt.Errorf("define call %d: %w", call, err)
		}
		outs = append(outs, out)
		if call == 3 {
			break
		}
		if call == 1 {
			in, err = Refeed(original, out)
		} else {
			in, err = RefeedAddingRootPorts(original, out, rootPorts)
		}
		if err != nil {
			return outs, fmt.Errorf("refeed after call %d: %w", call, err)
		}
	}
	return outs, nil
}

// Canonical drops what libvirt's define adds between hook calls (disk
// addresses, PCI controllers), so the domains two OnDefineDomain calls
// returned can be compared for the same mapping.
func Canonical(domXML []byte) ([]byte, error) {
	dom, err := parseDomain("domain", domXML)
	if err != nil {
		return nil, err
	}
	if devs := dom.Child("devices"); devs != nil {
		for _, d := range devs.All("disk") {
			d.Remove(func(c *xmltree.Node) bool { return c.Name == "address" })
		}
		devs.Remove(func(c *xmltree.Node) bool {
			t, _ := c.Attr("type")
			return c.Name == "controller" && t == "pci"
		})
	}
	return dom.Marshal(), nil
}

func parseDomain(what string, b []byte) (*xmltree.Node, error) {
	n, err := xmltree.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("kvsim: %s: %w", what, err)
	}
	if n.Name != "domain" {
		return nil, fmt.Errorf("kvsim: %s: root element is <%s>, want <domain>", what, n.Name)
	}
	return n, nil
}

// libvirtDefine gives every virtio disk without an address its own root
// port, as libvirt does for PCIe devices on a q35 machine.
func libvirtDefine(devs *xmltree.Node) {
	var need []*xmltree.Node
	for _, d := range devs.All("disk") {
		if t := d.Child("target"); t != nil {
			if bus, _ := t.Attr("bus"); bus == "virtio" && d.Child("address") == nil {
				need = append(need, d)
			}
		}
	}
	if len(need) == 0 {
		return
	}
	hasRoot := false
	for _, c := range devs.All("controller") {
		if m, _ := c.Attr("model"); m == "pcie-root" {
			hasRoot = true
		}
	}
	if !hasRoot {
		root := &xmltree.Node{Name: "controller"}
		root.SetAttr("type", "pci")
		root.SetAttr("index", "0")
		root.SetAttr("model", "pcie-root")
		devs.Children = append(devs.Children, root)
	}
	for _, d := range need {
		idx := addRootPort(devs)
		a := &xmltree.Node{Name: "address"}
		a.SetAttr("type", "pci")
		a.SetAttr("domain", "0x0000")
		a.SetAttr("bus", fmt.Sprintf("0x%02x", idx))
		a.SetAttr("slot", "0x00")
		a.SetAttr("function", "0x0")
		d.Children = append(d.Children, a)
	}
}

// addRootPort appends a pcie-root-port controller with the next free pci
// index and returns that index.
func addRootPort(devs *xmltree.Node) int {
	next := 1
	for _, c := range devs.All("controller") {
		if t, _ := c.Attr("type"); t != "pci" {
			continue
		}
		s, _ := c.Attr("index")
		if i, err := strconv.Atoi(s); err == nil && i >= next {
			next = i + 1
		}
	}
	c := &xmltree.Node{Name: "controller"}
	c.SetAttr("type", "pci")
	c.SetAttr("index", strconv.Itoa(next))
	c.SetAttr("model", "pcie-root-port")
	m := &xmltree.Node{Name: "model"}
	m.SetAttr("name", "pcie-root-port")
	t := &xmltree.Node{Name: "target"}
	t.SetAttr("chassis", strconv.Itoa(next))
	t.SetAttr("port", fmt.Sprintf("0x%x", 0x10+next-1))
	c.Children = append(c.Children, m, t)
	devs.Children = append(devs.Children, c)
	return next
}

var (
	driverAttrs = set("cache", "error_policy", "io", "name", "type", "iothread", "queues", "discard", "iommu")
	sourceAttrs = set("dev", "file", "startupPolicy", "protocol", "name")
	sourceKids  = set("host", "reservations", "slices", "dataStore")
)

// kubevirtDisk applies KubeVirt's api.Disk model to one <disk>.
func kubevirtDisk(d *xmltree.Node) {
	if drv := d.Child("driver"); drv != nil {
		keepAttrs(drv, driverAttrs)
		drv.Remove(func(c *xmltree.Node) bool { return c.Name != "iothreads" })
		if ts := drv.Child("iothreads"); ts != nil {
			ts.Remove(func(c *xmltree.Node) bool { return c.Name != "iothread" })
			for _, t := range ts.Children {
				keepAttrs(t, set("id"))
				t.Children = nil // <queue> is not modeled
				t.Text = ""
			}
		}
	}
	if src := d.Child("source"); src != nil {
		keepAttrs(src, sourceAttrs)
		src.Remove(func(c *xmltree.Node) bool { return !sourceKids[c.Name] })
	}
}

func keepAttrs(n *xmltree.Node, keep map[string]bool) {
	out := n.Attrs[:0]
	for _, a := range n.Attrs {
		if keep[xmltree.AttrName(a)] {
			out = append(out, a)
		}
	}
	n.Attrs = out
}

func set(names ...string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[n] = true
	}
	return m
}
