package manifests

// The checker behind manifests_test.go: it loads YAML documents, decodes
// them strictly into their API types, checks the virtblk annotations, and
// renders kustomizations far enough (resources + merge patches) to validate
// what `kubectl apply -k` would send. It is test-only code: the manifests are
// the product, this is how CI keeps them honest without a cluster or a
// kustomize binary.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kvv1 "kubevirt.io/api/core/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// object is one YAML document, converted to JSON.
type object struct {
	file  string // path relative to the manifests root, for messages
	index int    // document number within the file, from 0
	json  []byte
}

func (o object) typeMeta() (apiVersion, kind, name, namespace string) {
	var m struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	_ = json.Unmarshal(o.json, &m) // loadDocuments already proved it is a JSON object
	return m.APIVersion, m.Kind, m.Metadata.Name, m.Metadata.Namespace
}

func (o object) String() string {
	av, kind, name, _ := o.typeMeta()
	return fmt.Sprintf("%s (document %d, %s %s %q)", o.file, o.index, av, kind, name)
}

// loadDocuments splits a multi-document YAML stream and converts each
// non-empty document to JSON. Duplicate keys are an error.
func loadDocuments(file string, data []byte) ([]object, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var objs []object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: read YAML document %d: %w", file, i, err)
		}
		j, err := yaml.YAMLToJSONStrict(doc)
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", file, i, err)
		}
		if string(bytes.TrimSpace(j)) == "null" {
			continue // comments only, or an empty document between "---"
		}
		if !bytes.HasPrefix(bytes.TrimSpace(j), []byte("{")) {
			return nil, fmt.Errorf("%s: document %d is not a mapping", file, i)
		}
		objs = append(objs, object{file: file, index: i, json: j})
	}
}

// kinds maps apiVersion/kind to the Go type the API server decodes it into.
// Anything not listed here fails: a manifest of an unexpected kind in this
// tree is more likely a mistake than a new feature.
var kinds = map[string]func() any{
	"v1/PersistentVolumeClaim":              func() any { return new(corev1.PersistentVolumeClaim) },
	"v1/ConfigMap":                          func() any { return new(corev1.ConfigMap) },
	"v1/Namespace":                          func() any { return new(corev1.Namespace) },
	"kubevirt.io/v1/KubeVirt":               func() any { return new(kvv1.KubeVirt) },
	"kubevirt.io/v1/VirtualMachine":         func() any { return new(kvv1.VirtualMachine) },
	"kubevirt.io/v1/VirtualMachineInstance": func() any { return new(kvv1.VirtualMachineInstance) },
}

// strictUnmarshal decodes like the API server's strict field validation:
// case-sensitive keys, no unknown fields, no duplicate fields.
//
// A strict decoder alone is not enough: kubevirt.io/api gives
// VirtualMachineInstanceSpec (and a few others) an UnmarshalJSON that
// re-decodes with plain encoding/json, which silently drops unknown fields
// below spec. So after decoding, unknownFields walks the JSON against the Go
// type's json tags itself.
func strictUnmarshal(data []byte, v any) error {
	strictErrs, err := kjson.UnmarshalStrict(data, v, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	if len(strictErrs) > 0 {
		return errors.Join(strictErrs...)
	}
	var generic any
	if err := json.Unmarshal(data, &generic); err != nil {
		return err
	}
	return errors.Join(unknownFields("", generic, reflect.TypeOf(v))...)
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

// unknownFields reports every key of the JSON value v that has no field in
// Go type t, by json tag, case-sensitively.
func unknownFields(at string, v any, t reflect.Type) []error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	// Types with their own JSON form (Quantity, Time, IntOrString, ...) are
	// leaves; kubevirt.io/api's custom unmarshalers only post-process a
	// plain decode of the same fields, so those are walked.
	if reflect.PointerTo(t).Implements(unmarshalerType) && !strings.HasPrefix(t.PkgPath(), "kubevirt.io/api/") {
		return nil
	}
	var errs []error
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return nil // a type mismatch, already reported by the decoder
		}
		fields := map[string]reflect.Type{}
		collectFields(t, fields)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			p := k
			if at != "" {
				p = at + "." + k
			}
			ft, ok := fields[k]
			if !ok {
				errs = append(errs, fmt.Errorf("unknown field %q", p))
				continue
			}
			errs = append(errs, unknownFields(p, m[k], ft)...)
		}
	case reflect.Slice, reflect.Array:
		list, ok := v.([]any)
		if !ok || t.Elem().Kind() == reflect.Uint8 {
			return nil
		}
		for i, e := range list {
			errs = append(errs, unknownFields(fmt.Sprintf("%s[%d]", at, i), e, t.Elem())...)
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		for k, e := range m {
			errs = append(errs, unknownFields(at+"."+k, e, t.Elem())...)
		}
	}
	return errs
}

