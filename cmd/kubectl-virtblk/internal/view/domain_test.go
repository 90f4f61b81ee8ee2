package view

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/domainxml"
)

func mustRead(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func render(t *testing.T, xml []byte) (string, *Domain) {
	t.Helper()
	d, err := ParseDomain(xml)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := RenderDomain(&buf, d); err != nil {
		t.Fatal(err)
	}
	return buf.String(), d
}

// row finds the table row whose first column is key, split into columns.
// Columns are separated by two or more spaces (tabwriter padding 2), so a
// cell may contain single spaces.
func row(t *testing.T, out, key string) []string {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		cols := splitCols(line)
		if len(cols) > 0 && cols[0] == key {
			return cols
		}
	}
	t.Fatalf("no row %q in:\n%s", key, out)
	return nil
}

func splitCols(line string) []string {
	var cols []string
	for _, c := range strings.Split(line, "  ") {
		if c = strings.TrimSpace(c); c != "" {
			cols = append(cols, c)
		}
	}
	return cols
}

func wantCols(t *testing.T, got []string, want ...string) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("row %q: %d columns, want %q", got, len(got), want)
		return
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("row %q: column %d = %q, want %q", got, i, got[i], want[i])
		}
	}
}

// TestServedAndMappedDomain renders a libvirt-normalised dumpxml of a
// KubeVirt VM after virtblk's rewrite: a vhost-user disk, a queue-mapped
// disk, KubeVirt's own iothread= disks, a block PVC, a vDPA disk and a
// SATA cdrom.
func TestServedAndMappedDomain(t *testing.T) {
	out, d := render(t, mustRead(t, "testdata/served-mapped-dumpxml.xml"))
	if len(d.Warnings) != 0 {
		t.Errorf("warnings on a consistent domain: %q", d.Warnings)
	}
	wantCols(t, row(t, out, "Domain:"), "Domain:", "default_served-disk")
	wantCols(t, row(t, out, "vCPUs:"), "vCPUs:", "8")
	wantCols(t, row(t, out, "IOThreads:"), "IOThreads:", "6 (ids 1-6)")
	wantCols(t, row(t, out, "Memory:"), "Memory:", "shared (memfd)")
	wantCols(t, row(t, out, "DISK"), "DISK", "TARGET", "BUS", "DEVICE", "TYPE", "QUEUES", "IOTHREADS", "SOURCE")
	wantCols(t, row(t, out, "rootdisk"), "rootdisk", "vda", "virtio", "disk", "file", "auto", "1",
		"/var/run/kubevirt-ephemeral-disks/disk-data/rootdisk/disk.qcow2")
	wantCols(t, row(t, out, "data"), "data", "vdb", "virtio", "disk", "vhostuser", "4", "-",
		"/var/run/kubevirt-hooks/hook-sidecar-0/vhost/data.sock (reconnect 10s)")
	wantCols(t, row(t, out, "scratch"), "scratch", "vdc", "virtio", "disk", "file", "8", "map 3-6",
		"/var/run/kubevirt-private/vmi-disks/scratch/disk.img")
	wantCols(t, row(t, out, "logs"), "logs", "vdd", "virtio", "disk", "block", "auto", "2", "/dev/logs")
	wantCols(t, row(t, out, "vdpa"), "vdpa", "vde", "virtio", "disk", "vhostvdpa", "auto", "-", "/dev/vhost-vdpa-0")
	wantCols(t, row(t, out, "cloudinitdisk"), "cloudinitdisk", "sda", "sata", "cdrom", "file", "-", "-",
		"/var/run/kubevirt-ephemeral-disks/cloud-init-data/default/served-disk/noCloud.iso")

	// The second "scratch" row is the queue map.
	var qmap []string
	for _, line := range strings.Split(out, "\n") {
		if cols := splitCols(line); len(cols) == 2 && cols[0] == "scratch" {
			qmap = cols
		}
	}
	wantCols(t, qmap, "scratch", "0>3 1>4 2>5 3>6 4>3 5>4 6>5 7>6")

	wantCols(t, row(t, out, "IOTHREAD"), "IOTHREAD", "CPUSET", "POLL", "SERVES")
	wantCols(t, row(t, out, "1"), "1", "-", "-", "rootdisk all queues")
	wantCols(t, row(t, out, "2"), "2", "-", "-", "logs all queues")
	wantCols(t, row(t, out, "3"), "3", "2-5", "max=32768ns grow=2 shrink=2", "scratch q0,q4")
	wantCols(t, row(t, out, "6"), "6", "2-5", "max=32768ns grow=2 shrink=2", "scratch q3,q7")
	if strings.Contains(out, "WARNING") {
		t.Errorf("unexpected warning:\n%s", out)
	}
}

