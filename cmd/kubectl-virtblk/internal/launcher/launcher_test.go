package launcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
)

var t0 = time.Date(2026, 11, 1, 10, 0, 0, 0, time.UTC)

type podOpt func(*corev1.Pod)

func pod(ns, name, vm string, phase corev1.PodPhase, age time.Duration, opts ...podOpt) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace:         ns,
			Name:              name,
			Labels:            map[string]string{"kubevirt.io": "virt-launcher", VMNameLabel: vm},
			CreationTimestamp: metav1.NewTime(t0.Add(-age)),
		},
		Spec: corev1.PodSpec{
			NodeName:   "node-a",
			Containers: []corev1.Container{{Name: ComputeContainer}, {Name: "hook-sidecar-0"}},
		},
		Status: corev1.PodStatus{Phase: phase},
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

func noCompute(p *corev1.Pod) { p.Spec.Containers = []corev1.Container{{Name: "hotplug-disk"}} }
func terminating(p *corev1.Pod) {
	now := metav1.NewTime(t0)
	p.DeletionTimestamp = &now
	p.Finalizers = []string{"test"}
}
func unlabelled(p *corev1.Pod) { delete(p.Labels, VMNameLabel) }

func TestFindPod(t *testing.T) {
	ctx := context.Background()
	objs := []runtime.Object{
		pod("default", "virt-launcher-other-aaaaa", "other", corev1.PodRunning, time.Minute),
		pod("default", "virt-launcher-db-old", "db", corev1.PodSucceeded, 3*time.Hour),
		pod("default", "virt-launcher-db-running-older", "db", corev1.PodRunning, 2*time.Hour),
		pod("default", "virt-launcher-db-running-newer", "db", corev1.PodRunning, time.Hour),
		pod("default", "virt-launcher-db-pending", "db", corev1.PodPending, time.Second),
		pod("default", "hp-volume-db", "db", corev1.PodRunning, time.Millisecond, noCompute),
		pod("default", "virt-launcher-db-deleting", "db", corev1.PodRunning, 2*time.Millisecond, terminating),
		pod("default", "virt-launcher-db-nolabel", "db", corev1.PodRunning, time.Millisecond, unlabelled),
		pod("other-ns", "virt-launcher-db-elsewhere", "db", corev1.PodRunning, 0),
	}
	c := fake.NewClientset(objs...)
	p, err := FindPod(ctx, c, "default", "db")
	if err != nil {
		t.Fatal(err)
	}
	if p.Name != "virt-launcher-db-running-newer" {
		t.Errorf("FindPod = %s, want the newest running launcher virt-launcher-db-running-newer", p.Name)
	}

	// Only pods that are not running: the error lists them.
	c = fake.NewClientset(
		pod("default", "virt-launcher-web-b", "web", corev1.PodPending, time.Second),
		pod("default", "virt-launcher-web-a", "web", corev1.PodFailed, time.Hour),
		pod("default", "virt-launcher-web-c", "web", corev1.PodRunning, time.Second, terminating),
	)
	_, err = FindPod(ctx, c, "default", "web")
	if err == nil || !strings.Contains(err.Error(), "virt-launcher-web-a (Failed), virt-launcher-web-b (Pending), virt-launcher-web-c (Running, terminating)") {
		t.Errorf("not running: err = %v", err)
	}

	// No pod at all: the error says how to check the VM.
	_, err = FindPod(ctx, fake.NewClientset(objs...), "default", "nosuchvm")
	if err == nil || !strings.Contains(err.Error(), "is the VM running?") || !strings.Contains(err.Error(), "vm.kubevirt.io/name=nosuchvm") {
		t.Errorf("no pod: err = %v", err)
	}

	// Several running with the same creation time: deterministic by name.
	c = fake.NewClientset(
		pod("default", "virt-launcher-x-2", "x", corev1.PodRunning, time.Hour),
		pod("default", "virt-launcher-x-1", "x", corev1.PodRunning, time.Hour),
	)
	if p, err := FindPod(ctx, c, "default", "x"); err != nil || p.Name != "virt-launcher-x-1" {
		t.Errorf("tie: %v %v", p, err)
	}
}

// fakeExec answers commands from a table and records what ran.
type fakeExec struct {
	answers map[string]result
	calls   []string
}

type result struct {
	out string
	err error
}