// collectFields maps JSON names to field types, promoting the fields of
// embedded structs without a JSON name (TypeMeta, ObjectMeta inline).
func collectFields(t reflect.Type, into map[string]reflect.Type) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" || (!f.IsExported() && !f.Anonymous) {
			continue
		}
		if name == "" && f.Anonymous {
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				collectFields(ft, into)
				continue
			}
		}
		if name == "" {
			name = f.Name
		}
		into[name] = f.Type
	}
}

// decodeStrict decodes o into the Go type chosen by its apiVersion and kind.
func decodeStrict(o object) (any, error) {
	av, kind, _, _ := o.typeMeta()
	if av == "" || kind == "" {
		return nil, fmt.Errorf("%s: apiVersion and kind are required", o)
	}
	newObj, ok := kinds[av+"/"+kind]
	if !ok {
		return nil, fmt.Errorf("%s: unknown apiVersion/kind %s/%s: add it to kinds in validate_test.go if it is intended", o, av, kind)
	}
	v := newObj()
	if err := strictUnmarshal(o.json, v); err != nil {
		return nil, fmt.Errorf("%s: strict decode into %T: %w", o, v, err)
	}
	return v, nil
}

// checkObject decodes a complete resource strictly and checks what virtblk
// needs from it. peers are the objects deployed together with it (to resolve
// PVC references).
func checkObject(o object, peers []object) []error {
	v, err := decodeStrict(o)
	if err != nil {
		return []error{err}
	}
	var errs []error
	wrap := func(es []error) {
		for _, e := range es {
			errs = append(errs, fmt.Errorf("%s: %w", o, e))
		}
	}
	switch t := v.(type) {
	case *kvv1.KubeVirt:
		wrap(checkKubeVirt(t))
	case *kvv1.VirtualMachineInstance:
		wrap(checkVMI(t.Annotations, &t.Spec, peers))
	case *kvv1.VirtualMachine:
		if t.Spec.Template == nil {
			wrap([]error{errors.New("spec.template is required")})
			break
		}
		if t.Spec.Running == nil && t.Spec.RunStrategy == nil {
			wrap([]error{errors.New("set spec.runStrategy (spec.running is deprecated)")})
		}
		if len(t.Annotations) > 0 && hasVirtblkAnnotation(t.Annotations) {
			wrap([]error{errors.New("virtblk annotations on the VirtualMachine itself are ignored: put them in spec.template.metadata.annotations")})
		}
		wrap(checkVMI(t.Spec.Template.ObjectMeta.Annotations, &t.Spec.Template.Spec, peers))
	case *corev1.PersistentVolumeClaim:
		if t.Spec.VolumeMode != nil && *t.Spec.VolumeMode != corev1.PersistentVolumeFilesystem {
			wrap([]error{fmt.Errorf("volumeMode %s: hook sidecars can only mount Filesystem PVCs", *t.Spec.VolumeMode)})
		}
	}
	return errs
}

// checkKubeVirt checks a KubeVirt CR (or the merge patch for one): the
// object virtblk's base patches, with the Sidecar gate and sidecar resources.
func checkKubeVirt(kv *kvv1.KubeVirt) []error {
	var errs []error
	if kv.Name != "kubevirt" || kv.Namespace != "kubevirt" {
		errs = append(errs, fmt.Errorf("KubeVirt CR is %s/%s, want kubevirt/kubevirt (what KubeVirt's install creates)", kv.Namespace, kv.Name))
	}
	return errs
}

