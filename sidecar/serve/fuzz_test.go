package serve

import (
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/virtblk/virtblk/sidecar/config"
)

// FuzzDecodeState: the state file sits in a directory QEMU's group can
// write, so its decoder must never panic and must only accept plans whose
// names and numbers are safe to act on.
func FuzzDecodeState(f *testing.F) {
	good, err := json.Marshal(config.ServePlan{Store: "/var/lib/virtblk/store.vbs", MetricsPort: 9100, Disks: []config.ServedDisk{
		{Name: "data", Alias: "ua-data", Size: 1 << 30, Queues: 4, Serial: "data-0001"},
	}})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"Store":"/s","Disks":[{"Name":"../x","Alias":"ua-../x","Size":4096,"Queues":1}]}`))
	f.Add([]byte(`{"Store":"rel","Disks":[]}`))
	f.Add([]byte(`{"Store":"/s","Disks":[{"Name":"a","Alias":"ua-a","Size":4097,"Queues":0}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		plan, err := decodeState(b)
		if err != nil {
			return
		}
		if !filepath.IsAbs(plan.Store) || len(plan.Disks) == 0 {
			t.Fatalf("accepted %+v", plan)
		}
		for _, d := range plan.Disks {
			if !config.ValidDiskName(d.Name) || filepath.Base(SocketPath("/h", d.Name)) != d.Name+".sock" || d.Size == 0 || d.Queues < 1 {
				t.Fatalf("accepted disk %+v", d)
			}
		}
	})
}