func (f *fakeExec) Exec(_ context.Context, p *corev1.Pod, container string, cmd []string) ([]byte, error) {
	key := p.Name + "/" + container + ": " + strings.Join(cmd, " ")
	f.calls = append(f.calls, key)
	for prefix, r := range f.answers {
		if key == prefix {
			if r.err != nil {
				return nil, r.err
			}
			return []byte(r.out), nil
		}
	}
	return nil, fmt.Errorf("command terminated with exit code 127: %s: not found", cmd[0])
}

const launcherPod = "virt-launcher-served-disk-x7k2p"

func servedCluster() *fake.Clientset {
	return fake.NewClientset(pod("default", launcherPod, "served-disk", corev1.PodRunning, time.Hour))
}

func TestInspect(t *testing.T) {
	xml, err := os.ReadFile("../view/testdata/served-mapped-dumpxml.xml")
	if err != nil {
		t.Fatal(err)
	}
	ex := &fakeExec{answers: map[string]result{
		// The session URI fails (say, a root VMI); the system URI works.
		launcherPod + "/compute: virsh -c qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock dumpxml default_served-disk": {
			err: errors.New("error: failed to connect to the hypervisor")},
		launcherPod + "/compute: virsh -c qemu:///system dumpxml default_served-disk": {out: string(xml)},
	}}
	var out bytes.Buffer
	if err := Inspect(context.Background(), Deps{Client: servedCluster(), Exec: ex}, "default", "served-disk", &out); err != nil {
		t.Fatal(err)
	}
	if len(ex.calls) != 2 {
		t.Errorf("calls %q, want the two virsh URIs in order", ex.calls)
	}
	for _, want := range []string{
		"Pod:        " + launcherPod + " (node node-a)",
		"Domain:     default_served-disk",
		"/var/run/kubevirt-hooks/hook-sidecar-0/vhost/data.sock (reconnect 10s)",
		"scratch  0>3 1>4 2>5 3>6 4>3 5>4 6>5 7>6",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}

	// virsh fails everywhere: both attempts are in the error.
	ex = &fakeExec{}
	err = Inspect(context.Background(), Deps{Client: servedCluster(), Exec: ex}, "default", "served-disk", &out)
	if err == nil || strings.Count(err.Error(), "not found") != 2 || !strings.Contains(err.Error(), "virsh dumpxml default_served-disk in pod "+launcherPod) {
		t.Errorf("err = %v", err)
	}

	// virsh prints something that is not a domain.
	ex = &fakeExec{answers: map[string]result{
		launcherPod + "/compute: virsh -c qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock dumpxml default_served-disk": {out: "garbage"},
	}}
	if err := Inspect(context.Background(), Deps{Client: servedCluster(), Exec: ex}, "default", "served-disk", &out); err == nil {
		t.Error("garbage XML accepted")
	}
}

func cmdline(args ...string) string { return strings.Join(args, "\x00") + "\x00" }

func TestCmdline(t *testing.T) {
	qemu := cmdline("/usr/libexec/qemu-kvm", "-name", "guest=default_served-disk,debug-threads=on",
		"-object", `{"qom-type":"iothread","id":"iothread3"}`,
		"-device", `{"driver":"virtio-blk-pci","iothread-vq-mapping":[{"iothread":"iothread3"}],"id":"ua-scratch"}`,
		"-msg", "timestamp=on")

	// With a shell in the image: one exec.
	ex := &fakeExec{answers: map[string]result{
		launcherPod + "/compute: sh -c " + findQemu: {out: qemu},
	}}
	var out bytes.Buffer
	if err := Cmdline(context.Background(), Deps{Client: servedCluster(), Exec: ex}, "default", "served-disk", "iothread", &out); err != nil {
		t.Fatal(err)
	}
	want := "/usr/libexec/qemu-kvm \\\n    -object '{\"qom-type\":\"iothread\",\"id\":\"iothread3\"}' \\\n" +
		"    -device '{\"driver\":\"virtio-blk-pci\",\"iothread-vq-mapping\":[{\"iothread\":\"iothread3\"}],\"id\":\"ua-scratch\"}'\n"
	if out.String() != want {
		t.Errorf("output:\n%s\nwant:\n%s", out.String(), want)
	}

	// No shell: the root pid file is missing, the non-root one is read.
	ex = &fakeExec{answers: map[string]result{
		launcherPod + "/compute: cat /run/libvirt/qemu/run/default_served-disk.pid": {out: "4242\n"},
		launcherPod + "/compute: cat /proc/4242/cmdline":                            {out: qemu},
	}}
	out.Reset()
	if err := Cmdline(context.Background(), Deps{Client: servedCluster(), Exec: ex}, "default", "served-disk", "", &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "-msg timestamp=on") || len(ex.calls) != 3 {
		t.Errorf("calls %q output:\n%s", ex.calls, out.String())
	}

	// A pid file with junk must not become a path.
	ex = &fakeExec{answers: map[string]result{
		launcherPod + "/compute: cat /run/libvirt/qemu/run/default_served-disk.pid": {out: "../../etc/passwd"},
		launcherPod + "/compute: cat /var/run/libvirt/qemu/default_served-disk.pid": {out: "99999999999"},
	}}
	err := Cmdline(context.Background(), Deps{Client: servedCluster(), Exec: ex}, "default", "served-disk", "", &out)
	if err == nil || !strings.Contains(err.Error(), "not a pid") {
		t.Errorf("junk pid: err = %v", err)
	}
	for _, c := range ex.calls {
		if strings.Contains(c, "/proc/") && !strings.Contains(c, "sh -c") {
			t.Errorf("ran %q with an untrusted pid", c)
		}
	}
}

