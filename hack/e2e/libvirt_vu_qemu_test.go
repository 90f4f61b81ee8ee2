package e2e

import "testing"

func TestParseVhostUserArgs(t *testing.T) {
	args := []string{
		"/usr/bin/qemu-system-x86_64",
		"-object", `{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,"x-use-canonical-path-for-ramblock-id":false,"size":536870912}`,
		"-device", `{"driver":"vhost-user-blk-pci","bus":"pci.3","addr":"0x0","chardev":"chr-vu-ua-datadisk","id":"ua-datadisk","num-queues":2,"queue-size":256}`,
		"-chardev", "socket,id=chr-vu-ua-datadisk,path=/tmp/vu/vhost/datadisk.sock,reconnect-ms=1000",
		"-device", `{"driver":"virtio-blk-pci","id":"ua-rootdisk"}`,
		"-chardev", `{"id":"c2","backend":{"type":"socket","data":{"addr":{"type":"unix","path":"/tmp/c2.sock"}}}}`,
		"-device", `{"driver":"vhost-user-blk-pci","chardev":"c2","id":"d2"}`,
	}
	got, err := ParseVhostUserArgs(args)
	if err != nil {
		t.Fatal(err)
	}
	d := got.Disks["ua-datadisk"]
	if d.Socket != "/tmp/vu/vhost/datadisk.sock" || d.NumQueues != 2 || d.QueueSize != 256 || d.Chardev != "chr-vu-ua-datadisk" {
		t.Errorf("datadisk = %+v", d)
	}
	if got.Disks["d2"].Socket != "/tmp/c2.sock" {
		t.Errorf("JSON chardev not resolved: %+v", got.Disks["d2"])
	}
	if len(got.Disks) != 2 {
		t.Errorf("disks %v: virtio-blk-pci must not count", got.Disks)
	}
	if len(got.Backends) != 1 || !got.Backends[0].Share || got.Backends[0].Type != "memory-backend-memfd" {
		t.Errorf("backends %+v", got.Backends)
	}
	if _, err := ParseVhostUserArgs([]string{"-device", `{"driver":`}); err == nil {
		t.Error("broken JSON accepted")
	}
}

func FuzzParseVhostUserArgs(f *testing.F) {
	f.Add("-chardev", "socket,id=c,path=/x", "-device", `{"driver":"vhost-user-blk-pci","chardev":"c","id":"d"}`)
	f.Add("-object", `{"qom-type":"memory-backend-memfd","share":true}`, "-chardev", `{"id":1}`)
	f.Fuzz(func(t *testing.T, a, b, c, d string) {
		got, err := ParseVhostUserArgs([]string{a, b, c, d})
		if err == nil && got.Disks == nil {
			t.Fatal("nil disk map without error")
		}
	})
}