// TestDomainxmlFixtures renders every KubeVirt-generated domain XML the
// domainxml package tests with: none may fail, and the policies show up.
func TestDomainxmlFixtures(t *testing.T) {
	files, err := filepath.Glob("../../../../domainxml/testdata/*.xml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 5 {
		t.Fatalf("found %d domainxml fixtures, want at least 5", len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			out, d := render(t, mustRead(t, f))
			if len(d.Disks) == 0 {
				t.Fatalf("no disks parsed:\n%s", out)
			}
			switch filepath.Base(f) {
			case "supplemental-pool.xml":
				for _, k := range d.Disks {
					if k.Bus == "virtio" {
						wantCols(t, row(t, out, k.Name)[:7], k.Name, k.Target, "virtio", "disk", k.Type, "4", "pool 1-4")
					}
				}
				if !strings.Contains(row(t, out, "1")[3], "rootdisk (pool)") {
					t.Errorf("IOThread 1 row: %q", row(t, out, "1"))
				}
			case "no-iothreads.xml":
				wantCols(t, row(t, out, "IOThreads:"), "IOThreads:", "none (disk I/O runs in QEMU's main loop)")
			}
		})
	}
}

// TestRewrittenByDomainxml renders what virtblk's own rewrite produces, so
// inspect and the sidecar agree on the XML: the queue map inspect prints is
// the one domainxml reports it wrote.
func TestRewrittenByDomainxml(t *testing.T) {
	in := mustRead(t, "../../../../domainxml/testdata/supplemental-pool.xml")
	plan := domainxml.IOThreadPlan{
		PoolSize: 3,
		CPUSet:   "4-6",
		Disks: []domainxml.DiskPlan{
			{Alias: "ua-datadisk", Queues: 6},
			{Alias: "ua-rootdisk", Queues: 4, QueueMap: []int{0, 0, 1, 2}},
		},
	}
	outXML, rep, err := domainxml.RewriteIOThreads(in, plan)
	if err != nil {
		t.Fatal(err)
	}
	out, d := render(t, outXML)
	if len(d.Warnings) != 0 {
		t.Errorf("warnings: %q\n%s", d.Warnings, out)
	}
	for _, dr := range rep.Disks {
		name := strings.TrimPrefix(dr.Alias, "ua-")
		var disk *Disk
		for i := range d.Disks {
			if d.Disks[i].Name == name {
				disk = &d.Disks[i]
			}
		}
		if disk == nil || len(disk.QueueMap) != dr.Queues {
			t.Fatalf("disk %s: parsed %+v, domainxml wrote %d queues", name, disk, dr.Queues)
		}
		for _, tq := range dr.Threads {
			for _, q := range tq.Queues {
				if disk.QueueMap[q] != tq.ID {
					t.Errorf("disk %s queue %d: inspect shows IOThread %d, domainxml wrote %d", name, q, disk.QueueMap[q], tq.ID)
				}
			}
		}
	}
	for _, id := range rep.PoolIDs {
		if got := row(t, out, itoa(id))[1]; got != "4-6" {
			t.Errorf("pool IOThread %d pinned to %q, want 4-6", id, got)
		}
	}

	// And the vhost-user redirect of the same domain.
	dom, err := domainxml.ParseDomain(outXML)
	if err != nil {
		t.Fatal(err)
	}
	if err := domainxml.ToVhostUser(dom, "ua-cloudinitdisk", domainxml.VhostUserOptions{
		SocketPath: "/var/run/kubevirt-hooks/hook-sidecar-0/vhost/cloudinitdisk.sock", ReconnectSeconds: 5}); err != nil {
		t.Fatal(err)
	}
	if err := domainxml.EnsureSharedMemory(dom); err != nil {
		t.Fatal(err)
	}
	outXML, err = domainxml.MarshalDomain(dom)
	if err != nil {
		t.Fatal(err)
	}
	out, d = render(t, outXML)
	r := row(t, out, "cloudinitdisk")
	if r[4] != "vhostuser" || r[len(r)-1] != "/var/run/kubevirt-hooks/hook-sidecar-0/vhost/cloudinitdisk.sock (reconnect 5s)" {
		t.Errorf("vhost-user row %q", r)
	}
	if d.SharedMemory == "" || len(d.Warnings) != 0 {
		t.Errorf("shared memory %q, warnings %q", d.SharedMemory, d.Warnings)
	}
}

