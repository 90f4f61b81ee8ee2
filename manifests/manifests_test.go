package manifests

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	kvv1 "kubevirt.io/api/core/v1"
)

// root is this package's directory: the tests run with it as working dir.
const root = "."

// TestEveryManifestDecodesStrictly walks every YAML document in the tree and
// decodes it into its API type with unknown and duplicate fields rejected.
// Complete resources also get the virtblk checks; patch files are partial
// objects and only decode strictly.
func TestEveryManifestDecodesStrictly(t *testing.T) {
	files, err := yamlFiles(root)
	if err != nil {
		t.Fatal(err)
	}
	patches := map[string]bool{}
	for _, f := range files {
		if filepath.Base(f) != "kustomization.yaml" {
			continue
		}
		pf, err := patchFiles(filepath.Dir(f))
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pf {
			patches[p] = true
		}
	}

	byDir := map[string][]object{}
	docs := 0
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			for _, err := range checkKustomizationFiles(root, filepath.Dir(f)) {
				t.Error(err)
			}
			continue
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := loadDocuments(f, data)
		if err != nil {
			t.Error(err)
			continue
		}
		if len(objs) == 0 {
			t.Errorf("%s: no YAML document", f)
		}
		docs += len(objs)
		if patches[filepath.Clean(f)] {
			for _, o := range objs {
				if _, err := decodeStrict(o); err != nil {
					t.Error(err)
				}
			}
			continue
		}
		byDir[filepath.Dir(f)] = append(byDir[filepath.Dir(f)], objs...)
	}
	for _, objs := range byDir {
		for _, o := range objs {
			for _, err := range checkObject(o, objs) {
				t.Error(err)
			}
		}
	}
	if docs < 7 {
		t.Errorf("found %d YAML documents, expected at least 7: is the walk missing files?", docs)
	}
}

// TestKustomizationsBuild renders every kustomization (resources + patches)
// and checks the result as the API server would receive it.
func TestKustomizationsBuild(t *testing.T) {
	files, err := yamlFiles(root)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range files {
		if filepath.Base(f) != "kustomization.yaml" {
			continue
		}
		n++
		dir := filepath.Dir(f)
		t.Run(dir, func(t *testing.T) {
			out, err := build(root, dir, 0)
			if err != nil {
				t.Fatal(err)
			}
			if len(out) == 0 {
				t.Fatal("renders no resources")
			}
			for _, o := range out {
				for _, err := range checkObject(o, out) {
					t.Error(err)
				}
				if v, err := decodeStrict(o); err == nil {
					if kv, ok := v.(*kvv1.KubeVirt); ok {
						for _, err := range checkPreparedKubeVirt(kv) {
							t.Errorf("%s: %v", o, err)
						}
					}
				}
			}
		})
	}
	if n < 3 {
		t.Errorf("found %d kustomizations, want base, examples and overlays/dev", n)
	}
}

