package config

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestServeOnly(t *testing.T) {
	cfg, err := Parse(testVMI(map[string]string{
		// Listed out of VMI order and with spaces: the plan is in VMI order.
		KeyServe:       " scratch:10G , data:1Gi",
		KeyStore:       "/pvc/store.vbs",
		KeyMetricsPort: "9100",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.IOThreads != nil {
		t.Errorf("serve alone made an IOThread plan: %+v", cfg.IOThreads)
	}
	want := &ServePlan{
		Disks: []ServedDisk{
			{Name: "data", Alias: "ua-data", Size: 1 << 30, Queues: 4},
			// 10^10 rounded up to 4 KiB.
			{Name: "scratch", Alias: "ua-scratch", Size: (10_000_000_000 + 4095) / 4096 * 4096, Queues: 4},
		},
		Store:       "/pvc/store.vbs",
		MetricsPort: 9100,
	}
	if !reflect.DeepEqual(cfg.Serve, want) {
		t.Errorf("plan\n%+v\nwant\n%+v", cfg.Serve, want)
	}
}

func TestServeQueuesAnnotation(t *testing.T) {
	cfg, err := Parse(testVMI(map[string]string{KeyServe: "data:4Mi", KeyQueues: "2"}))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Serve.Disks[0].Queues; got != 2 {
		t.Errorf("queues %d, want 2 from %s", got, KeyQueues)
	}
	if cfg.Serve.Store != "" || cfg.Serve.MetricsPort != 0 {
		t.Errorf("defaults not empty: %+v", cfg.Serve)
	}
}

// With IOThread mapping as well, served disks leave the default selection:
// QEMU IOThreads cannot serve a vhost-user disk.
func TestServeWithIOThreads(t *testing.T) {
	cfg, err := Parse(testVMI(map[string]string{KeyServe: "data:1Gi", KeyIOThreads: "2"}))
	if err != nil {
		t.Fatal(err)
	}
	var mapped []string
	for _, d := range cfg.IOThreads.Disks {
		mapped = append(mapped, d.Alias)
	}
	if want := []string{"ua-rootdisk", "ua-scratch"}; !reflect.DeepEqual(mapped, want) {
		t.Errorf("mapped %v, want %v", mapped, want)
	}
	if len(cfg.Serve.Disks) != 1 || cfg.Serve.Disks[0].Name != "data" {
		t.Errorf("served %+v", cfg.Serve.Disks)
	}
}

func TestServeErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		ann  map[string]string
		key  string
		want string
	}{
		{"no such disk", map[string]string{KeyServe: "nope:1Gi"}, KeyServe, `the VMI has no disk named "nope"`},
		{"sata disk", map[string]string{KeyServe: "slow:1Gi"}, KeyServe, "only virtio disks can be served"},
		{"cdrom", map[string]string{KeyServe: "cdrom:1Gi"}, KeyServe, "a cdrom"},
		{"bad quantity", map[string]string{KeyServe: "data:10GB"}, KeyServe, "is not a quantity"},
		{"zero size", map[string]string{KeyServe: "data:0"}, KeyServe, "more than zero"},
		{"negative size", map[string]string{KeyServe: "data:-1Gi"}, KeyServe, "more than zero"},
		{"huge size", map[string]string{KeyServe: "data:17Ti"}, KeyServe, "16Ti"},
		{"absurd size", map[string]string{KeyServe: "data:1e30"}, KeyServe, "16Ti"},
		{"duplicate", map[string]string{KeyServe: "data:1Gi,data:2Gi"}, KeyServe, "listed twice"},
		{"bad name", map[string]string{KeyServe: "../etc:1Gi"}, KeyServe, "not a DNS label"},
		{"upper case", map[string]string{KeyServe: "Data:1Gi"}, KeyServe, "not a DNS label"},
		{"empty", map[string]string{KeyServe: ""}, KeyServe, "not disk:size"},
		{"relative store", map[string]string{KeyServe: "data:1Gi", KeyStore: "store.vbs"}, KeyStore, "not an absolute path"},
		{"unclean store", map[string]string{KeyServe: "data:1Gi", KeyStore: "/pvc/../x"}, KeyStore, "not a clean file path"},
		{"store dir", map[string]string{KeyServe: "data:1Gi", KeyStore: "/pvc/"}, KeyStore, "not a clean file path"},
		{"port zero", map[string]string{KeyServe: "data:1Gi", KeyMetricsPort: "0"}, KeyMetricsPort, "at least 1"},
		{"port too big", map[string]string{KeyServe: "data:1Gi", KeyMetricsPort: "70000"}, KeyMetricsPort, "limit of 65535"},
		{"served disk listed for iothreads", map[string]string{KeyServe: "data:1Gi", KeyIOThreads: "2", KeyDisks: "data"}, KeyDisks, "also served by virtblk"},
		{"served disk with queue map", map[string]string{KeyServe: "data:1Gi", KeyIOThreads: "2", KeyQueueMapPrefix + "data": "1,2,1,2"}, KeyQueueMapPrefix + "data", "served by virtblk"},
		{"iothread key without pool", map[string]string{KeyServe: "data:1Gi", KeyIOThreadCPUSet: "1-2"}, KeyIOThreads, "missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse(testVMI(tc.ann))
			if err == nil {
				t.Fatalf("no error; config %+v", cfg)
			}
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("error %T %v is not Errors", err, err)
			}
			found := false
			for _, e := range es {
				if e.Annotation == tc.key && strings.Contains(e.Error(), tc.want) && e.Fix != "" {
					found = true
				}
			}
			if !found {
				t.Errorf("no error on %s containing %q in: %v", tc.key, tc.want, err)
			}
		})
	}
}
