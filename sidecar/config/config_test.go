package config

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	k8sv1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/virtblk/virtblk/domainxml"
)

// testVMI has the disk mix of KubeVirt's converter fixture: two virtio
// disks, a sata disk, a cdrom and a lun, and a 4-vCPU topology.
func testVMI(annotations map[string]string) *kubevirtv1.VirtualMachineInstance {
	vmi := &kubevirtv1.VirtualMachineInstance{}
	vmi.Name = "testvmi"
	vmi.Annotations = annotations
	vmi.Spec.Domain.CPU = &kubevirtv1.CPU{Cores: 4}
	vmi.Spec.Domain.Devices.Disks = []kubevirtv1.Disk{
		{Name: "rootdisk", DiskDevice: kubevirtv1.DiskDevice{Disk: &kubevirtv1.DiskTarget{Bus: kubevirtv1.DiskBusVirtio}}},
		{Name: "data", DiskDevice: kubevirtv1.DiskDevice{Disk: &kubevirtv1.DiskTarget{Bus: kubevirtv1.DiskBusVirtio}}},
		{Name: "slow", DiskDevice: kubevirtv1.DiskDevice{Disk: &kubevirtv1.DiskTarget{Bus: kubevirtv1.DiskBusSATA}}},
		{Name: "cdrom", DiskDevice: kubevirtv1.DiskDevice{CDRom: &kubevirtv1.CDRomTarget{Bus: kubevirtv1.DiskBusSATA}}},
		{Name: "lun0", DiskDevice: kubevirtv1.DiskDevice{LUN: &kubevirtv1.LunTarget{Bus: kubevirtv1.DiskBusSCSI}}},
		{Name: "scratch", DiskDevice: kubevirtv1.DiskDevice{Disk: &kubevirtv1.DiskTarget{}}},
	}
	return vmi
}

func mustParse(t *testing.T, ann map[string]string) *domainxml.IOThreadPlan {
	t.Helper()
	cfg, err := Parse(testVMI(ann))
	if err != nil {
		t.Fatalf("Parse(%v): %v", ann, err)
	}
	if cfg == nil || cfg.IOThreads == nil {
		t.Fatalf("Parse(%v): no plan", ann)
	}
	return cfg.IOThreads
}

func TestNoVirtblkAnnotationMeansNoPlan(t *testing.T) {
	for _, ann := range []map[string]string{
		nil,
		{},
		{"kubevirt.io/latestObservedAPIVersion": "v1", "hooks.kubevirt.io/hookSidecars": "[]"},
		{"example.com/virtblk.io/iothreads": "4"}, // prefix must start the key
	} {
		cfg, err := Parse(testVMI(ann))
		if cfg != nil || err != nil {
			t.Errorf("Parse(%v) = %+v, %v; want nil, nil", ann, cfg, err)
		}
	}
	if cfg, err := Parse(nil); cfg != nil || err != nil {
		t.Errorf("Parse(nil) = %+v, %v", cfg, err)
	}
}

func TestDefaultsMapEveryVirtioDiskWithOneQueuePerVCPU(t *testing.T) {
	plan := mustParse(t, map[string]string{KeyIOThreads: "4"})
	want := &domainxml.IOThreadPlan{
		PoolSize: 4,
		Disks: []domainxml.DiskPlan{
			{Alias: "ua-rootdisk", Queues: 4},
			{Alias: "ua-data", Queues: 4},
			{Alias: "ua-scratch", Queues: 4}, // empty bus is KubeVirt's virtio default
		},
	}
	if !reflect.DeepEqual(plan, want) {
		t.Fatalf("plan = %+v\nwant %+v", plan, want)
	}
}

func TestFullConfiguration(t *testing.T) {
	plan := mustParse(t, map[string]string{
		KeyIOThreads:               "3",
		KeyDisks:                   " scratch , data ",
		KeyQueues:                  "4",
		KeyIOThreadCPUSet:          " 2-5,^3 ",
		KeyIOThreadPoll:            "max=32768, grow=2,shrink=4",
		KeyQueueMapPrefix + "data": "1,1,3, 2",
	})
	want := &domainxml.IOThreadPlan{
		PoolSize: 3,
		CPUSet:   "2-5,^3",
		Polling:  &domainxml.Polling{MaxNS: 32768, Grow: 2, Shrink: 4},
		Disks: []domainxml.DiskPlan{
			// VMI spec order, not annotation order; the map is 0-based.
			{Alias: "ua-data", Queues: 4, QueueMap: []int{0, 0, 2, 1}},
			{Alias: "ua-scratch", Queues: 4},
		},
	}
	if !reflect.DeepEqual(plan, want) {
		t.Fatalf("plan = %+v\nwant %+v", plan, want)
	}
}

