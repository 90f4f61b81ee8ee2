package domainxml

import (
	"bytes"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/virtblk/virtblk/domainxml/kvsim"
)

const testSock = "/var/run/kubevirt-hooks/hook-sidecar-0/vhost/data.sock"

func TestToVhostUserStripsWhatLibvirtRejects(t *testing.T) {
	dom := mustParse(t, readFixture(t, "block-multiqueue.xml"))
	d := findDisk(dom, "ua-data")
	// Give the disk everything libvirt refuses on vhost-user, on top of
	// KubeVirt's cache/io/error_policy/discard/iothread/serial.
	d.Driver.RErrorPolicy = "report"
	d.Driver.IOEventFD = "on"
	d.Driver.CopyOnRead = "on"
	d.Driver.DetectZeros = "unmap"
	d.Driver.MetadataCache = &libvirtxml.DomainDiskMetadataCache{}
	d.BackingStore = &libvirtxml.DomainDiskBackingStore{}
	d.Encryption = &libvirtxml.DomainDiskEncryption{Format: "luks"}
	d.ReadOnly = &libvirtxml.DomainDiskReadOnly{}
	d.Shareable = &libvirtxml.DomainDiskShareable{}
	d.Transient = &libvirtxml.DomainDiskTransient{}
	d.WWN, d.Vendor, d.Product = "5000c50015ea71ac", "ACME", "FAST"
	d.Auth = &libvirtxml.DomainDiskAuth{Username: "u"}
	d.Geometry = &libvirtxml.DomainDiskGeometry{Cylinders: 1, Headers: 1, Sectors: 1}
	d.BlockIO = &libvirtxml.DomainDiskBlockIO{LogicalBlockSize: 4096}
	d.IOTune = &libvirtxml.DomainDiskIOTune{TotalIopsSec: 100}
	qs := uint(128)
	d.Driver.QueueSize = &qs

	if err := ToVhostUser(dom, "ua-data", VhostUserOptions{SocketPath: testSock, ReconnectSeconds: 10, Queues: 6}); err != nil {
		t.Fatal(err)
	}
	got := marshal(t, findDisk(dom, "ua-data"))
	want := `<disk type="vhostuser" device="disk" snapshot="no" model="virtio-non-transitional">` +
		`<driver name="qemu" type="raw" queues="6" queue_size="128"></driver>` +
		`<source type="unix" path="` + testSock + `"><reconnect enabled="yes" timeout="10"></reconnect></source>` +
		`<target dev="vdb" bus="virtio"></target><alias name="ua-data"></alias></disk>`
	if got != want {
		t.Fatalf("disk\n got %s\nwant %s", got, want)
	}
	// Boot order and address survive.
	dom2 := mustParse(t, readFixture(t, "pci-defined.xml"))
	if err := ToVhostUser(dom2, "ua-rootdisk", VhostUserOptions{SocketPath: testSock}); err != nil {
		t.Fatal(err)
	}
	r := findDisk(dom2, "ua-rootdisk")
	if r.Boot == nil || r.Boot.Order != 1 || r.Address == nil || r.Address.PCI == nil || *r.Driver.Queues != 4 {
		t.Fatalf("boot/address/queues lost: %s", marshal(t, r))
	}
	if r.Source.VHostUser.UNIX.Reconnect != nil {
		t.Fatal("reconnect set with ReconnectSeconds 0")
	}
}

