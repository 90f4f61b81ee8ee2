// Package launcher is kubectl-virtblk's cluster side: it finds a VM's
// virt-launcher pod, runs commands in its containers, reads the VMI's
// annotations and the back-end's metrics. Cluster access sits behind small
// interfaces (Executor, MetricsFetcher, VMIAnnotations) so the commands'
// logic is tested with fakes and real outputs, without a cluster.
package launcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/virtblk/virtblk/cmd/kubectl-virtblk/internal/view"
)

const (
	// VMNameLabel is set by KubeVirt on a VM's virt-launcher pod (and on
	// helper pods such as hotplug attachment pods, which have no compute
	// container).
	VMNameLabel = "vm.kubevirt.io/name"
	// ComputeContainer runs virt-launcher, libvirt and QEMU.
	ComputeContainer = "compute"

	annServe       = "virtblk.io/serve"
	annMetricsPort = "virtblk.io/metrics-port"
)

// FindPod returns the VM's running virt-launcher pod: labelled with the VM
// name, with a compute container, phase Running and not being deleted; the
// newest if there are several (during a migration, the target).
func FindPod(ctx context.Context, c kubernetes.Interface, ns, vm string) (*corev1.Pod, error) {
	list, err := c.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: VMNameLabel + "=" + vm})
	if err != nil {
		return nil, fmt.Errorf("list pods of VM %s/%s: %w", ns, vm, err)
	}
	var running []*corev1.Pod
	var others []string
	for i := range list.Items {
		p := &list.Items[i]
		if !hasContainer(p, ComputeContainer) {
			continue
		}
		if p.Status.Phase != corev1.PodRunning || p.DeletionTimestamp != nil {
			state := string(p.Status.Phase)
			if p.DeletionTimestamp != nil {
				state += ", terminating"
			}
			others = append(others, fmt.Sprintf("%s (%s)", p.Name, state))
			continue
		}
		running = append(running, p)
	}
	if len(running) == 0 {
		if len(others) > 0 {
			sort.Strings(others)
			return nil, fmt.Errorf("VM %s/%s has no running virt-launcher pod: %s", ns, vm, strings.Join(others, ", "))
		}
		return nil, fmt.Errorf("no virt-launcher pod for VM %s/%s (label %s=%s): is the VM running? check `kubectl get vmi -n %s %s`", ns, vm, VMNameLabel, vm, ns, vm)
	}
	sort.Slice(running, func(i, j int) bool {
		ti, tj := running[i].CreationTimestamp, running[j].CreationTimestamp
		if !ti.Equal(&tj) {
			return tj.Before(&ti)
		}
		return running[i].Name < running[j].Name
	})
	return running[0], nil
}

func hasContainer(p *corev1.Pod, name string) bool {
	for _, c := range p.Spec.Containers {
		if c.Name == name {
			return true
		}
	}
	return false
}

// Executor runs a command in a container and returns its standard output;
// a non-zero exit is an error carrying the standard error.
type Executor interface {
	Exec(ctx context.Context, pod *corev1.Pod, container string, cmd []string) ([]byte, error)
}

// MetricsFetcher gets the Prometheus text a pod serves on a port.
type MetricsFetcher interface {
	Metrics(ctx context.Context, pod *corev1.Pod, port int) ([]byte, error)
}

// VMIAnnotations returns a VMI's annotations.
type VMIAnnotations interface {
	Annotations(ctx context.Context, ns, name string) (map[string]string, error)
}

// Deps are the cluster accesses the commands use.
type Deps struct {
	Client  kubernetes.Interface
	Exec    Executor
	Metrics MetricsFetcher
	VMIs    VMIAnnotations
}

// DomainName is libvirt's name for a KubeVirt VMI's domain.
func DomainName(ns, vm string) string { return ns + "_" + vm }