func TestPartialPolling(t *testing.T) {
	plan := mustParse(t, map[string]string{KeyIOThreads: "1", KeyIOThreadPoll: "max=0"})
	if plan.Polling == nil || *plan.Polling != (domainxml.Polling{}) {
		t.Fatalf("polling = %+v, want zero value (max=0 disables polling)", plan.Polling)
	}
}

func TestDefaultQueuesAreClampedToQEMULimit(t *testing.T) {
	vmi := testVMI(map[string]string{KeyIOThreads: "2"})
	vmi.Spec.Domain.CPU = &kubevirtv1.CPU{Sockets: 4, Cores: 300}
	cfg, err := Parse(vmi)
	if err != nil {
		t.Fatal(err)
	}
	if q := cfg.IOThreads.Disks[0].Queues; q != MaxQueues {
		t.Fatalf("queues = %d, want %d", q, MaxQueues)
	}
}

func TestErrors(t *testing.T) {
	cases := []struct {
		name string
		ann  map[string]string
		// want are substrings of the single error's message, beyond the
		// annotation key and value, which are always checked.
		key, value string
		want       []string
	}{
		{"unknown key", map[string]string{KeyIOThreads: "2", "virtblk.io/iothread": "2"},
			"virtblk.io/iothread", "2", []string{"unknown virtblk annotation", "known keys: virtblk.io/iothreads, virtblk.io/disks", "virtblk.io/queue-map.<disk>"}},
		{"serve entry without size", map[string]string{KeyIOThreads: "2", "virtblk.io/serve": "data"},
			"virtblk.io/serve", "data", []string{"is not disk:size", "data:10Gi"}},
		{"store without serve", map[string]string{KeyIOThreads: "2", "virtblk.io/store": "/x"},
			"virtblk.io/store", "/x", []string{"set without virtblk.io/serve"}},
		{"metrics-port without serve", map[string]string{KeyIOThreads: "2", "virtblk.io/metrics-port": "9100"},
			"virtblk.io/metrics-port", "9100", []string{"set without virtblk.io/serve"}},
		{"iothreads zero", map[string]string{KeyIOThreads: "0"},
			KeyIOThreads, "0", []string{"must be at least 1", "whole number from 1 to 256"}},
		{"iothreads not a number", map[string]string{KeyIOThreads: "four"},
			KeyIOThreads, "four", []string{"not a whole number", "whole number from 1 to 256"}},
		{"iothreads signed", map[string]string{KeyIOThreads: "+4"},
			KeyIOThreads, "+4", []string{"not a whole number"}},
		{"iothreads negative", map[string]string{KeyIOThreads: "-1"},
			KeyIOThreads, "-1", []string{"not a whole number"}},
		{"iothreads empty", map[string]string{KeyIOThreads: " "},
			KeyIOThreads, " ", []string{"value is empty"}},
		{"iothreads too many", map[string]string{KeyIOThreads: "257"},
			KeyIOThreads, "257", []string{"257 is more than the limit of 256"}},
		{"iothreads overflow", map[string]string{KeyIOThreads: "99999999999999999999999"},
			KeyIOThreads, "99999999999999999999999", []string{"more than the limit of 256"}},
		{"iothreads missing", map[string]string{KeyQueues: "4"},
			KeyIOThreads, "", []string{"missing, but other virtblk.io/ annotations are set", `add virtblk.io/iothreads: "<pool size>"`}},
		{"queues zero", map[string]string{KeyIOThreads: "2", KeyQueues: "0"},
			KeyQueues, "0", []string{"must be at least 1", "whole number from 1 to 1024", "one per vCPU"}},
		{"queues float", map[string]string{KeyIOThreads: "2", KeyQueues: "4.0"},
			KeyQueues, "4.0", []string{"not a whole number"}},
		{"queues above QEMU limit", map[string]string{KeyIOThreads: "2", KeyQueues: "1025"},
			KeyQueues, "1025", []string{"1025 is more than the limit of 1024"}},
		{"disks unknown name", map[string]string{KeyIOThreads: "2", KeyDisks: "data,nosuch"},
			KeyDisks, "data,nosuch", []string{`no disk named "nosuch"`, "rootdisk (a virtio disk), data (a virtio disk), slow (a sata disk), cdrom (a cdrom), lun0 (a lun)"}},
		{"disks sata", map[string]string{KeyIOThreads: "2", KeyDisks: "slow"},
			KeyDisks, "slow", []string{`disk "slow" is a sata disk, and only virtio disks can be mapped`, `remove "slow" from the list, or set the disk's bus to virtio`}},
		{"disks cdrom", map[string]string{KeyIOThreads: "2", KeyDisks: "data,cdrom"},
			KeyDisks, "data,cdrom", []string{`disk "cdrom" is a cdrom`}},
		{"disks lun", map[string]string{KeyIOThreads: "2", KeyDisks: "lun0"},
			KeyDisks, "lun0", []string{`disk "lun0" is a lun`}},
		{"disks duplicate", map[string]string{KeyIOThreads: "2", KeyDisks: "data, data"},
			KeyDisks, "data, data", []string{`disk "data" is listed twice`}},
		{"disks empty entry", map[string]string{KeyIOThreads: "2", KeyDisks: "data,,rootdisk"},
			KeyDisks, "data,,rootdisk", []string{"empty disk name", "separated by commas"}},
		{"cpuset reversed", map[string]string{KeyIOThreads: "2", KeyIOThreadCPUSet: "5-2"},
			KeyIOThreadCPUSet, "5-2", []string{"reversed", "libvirt cpuset syntax"}},
		{"cpuset garbage", map[string]string{KeyIOThreads: "2", KeyIOThreadCPUSet: "two"},
			KeyIOThreadCPUSet, "two", []string{"not a CPU number"}},
		{"cpuset empty after exclusion", map[string]string{KeyIOThreads: "2", KeyIOThreadCPUSet: "3,^3"},
			KeyIOThreadCPUSet, "3,^3", []string{"selects no CPU"}},
		{"cpuset too large", map[string]string{KeyIOThreads: "2", KeyIOThreadCPUSet: "0-20000"},
			KeyIOThreadCPUSet, "0-20000", []string{"above the maximum"}},
		{"cpuset too long", map[string]string{KeyIOThreads: "2", KeyIOThreadCPUSet: strings.Repeat("0-16383,", 200) + "1"},
			KeyIOThreadCPUSet, strings.Repeat("0-16383,", 200) + "1", []string{"1601 characters is more than the limit of 1024", "use ranges"}},
		{"cpuset with space", map[string]string{KeyIOThreads: "2", KeyIOThreadCPUSet: "2-5, 7"},
			KeyIOThreadCPUSet, "2-5, 7", []string{"without spaces"}},
		{"poll bad number", map[string]string{KeyIOThreads: "2", KeyIOThreadPoll: "max=lots"},
			KeyIOThreadPoll, "max=lots", []string{`max="lots" is not a whole number`, "give max=<ns> and optionally grow=<factor>, shrink=<divisor>"}},
		{"poll unknown setting", map[string]string{KeyIOThreads: "2", KeyIOThreadPoll: "max=1,speed=2"},
			KeyIOThreadPoll, "max=1,speed=2", []string{`unknown setting "speed"`}},
		{"poll not name=value", map[string]string{KeyIOThreads: "2", KeyIOThreadPoll: "max"},
			KeyIOThreadPoll, "max", []string{`"max" is not name=value`}},
		{"poll repeated", map[string]string{KeyIOThreads: "2", KeyIOThreadPoll: "max=1,grow=2,grow=3"},
			KeyIOThreadPoll, "max=1,grow=2,grow=3", []string{"grow is given twice"}},
		{"poll without max", map[string]string{KeyIOThreads: "2", KeyIOThreadPoll: "grow=2,shrink=2"},
			KeyIOThreadPoll, "grow=2,shrink=2", []string{"max is missing", "use max=0 to switch polling off"}},
		{"queue map length", map[string]string{KeyIOThreads: "2", KeyQueueMapPrefix + "data": "1,2"},
			KeyQueueMapPrefix + "data", "1,2", []string{"2 entries, but the disk has 4 queues (one per vCPU, the default)", "give exactly 4 entries", "or set virtblk.io/queues to 2"}},
		{"queue map length with explicit queues", map[string]string{KeyIOThreads: "2", KeyQueues: "3", KeyQueueMapPrefix + "data": "1,2"},
			KeyQueueMapPrefix + "data", "1,2", []string{"the disk has 3 queues (from virtblk.io/queues)"}},
		{"queue map zero entry", map[string]string{KeyIOThreads: "2", KeyQueueMapPrefix + "data": "0,1,1,1"},
			KeyQueueMapPrefix + "data", "0,1,1,1", []string{"entry 1 is 0, but pool IOThreads are numbered from 1"}},
		{"queue map beyond pool", map[string]string{KeyIOThreads: "2", KeyQueueMapPrefix + "data": "1,2,3,1"},
			KeyQueueMapPrefix + "data", "1,2,3,1", []string{"entry 3 names IOThread 3, but the pool has 2", "raise virtblk.io/iothreads"}},
		{"queue map not a number", map[string]string{KeyIOThreads: "2", KeyQueueMapPrefix + "data": "1,a,1,1"},
			KeyQueueMapPrefix + "data", "1,a,1,1", []string{`entry 2 ("a") is not a whole number`}},
		{"queue map unknown disk", map[string]string{KeyIOThreads: "2", KeyQueueMapPrefix + "dta": "1,1,1,1"},
			KeyQueueMapPrefix + "dta", "1,1,1,1", []string{`the VMI has no disk named "dta"`, "rename the annotation"}},
		{"queue map disk not listed", map[string]string{KeyIOThreads: "2", KeyDisks: "rootdisk", KeyQueueMapPrefix + "data": "1,1,1,1"},
			KeyQueueMapPrefix + "data", "1,1,1,1", []string{`disk "data" is not in virtblk.io/disks`, `add "data" to virtblk.io/disks`}},
		{"queue map non-virtio disk", map[string]string{KeyIOThreads: "2", KeyQueueMapPrefix + "slow": "1,1,1,1"},
			KeyQueueMapPrefix + "slow", "1,1,1,1", []string{`disk "slow" is a sata disk`}},
		{"queue map without disk name", map[string]string{KeyIOThreads: "2", KeyQueueMapPrefix: "1,1,1,1"},
			KeyQueueMapPrefix, "1,1,1,1", []string{"no disk name after virtblk.io/queue-map.", "virtblk.io/queue-map.data"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse(testVMI(tc.ann))
			if err == nil {
				t.Fatalf("no error; plan %+v", cfg.IOThreads)
			}
			if cfg != nil {
				t.Errorf("config %+v returned with an error", cfg)
			}
			var es Errors
			if !errors.As(err, &es) || len(es) != 1 {
				t.Fatalf("want exactly one *Error, got %v", err)
			}
			e := es[0]
			if e.Annotation != tc.key || e.Value != tc.value {
				t.Errorf("error names %s=%q, want %s=%q", e.Annotation, e.Value, tc.key, tc.value)
			}
			if e.Fix == "" {
				t.Errorf("error has no fix: %v", e)
			}
			msg := err.Error()
			for _, w := range append([]string{tc.key + "=", "fix: "}, tc.want...) {
				if !strings.Contains(msg, w) {
					t.Errorf("message %q\ndoes not contain %q", msg, w)
				}
			}
		})
	}
}