// checkPreparedKubeVirt checks the rendered KubeVirt CR of the base.
func checkPreparedKubeVirt(kv *kvv1.KubeVirt) []error {
	var errs []error
	c := kv.Spec.Configuration
	if c.DeveloperConfiguration == nil || !contains(c.DeveloperConfiguration.FeatureGates, "Sidecar") {
		errs = append(errs, errors.New("spec.configuration.developerConfiguration.featureGates lacks Sidecar: hookSidecars annotations would be rejected"))
	}
	found := false
	for _, s := range c.SupportContainerResources {
		if s.Type != kvv1.SideCar {
			continue
		}
		found = true
		for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			req, okR := s.Resources.Requests[name]
			lim, okL := s.Resources.Limits[name]
			if !okR || !okL {
				errs = append(errs, fmt.Errorf("supportContainerResources sidecar: set both request and limit for %s", name))
				continue
			}
			if req.Cmp(lim) != 0 {
				errs = append(errs, fmt.Errorf("supportContainerResources sidecar: %s request %s != limit %s, Guaranteed VMI pods would lose their QoS class", name, req.String(), lim.String()))
			}
		}
		if m := s.Resources.Limits[corev1.ResourceMemory]; m.Cmp(resource.MustParse("256Mi")) < 0 {
			errs = append(errs, fmt.Errorf("supportContainerResources sidecar: memory %s is too small for the data plane (want >= 256Mi)", m.String()))
		}
	}
	if !found {
		errs = append(errs, errors.New("no supportContainerResources entry of type sidecar: dedicated-CPU VMIs would get 64M/200m for the data plane"))
	}
	return errs
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// Hook sidecar annotation, mirroring KubeVirt's pkg/hooks HookSidecar JSON
// (v1.9.0). KubeVirt itself ignores unknown keys; we decode strictly so that
// e.g. a "resources" or "env" key, which would silently do nothing, fails.
type hookSidecar struct {
	Image           string          `json:"image,omitempty"`
	ImagePullPolicy string          `json:"imagePullPolicy,omitempty"`
	Command         []string        `json:"command,omitempty"`
	Args            []string        `json:"args,omitempty"`
	ConfigMap       *hookConfigMap  `json:"configMap,omitempty"`
	PVC             *hookSidecarPVC `json:"pvc,omitempty"`
}

type hookConfigMap struct {
	Name     string `json:"name"`
	Key      string `json:"key"`
	HookPath string `json:"hookPath"`
}

type hookSidecarPVC struct {
	Name              string `json:"name"`
	VolumePath        string `json:"volumePath"`
	SharedComputePath string `json:"sharedComputePath,omitempty"`
}

const (
	hookSidecarsAnnotation = "hooks.kubevirt.io/hookSidecars"
	virtblkPrefix          = "virtblk.io/"
	defaultStore           = "/var/lib/virtblk/store.vbs"
	imageEntrypoint        = "/usr/local/bin/virtblk-hook"
)

func parseHookSidecars(s string) ([]hookSidecar, error) {
	var list []hookSidecar
	if err := strictUnmarshal([]byte(s), &list); err != nil {
		return nil, fmt.Errorf("annotation %s is not a JSON array of hook sidecars: %w", hookSidecarsAnnotation, err)
	}
	if len(list) == 0 {
		return nil, fmt.Errorf("annotation %s is an empty array: it adds no sidecar", hookSidecarsAnnotation)
	}
	return list, nil
}

var imageRef = regexp.MustCompile(`^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[a-f0-9]{64})$`)

