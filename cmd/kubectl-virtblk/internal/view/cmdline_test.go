package view

import (
	"bytes"
	"strings"
	"testing"
)

// A QEMU command line as libvirt builds it for a KubeVirt VM with an
// IOThread-mapped virtio-blk disk and a vhost-user-blk disk (abridged to
// the parts that matter, NUL-separated like /proc/PID/cmdline).
var qemuArgs = []string{
	"/usr/libexec/qemu-kvm",
	"-name", "guest=default_served-disk,debug-threads=on",
	"-S",
	"-object", `{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/run/kubevirt-private/libvirt/qemu/lib/domain-1-default_served-disk/master-key.aes"}`,
	"-machine", "pc-q35-rhel9.4.0,usb=off,dump-guest-core=off,memory-backend=pc.ram",
	"-object", `{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,"x-use-canonical-path-for-ramblock-id":false,"size":4294967296}`,
	"-smp", "8,sockets=1,dies=1,clusters=1,cores=8,threads=1",
	"-object", `{"qom-type":"iothread","id":"iothread3","poll-max-ns":32768,"poll-grow":2,"poll-shrink":2}`,
	"-chardev", "socket,id=chr-vu-ua-data,path=/var/run/kubevirt-hooks/hook-sidecar-0/vhost/data.sock,reconnect=10",
	"-device", `{"driver":"vhost-user-blk-pci","bus":"pci.8","addr":"0x0","id":"ua-data","chardev":"chr-vu-ua-data","num-queues":4}`,
	"-device", `{"driver":"virtio-blk-pci-non-transitional","bus":"pci.9","addr":"0x0","num-queues":8,"iothread-vq-mapping":[{"iothread":"iothread3","vqs":[0,4]},{"iothread":"iothread4","vqs":[1,5]}],"drive":"libvirt-1-format","id":"ua-scratch"}`,
	"-msg", "timestamp=on",
}

func cmdlineBytes(args []string) []byte {
	return []byte(strings.Join(args, "\x00") + "\x00")
}

func TestParseCmdline(t *testing.T) {
	got, err := ParseCmdline(cmdlineBytes(qemuArgs))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(qemuArgs) || got[0] != qemuArgs[0] || got[len(got)-1] != "timestamp=on" {
		t.Errorf("ParseCmdline = %q", got)
	}
	for _, in := range []string{"", "\x00", "\x00\x00"} {
		if _, err := ParseCmdline([]byte(in)); err == nil {
			t.Errorf("ParseCmdline(%q) accepted", in)
		}
	}
}

func TestRenderCmdline(t *testing.T) {
	var buf bytes.Buffer
	if err := RenderCmdline(&buf, qemuArgs, ""); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	// Program + one line per option (-S has no value).
	if len(lines) != 12 {
		t.Fatalf("%d lines, want 12:\n%s", len(lines), buf.String())
	}
	if lines[0] != "/usr/libexec/qemu-kvm \\" || lines[2] != "    -S \\" || lines[11] != "    -msg timestamp=on" {
		t.Errorf("unexpected layout:\n%s", buf.String())
	}
	// JSON values are single-quoted so the output pastes into a shell.
	if !strings.Contains(buf.String(), `-device '{"driver":"vhost-user-blk-pci",`) {
		t.Errorf("JSON option not quoted:\n%s", buf.String())
	}

	buf.Reset()
	if err := RenderCmdline(&buf, qemuArgs, "iothread"); err != nil {
		t.Fatal(err)
	}
	lines = strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != 3 || !strings.Contains(lines[1], `"qom-type":"iothread"`) || !strings.Contains(lines[2], "iothread-vq-mapping") {
		t.Errorf("match iothread:\n%s", buf.String())
	}
	if err := RenderCmdline(&buf, qemuArgs, "no-such-thing"); err == nil || !strings.Contains(err.Error(), "no-such-thing") {
		t.Errorf("unmatched filter: err = %v", err)
	}
	if err := RenderCmdline(&buf, nil, ""); err == nil {
		t.Error("empty command line accepted")
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"plain-arg_1.2,x=y:z": "plain-arg_1.2,x=y:z",
		"":                    "''",
		"a b":                 "'a b'",
		"it's":                `'it'\''s'`,
		`{"a":1}`:             `'{"a":1}'`,
		"a\x1b[2Jb":           `"a\x1b[2Jb"`,
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %q, want %q", in, got, want)
		}
	}
}
