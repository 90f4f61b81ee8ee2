package sidecar

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha3"
	"github.com/virtblk/virtblk/sidecar/hooktest"
)

// domain64 is a KubeVirt-style domain with 64 virtio block disks on
// KubeVirt's supplemental pool of 4 IOThreads, 16 queues each, and the VMI
// asking virtblk to map all of them onto a pinned, polling pool of 8.
func domain64(t testing.TB) (domainXML, vmiJSON []byte) {
	var b strings.Builder
	b.WriteString("<domain type=\"kvm\" xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\">\n\t<name>bench_vm</name>\n\t<memory unit=\"b\">17179869184</memory>\n\t<devices>\n")
	var disks []any
	for i := range 64 {
		name := fmt.Sprintf("vol%d", i)
		fmt.Fprintf(&b, "\t\t<disk device=\"disk\" type=\"block\" model=\"virtio-non-transitional\">\n"+
			"\t\t\t<source dev=\"/dev/%s\" name=\"%s\"></source>\n"+
			"\t\t\t<target bus=\"virtio\" dev=\"vd%s\"></target>\n"+
			"\t\t\t<driver cache=\"none\" error_policy=\"stop\" io=\"native\" name=\"qemu\" type=\"raw\" queues=\"16\" discard=\"unmap\">\n"+
			"\t\t\t\t<iothreads>\n\t\t\t\t\t<iothread id=\"1\"></iothread>\n\t\t\t\t\t<iothread id=\"2\"></iothread>\n\t\t\t\t\t<iothread id=\"3\"></iothread>\n\t\t\t\t\t<iothread id=\"4\"></iothread>\n\t\t\t\t</iothreads>\n"+
			"\t\t\t</driver>\n\t\t\t<alias name=\"ua-%s\"></alias>\n\t\t</disk>\n", name, name, devName(i), name)
		disks = append(disks, map[string]any{"name": name, "disk": map[string]any{"bus": "virtio"}})
	}
	b.WriteString("\t</devices>\n\t<cpu mode=\"host-model\">\n\t\t<topology sockets=\"1\" cores=\"16\" threads=\"1\"></topology>\n\t</cpu>\n\t<vcpu placement=\"static\">16</vcpu>\n\t<iothreads>4</iothreads>\n</domain>")

	var vmi map[string]any
	if err := json.Unmarshal(hooktest.VMI(t, map[string]string{
		"virtblk.io/iothreads":       "8",
		"virtblk.io/iothread-cpuset": "8-15",
		"virtblk.io/iothread-poll":   "max=32768,grow=2,shrink=2",
	}), &vmi); err != nil {
		t.Fatal(err)
	}
	dom := vmi["spec"].(map[string]any)["domain"].(map[string]any)
	dom["cpu"] = map[string]any{"cores": 16}
	dom["devices"].(map[string]any)["disks"] = disks
	js, err := json.Marshal(vmi)
	if err != nil {
		t.Fatal(err)
	}
	return []byte(b.String()), js
}

func devName(i int) string {
	if i < 26 {
		return string(rune('a' + i))
	}
	return string(rune('a'+i/26-1)) + string(rune('a'+i%26))
}

func TestDomain64Maps(t *testing.T) {
	dom, vmi := domain64(t)
	svc := v1alpha3Service{h: NewHandler(nil, nil)}
	res, err := svc.OnDefineDomain(context.Background(), &v1alpha3.OnDefineDomainParams{DomainXML: dom, Vmi: vmi})
	if err != nil {
		t.Fatal(err)
	}
	m := hooktest.ReadMapping(t, res.GetDomainXML())
	if len(m.Disks) != 64 || m.IOThreads != 8 {
		t.Fatalf("mapped %d disks on %d IOThreads, want 64 on 8", len(m.Disks), m.IOThreads)
	}
	for alias, threads := range m.Disks {
		if len(threads) != 16 {
			t.Fatalf("%s has %d queues", alias, len(threads))
		}
	}
}

// BenchmarkOnDefineDomain64Disks is one v1alpha3 OnDefineDomain call through
// the gRPC service handler (VMI decode, annotation parse, XML rewrite and
// marshal), without the socket.
func BenchmarkOnDefineDomain64Disks(b *testing.B) {
	dom, vmi := domain64(b)
	svc := v1alpha3Service{h: NewHandler(nil, nil)}
	req := &v1alpha3.OnDefineDomainParams{DomainXML: dom, Vmi: vmi}
	b.SetBytes(int64(len(dom) + len(vmi)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := svc.OnDefineDomain(context.Background(), req); err != nil {
			b.Fatal(err)
		}
	}
}