// checkHookSidecar checks one entry of the annotation against KubeVirt's
// schema and virtblk's image.
func checkHookSidecar(h hookSidecar, peers []object) []error {
	var errs []error
	if !imageRef.MatchString(h.Image) {
		errs = append(errs, fmt.Errorf("hook sidecar image %q: want a full reference with a tag or digest (an empty image means KubeVirt's sidecar-shim)", h.Image))
	}
	switch corev1.PullPolicy(h.ImagePullPolicy) {
	case "", corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		errs = append(errs, fmt.Errorf("hook sidecar imagePullPolicy %q: want Always, IfNotPresent or Never", h.ImagePullPolicy))
	}
	if len(h.Command) > 0 && h.Command[0] != imageEntrypoint {
		errs = append(errs, fmt.Errorf("hook sidecar command %q: virtblk's image runs %s; leave command unset", h.Command, imageEntrypoint))
	}
	for _, a := range h.Args {
		if a == "" || a == "virtblk-hook" || a == imageEntrypoint {
			errs = append(errs, fmt.Errorf("hook sidecar args %q: give only flags, the entrypoint is already %s", h.Args, imageEntrypoint))
			break
		}
	}
	if h.ConfigMap != nil {
		errs = append(errs, errors.New("hook sidecar configMap: virtblk's hook is built in, a hook script ConfigMap is for KubeVirt's sidecar-shim"))
	}
	if p := h.PVC; p != nil {
		if p.Name == "" {
			errs = append(errs, errors.New("hook sidecar pvc.name is empty"))
		} else if !hasPVC(peers, p.Name) {
			errs = append(errs, fmt.Errorf("hook sidecar pvc.name %q: no PersistentVolumeClaim of that name is deployed with it", p.Name))
		}
		if !path.IsAbs(p.VolumePath) || path.Clean(p.VolumePath) != p.VolumePath {
			errs = append(errs, fmt.Errorf("hook sidecar pvc.volumePath %q: want a clean absolute path", p.VolumePath))
		}
		if p.SharedComputePath != "" && !path.IsAbs(p.SharedComputePath) {
			errs = append(errs, fmt.Errorf("hook sidecar pvc.sharedComputePath %q: want an absolute path", p.SharedComputePath))
		}
	}
	return errs
}

func hasPVC(objs []object, name string) bool {
	for _, o := range objs {
		av, kind, n, _ := o.typeMeta()
		if av == "v1" && kind == "PersistentVolumeClaim" && n == name {
			return true
		}
	}
	return false
}

func hasVirtblkAnnotation(ann map[string]string) bool {
	for k := range ann {
		if strings.HasPrefix(k, virtblkPrefix) {
			return true
		}
	}
	return false
}

var cpusetSyntax = regexp.MustCompile(`^\^?[0-9]+(-[0-9]+)?(,\^?[0-9]+(-[0-9]+)?)*$`)