// TestVhostUserLossyRefeed: KubeVirt returns the disk with an empty
// <source>; the redirect must rebuild it identically.
func TestVhostUserLossyRefeed(t *testing.T) {
	x := readFixture(t, "no-iothreads.xml")
	f := func(in []byte) []byte {
		dom := mustParse(t, in)
		if err := ToVhostUser(dom, "ua-scratch", VhostUserOptions{SocketPath: testSock, ReconnectSeconds: 3, Queues: 2}); err != nil {
			t.Fatal(err)
		}
		if err := EnsureSharedMemory(dom); err != nil {
			t.Fatal(err)
		}
		out, err := MarshalDomain(dom)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	out1 := f(x)
	in2, err := kvsim.Refeed(x, out1)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(in2, []byte(testSock)) || bytes.Contains(in2, []byte("<reconnect")) || bytes.Contains(in2, []byte("memoryBacking")) {
		t.Fatalf("refeed kept what KubeVirt drops:\n%s", in2)
	}
	out2 := f(in2)
	if settings(t, out1) != settings(t, out2) {
		t.Fatalf("not convergent:\n%s\n---\n%s", settings(t, out1), settings(t, out2))
	}
	if !bytes.Equal(f(out1), out1) {
		t.Fatal("not idempotent")
	}
	validateAll(t, map[string][]byte{"vhost-out1.xml": out1, "vhost-out2.xml": out2})
}

func TestToVhostVDPA(t *testing.T) {
	dom := mustParse(t, readFixture(t, "mixed-sata-cdrom.xml"))
	if err := ToVhostVDPA(dom, "ua-myvolume", "/dev/vhost-vdpa-3"); err != nil {
		t.Fatal(err)
	}
	got := marshal(t, findDisk(dom, "ua-myvolume"))
	want := `<disk type="vhostvdpa" device="disk" model="virtio-non-transitional">` +
		`<driver name="qemu" type="raw" cache="none" error_policy="stop" discard="unmap" iothread="2"></driver>` +
		`<source dev="/dev/vhost-vdpa-3"></source><target dev="vda" bus="virtio"></target><alias name="ua-myvolume"></alias></disk>`
	if got != want {
		t.Fatalf("disk\n got %s\nwant %s", got, want)
	}
	// Idempotent, and the IOThread plan still applies to a vDPA disk.
	before := marshal(t, dom)
	if err := ToVhostVDPA(dom, "ua-myvolume", "/dev/vhost-vdpa-3"); err != nil || marshal(t, dom) != before {
		t.Fatalf("second ToVhostVDPA changed the domain (err %v)", err)
	}
	if _, err := ApplyIOThreads(dom, IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-myvolume", 2)}}); err != nil {
		t.Fatal(err)
	}
	out, err := MarshalDomain(dom)
	if err != nil {
		t.Fatal(err)
	}
	validateAll(t, map[string][]byte{"vdpa.xml": out})
}

func TestRedirectErrors(t *testing.T) {
	mixed := readFixture(t, "mixed-sata-cdrom.xml")
	cases := []struct {
		name string
		do   func(*libvirtxml.Domain) error
		want []string
	}{
		{"relative socket", func(d *libvirtxml.Domain) error {
			return ToVhostUser(d, "ua-myvolume", VhostUserOptions{SocketPath: "vhost/data.sock"})
		}, []string{"ua-myvolume", "must be absolute"}},
		{"unknown alias", func(d *libvirtxml.Domain) error {
			return ToVhostUser(d, "ua-nope", VhostUserOptions{SocketPath: testSock})
		}, []string{"ua-nope", "not found"}},
		{"sata", func(d *libvirtxml.Domain) error {
			return ToVhostUser(d, "ua-secret_test", VhostUserOptions{SocketPath: testSock})
		}, []string{"ua-secret_test (target sde)", `bus "sata"`}},
		{"cdrom", func(d *libvirtxml.Domain) error {
			return ToVhostUser(d, "ua-sysprep", VhostUserOptions{SocketPath: testSock})
		}, []string{"ua-sysprep (target sdj)", "cdrom"}},
		{"long socket path", func(d *libvirtxml.Domain) error {
			return ToVhostUser(d, "ua-myvolume", VhostUserOptions{SocketPath: "/var/run/kubevirt-hooks/" + strings.Repeat("x", 90) + "/d.sock"})
		}, []string{"ua-myvolume", "121 bytes", "107"}},
		{"queues", func(d *libvirtxml.Domain) error {
			return ToVhostUser(d, "ua-myvolume", VhostUserOptions{SocketPath: testSock, Queues: 5000})
		}, []string{"5000 queues"}},
		{"vdpa relative", func(d *libvirtxml.Domain) error { return ToVhostVDPA(d, "ua-myvolume", "vhost-vdpa-0") }, []string{"must be absolute"}},
		{"vdpa sata", func(d *libvirtxml.Domain) error { return ToVhostVDPA(d, "ua-secret_test", "/dev/vhost-vdpa-0") }, []string{"need bus virtio", "vDPA"}},
		{"private numa", func(d *libvirtxml.Domain) error {
			d.CPU.Numa = &libvirtxml.DomainNuma{Cell: []libvirtxml.DomainCell{{Memory: 1, MemAccess: "private"}}}
			return EnsureSharedMemory(d)
		}, []string{"NUMA cell 0", "private"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.do(mustParse(t, mixed))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestEnsureSharedMemory(t *testing.T) {
	cases := []struct {
		name string
		in   *libvirtxml.DomainMemoryBacking
		want string
	}{
		{"none", nil, `<DomainMemoryBacking><source type="memfd"></source><access mode="shared"></access></DomainMemoryBacking>`},
		{"anonymous", &libvirtxml.DomainMemoryBacking{MemorySource: &libvirtxml.DomainMemorySource{Type: "anonymous"}, MemoryAccess: &libvirtxml.DomainMemoryAccess{Mode: "private"}},
			`<DomainMemoryBacking><source type="memfd"></source><access mode="shared"></access></DomainMemoryBacking>`},
		{"file", &libvirtxml.DomainMemoryBacking{MemorySource: &libvirtxml.DomainMemorySource{Type: "file"}},
			`<DomainMemoryBacking><source type="file"></source><access mode="shared"></access></DomainMemoryBacking>`},
		{"hugepages", &libvirtxml.DomainMemoryBacking{MemoryHugePages: &libvirtxml.DomainMemoryHugepages{}},
			`<DomainMemoryBacking><hugepages></hugepages><access mode="shared"></access></DomainMemoryBacking>`},
		{"hugepages memfd", &libvirtxml.DomainMemoryBacking{MemoryHugePages: &libvirtxml.DomainMemoryHugepages{}, MemorySource: &libvirtxml.DomainMemorySource{Type: "memfd"}},
			`<DomainMemoryBacking><hugepages></hugepages><source type="memfd"></source><access mode="shared"></access></DomainMemoryBacking>`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dom := &libvirtxml.Domain{MemoryBacking: c.in}
			if err := EnsureSharedMemory(dom); err != nil {
				t.Fatal(err)
			}
			if got := marshal(t, dom.MemoryBacking); got != c.want {
				t.Fatalf("got %s\nwant %s", got, c.want)
			}
			if err := EnsureSharedMemory(dom); err != nil || marshal(t, dom.MemoryBacking) != c.want {
				t.Fatal("not idempotent")
			}
		})
	}
	// The fixture's hugepage page sizes survive.
	dom := mustParse(t, readFixture(t, "pci-defined.xml"))
	if err := EnsureSharedMemory(dom); err != nil {
		t.Fatal(err)
	}
	if got := marshal(t, dom.MemoryBacking); got != `<DomainMemoryBacking><hugepages><page size="2048" unit="KiB"></page></hugepages><source type="memfd"></source><access mode="shared"></access></DomainMemoryBacking>` {
		t.Fatalf("hugepages lost: %s", got)
	}
}
