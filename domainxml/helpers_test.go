package domainxml

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/virtblk/virtblk/domainxml/internal/xmltree"

	"github.com/virtblk/virtblk/internal/testenv"
)

// fixtures are KubeVirt-generated domain XMLs written from the converter
// output in the reference notes (Appendix A, section 7).
var fixtures = []string{
	"supplemental-pool.xml",
	"auto-dedicated.xml",
	"no-iothreads.xml",
	"block-multiqueue.xml",
	"mixed-sata-cdrom.xml",
	"pci-defined.xml",
	"vhostuser-refeed.xml",
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatalf("read fixture: %v", err)
	}
	return b
}

// scenario is one desired state: an IOThread plan plus disk redirects.
type scenario struct {
	fixture string
	name    string
	plan    IOThreadPlan
	vhost   map[string]VhostUserOptions
	vdpa    map[string]string
}

func (s scenario) String() string { return s.fixture + "/" + s.name }

// apply is the hook's whole rewrite in the order the sidecar must use:
// redirects first (they strip IOThread references), then the IOThread plan,
// whose pool ids depend on the references that remain.
func (s scenario) apply(in []byte) ([]byte, Report, error) {
	dom, err := ParseDomain(in)
	if err != nil {
		return nil, Report{}, err
	}
	for _, alias := range sortedKeys(s.vhost) {
		if err := ToVhostUser(dom, alias, s.vhost[alias]); err != nil {
			return nil, Report{}, err
		}
	}
	for _, alias := range sortedKeys(s.vdpa) {
		if err := ToVhostVDPA(dom, alias, s.vdpa[alias]); err != nil {
			return nil, Report{}, err
		}
	}
	if len(s.vhost)+len(s.vdpa) > 0 {
		if err := EnsureSharedMemory(dom); err != nil {
			return nil, Report{}, err
		}
	}
	rep, err := ApplyIOThreads(dom, s.plan)
	if err != nil {
		return nil, Report{}, err
	}
	out, err := MarshalDomain(dom)
	if err != nil {
		return nil, Report{}, err
	}
	out, err = KeepKubeVirtDiskExtras(in, out)
	return out, rep, err
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func disk(alias string, queues int) DiskPlan { return DiskPlan{Alias: alias, Queues: queues} }

var poll = &Polling{MaxNS: 32768, Grow: 2, Shrink: 4}

// scenarios covers every fixture with a few plans each.
var scenarios = []scenario{
	{fixture: "supplemental-pool.xml", name: "replace-pool",
		plan: IOThreadPlan{PoolSize: 4, Disks: []DiskPlan{disk("ua-rootdisk", 4), disk("ua-datadisk", 4), disk("ua-cloudinitdisk", 4)}}},
	{fixture: "supplemental-pool.xml", name: "one-disk-beside-pool",
		plan: IOThreadPlan{PoolSize: 2, CPUSet: "2-3", Polling: poll, Disks: []DiskPlan{disk("ua-datadisk", 8)}}},
	{fixture: "supplemental-pool.xml", name: "explicit-map",
		plan: IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{{Alias: "ua-rootdisk", Queues: 4, QueueMap: []int{1, 1, 0, 1}}}}},
	{fixture: "supplemental-pool.xml", name: "vhostuser-datadisk",
		plan:  IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-rootdisk", 4)}},
		vhost: map[string]VhostUserOptions{"ua-datadisk": {SocketPath: "/var/run/kubevirt-hooks/hook-sidecar-0/vhost/datadisk.sock", ReconnectSeconds: 10, Queues: 4}}},
	{fixture: "auto-dedicated.xml", name: "dedicated-disk",
		plan: IOThreadPlan{PoolSize: 2, CPUSet: "4-5", Disks: []DiskPlan{disk("ua-datadisk", 4)}}},
	{fixture: "auto-dedicated.xml", name: "all-disks",
		plan: IOThreadPlan{PoolSize: 3, CPUSet: "0,2", Disks: []DiskPlan{disk("ua-rootdisk", 6), disk("ua-datadisk", 6), disk("ua-logdisk", 2)}}},
	{fixture: "no-iothreads.xml", name: "two-disks",
		plan: IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-rootdisk", 2), disk("ua-scratch", 2)}}},
	{fixture: "no-iothreads.xml", name: "fewer-queues-than-pool",
		plan: IOThreadPlan{PoolSize: 4, Polling: poll, Disks: []DiskPlan{disk("ua-scratch", 3)}}},
	{fixture: "block-multiqueue.xml", name: "data-pinned",
		plan: IOThreadPlan{PoolSize: 4, CPUSet: "4-7,^6", Polling: poll, Disks: []DiskPlan{disk("ua-data", 8)}}},
	{fixture: "block-multiqueue.xml", name: "all-disks",
		plan: IOThreadPlan{PoolSize: 8, Disks: []DiskPlan{disk("ua-rootdisk", 8), disk("ua-data", 8), disk("ua-scratch", 8)}}},
	{fixture: "block-multiqueue.xml", name: "vhostuser-data",
		plan:  IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-scratch", 8)}},
		vhost: map[string]VhostUserOptions{"ua-data": {SocketPath: "/var/run/kubevirt-hooks/hook-sidecar-0/vhost/data.sock"}}},
	{fixture: "mixed-sata-cdrom.xml", name: "myvolume",
		plan: IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-myvolume", 4)}}},
	{fixture: "mixed-sata-cdrom.xml", name: "both-virtio",
		plan: IOThreadPlan{PoolSize: 1, CPUSet: "1", Disks: []DiskPlan{disk("ua-myvolume", 1), disk("ua-nocloud", 1)}}},
	{fixture: "pci-defined.xml", name: "pgdata-pinned",
		plan: IOThreadPlan{PoolSize: 4, CPUSet: "11-14", Disks: []DiskPlan{disk("ua-pgdata", 4)}}},
	{fixture: "pci-defined.xml", name: "both-shrink-pool",
		plan: IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-rootdisk", 4), disk("ua-pgdata", 4)}}},
	{fixture: "pci-defined.xml", name: "vdpa-pgdata",
		plan: IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-rootdisk", 4)}},
		vdpa: map[string]string{"ua-pgdata": "/dev/vhost-vdpa-0"}},
	{fixture: "vhostuser-refeed.xml", name: "fastdisk",
		plan:  IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-rootdisk", 4)}},
		vhost: map[string]VhostUserOptions{"ua-fastdisk": {SocketPath: "/var/run/kubevirt-hooks/hook-sidecar-0/vhost/fast.sock", ReconnectSeconds: 5}}},
}

// libvirtKey identifies repeated libvirt elements by what names them, so
// tree diffs can say "disk[ua-data]" and match elements across reorders.
func libvirtKey(n *xmltree.Node) string {
	switch n.Name {
	case "disk", "interface", "input":
		if a := n.Child("alias"); a != nil {
			v, _ := a.Attr("name")
			return v
		}
	case "controller":
		t, _ := n.Attr("type")
		i, _ := n.Attr("index")
		return t + ":" + i
	case "iothread", "queue":
		v, _ := n.Attr("id")
		return v
	case "iothreadpin":
		v, _ := n.Attr("iothread")
		return v
	case "vcpupin":
		v, _ := n.Attr("vcpu")
		return v
	case "entry", "timer":
		v, _ := n.Attr("name")
		return v
	}
	return ""
}

func mustTree(t testing.TB, b []byte) *xmltree.Node {
	t.Helper()
	n, err := xmltree.Parse(b)
	if err != nil {
		t.Fatalf("parse tree: %v\n%s", err, b)
	}
	return n
}

// schemaPath finds libvirt 11.3's domain.rng: $VIRTBLK_LIBVIRT_RNG, the
// trixie root's libvirt-common (which make test builds before the tests),
// or the workspace's shared/schemas beside the repository; the files are
// byte-identical.
func schemaPath(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("VIRTBLK_LIBVIRT_RNG"); p != "" {
		return p
	}
	if p := filepath.Join(testenv.TrixieRoot(), "usr/share/libvirt/schemas/domain.rng"); fileExists(p) {
		return p
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if p := filepath.Join(dir, "shared", "schemas", "libvirt", "domain.rng"); fileExists(p) {
			return p
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	testenv.Missing(t, "libvirt 11.3 schema domain.rng: build the trixie root (hack/trixie-root.sh, run by make test) or set VIRTBLK_LIBVIRT_RNG")
	return ""
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func xmllintPath(t testing.TB) string {
	t.Helper()
	return testenv.Tool(t, "xmllint", "libxml2-utils")
}

// forSchema normalises the KubeVirt-isms that libvirt accepts but its own
// RelaxNG schema does not: KubeVirt always emits <sysinfo> with empty
// <bios>, <baseBoard>, <chassis> (and sometimes <system>), and the schema
// wants at least one <entry> in each; and KubeVirt's private <disk>
// children <filesystemOverhead> and <capacity>, which libvirt ignores.
// Nothing we write is touched, so what we produce is what gets validated.
func forSchema(t testing.TB, b []byte) []byte {
	t.Helper()
	n := mustTree(t, b)
	if devs := n.Child("devices"); devs != nil {
		for _, d := range devs.All("disk") {
			d.Remove(func(c *xmltree.Node) bool { return kubevirtDiskExtras[c.Name] })
		}
	}
	for _, si := range n.All("sysinfo") {
		si.Remove(func(c *xmltree.Node) bool {
			switch c.Name {
			case "bios", "baseBoard", "chassis", "system":
				return len(c.Children) == 0 && len(c.Attrs) == 0 && c.Text == ""
			}
			return false
		})
	}
	return n.Marshal()
}

// validateAll runs one xmllint over all docs (name -> XML) and fails the
// test for each document the schema rejects, with xmllint's reasons.
func validateAll(t *testing.T, docs map[string][]byte) {
	t.Helper()
	for name, why := range lint(t, docs) {
		if why != "" {
			t.Errorf("%s does not validate against libvirt's domain.rng:\n%s\n%s", name, why, forSchema(t, docs[name]))
		}
	}
}

// lint returns, per document, "" if it validates or xmllint's complaint.
func lint(t *testing.T, docs map[string][]byte) map[string]string {
	t.Helper()
	schema := schemaPath(t)
	xl := xmllintPath(t)
	dir := t.TempDir()
	files := map[string]string{}
	args := []string{"--noout", "--relaxng", schema}
	for _, name := range sortedKeys(docs) {
		f := filepath.Join(dir, strings.ReplaceAll(name, "/", "_"))
		if err := os.WriteFile(f, forSchema(t, docs[name]), 0o644); err != nil {
			t.Fatal(err)
		}
		files[name] = f
		args = append(args, f)
	}
	var out bytes.Buffer
	cmd := exec.Command(xl, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	report := out.String()
	if strings.Contains(report, "failed to compile") || strings.Contains(report, "Relax-NG parser error") {
		t.Fatalf("xmllint cannot load %s: %v\n%s", schema, err, report)
	}
	res := map[string]string{}
	for name, f := range files {
		res[name] = ""
		if !strings.Contains(report, f+" validates") {
			res[name] = grepFile(report, f)
			if res[name] == "" {
				res[name] = "no verdict from xmllint: " + report
			}
		}
	}
	return res
}

func grepFile(report, f string) string {
	var lines []string
	for _, l := range strings.Split(report, "\n") {
		if strings.Contains(l, f) || strings.HasPrefix(l, "Relax-NG") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

func mustParse(t testing.TB, b []byte) *libvirtxml.Domain {
	t.Helper()
	d, err := ParseDomain(b)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func marshal(t testing.TB, v any) string {
	t.Helper()
	b, err := xml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// settings extracts everything the hook is responsible for, to compare
// across hook calls: domain-level IOThreads, pins, memory backing, and each
// disk's type, snapshot, driver and source, keyed by alias. Addresses and
// controllers are libvirt's and legitimately appear on later calls.
func settings(t testing.TB, b []byte) string {
	t.Helper()
	d := mustParse(t, b)
	var s strings.Builder
	fmt.Fprintf(&s, "iothreads=%d\n", d.IOThreads)
	fmt.Fprintf(&s, "iothreadids=%s\n", marshal(t, d.IOThreadIDs))
	fmt.Fprintf(&s, "cputune=%s\n", marshal(t, d.CPUTune))
	fmt.Fprintf(&s, "memoryBacking=%s\n", marshal(t, d.MemoryBacking))
	if d.Devices != nil {
		for _, dk := range d.Devices.Disks {
			dk.Address = nil
			fmt.Fprintf(&s, "disk %s: %s\n", diskAlias(&dk), marshal(t, &dk))
		}
	}
	return s.String()
}