// checkVMI checks the virtblk annotations of a VMI (or VM template) against
// its spec: every disk they name exists, is virtio, and the sidecar that
// reads them is attached. The full annotation grammar is the sidecar's
// parser's job (see sidecarParse in manifests_test.go).
func checkVMI(ann map[string]string, spec *kvv1.VirtualMachineInstanceSpec, peers []object) []error {
	var errs []error
	fail := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }

	volumes := map[string]bool{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = true
	}
	virtio := map[string]bool{}
	for _, d := range spec.Domain.Devices.Disks {
		if !volumes[d.Name] {
			fail("disk %q has no volume of the same name", d.Name)
		}
		// An empty bus is virtio: KubeVirt's default.
		if d.Disk != nil && (d.Disk.Bus == kvv1.DiskBusVirtio || d.Disk.Bus == "") {
			virtio[d.Name] = true
		}
	}
	needVirtio := func(key, name string) {
		if !virtio[name] {
			fail("annotation %s names disk %q, which is not a virtio disk (disk.bus: virtio) of this VMI", key, name)
		}
	}

	var sidecars []hookSidecar
	if s, ok := ann[hookSidecarsAnnotation]; ok {
		list, err := parseHookSidecars(s)
		if err != nil {
			fail("%v", err)
		}
		sidecars = list
		for _, h := range list {
			errs = append(errs, checkHookSidecar(h, peers)...)
		}
	}
	if !hasVirtblkAnnotation(ann) {
		return errs
	}
	var virtblk *hookSidecar
	for i := range sidecars {
		if strings.Contains(sidecars[i].Image, "virtblk") {
			virtblk = &sidecars[i]
		}
	}
	if virtblk == nil {
		fail("virtblk.io annotations without a virtblk image in %s: nothing would read them", hookSidecarsAnnotation)
	}

	positive := func(key string) int {
		v, ok := ann[key]
		if !ok {
			return 0
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			fail("annotation %s=%q: want a positive integer", key, v)
			return 0
		}
		return n
	}
	queues := positive(virtblkPrefix + "queues")
	positive(virtblkPrefix + "iothreads")
	if v, ok := ann[virtblkPrefix+"disks"]; ok {
		for _, name := range strings.Split(v, ",") {
			needVirtio(virtblkPrefix+"disks", strings.TrimSpace(name))
		}
	}
	if v, ok := ann[virtblkPrefix+"iothread-cpuset"]; ok && !cpusetSyntax.MatchString(v) {
		fail("annotation %siothread-cpuset=%q: want a libvirt cpuset such as 2-5 or 0,2,4-6", virtblkPrefix, v)
	}
	if v, ok := ann[virtblkPrefix+"metrics-port"]; ok {
		if p, err := strconv.Atoi(v); err != nil || p < 1 || p > 65535 {
			fail("annotation %smetrics-port=%q: want a TCP port 1-65535", virtblkPrefix, v)
		}
	}
	served := false
	if v, ok := ann[virtblkPrefix+"serve"]; ok {
		served = true
		for _, item := range strings.Split(v, ",") {
			name, size, ok := strings.Cut(strings.TrimSpace(item), ":")
			if !ok {
				fail("annotation %sserve item %q: want DISK:SIZE", virtblkPrefix, item)
				continue
			}
			needVirtio(virtblkPrefix+"serve", name)
			q, err := resource.ParseQuantity(size)
			if err != nil || q.Sign() <= 0 {
				fail("annotation %sserve item %q: size %q is not a positive quantity such as 10Gi", virtblkPrefix, item, size)
			}
		}
	}
	store, storeSet := ann[virtblkPrefix+"store"]
	if !storeSet {
		store = defaultStore
	}
	if storeSet && !served {
		fail("annotation %sstore without %sserve: the store is only used for served disks", virtblkPrefix, virtblkPrefix)
	}
	if served && virtblk != nil {
		if virtblk.PVC == nil {
			fail("%sserve needs a pvc in the virtblk hook sidecar entry: without it the store %s is in the container's writable layer and lost on restart", virtblkPrefix, store)
		} else if !strings.HasPrefix(store, virtblk.PVC.VolumePath+"/") {
			fail("store %s is not inside the sidecar's PVC mount %s: data would not persist", store, virtblk.PVC.VolumePath)
		}
	}
	for k, v := range ann {
		if !strings.HasPrefix(k, virtblkPrefix) {
			continue
		}
		key := strings.TrimPrefix(k, virtblkPrefix)
		switch key {
		case "iothreads", "disks", "queues", "iothread-cpuset", "iothread-poll", "serve", "store", "metrics-port":
			continue
		}
		disk, ok := strings.CutPrefix(key, "queue-map.")
		if !ok {
			fail("unknown annotation %s: the sidecar rejects it", k)
			continue
		}
		needVirtio(k, disk)
		entries := strings.Split(v, ",")
		for _, e := range entries {
			if n, err := strconv.Atoi(strings.TrimSpace(e)); err != nil || n < 0 {
				fail("annotation %s=%q: entry %q is not an IOThread number", k, v, e)
			}
		}
		if queues > 0 && len(entries) != queues {
			fail("annotation %s=%q has %d entries, but %squeues is %d: give one IOThread per queue", k, v, len(entries), virtblkPrefix, queues)
		}
	}
	return errs
}

// kustomization is the subset of kustomize's Kustomization this tree uses.
// It is decoded strictly: a field outside this subset (or a typo such as
// "resource:") fails the test and has to be added here deliberately.
type kustomization struct {
	APIVersion string           `json:"apiVersion"`
	Kind       string           `json:"kind"`
	Namespace  string           `json:"namespace,omitempty"`
	Resources  []string         `json:"resources,omitempty"`
	Components []string         `json:"components,omitempty"`
	Patches    []kustomizePatch `json:"patches,omitempty"`
}