func vmi(ns, name string, ann map[string]string) *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetAPIVersion("kubevirt.io/v1")
	u.SetKind("VirtualMachineInstance")
	u.SetNamespace(ns)
	u.SetName(name)
	u.SetAnnotations(ann)
	return u
}

type fakeMetrics struct {
	body string
	pod  string
	port int
}

func (f *fakeMetrics) Metrics(_ context.Context, p *corev1.Pod, port int) ([]byte, error) {
	f.pod, f.port = p.Name, port
	return []byte(f.body), nil
}

func TestStats(t *testing.T) {
	ctx := context.Background()
	dyn := dynfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{VMIResource: "VirtualMachineInstanceList"},
		vmi("default", "plain", map[string]string{"virtblk.io/iothreads": "4"}),
		vmi("default", "nometrics", map[string]string{"virtblk.io/serve": "data:10Gi"}),
		vmi("default", "badport", map[string]string{"virtblk.io/serve": "data:10Gi", "virtblk.io/metrics-port": "http"}),
		vmi("default", "served-disk", map[string]string{"virtblk.io/serve": "data:10Gi", "virtblk.io/metrics-port": "9474"}),
	)
	m := &fakeMetrics{body: "# TYPE virtblk_requests_total counter\nvirtblk_requests_total{volume=\"data\",queue=\"0\"} 12\ngo_goroutines 7\n"}
	d := Deps{Client: servedCluster(), VMIs: DynamicVMIs{Client: dyn}, Metrics: m, Exec: &fakeExec{}}

	var out bytes.Buffer
	if err := Stats(ctx, d, "default", "plain", &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "no disk is served by virtblk") {
		t.Errorf("plain VM:\n%s", out.String())
	}
	out.Reset()
	if err := Stats(ctx, d, "default", "nometrics", &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "serves data:10Gi, but its metrics are off") {
		t.Errorf("no metrics port:\n%s", out.String())
	}
	if err := Stats(ctx, d, "default", "badport", &out); err == nil || !strings.Contains(err.Error(), `virtblk.io/metrics-port="http"`) {
		t.Errorf("bad port: err = %v", err)
	}
	if err := Stats(ctx, d, "default", "missing", &out); err == nil || !strings.Contains(err.Error(), "get VMI default/missing") {
		t.Errorf("missing VMI: err = %v", err)
	}
	if m.port != 0 {
		t.Error("metrics fetched for a VM without a metrics port")
	}

	out.Reset()
	if err := Stats(ctx, d, "default", "served-disk", &out); err != nil {
		t.Fatal(err)
	}
	if m.pod != launcherPod || m.port != 9474 {
		t.Errorf("fetched pod %s port %d", m.pod, m.port)
	}
	if !strings.Contains(out.String(), "virtblk_requests_total  queue=0,volume=data  12") &&
		!strings.Contains(out.String(), "virtblk_requests_total  volume=data,queue=0  12") {
		t.Errorf("stats output:\n%s", out.String())
	}
	if strings.Contains(out.String(), "go_goroutines") {
		t.Errorf("non-virtblk metric shown:\n%s", out.String())
	}
}
