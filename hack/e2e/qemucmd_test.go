package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/domainxml"
)

// testdata/libvirt-qemu.log is a real log from libvirt 11.3 starting QEMU
// 10.0 on the rewritten supplemental-pool domain.
func TestParseLogCmdlineRealLog(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "libvirt-qemu.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd, err := ParseLogCmdline(string(b))
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 7; i++ {
		id := "iothread" + string(rune('0'+i))
		if !cmd.IOThreads[id] {
			t.Errorf("missing -object %s; have %v", id, cmd.IOThreads)
		}
	}
	want := map[string]VQMapping{
		"ua-rootdisk":      {"iothread5": {0, 3}, "iothread6": {1}, "iothread7": {2}},
		"ua-datadisk":      {"iothread5": {1}, "iothread6": {3}, "iothread7": {0, 2}},
		"ua-cloudinitdisk": {"iothread1": nil, "iothread2": nil, "iothread3": nil, "iothread4": nil},
	}
	if len(cmd.Blk) != len(want) {
		t.Errorf("got %d virtio-blk devices, want %d: %v", len(cmd.Blk), len(want), cmd.Blk)
	}
	for alias, wm := range want {
		dev := cmd.Blk[alias]
		if d := wm.Diff(dev.Mapping); d != "" {
			t.Errorf("%s: %s", alias, d)
		}
		if dev.NumQueues != 4 {
			t.Errorf("%s: num-queues %d, want 4", alias, dev.NumQueues)
		}
	}
}

func TestParseCmdlineProcFormat(t *testing.T) {
	args := []string{
		"/usr/bin/qemu-system-x86_64", "-name", "guest=x",
		"-object", `{"qom-type":"iothread","id":"iothread1"}`,
		"-object", "iothread,id=iothread2",
		"-object", `{"qom-type":"memory-backend-ram","id":"pc.ram"}`,
		"-device", `{"driver":"virtio-blk-pci","num-queues":2,"iothread-vq-mapping":[{"iothread":"iothread2","vqs":[1]},{"iothread":"iothread1","vqs":[0]}],"id":"ua-a"}`,
		"-device", `{"driver":"virtio-blk-pci","iothread":"iothread1","id":"ua-b"}`,
		"-device", "virtio-net-pci,id=net0",
	}
	cmd, err := ParseCmdline([]byte(strings.Join(args, "\x00") + "\x00"))
	if err != nil {
		t.Fatal(err)
	}
	if !cmd.IOThreads["iothread1"] || !cmd.IOThreads["iothread2"] || len(cmd.IOThreads) != 2 {
		t.Errorf("iothreads %v", cmd.IOThreads)
	}
	if d := (VQMapping{"iothread1": {0}, "iothread2": {1}}).Diff(cmd.Blk["ua-a"].Mapping); d != "" {
		t.Errorf("ua-a: %s", d)
	}
	if b := cmd.Blk["ua-b"]; b.IOThread != "iothread1" || b.Mapping != nil {
		t.Errorf("ua-b: %+v", b)
	}
}

func TestParseCmdlineErrors(t *testing.T) {
	bad := [][]string{
		{"-device", `{"driver":"virtio-blk-pci","id":"a","iothread-vq-mapping":[{"iothread":"i1","vqs":[0]},{"iothread":"i1","vqs":[1]}]}`},
		{"-device", `{"driver":"virtio-blk-pci","id":"a","iothread-vq-mapping":[{"vqs":[0]}]}`},
		{"-device", `{"driver":"virtio-blk-pci","id":"a","iothread-vq-mapping":[{"iothread":"i1","bogus":1}]}`},
		{"-device", `{"driver":"virtio-blk-pci","id":"a"}`, "-device", `{"driver":"virtio-blk-pci","id":"a"}`},
		{"-device", `{"driver":`},
	}
	for _, args := range bad {
		if _, err := ParseCmdline([]byte(strings.Join(args, "\x00"))); err == nil {
			t.Errorf("accepted %q", args)
		}
	}
}

func TestShellSplit(t *testing.T) {
	got, err := shellSplit(`a 'b c' "d\"e" f\ g '{"x":1}'`)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"a", "b c", `d"e`, "f g", `{"x":1}`}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("got %q want %q", got, want)
	}
	for _, s := range []string{`'open`, `"open`} {
		if _, err := shellSplit(s); err == nil {
			t.Errorf("accepted %q", s)
		}
	}
}