type kustomizePatch struct {
	Path   string       `json:"path,omitempty"`
	Patch  string       `json:"patch,omitempty"`
	Target *patchTarget `json:"target,omitempty"`
}

type patchTarget struct {
	Group     string `json:"group,omitempty"`
	Version   string `json:"version,omitempty"`
	Kind      string `json:"kind,omitempty"`
	Name      string `json:"name,omitempty"`
	Namespace string `json:"namespace,omitempty"`
}

func readKustomization(dir string) (*kustomization, error) {
	file := filepath.Join(dir, "kustomization.yaml")
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read kustomization: %w", err)
	}
	j, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	var k kustomization
	if err := strictUnmarshal(j, &k); err != nil {
		return nil, fmt.Errorf("%s: strict decode: %w", file, err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		return nil, fmt.Errorf("%s: apiVersion/kind %s/%s, want kustomize.config.k8s.io/v1beta1/Kustomization", file, k.APIVersion, k.Kind)
	}
	if len(k.Components) > 0 {
		return nil, fmt.Errorf("%s: components are not supported by this test's renderer; extend build()", file)
	}
	for i, p := range k.Patches {
		if (p.Path == "") == (p.Patch == "") {
			return nil, fmt.Errorf("%s: patches[%d]: set exactly one of path and patch", file, i)
		}
	}
	return &k, nil
}

// checkKustomizationFiles reports every file or directory a kustomization
// references that does not exist (or, for a directory, has no
// kustomization.yaml).
func checkKustomizationFiles(root, dir string) []error {
	k, err := readKustomization(dir)
	if err != nil {
		return []error{err}
	}
	var errs []error
	rel := func(p string) string { r, _ := filepath.Rel(root, p); return r }
	for _, r := range k.Resources {
		if strings.Contains(r, "://") {
			errs = append(errs, fmt.Errorf("%s: remote resource %q: keep this tree self-contained", rel(dir), r))
			continue
		}
		p := filepath.Join(dir, r)
		st, err := os.Stat(p)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: resource %q: %w", rel(dir), r, err))
		case st.IsDir():
			if _, err := os.Stat(filepath.Join(p, "kustomization.yaml")); err != nil {
				errs = append(errs, fmt.Errorf("%s: resource directory %q has no kustomization.yaml", rel(dir), r))
			}
		}
	}
	for i, p := range k.Patches {
		if p.Path == "" {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, p.Path)); err != nil {
			errs = append(errs, fmt.Errorf("%s: patches[%d] path %q: %w", rel(dir), i, p.Path, err))
		}
	}
	return errs
}

// patchFiles lists the files a kustomization uses as patches (partial
// objects, decoded strictly but not checked as complete resources).
func patchFiles(dir string) ([]string, error) {
	k, err := readKustomization(dir)
	if err != nil {
		return nil, err
	}
	var files []string
	for _, p := range k.Patches {
		if p.Path != "" {
			files = append(files, filepath.Clean(filepath.Join(dir, p.Path)))
		}
	}
	return files, nil
}

