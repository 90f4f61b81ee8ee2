package kvsim

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/domainxml/internal/xmltree"
)

const original = `<domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
	<name>ns_vm</name>
	<devices>
		<disk device="disk" type="file">
			<source file="/disk.img"></source>
			<target bus="virtio" dev="vda"></target>
			<driver name="qemu" type="raw" iothread="1"></driver>
			<alias name="ua-root"></alias>
		</disk>
	</devices>
	<vcpu placement="static">2</vcpu>
	<iothreads>1</iothreads>
</domain>`

// defined is what a hook returned on call #1: domain-level edits, a queue
// mapping, a vhost-user disk and a driver attribute KubeVirt does not model.
const defined = `<domain type="kvm">
	<name>ns_vm</name>
	<vcpu placement="static">2</vcpu>
	<iothreads>3</iothreads>
	<iothreadids><iothread id="1"></iothread><iothread id="2"></iothread><iothread id="3"></iothread></iothreadids>
	<cputune><iothreadpin iothread="2" cpuset="4"></iothreadpin></cputune>
	<memoryBacking><source type="memfd"></source><access mode="shared"></access></memoryBacking>
	<devices>
		<disk type="file" device="disk">
			<driver name="qemu" type="raw" queues="2" queue_size="256">
				<iothreads>
					<iothread id="2"><queue id="0"></queue></iothread>
					<iothread id="3"><queue id="1"></queue></iothread>
				</iothreads>
			</driver>
			<source file="/disk.img"></source>
			<target dev="vda" bus="virtio"></target>
			<alias name="ua-root"></alias>
		</disk>
		<disk type="vhostuser" device="disk" snapshot="no">
			<driver name="qemu" type="raw" queues="4"></driver>
			<source type="unix" path="/run/vhost/data.sock"><reconnect enabled="yes" timeout="10"></reconnect></source>
			<target dev="vdb" bus="virtio"></target>
			<alias name="ua-data"></alias>
			<address type="pci" domain="0x0000" bus="0x07" slot="0x00" function="0x0"></address>
		</disk>
		<controller type="pci" index="0" model="pcie-root"></controller>
		<controller type="pci" index="7" model="pcie-root-port"></controller>
	</devices>
</domain>`