func TestNoVirtioDisk(t *testing.T) {
	vmi := testVMI(map[string]string{KeyIOThreads: "2"})
	vmi.Spec.Domain.Devices.Disks = vmi.Spec.Domain.Devices.Disks[2:5] // sata, cdrom, lun
	_, err := Parse(vmi)
	if err == nil || !strings.Contains(err.Error(), `virtblk.io/iothreads="2": the VMI has no virtio disk to map`) {
		t.Fatalf("err = %v", err)
	}
}

func TestAllErrorsAreCollectedInKeyOrder(t *testing.T) {
	_, err := Parse(testVMI(map[string]string{
		KeyIOThreads:               "0",
		KeyQueues:                  "many",
		KeyDisks:                   "nosuch",
		"virtblk.io/typo":          "x",
		KeyQueueMapPrefix + "data": "0",
	}))
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("err = %v", err)
	}
	var keys []string
	for _, e := range es {
		keys = append(keys, e.Annotation)
	}
	want := []string{KeyDisks, KeyIOThreads, KeyQueueMapPrefix + "data", KeyQueues, "virtblk.io/typo"}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("errors for %v, want %v\n%v", keys, want, err)
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, "virtblk.io annotations: 5 problems: (1) annotation virtblk.io/disks=") {
		t.Errorf("message %q", msg)
	}
	// Same input, same message: callers log it and users compare runs.
	_, err2 := Parse(testVMI(map[string]string{
		KeyIOThreads: "0", KeyQueues: "many", KeyDisks: "nosuch", "virtblk.io/typo": "x", KeyQueueMapPrefix + "data": "0",
	}))
	if err2.Error() != msg {
		t.Errorf("message changed between calls:\n%s\n%s", msg, err2)
	}
}

