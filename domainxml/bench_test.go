package domainxml

import (
	"fmt"
	"strings"
	"testing"
)

// domain64 is a KubeVirt-style domain with 64 virtio disks, each on
// KubeVirt's supplemental pool of 4.
func domain64() ([]byte, IOThreadPlan) {
	var b strings.Builder
	b.WriteString("<domain type=\"kvm\" xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\">\n\t<name>bench_vm</name>\n\t<memory unit=\"b\">17179869184</memory>\n\t<devices>\n")
	plan := IOThreadPlan{PoolSize: 8, CPUSet: "8-15", Polling: poll}
	for i := 0; i < 64; i++ {
		fmt.Fprintf(&b, "\t\t<disk device=\"disk\" type=\"block\" model=\"virtio-non-transitional\">\n"+
			"\t\t\t<source dev=\"/dev/vol%d\" name=\"vol%d\"></source>\n"+
			"\t\t\t<target bus=\"virtio\" dev=\"vd%s\"></target>\n"+
			"\t\t\t<driver cache=\"none\" error_policy=\"stop\" io=\"native\" name=\"qemu\" type=\"raw\" queues=\"16\" discard=\"unmap\">\n"+
			"\t\t\t\t<iothreads><iothread id=\"1\"></iothread><iothread id=\"2\"></iothread><iothread id=\"3\"></iothread><iothread id=\"4\"></iothread></iothreads>\n"+
			"\t\t\t</driver>\n\t\t\t<alias name=\"ua-vol%d\"></alias>\n\t\t</disk>\n", i, i, devName(i), i)
		plan.Disks = append(plan.Disks, DiskPlan{Alias: fmt.Sprintf("ua-vol%d", i), Queues: 16})
	}
	b.WriteString("\t</devices>\n\t<vcpu placement=\"static\">16</vcpu>\n\t<iothreads>4</iothreads>\n</domain>\n")
	return []byte(b.String()), plan
}

func devName(i int) string {
	if i < 26 {
		return string(rune('a' + i))
	}
	return string(rune('a'+i/26-1)) + string(rune('a'+i%26))
}

func BenchmarkRewrite64Disks(b *testing.B) {
	in, plan := domain64()
	b.SetBytes(int64(len(in)))
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := RewriteIOThreads(in, plan); err != nil {
			b.Fatal(err)
		}
	}
}

func TestDomain64Valid(t *testing.T) {
	in, plan := domain64()
	out, rep, err := RewriteIOThreads(in, plan)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Disks) != 64 || rep.IOThreads != 8 {
		t.Fatalf("report %+v", rep)
	}
	validateAll(t, map[string][]byte{"domain64.xml": out})
}