// libvirtURIs are tried in order: virt-launcher's libvirt is a session
// daemon listening on this socket for non-root VMIs (the default), and the
// system URI for root VMIs.
var libvirtURIs = []string{
	"qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock",
	"qemu:///system",
}

// DomainXML runs `virsh dumpxml` for the VM's domain in the compute
// container: the XML libvirt actually runs, after every hook.
func DomainXML(ctx context.Context, d Deps, pod *corev1.Pod, ns, vm string) ([]byte, error) {
	var errs []error
	for _, uri := range libvirtURIs {
		out, err := d.Exec.Exec(ctx, pod, ComputeContainer, []string{"virsh", "-c", uri, "dumpxml", DomainName(ns, vm)})
		if err == nil {
			return out, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", uri, err))
	}
	return nil, fmt.Errorf("virsh dumpxml %s in pod %s container %s: %w", DomainName(ns, vm), pod.Name, ComputeContainer, errors.Join(errs...))
}

// findQemu prints the cmdline of the QEMU process using only sh builtins
// and cat: the compute image has neither pgrep nor pidof for sure. comm is
// cut to 15 characters ("qemu-system-x86").
const findQemu = `for d in /proc/[0-9]*; do
  read -r c < "$d/comm" 2>/dev/null || continue
  case "$c" in qemu-kvm|qemu-system-*) cat "$d/cmdline"; exit 0;; esac
done
echo "no qemu-kvm or qemu-system-* process" >&2
exit 3`

// pidFiles are where libvirt writes the QEMU pid for non-root and root
// virt-launcher.
func pidFiles(domain string) []string {
	return []string{
		"/run/libvirt/qemu/run/" + domain + ".pid",
		"/var/run/libvirt/qemu/" + domain + ".pid",
	}
}

// maxPID bounds the pid read from a pid file before it goes into a path.
const maxPID = 1 << 22

// QemuCmdline returns QEMU's raw /proc/PID/cmdline from the compute
// container: by scanning /proc with sh, else through libvirt's pid file.
func QemuCmdline(ctx context.Context, d Deps, pod *corev1.Pod, ns, vm string) ([]byte, error) {
	out, err := d.Exec.Exec(ctx, pod, ComputeContainer, []string{"sh", "-c", findQemu})
	if err == nil && len(out) > 0 {
		return out, nil
	}
	errs := []error{fmt.Errorf("scan /proc: %w", orEmpty(err))}
	for _, pf := range pidFiles(DomainName(ns, vm)) {
		raw, err := d.Exec.Exec(ctx, pod, ComputeContainer, []string{"cat", pf})
		if err != nil {
			errs = append(errs, fmt.Errorf("read %s: %w", pf, err))
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
		if err != nil || pid < 1 || pid > maxPID {
			errs = append(errs, fmt.Errorf("pid file %s holds %q, not a pid", pf, bytes.TrimSpace(raw)))
			continue
		}
		out, err := d.Exec.Exec(ctx, pod, ComputeContainer, []string{"cat", "/proc/" + strconv.Itoa(pid) + "/cmdline"})
		if err != nil {
			errs = append(errs, fmt.Errorf("read /proc/%d/cmdline: %w", pid, err))
			continue
		}
		return out, nil
	}
	return nil, fmt.Errorf("QEMU command line of %s in pod %s: %w", DomainName(ns, vm), pod.Name, errors.Join(errs...))
}

func orEmpty(err error) error {
	if err == nil {
		return errors.New("empty output")
	}
	return err
}

// Inspect prints the disks, queues, IOThread map and pinning of the VM's
// running domain.
func Inspect(ctx context.Context, d Deps, ns, vm string, w io.Writer) error {
	pod, err := FindPod(ctx, d.Client, ns, vm)
	if err != nil {
		return err
	}
	xml, err := DomainXML(ctx, d, pod, ns, vm)
	if err != nil {
		return err
	}
	dom, err := view.ParseDomain(xml)
	if err != nil {
		return fmt.Errorf("domain of pod %s: %w", pod.Name, err)
	}
	fmt.Fprintf(w, "Pod:        %s (node %s)\n", pod.Name, pod.Spec.NodeName)
	return view.RenderDomain(w, dom)
}

// Cmdline prints QEMU's command line, one option per line; with match, only
// the options containing it.
func Cmdline(ctx context.Context, d Deps, ns, vm, match string, w io.Writer) error {
	pod, err := FindPod(ctx, d.Client, ns, vm)
	if err != nil {
		return err
	}
	raw, err := QemuCmdline(ctx, d, pod, ns, vm)
	if err != nil {
		return err
	}
	args, err := view.ParseCmdline(raw)
	if err != nil {
		return fmt.Errorf("QEMU in pod %s: %w", pod.Name, err)
	}
	return view.RenderCmdline(w, args, match)
}

// Stats prints the back-end's metrics for a VM whose disks virtblk serves,
// read through the API server's pod proxy from the port named by the VMI's
// virtblk.io/metrics-port annotation. For a VM without served disks it
// says so instead.
func Stats(ctx context.Context, d Deps, ns, vm string, w io.Writer) error {
	ann, err := d.VMIs.Annotations(ctx, ns, vm)
	if err != nil {
		return err
	}
	serve := ann[annServe]
	if serve == "" {
		_, err := fmt.Fprintf(w, "VM %s/%s: no disk is served by virtblk (no %s annotation), so there are no back-end stats.\n"+
			"Its disks are QEMU's own; `kubectl virtblk inspect %s` shows their queues and IOThreads.\n", ns, vm, annServe, vm)
		return err
	}
	portText, ok := ann[annMetricsPort]
	if !ok {
		_, err := fmt.Fprintf(w, "VM %s/%s: virtblk serves %s, but its metrics are off (no %s annotation).\n"+
			"Set it on the VM template (e.g. \"9474\") and restart the VM.\n", ns, vm, serve, annMetricsPort)
		return err
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port < 1 || port > 65535 {
		return fmt.Errorf("VMI %s/%s: annotation %s=%q is not a TCP port (1-65535)", ns, vm, annMetricsPort, portText)
	}
	pod, err := FindPod(ctx, d.Client, ns, vm)
	if err != nil {
		return err
	}
	raw, err := d.Metrics.Metrics(ctx, pod, port)
	if err != nil {
		return fmt.Errorf("metrics of pod %s port %d: %w", pod.Name, port, err)
	}
	samples, err := view.ParseMetrics(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("metrics of pod %s port %d: %w", pod.Name, port, err)
	}
	fmt.Fprintf(w, "Pod %s, served disks %s, metrics port %d\n\n", pod.Name, serve, port)
	return view.RenderMetrics(w, samples, "virtblk_")
}

// VMIResource is KubeVirt's VirtualMachineInstance resource.
var VMIResource = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstances"}

// DynamicVMIs reads VMIs with the dynamic client, which needs no KubeVirt
// client library.
type DynamicVMIs struct{ Client dynamic.Interface }

// Annotations implements VMIAnnotations.
func (v DynamicVMIs) Annotations(ctx context.Context, ns, name string) (map[string]string, error) {
	u, err := v.Client.Resource(VMIResource).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get VMI %s/%s: %w", ns, name, err)
	}
	return u.GetAnnotations(), nil
}

// ProxyMetrics reads /metrics through the API server's pod proxy, so it
// works from outside the cluster network.
type ProxyMetrics struct{ Client kubernetes.Interface }

// Metrics implements MetricsFetcher.
func (p ProxyMetrics) Metrics(ctx context.Context, pod *corev1.Pod, port int) ([]byte, error) {
	return p.Client.CoreV1().Pods(pod.Namespace).ProxyGet("http", pod.Name, strconv.Itoa(port), "/metrics", nil).DoRaw(ctx)
}