func TestVCPUs(t *testing.T) {
	q := resource.MustParse
	cases := []struct {
		name      string
		cpu       *kubevirtv1.CPU
		limits    k8sv1.ResourceList
		requests  k8sv1.ResourceList
		wantVCPUs int
	}{
		{"nothing", nil, nil, nil, 1},
		{"cores only", &kubevirtv1.CPU{Cores: 4}, nil, nil, 4},
		{"full topology", &kubevirtv1.CPU{Sockets: 2, Cores: 3, Threads: 2}, nil, nil, 12},
		{"threads only", &kubevirtv1.CPU{Threads: 2}, nil, nil, 2},
		{"topology wins over resources", &kubevirtv1.CPU{Sockets: 2}, k8sv1.ResourceList{k8sv1.ResourceCPU: q("8")}, nil, 2},
		{"request rounded up", nil, nil, k8sv1.ResourceList{k8sv1.ResourceCPU: q("2500m")}, 3},
		{"limit before request", nil, k8sv1.ResourceList{k8sv1.ResourceCPU: q("6")}, k8sv1.ResourceList{k8sv1.ResourceCPU: q("2")}, 6},
		{"empty topology falls back to request", &kubevirtv1.CPU{Model: "host-model"}, nil, k8sv1.ResourceList{k8sv1.ResourceCPU: q("3")}, 3},
		{"zero request is one", nil, nil, k8sv1.ResourceList{k8sv1.ResourceCPU: q("0")}, 1},
		{"memory only", nil, nil, k8sv1.ResourceList{k8sv1.ResourceMemory: q("2Gi")}, 1},
		{"huge topology is capped", &kubevirtv1.CPU{Sockets: 1 << 31, Cores: 1 << 31, Threads: 1 << 31}, nil, nil, 1 << 31},
		{"huge request is capped", nil, nil, k8sv1.ResourceList{k8sv1.ResourceCPU: q("1e15")}, 1 << 31},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			vmi := &kubevirtv1.VirtualMachineInstance{}
			vmi.Spec.Domain.CPU = tc.cpu
			vmi.Spec.Domain.Resources.Limits = tc.limits
			vmi.Spec.Domain.Resources.Requests = tc.requests
			if got := VCPUs(vmi); got != tc.wantVCPUs {
				t.Fatalf("VCPUs = %d, want %d", got, tc.wantVCPUs)
			}
		})
	}
}