func tree(t *testing.T, b []byte) *xmltree.Node {
	t.Helper()
	n, err := xmltree.Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestRefeed(t *testing.T) {
	out, err := Refeed([]byte(original), []byte(defined))
	if err != nil {
		t.Fatal(err)
	}
	s := string(out)
	// Domain level is the original's.
	for _, gone := range []string{"<iothreadids>", "<cputune>", "<memoryBacking>", "<iothreads>3<"} {
		if strings.Contains(s, gone) {
			t.Errorf("domain-level edit %s survived:\n%s", gone, s)
		}
	}
	if !strings.Contains(s, "<iothreads>1</iothreads>") || !strings.Contains(s, `xmlns:qemu=`) {
		t.Errorf("original top level lost:\n%s", s)
	}
	// Device-level: unmodeled parts gone, modeled kept.
	for _, gone := range []string{"<queue ", "queue_size", "/run/vhost/data.sock", "<reconnect", `type="unix"`} {
		if strings.Contains(s, gone) {
			t.Errorf("unmodeled %s survived:\n%s", gone, s)
		}
	}
	n := tree(t, out)
	devs := n.Child("devices")
	disks := devs.All("disk")
	if len(disks) != 2 {
		t.Fatalf("%d disks", len(disks))
	}
	root, data := disks[0], disks[1]
	if q, _ := root.Child("driver").Attr("queues"); q != "2" {
		t.Errorf("queues lost: %q", q)
	}
	if ids := root.Child("driver").Child("iothreads").All("iothread"); len(ids) != 2 || len(ids[0].Children) != 0 {
		t.Errorf("iothread ids not kept without queues")
	}
	if typ, _ := data.Attr("type"); typ != "vhostuser" {
		t.Errorf("vhostuser type lost")
	}
	if src := data.Child("source"); src == nil || len(src.Attrs) != 0 || len(src.Children) != 0 {
		t.Errorf("vhostuser source should come back empty")
	}
	// libvirt addressed the unaddressed virtio disk on a new root port;
	// the existing address is kept.
	a := root.Child("address")
	if a == nil {
		t.Fatal("virtio disk without address after define")
	}
	if bus, _ := a.Attr("bus"); bus != "0x08" {
		t.Errorf("new address on bus %s, want 0x08 (next root port)", bus)
	}
	if bus, _ := data.Child("address").Attr("bus"); bus != "0x07" {
		t.Errorf("existing address changed")
	}
	if n := len(devs.All("controller")); n != 3 {
		t.Errorf("%d controllers, want pcie-root + 2 root ports", n)
	}
}

func TestRefeedAddingRootPorts(t *testing.T) {
	out2, err := Refeed([]byte(original), []byte(defined))
	if err != nil {
		t.Fatal(err)
	}
	out3, err := RefeedAddingRootPorts([]byte(original), out2, 4)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(tree(t, out3).Child("devices").All("controller")); got != 3+4 {
		t.Fatalf("%d controllers, want 7", got)
	}
	// Refeeding an already refed document changes nothing else: the
	// model is a projection.
	again, err := Refeed([]byte(original), out2)
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != string(out2) {
		t.Fatalf("Refeed is not a projection:\n%s\n---\n%s", out2, again)
	}
	if _, err := RefeedAddingRootPorts([]byte(original), out2, 65); err == nil {
		t.Fatal("65 root ports accepted")
	}
}

func TestRefeedErrors(t *testing.T) {
	if _, err := Refeed([]byte("<domain>"), []byte(defined)); err == nil || !strings.Contains(err.Error(), "original") {
		t.Errorf("bad original: %v", err)
	}
	if _, err := Refeed([]byte(original), []byte("<network/>")); err == nil || !strings.Contains(err.Error(), "defined") {
		t.Errorf("bad defined: %v", err)
	}
}

func TestCanonical(t *testing.T) {
	plain := []byte(`<domain type="kvm"><name>x</name><devices>` +
		`<disk type="file" device="disk"><source file="/a"/><target dev="vda" bus="virtio"/></disk>` +
		`<controller type="usb" index="0"/></devices></domain>`)
	defined := []byte(`<domain type="kvm"><name>x</name><devices>` +
		`<disk type="file" device="disk"><source file="/a"/><target dev="vda" bus="virtio"/>` +
		`<address type="pci" domain="0x0000" bus="0x01" slot="0x00" function="0x0"/></disk>` +
		`<controller type="usb" index="0"/><controller type="pci" index="0" model="pcie-root"/>` +
		`<controller type="pci" index="1" model="pcie-root-port"/></devices></domain>`)
	a, err := Canonical(plain)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Canonical(defined)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatalf("canonical forms differ:\n%s\n%s", a, b)
	}
	if !bytes.Contains(b, []byte(`controller type="usb"`)) {
		t.Fatalf("non-PCI controller dropped:\n%s", b)
	}
	if _, err := Canonical([]byte(`<network/>`)); err == nil {
		t.Fatal("a non-domain document was accepted")
	}
}

func TestDefineCalls(t *testing.T) {
	var ins [][]byte
	outs, err := DefineCalls([]byte(original), 2, func(call int, in []byte) ([]byte, error) {
		if call != len(ins)+1 {
			t.Fatalf("call %d out of order", call)
		}
		ins = append(ins, in)
		return in, nil // a hook that changes nothing
	})
	if err != nil || len(outs) != 3 {
		t.Fatalf("outs %d, err %v", len(outs), err)
	}
	want2, _ := Refeed([]byte(original), outs[0])
	want3, _ := RefeedAddingRootPorts([]byte(original), outs[1], 2)
	if string(ins[0]) != original || !bytes.Equal(ins[1], want2) || !bytes.Equal(ins[2], want3) {
		t.Fatal("calls did not get virt-launcher's inputs")
	}
	if _, err := DefineCalls([]byte(original), 2, func(call int, in []byte) ([]byte, error) {
		if call == 2 {
			return nil, errors.New("boom")
		}
		return in, nil
	}); err == nil || !strings.Contains(err.Error(), "define call 2: boom") {
		t.Fatalf("error %v, want it to name call 2", err)
	}
}