func buildTyped(t *testing.T, dir string) []any {
	t.Helper()
	out, err := build(root, dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	var typed []any
	for _, o := range out {
		v, err := decodeStrict(o)
		if err != nil {
			t.Fatal(err)
		}
		typed = append(typed, v)
	}
	return typed
}

func sidecarsOf(t *testing.T, ann map[string]string) []hookSidecar {
	t.Helper()
	s, ok := ann[hookSidecarsAnnotation]
	if !ok {
		t.Fatalf("no %s annotation", hookSidecarsAnnotation)
	}
	list, err := parseHookSidecars(s)
	if err != nil {
		t.Fatal(err)
	}
	return list
}

// TestBase checks that the base turns the Sidecar gate on and sizes hook
// sidecars, and that its patch also works as `kubectl patch --type merge`
// input on a CR that already has other settings.
func TestBase(t *testing.T) {
	var kvs []*kvv1.KubeVirt
	for _, v := range buildTyped(t, "base") {
		if kv, ok := v.(*kvv1.KubeVirt); ok {
			kvs = append(kvs, kv)
		}
	}
	if len(kvs) != 1 {
		t.Fatalf("base renders %d KubeVirt CRs, want 1", len(kvs))
	}
	if errs := checkPreparedKubeVirt(kvs[0]); len(errs) > 0 {
		t.Fatal(errs)
	}

	// A cluster's live CR with settings the patch must leave alone.
	live := []byte(`{"apiVersion":"kubevirt.io/v1","kind":"KubeVirt","metadata":{"name":"kubevirt","namespace":"kubevirt"},
		"spec":{"imagePullPolicy":"Always","configuration":{"cpuModel":"host-passthrough","developerConfiguration":{"featureGates":["Sidecar"],"logVerbosity":{"virtLauncher":4}}}}}`)
	patch, err := os.ReadFile("base/patch-kubevirt.yaml")
	if err != nil {
		t.Fatal(err)
	}
	pobjs, err := loadDocuments("base/patch-kubevirt.yaml", patch)
	if err != nil || len(pobjs) != 1 {
		t.Fatalf("patch-kubevirt.yaml: %v (%d documents)", err, len(pobjs))
	}
	merged, err := mergePatchJSON(live, pobjs[0].json)
	if err != nil {
		t.Fatal(err)
	}
	var kv kvv1.KubeVirt
	if err := strictUnmarshal(merged, &kv); err != nil {
		t.Fatal(err)
	}
	if errs := checkPreparedKubeVirt(&kv); len(errs) > 0 {
		t.Fatal(errs)
	}
	c := kv.Spec.Configuration
	if c.CPUModel != "host-passthrough" || kv.Spec.ImagePullPolicy != "Always" || c.DeveloperConfiguration.LogVerbosity == nil {
		t.Errorf("merge patch clobbered unrelated settings: %s", merged)
	}
}

// TestExamples checks the two examples say what the docs say they do.
func TestExamples(t *testing.T) {
	var vmi *kvv1.VirtualMachineInstance
	var vm *kvv1.VirtualMachine
	pvcs := 0
	for _, v := range buildTyped(t, "examples") {
		switch o := v.(type) {
		case *kvv1.VirtualMachineInstance:
			vmi = o
		case *kvv1.VirtualMachine:
			vm = o
		default:
			pvcs++
		}
	}
	if vmi == nil || vm == nil || pvcs != 1 {
		t.Fatalf("examples: want one VMI, one VM and one PVC; got vmi=%v vm=%v others=%d", vmi != nil, vm != nil, pvcs)
	}

	// Mapping only: the sidecar without a PVC, the mapping annotations, no serve.
	sc := sidecarsOf(t, vmi.Annotations)
	if len(sc) != 1 || sc[0].Image != "ghcr.io/virtblk/virtblk:latest" || sc[0].PVC != nil {
		t.Errorf("iothreads-vmi: hook sidecars %+v, want the published image and no pvc", sc)
	}
	for _, k := range []string{"iothreads", "disks", "queues"} {
		if vmi.Annotations[virtblkPrefix+k] == "" {
			t.Errorf("iothreads-vmi: missing %s%s", virtblkPrefix, k)
		}
	}
	if _, ok := vmi.Annotations[virtblkPrefix+"serve"]; ok {
		t.Error("iothreads-vmi must not serve disks: it is the mapping-only example")
	}

	// Served disk: PVC mounted where the store lives, data disk served.
	ann := vm.Spec.Template.ObjectMeta.Annotations
	sc = sidecarsOf(t, ann)
	if len(sc) != 1 || sc[0].PVC == nil || sc[0].PVC.Name != "served-disk-store" || sc[0].PVC.VolumePath != "/var/lib/virtblk" {
		t.Fatalf("served-disk-vm: hook sidecars %+v, want pvc served-disk-store at /var/lib/virtblk", sc)
	}
	if sc[0].PVC.SharedComputePath != "" {
		t.Error("served-disk-vm: the store must not be shared with the compute container (QEMU uses the socket)")
	}
	if got := ann[virtblkPrefix+"serve"]; got != "data:10Gi" {
		t.Errorf("served-disk-vm: serve = %q, want data:10Gi", got)
	}
	if got := ann[virtblkPrefix+"store"]; got != defaultStore {
		t.Errorf("served-disk-vm: store = %q, want %s", got, defaultStore)
	}
}

// TestDevOverlay checks the overlay swaps the image inside the annotation
// and keeps everything else of the examples.
func TestDevOverlay(t *testing.T) {
	const want = "localhost:5000/virtblk:dev"
	var images []string
	for _, v := range buildTyped(t, "overlays/dev") {
		var ann map[string]string
		switch o := v.(type) {
		case *kvv1.VirtualMachineInstance:
			ann = o.Annotations
			if ann[virtblkPrefix+"iothreads"] == "" {
				t.Error("overlay lost the VMI's virtblk.io/iothreads annotation")
			}
		case *kvv1.VirtualMachine:
			ann = o.Spec.Template.ObjectMeta.Annotations
			sc := sidecarsOf(t, ann)
			if sc[0].PVC == nil || ann[virtblkPrefix+"serve"] == "" {
				t.Error("overlay lost the served VM's pvc or virtblk.io/serve")
			}
		default:
			continue
		}
		for _, s := range sidecarsOf(t, ann) {
			images = append(images, s.Image)
		}
	}
	if len(images) != 2 || slices.IndexFunc(images, func(s string) bool { return s != want }) >= 0 {
		t.Errorf("overlay images %q, want both %s", images, want)
	}
}

// TestCheckerRejects proves the checks above can fail: each broken
// manifest must be reported, with a message naming the problem.
func TestCheckerRejects(t *testing.T) {
	const vmiHead = `apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: bad
  annotations:
`
	const vmiSpec = `spec:
  domain:
    devices:
      disks:
      - name: data
        disk: {bus: virtio}
      - name: cd
        cdrom: {bus: sata}
  volumes:
  - name: data
    emptyDisk: {capacity: 1Gi}
  - name: cd
    emptyDisk: {capacity: 1Gi}
`
	const sc = `    hooks.kubevirt.io/hookSidecars: '[{"image": "ghcr.io/virtblk/virtblk:v1"}]'
`
	cases := []struct {
		name, yaml, want string
	}{
		{"unknown field", vmiHead + sc + vmiSpec + "  bogus: 1\n", `unknown field "spec.bogus"`},
		{"wrong case", vmiHead + sc + strings.Replace(vmiSpec, "devices:", "Devices:", 1), `unknown field "spec.domain.Devices"`},
		{"duplicate key", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nmetadata: {name: b}\n", `key "metadata" already set`},
		{"unknown kind", "apiVersion: kubevirt.io/v1\nkind: VirtualMachineBogus\nmetadata: {name: a}\n", "unknown apiVersion/kind"},
		{"no kind", "metadata: {name: a}\n", "apiVersion and kind are required"},
		{"hook json", vmiHead + "    hooks.kubevirt.io/hookSidecars: '{\"image\": 1}'\n" + vmiSpec, "not a JSON array"},
		{"hook unknown key", vmiHead + "    hooks.kubevirt.io/hookSidecars: '[{\"image\": \"ghcr.io/virtblk/virtblk:v1\", \"resources\": {}}]'\n" + vmiSpec, `unknown field "[0].resources"`},
		{"hook no tag", vmiHead + "    hooks.kubevirt.io/hookSidecars: '[{\"image\": \"virtblk\"}]'\n" + vmiSpec, "want a full reference"},
		{"hook pvc missing", vmiHead + "    hooks.kubevirt.io/hookSidecars: '[{\"image\": \"ghcr.io/virtblk/virtblk:v1\", \"pvc\": {\"name\": \"nope\", \"volumePath\": \"/var/lib/virtblk\"}}]'\n" + vmiSpec, `no PersistentVolumeClaim of that name`},
		{"no sidecar", vmiHead + "    virtblk.io/iothreads: \"2\"\n" + vmiSpec, "nothing would read them"},
		{"unknown disk", vmiHead + sc + "    virtblk.io/disks: data,nope\n" + vmiSpec, `names disk "nope"`},
		{"non-virtio disk", vmiHead + sc + "    virtblk.io/disks: cd\n" + vmiSpec, `names disk "cd", which is not a virtio disk`},
		{"zero iothreads", vmiHead + sc + "    virtblk.io/iothreads: \"0\"\n" + vmiSpec, "want a positive integer"},
		{"bad cpuset", vmiHead + sc + "    virtblk.io/iothread-cpuset: two\n" + vmiSpec, "want a libvirt cpuset"},
		{"queue map length", vmiHead + sc + "    virtblk.io/queues: \"4\"\n    virtblk.io/queue-map.data: 0,1\n" + vmiSpec, "has 2 entries"},
		{"unknown annotation", vmiHead + sc + "    virtblk.io/iothread: \"4\"\n" + vmiSpec, "unknown annotation virtblk.io/iothread"},
		{"serve without pvc", vmiHead + sc + "    virtblk.io/serve: data:1Gi\n" + vmiSpec, "needs a pvc"},
		{"serve bad size", vmiHead + sc + "    virtblk.io/serve: data:lots\n" + vmiSpec, "not a positive quantity"},
		{"vm template typo", "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: v}\nspec:\n  runStrategy: Always\n  template:\n    spec:\n      domain:\n        devices: {blockMultiqueue: true}\n", `unknown field "spec.template.spec.domain.devices.blockMultiqueue"`},
		{"block pvc", "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: p}\nspec: {volumeMode: Block}\n", "only mount Filesystem PVCs"},
		{"kubevirt name", "apiVersion: kubevirt.io/v1\nkind: KubeVirt\nmetadata: {name: kv, namespace: kubevirt}\nspec: {}\n", "want kubevirt/kubevirt"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			objs, err := loadDocuments("case.yaml", []byte(c.yaml))
			var errs []error
			if err != nil {
				errs = append(errs, err)
			}
			for _, o := range objs {
				errs = append(errs, checkObject(o, objs)...)
			}
			if len(errs) == 0 {
				t.Fatalf("accepted, want an error containing %q", c.want)
			}
			found := false
			for _, e := range errs {
				found = found || strings.Contains(e.Error(), c.want)
			}
			if !found {
				t.Errorf("errors %v, want one containing %q", errs, c.want)
			}
		})
	}

	// Prepared-KubeVirt checks on a CR without the gate and resources.
	bare := `{"apiVersion":"kubevirt.io/v1","kind":"KubeVirt","metadata":{"name":"kubevirt","namespace":"kubevirt"},"spec":{}}`
	var kv kvv1.KubeVirt
	if err := strictUnmarshal([]byte(bare), &kv); err != nil {
		t.Fatal(err)
	}
	if errs := checkPreparedKubeVirt(&kv); len(errs) != 2 {
		t.Errorf("bare KubeVirt CR: %d errors %v, want 2 (gate, resources)", len(errs), errs)
	}
}

// TestKustomizeRendererRejects covers the renderer's own failure modes.
func TestKustomizeRendererRejects(t *testing.T) {
	write := func(dir, name, body string) {
		t.Helper()
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	head := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
	cm := "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
	cases := []struct{ name, kust, want string }{
		{"missing file", head + "resources: [nope.yaml]\n", "nope.yaml"},
		{"typo field", head + "resource: [cm.yaml]\n", `unknown field "resource"`},
		{"patch misses", head + "resources: [cm.yaml]\npatches:\n- patch: |\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: b}\n", "matches no resource"},
		{"duplicate resource", head + "resources: [cm.yaml, cm2.yaml]\n", "define the same resource"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			write(dir, "cm.yaml", cm)
			write(dir, "cm2.yaml", cm)
			write(dir, "kustomization.yaml", c.kust)
			_, err := build(dir, dir, 0)
			var errs []error
			if err != nil {
				errs = append(errs, err)
			}
			errs = append(errs, checkKustomizationFiles(dir, dir)...)
			found := false
			for _, e := range errs {
				found = found || strings.Contains(e.Error(), c.want)
			}
			if !found {
				t.Errorf("errors %v, want one containing %q", errs, c.want)
			}
		})
	}
}