// build renders a kustomization directory the way `kustomize build` does
// for the features this tree uses: resources (files and directories,
// recursively) and strategic-merge patches. None of our patches touches a
// list that has a merge key, so an RFC 7386 JSON merge patch gives the same
// result as kustomize's strategic merge.
func build(root, dir string, depth int) ([]object, error) {
	if depth > 10 {
		return nil, fmt.Errorf("%s: kustomization resources nest more than 10 levels (a cycle?)", dir)
	}
	k, err := readKustomization(dir)
	if err != nil {
		return nil, err
	}
	rel := func(p string) string { r, _ := filepath.Rel(root, p); return r }
	var out []object
	for _, r := range k.Resources {
		p := filepath.Join(dir, r)
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("%s: resource %q: %w", rel(dir), r, err)
		}
		if st.IsDir() {
			objs, err := build(root, p, depth+1)
			if err != nil {
				return nil, err
			}
			out = append(out, objs...)
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read resource: %w", err)
		}
		objs, err := loadDocuments(rel(p), data)
		if err != nil {
			return nil, err
		}
		out = append(out, objs...)
	}
	if err := checkUniqueIDs(out); err != nil {
		return nil, fmt.Errorf("%s: %w", rel(dir), err)
	}
	for i, p := range k.Patches {
		var patches []object
		name := fmt.Sprintf("%s patches[%d]", rel(dir), i)
		if p.Path != "" {
			data, err := os.ReadFile(filepath.Join(dir, p.Path))
			if err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			if patches, err = loadDocuments(rel(filepath.Join(dir, p.Path)), data); err != nil {
				return nil, err
			}
		} else {
			var err error
			if patches, err = loadDocuments(name, []byte(p.Patch)); err != nil {
				return nil, err
			}
		}
		for _, patch := range patches {
			if _, err := decodeStrict(patch); err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			hits := 0
			for j := range out {
				if !patchApplies(p.Target, patch, out[j]) {
					continue
				}
				merged, err := mergePatchJSON(out[j].json, patch.json)
				if err != nil {
					return nil, fmt.Errorf("%s on %s: %w", name, out[j], err)
				}
				out[j].json = merged
				out[j].file += " + " + patch.file
				hits++
			}
			if hits == 0 {
				return nil, fmt.Errorf("%s (%s) matches no resource: kustomize would fail or do nothing", name, patch)
			}
		}
	}
	if k.Namespace != "" {
		return nil, fmt.Errorf("%s: namespace: is not supported by this test's renderer; extend build()", rel(dir))
	}
	return out, nil
}

func checkUniqueIDs(objs []object) error {
	seen := map[string]object{}
	for _, o := range objs {
		av, kind, name, ns := o.typeMeta()
		id := strings.Join([]string{av, kind, ns, name}, "|")
		if prev, ok := seen[id]; ok {
			return fmt.Errorf("%s and %s define the same resource", prev, o)
		}
		seen[id] = o
	}
	return nil
}

// patchApplies reports whether a patch targets obj: by the explicit target
// selector if there is one, else by the patch's own apiVersion, kind, name
// and namespace, like kustomize.
func patchApplies(t *patchTarget, patch, obj object) bool {
	av, kind, name, ns := obj.typeMeta()
	group, version := "", av
	if g, v, ok := strings.Cut(av, "/"); ok {
		group, version = g, v
	}
	if t == nil {
		pav, pkind, pname, pns := patch.typeMeta()
		return pav == av && pkind == kind && pname == name && pns == ns
	}
	return (t.Group == "" || t.Group == group) &&
		(t.Version == "" || t.Version == version) &&
		(t.Kind == "" || t.Kind == kind) &&
		(t.Name == "" || t.Name == name) &&
		(t.Namespace == "" || t.Namespace == ns)
}

// mergePatchJSON applies an RFC 7386 JSON merge patch.
func mergePatchJSON(doc, patch []byte) ([]byte, error) {
	var d, p any
	if err := json.Unmarshal(doc, &d); err != nil {
		return nil, fmt.Errorf("decode document: %w", err)
	}
	if err := json.Unmarshal(patch, &p); err != nil {
		return nil, fmt.Errorf("decode patch: %w", err)
	}
	return json.Marshal(mergeValue(d, p))
}

func mergeValue(doc, patch any) any {
	pm, ok := patch.(map[string]any)
	if !ok {
		return patch
	}
	dm, ok := doc.(map[string]any)
	if !ok {
		dm = map[string]any{}
	}
	out := make(map[string]any, len(dm))
	for k, v := range dm {
		out[k] = v
	}
	for k, v := range pm {
		if v == nil {
			delete(out, k)
			continue
		}
		out[k] = mergeValue(out[k], v)
	}
	return out
}

// yamlFiles lists every YAML file under root, sorted.
func yamlFiles(root string) ([]string, error) {
	var files []string
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && strings.HasPrefix(d.Name(), ".") && p != root {
			return filepath.SkipDir
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return nil
	})
	sort.Strings(files)
	return files, err
}
