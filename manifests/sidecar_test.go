package manifests

import (
	"testing"

	kvv1 "kubevirt.io/api/core/v1"

	"github.com/virtblk/virtblk/sidecar/config"
)

// sidecarParse runs the sidecar's own annotation parser on a VMI, so the
// examples are checked against the code that will read them in the pod.
func sidecarParse(t *testing.T, where string, vmi *kvv1.VirtualMachineInstance) *config.Config {
	t.Helper()
	cfg, err := config.Parse(vmi)
	if err != nil {
		t.Errorf("%s: sidecar parser: %v", where, err)
	}
	return cfg
}

// TestSidecarParserAcceptsExamples feeds every VMI (and VM template) the
// manifests render to sidecar/config.Parse.
func TestSidecarParserAcceptsExamples(t *testing.T) {
	n := 0
	for _, dir := range []string{"examples", "overlays/dev"} {
		for _, v := range buildTyped(t, dir) {
			var vmi *kvv1.VirtualMachineInstance
			switch o := v.(type) {
			case *kvv1.VirtualMachineInstance:
				vmi = o
			case *kvv1.VirtualMachine:
				vmi = &kvv1.VirtualMachineInstance{ObjectMeta: o.Spec.Template.ObjectMeta, Spec: o.Spec.Template.Spec}
				vmi.Name, vmi.Namespace = o.Name, o.Namespace
			default:
				continue
			}
			n++
			cfg := sidecarParse(t, dir+"/"+vmi.Name, vmi)
			if vmi.Name == "served-disk" {
				if cfg == nil || cfg.Serve == nil {
					t.Errorf("%s/served-disk: the sidecar parser found nothing to serve", dir)
					continue
				}
				sp := cfg.Serve
				if len(sp.Disks) != 1 || sp.Disks[0].Name != "data" || sp.Disks[0].Size != 10<<30 || sp.Store != defaultStore {
					t.Errorf("%s/served-disk: serve plan %+v, want disk data of 10Gi in %s", dir, sp, defaultStore)
				}
				continue
			}
			if cfg == nil || cfg.IOThreads == nil {
				t.Fatalf("%s/iothreads-demo: no IOThread plan", dir)
			}
			p := cfg.IOThreads
			if p.PoolSize != 4 || p.CPUSet != "2-5" || len(p.Disks) != 2 {
				t.Errorf("%s/iothreads-demo: plan %+v, want pool 4 pinned to 2-5 over 2 disks", dir, p)
			}
			for _, d := range p.Disks {
				if d.Queues != 8 {
					t.Errorf("%s/iothreads-demo: disk %s has %d queues, want 8", dir, d.Alias, d.Queues)
				}
				if d.Alias == "ua-scratch" && len(d.QueueMap) != 8 {
					t.Errorf("%s/iothreads-demo: scratch queue map %v, want 8 entries", dir, d.QueueMap)
				}
			}
		}
	}
	if n != 4 {
		t.Errorf("checked %d VMIs/VMs, want 4 (2 examples, 2 in the dev overlay)", n)
	}
}
