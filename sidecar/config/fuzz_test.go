package config

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary annotations ("key=value" lines) and arbitrary
// VMI JSON. Parse must never panic, and whatever plan it returns must be one
// domainxml accepts: counts within limits and queue maps that fit.
func FuzzParse(f *testing.F) {
	vmiJSON, err := json.Marshal(testVMI(nil))
	if err != nil {
		f.Fatal(err)
	}
	f.Add("virtblk.io/iothreads=4", vmiJSON)
	f.Add("virtblk.io/iothreads=2\nvirtblk.io/disks=data,scratch\nvirtblk.io/queues=4\nvirtblk.io/queue-map.data=1,2,2,1", vmiJSON)
	f.Add("virtblk.io/iothreads=3\nvirtblk.io/iothread-cpuset=0-7,^3\nvirtblk.io/iothread-poll=max=32768,grow=2,shrink=2", vmiJSON)
	f.Add("virtblk.io/iothreads=0\nvirtblk.io/typo=1\nvirtblk.io/queue-map.=1", vmiJSON)
	f.Add("virtblk.io/iothreads=2", []byte(`{"spec":{"domain":{"cpu":{"cores":4294967295,"sockets":4294967295},"devices":{"disks":[{"name":"a"},{"name":"a","cdrom":{}}]}}}}`))
	f.Add("virtblk.io/iothreads=2", []byte(`{"spec":{"domain":{"resources":{"limits":{"cpu":"-3"}},"devices":{"disks":[{"name":"a","disk":{"bus":"virtio"}}]}}}}`))
	f.Add("", []byte(`{"metadata":{"annotations":{"virtblk.io/iothreads":"1"}}}`))
	f.Add("", []byte(`null`))
	f.Add("virtblk.io/serve=data:10Gi,scratch:1.5G\nvirtblk.io/store=/pvc/s.vbs\nvirtblk.io/metrics-port=9100", vmiJSON)
	f.Add("virtblk.io/serve=data:1Gi\nvirtblk.io/iothreads=2\nvirtblk.io/queue-map.data=1", vmiJSON)
	f.Add("virtblk.io/serve=data:1e40,x:,:3\nvirtblk.io/store=rel", vmiJSON)
	f.Fuzz(func(t *testing.T, annotations string, vmiJSON []byte) {
		// The VMI JSON on its own, as the hook receives it.
		cfg, err := FromVMIJSON(vmiJSON)
		checkResult(t, cfg, err)

		// The same VMI with the fuzzed annotations put in.
		vmi := testVMI(nil)
		if json.Unmarshal(vmiJSON, vmi) != nil {
			vmi = testVMI(nil)
		}
		if vmi.Annotations == nil {
			vmi.Annotations = map[string]string{}
		}
		for _, line := range strings.Split(annotations, "\n") {
			k, v, _ := strings.Cut(line, "=")
			vmi.Annotations[k] = v
		}
		cfg, err = Parse(vmi)
		checkResult(t, cfg, err)
	})
}

func checkResult(t *testing.T, cfg *Config, err error) {
	t.Helper()
	if err != nil {
		if cfg != nil {
			t.Fatalf("config %+v returned with error %v", cfg, err)
		}
		var es Errors
		if errors.As(err, &es) {
			for _, e := range es {
				if e.Annotation == "" || e.Problem == "" || e.Fix == "" {
					t.Fatalf("incomplete error %#v", e)
				}
			}
		}
		return
	}
	if cfg == nil {
		return
	}
	if cfg.Serve != nil {
		checkServe(t, cfg.Serve)
		if cfg.IOThreads == nil {
			return
		}
	}
	plan := cfg.IOThreads
	if plan == nil || plan.PoolSize < 1 || plan.PoolSize > MaxIOThreads || len(plan.Disks) == 0 {
		t.Fatalf("bad plan %+v", plan)
	}
	for _, d := range plan.Disks {
		if !strings.HasPrefix(d.Alias, AliasPrefix) || d.Queues < 1 || d.Queues > MaxQueues {
			t.Fatalf("bad disk plan %+v", d)
		}
		if d.QueueMap != nil && len(d.QueueMap) != d.Queues {
			t.Fatalf("queue map length %d for %d queues", len(d.QueueMap), d.Queues)
		}
		for _, th := range d.QueueMap {
			if th < 0 || th >= plan.PoolSize {
				t.Fatalf("queue map entry %d outside pool of %d", th, plan.PoolSize)
			}
		}
	}
}

func checkServe(t *testing.T, sp *ServePlan) {
	t.Helper()
	if len(sp.Disks) == 0 || len(sp.Disks) > MaxServedDisks {
		t.Fatalf("serve plan with %d disks", len(sp.Disks))
	}
	for _, d := range sp.Disks {
		if !ValidDiskName(d.Name) || d.Alias != AliasPrefix+d.Name {
			t.Fatalf("bad served disk name %+v", d)
		}
		if d.Size == 0 || d.Size%VolumeBlockSize != 0 || d.Size > MaxVolumeBytes {
			t.Fatalf("bad served disk size %+v", d)
		}
		if d.Queues < 1 || d.Queues > MaxQueues {
			t.Fatalf("bad served disk queues %+v", d)
		}
	}
	if sp.MetricsPort < 0 || sp.MetricsPort > 65535 {
		t.Fatalf("bad metrics port %d", sp.MetricsPort)
	}
}