func TestAdaptForTestGuest(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("..", "..", "domainxml", "testdata", "supplemental-pool.xml"))
	if err != nil {
		t.Fatal(err)
	}
	dom, err := domainxml.ParseDomain(src)
	if err != nil {
		t.Fatal(err)
	}
	g := TestGuest{Name: "t", Kernel: "/tmp/k", Initrd: "/tmp/i", Console: "/tmp/c",
		DiskFiles: map[string]string{"ua-rootdisk": "/tmp/r.img", "ua-datadisk": "/tmp/d.img"}}
	if err := AdaptForTestGuest(dom, g); err != nil {
		t.Fatal(err)
	}
	if dom.Type != "qemu" || dom.OS.Kernel != "/tmp/k" || dom.CPU.Mode != "maximum" {
		t.Errorf("type %s kernel %s cpu %s", dom.Type, dom.OS.Kernel, dom.CPU.Mode)
	}
	if dom.UUID != "5b9d1f0c-2f6e-4d3b-9a55-0c4e8a1f7d21" {
		t.Errorf("uuid %q not taken from sysinfo", dom.UUID)
	}
	if len(dom.Devices.Interfaces)+len(dom.Devices.Graphics)+len(dom.Devices.Channels) != 0 {
		t.Errorf("cluster devices left: %+v", dom.Devices)
	}
	if len(dom.Devices.Disks) != 2 {
		t.Fatalf("disks %d, want 2 (cloudinit dropped)", len(dom.Devices.Disks))
	}
	for _, d := range dom.Devices.Disks {
		if d.Source == nil || d.Source.File == nil || d.Source.File.File != g.DiskFiles[d.Alias.Name] {
			t.Errorf("disk %s source %+v", d.Alias.Name, d.Source)
		}
		if d.Driver.IOThreads == nil {
			t.Errorf("disk %s lost its <iothreads>", d.Alias.Name)
		}
	}
	maps, queues := DiskMappings(dom)
	if len(maps) != 2 || queues["ua-datadisk"] != 4 || len(maps["ua-datadisk"]) != 4 {
		t.Errorf("mappings %v queues %v", maps, queues)
	}

	dom2, _ := domainxml.ParseDomain(src)
	g.DiskFiles = map[string]string{"ua-nosuch": "/tmp/x"}
	if err := AdaptForTestGuest(dom2, g); err == nil || !strings.Contains(err.Error(), "ua-nosuch") {
		t.Errorf("unknown disk alias: err %v", err)
	}
	dom3, _ := domainxml.ParseDomain(src)
	g.DiskFiles = map[string]string{"ua-rootdisk": "/tmp/r"}
	g.KeepDisks = true
	if err := AdaptForTestGuest(dom3, g); err == nil {
		t.Error("KeepDisks with an unmapped disk must fail")
	}
}

func FuzzParseLogCmdline(f *testing.F) {
	if b, err := os.ReadFile(filepath.Join("testdata", "libvirt-qemu.log")); err == nil {
		f.Add(string(b))
	}
	f.Add("/usr/bin/qemu-system-x86_64 \\\n-device '{\"driver\":\"virtio-blk-pci\",\"iothread-vq-mapping\":[{\"iothread\":\"a\"}]}'\n")
	f.Add("qemu-system-x \\\n'")
	f.Fuzz(func(t *testing.T, s string) {
		ParseLogCmdline(s) // must not panic or hang
	})
}

func FuzzParseCmdline(f *testing.F) {
	f.Add([]byte("-object\x00iothread,id=x\x00-device\x00{\"driver\":\"virtio-blk-pci\",\"id\":\"a\",\"iothread-vq-mapping\":[{\"iothread\":\"x\",\"vqs\":[0]}]}"))
	f.Add([]byte("-device\x00{"))
	f.Fuzz(func(t *testing.T, b []byte) {
		cmd, err := ParseCmdline(b)
		if err == nil {
			for id, d := range cmd.Blk {
				if id != d.ID {
					t.Fatalf("device keyed %q has id %q", id, d.ID)
				}
			}
		}
	})
}