func TestFromVMIJSON(t *testing.T) {
	vmi := testVMI(map[string]string{KeyIOThreads: "2", KeyDisks: "data"})
	vmi.Spec.Domain.Resources.Requests = k8sv1.ResourceList{k8sv1.ResourceCPU: resource.MustParse("2")}
	js, err := json.Marshal(vmi)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := FromVMIJSON(js)
	if err != nil {
		t.Fatal(err)
	}
	want := []domainxml.DiskPlan{{Alias: "ua-data", Queues: 4}}
	if !reflect.DeepEqual(cfg.IOThreads.Disks, want) {
		t.Fatalf("disks = %+v, want %+v", cfg.IOThreads.Disks, want)
	}

	// Without virtblk annotations the spec is never decoded, so a VMI whose
	// spec this KubeVirt API version cannot read still passes through.
	cfg, err = FromVMIJSON([]byte(`{"metadata":{"annotations":{"a":"b"}},"spec":{"domain":"not an object"}}`))
	if cfg != nil || err != nil {
		t.Fatalf("unrelated VMI: %+v, %v", cfg, err)
	}
	if _, err := FromVMIJSON([]byte(`{"metadata":{"annotations":{"virtblk.io/iothreads":"2"}},"spec":{"domain":"not an object"}}`)); err == nil || !strings.Contains(err.Error(), "decode VMI JSON") {
		t.Fatalf("bad spec: %v", err)
	}
	if _, err := FromVMIJSON([]byte(`not json`)); err == nil || !strings.Contains(err.Error(), "decode VMI JSON metadata") {
		t.Fatalf("bad JSON: %v", err)
	}
}