func itoa(u uint) string { return strconv.FormatUint(uint64(u), 10) }

func TestWarnings(t *testing.T) {
	cases := []struct{ name, devices, extra, want string }{
		{"missing iothread", `<disk type='file'><driver iothread='9'/><target dev='vda' bus='virtio'/><alias name='ua-a'/></disk>`, "",
			"disk a: driver iothread uses IOThread 9, which the domain does not define"},
		{"unmapped queue", `<disk type='file'><driver queues='3'><iothreads><iothread id='1'><queue id='0'/><queue id='2'/></iothread></iothreads></driver><target dev='vda' bus='virtio'/><alias name='ua-a'/></disk>`, "<iothreads>1</iothreads>",
			"disk a: queue 1 is not mapped"},
		{"queue beyond count", `<disk type='file'><driver queues='1'><iothreads><iothread id='1'><queue id='0'/><queue id='1'/></iothread></iothreads></driver><target dev='vda' bus='virtio'/><alias name='ua-a'/></disk>`, "<iothreads>1</iothreads>",
			"names queue 1 but the disk has 1 queues"},
		{"not shared", `<disk type='vhostuser'><source type='unix' path='/s.sock'/><target dev='vda' bus='virtio'/><alias name='ua-a'/></disk>`, "",
			"guest memory is not shared"},
		{"both", `<disk type='file'><driver iothread='1'><iothreads><iothread id='1'/></iothreads></driver><target dev='vda' bus='virtio'/><alias name='ua-a'/></disk>`, "<iothreads>1</iothreads>",
			"both driver iothread and <iothreads>"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			xml := "<domain type='kvm'><name>ns_vm</name>" + c.extra + "<devices>" + c.devices + "</devices></domain>"
			out, d := render(t, []byte(xml))
			found := false
			for _, w := range d.Warnings {
				found = found || strings.Contains(w, c.want)
			}
			if !found || !strings.Contains(out, "WARNING: ") {
				t.Errorf("warnings %q, want one containing %q; output:\n%s", d.Warnings, c.want, out)
			}
		})
	}
}

func TestParseDomainErrors(t *testing.T) {
	for _, in := range []string{"", "not xml", "<domain><name>x</name>", "<domain type='kvm'></domain>", "error: failed to get domain 'default_vm'"} {
		if _, err := ParseDomain([]byte(in)); err == nil {
			t.Errorf("ParseDomain(%q) accepted", in)
		}
	}
}

func FuzzParseDomain(f *testing.F) {
	f.Add(mustRead(f, "testdata/served-mapped-dumpxml.xml"))
	f.Add([]byte("<domain><name>a</name><iothreads>3</iothreads><devices><disk type='vhostuser'><driver queues='2'><iothreads><iothread id='7'><queue id='4000000000'/></iothread></iothreads></driver></disk></devices></domain>"))
	f.Add([]byte("<domain><name>a</name><devices><disk type='network'><source protocol='nbd' name='x'/></disk></devices></domain>"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := ParseDomain(data)
		if err != nil {
			return
		}
		var buf bytes.Buffer
		if err := RenderDomain(&buf, d); err != nil {
			t.Fatal(err)
		}
		for _, k := range d.Disks {
			if len(k.QueueMap) > maxShownQueues {
				t.Fatalf("queue map of %d entries from untrusted XML", len(k.QueueMap))
			}
		}
	})
}

// TestHostileValuesAreEscaped: paths and names come from the pod; control
// characters in them must not reach the terminal or break the table.
func TestHostileValuesAreEscaped(t *testing.T) {
	xml := "<domain type='kvm'><name>ns_vm</name><devices>" +
		"<disk type='file'><source file='/x&#x9b;2J&#x9;y'/><target dev='vda' bus='virtio'/><alias name='ua-a&#xa;b'/></disk>" +
		"</devices></domain>"
	out, _ := render(t, []byte(xml))
	if strings.ContainsAny(out, "\u009b\t") {
		t.Errorf("raw control characters in output: %q", out)
	}
	if !strings.Contains(out, `"/x\u009b2J\ty"`) || !strings.Contains(out, `"a\nb"`) {
		t.Errorf("values not quoted:\n%s", out)
	}
}
