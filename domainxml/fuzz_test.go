package domainxml

import (
	"bytes"
	"testing"
)

// FuzzRewrite: arbitrary domain XML and a small plan never panic; either
// an error comes back, or the output passes Check and is a fixpoint.
func FuzzRewrite(f *testing.F) {
	for _, fx := range fixtures {
		f.Add(readFixture(f, fx), uint8(2), uint8(4), uint8(0), "")
		f.Add(readFixture(f, fx), uint8(3), uint8(1), uint8(1), "2-5")
	}
	f.Add([]byte(`<domain><devices><disk><alias name="ua-a"/><target bus="virtio" dev="vda"/><driver iothread="4294967295"/></disk></devices></domain>`), uint8(1), uint8(1), uint8(0), "")
	f.Add([]byte(`<domain><iothreadids><iothread id="0"/></iothreadids><devices><disk type="vhostuser"><alias name="ua-a"/><target bus="virtio"/></disk></devices></domain>`), uint8(1), uint8(2), uint8(0), "^1")
	f.Add([]byte(`<domain>`), uint8(0), uint8(0), uint8(0), "")
	f.Fuzz(func(t *testing.T, data []byte, pool, queues, which uint8, cpuset string) {
		alias := "ua-x"
		if dom, err := ParseDomain(data); err == nil && dom.Devices != nil && len(dom.Devices.Disks) > 0 {
			alias = diskAlias(&dom.Devices.Disks[int(which)%len(dom.Devices.Disks)])
		}
		plan := IOThreadPlan{PoolSize: int(pool % 9), CPUSet: cpuset, Disks: []DiskPlan{{Alias: alias, Queues: int(queues % 17)}}}
		out, _, err := RewriteIOThreads(data, plan)
		if err != nil {
			return
		}
		dom, err := ParseDomain(out)
		if err != nil {
			t.Fatalf("output does not parse: %v\n%s", err, out)
		}
		if err := Check(dom, plan); err != nil {
			t.Fatalf("output breaks a rule: %v\n%s", err, out)
		}
		again, _, err := RewriteIOThreads(out, plan)
		if err != nil {
			t.Fatalf("rewrite of own output fails: %v\n%s", err, out)
		}
		if !bytes.Equal(again, out) {
			t.Fatalf("not idempotent:\n%s\n---\n%s", out, again)
		}
	})
}
