package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/virtblk/virtblk/domainxml"
	"github.com/virtblk/virtblk/hack/vmtest"
	"github.com/virtblk/virtblk/sidecar/config"
	"github.com/virtblk/virtblk/sidecar/serve"

	"github.com/virtblk/virtblk/internal/testenv"
)

// vuLibvirtScript finds the vhost-user disk by its size (64 MiB = 131072
// sectors), reports its blk-mq queues and writes the host's pattern to it at
// 16 MiB, durably, bypassing the guest page cache.
const vuLibvirtScript = guestScript + `vu=
for d in /sys/block/vd*; do [ "$(cat $d/size)" = 131072 ] && vu=${d##*/}; done
[ -n "$vu" ] || { echo "VU-FAIL: no 64 MiB disk"; exit 21; }
dd if=/hostpattern of=/dev/$vu bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null || { echo "VU-FAIL: write"; exit 22; }
dd if=/dev/$vu of=/tmp/r bs=1M skip=16 count=1 iflag=direct 2>/dev/null
cmp /hostpattern /tmp/r || { echo "VU-FAIL: read back"; exit 23; }
echo "VU-WROTE $vu"
`

// TestLibvirtVhostUserDisk proves that what serve mode writes is a domain
// libvirt 11 accepts and QEMU 10 runs: a KubeVirt domain goes through the
// sidecar's real rewrites (serve.Rewrite for datadisk, then
// domainxml.RewriteIOThreads for rootdisk), libvirt defines and starts it
// against a running virtblkd, and the guest's write lands in virtblkd's raw
// image. It also shows that libvirt refuses the block-layer settings
// ToVhostUser strips.
func TestLibvirtVhostUserDisk(t *testing.T) {
	start := time.Now()
	vmtest.RequireRoot(t)
	img := vmtest.EnsureImage(t)
	t.Cleanup(func() { checkNoMounts(t, testenv.TrixieRoot()) })
	bin := testenv.Build(t, "./cmd/virtblkd")

	src, err := os.ReadFile(filepath.Join("..", "..", "domainxml", "testdata", "supplemental-pool.xml"))
	if err != nil {
		t.Fatalf("read KubeVirt domain: %v", err)
	}
	dir := vuTempDir(t) // under /tmp: visible in the trixie root, short socket path
	vhostDir := filepath.Join(dir, serve.VhostSubdir)
	if err := os.Mkdir(vhostDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The sidecar pipeline order: serve first, then IOThreads.
	plan := &config.ServePlan{Disks: []config.ServedDisk{{Name: "datadisk", Alias: "ua-datadisk", Size: vuImageSize, Queues: 2}}}
	served, attrs, err := serve.Rewrite(src, plan, serve.RewriteOptions{ComputeHooksDir: dir, ReconnectSeconds: serve.DefaultReconnectSeconds})
	if err != nil {
		t.Fatalf("serve.Rewrite: %v", err)
	}
	t.Logf("serve.Rewrite: %v", attrs)
	rewritten, rep, err := domainxml.RewriteIOThreads(served, domainxml.IOThreadPlan{
		PoolSize: 2,
		Disks:    []domainxml.DiskPlan{{Alias: "ua-rootdisk", Queues: 2}},
	})
	if err != nil {
		t.Fatalf("RewriteIOThreads after serve: %v", err)
	}
	sock := serve.SocketPath(dir, "datadisk")

	// The back-end must listen before QEMU's vhost-user-blk realize.
	vuImg := vuImage(t, dir)
	daemon := vuStart(t, bin, sock, vuImg, "--queue-size", vuDaemonQueueSize(), "--log-level", "debug")

	env := startLibvirtd(t)
	t.Logf("virtblkd + libvirtd ready after %s", time.Since(start).Round(time.Millisecond))

	const mib = 1 << 20
	initrd, kernel, files := libvirtGuestFiles(t, img, dir, vuLibvirtScript, map[string][]byte{"/hostpattern": vuPattern()},
		map[string]int64{"ua-rootdisk": 8 * mib, "ua-cloudinitdisk": 4 * mib})
	name := fmt.Sprintf("virtblk-e2e-vu-%d", os.Getpid())
	console := filepath.Join(dir, "console.log")
	dom, err := domainxml.ParseDomain(rewritten)
	if err != nil {
		t.Fatal(err)
	}
	// AdaptForTestGuest points every disk at a raw file; the vhost-user
	// disk must stay exactly as serve mode wrote it, so it sits out.
	vu := takeDisk(t, dom, "ua-datadisk")
	err = AdaptForTestGuest(dom, TestGuest{
		Name: name, Kernel: kernel, Initrd: initrd,
		Cmdline: "console=ttyS0 panic=-1 quiet",
		BIOS:    "/usr/share/qemu/qboot.rom",
		Console: console, DiskFiles: files, KeepDisks: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	dom.Devices.Disks = append(dom.Devices.Disks, vu)
	checkServedDisk(t, dom, vu, sock)
	domXML, err := domainxml.MarshalDomain(dom)
	if err != nil {
		t.Fatal(err)
	}

	// Each stripped setting, put back, must make libvirt refuse the disk:
	// that is why ToVhostUser strips them.
	for _, c := range []struct {
		name string
		put  func(*libvirtxml.DomainDiskDriver)
		want *regexp.Regexp
	}{
		{"cache", func(d *libvirtxml.DomainDiskDriver) { d.Cache = "none" }, regexp.MustCompile(`unsupported configuration: cache is not supported with vhostuser disk`)},
		{"iothread", func(d *libvirtxml.DomainDiskDriver) { one := uint(rep.PoolIDs[0]); d.IOThread = &one }, regexp.MustCompile(`unsupported configuration: iothread is not supported with vhostuser disk`)},
	} {
		t.Run("define rejects "+c.name, func(t *testing.T) {
			broken, err := domainxml.ParseDomain(domXML)
			if err != nil {
				t.Fatal(err)
			}
			broken.Name = name + "-" + c.name
			broken.UUID = ""
			d := findAlias(broken, "ua-datadisk")
			if d == nil || d.Driver == nil {
				t.Fatal("no vhost-user datadisk driver")
			}
			c.put(d.Driver)
			bx, err := domainxml.MarshalDomain(broken)
			if err != nil {
				t.Fatal(err)
			}
			out, err := env.define(broken.Name, bx)
			if err == nil {
				t.Fatalf("virsh define accepted a vhost-user disk with %s:\n%s", c.name, out)
			}
			if !strings.Contains(out, "vhostuser") || !c.want.MatchString(out) {
				t.Fatalf("virsh define failed, but not with libvirt's vhostuser %s error:\n%s", c.name, out)
			}
			t.Logf("libvirt rejected it: %s", strings.TrimSpace(out))
		})
	}

	tDefine := time.Now()
	if out, err := env.define(name, domXML); err != nil {
		t.Fatalf("virsh define rejected what serve mode writes: %v\n%s\n%s", err, out, domXML)
	}
	defined, err := domainxml.ParseDomain([]byte(env.mustVirsh("dumpxml", "--inactive", name)))
	if err != nil {
		t.Fatal(err)
	}
	checkServedDisk(t, defined, *findAlias(defined, "ua-datadisk"), sock)
	if mb := defined.MemoryBacking; mb == nil || mb.MemorySource == nil || mb.MemorySource.Type != "memfd" || mb.MemoryAccess == nil || mb.MemoryAccess.Mode != "shared" {
		t.Errorf("libvirt's defined memoryBacking lost memfd/shared: %+v", mb)
	}
	if out, err := env.virsh("start", name); err != nil {
		t.Fatalf("virsh start: %v\n%s\nvirtblkd:\n%s", err, out, vuTail(daemon.logs(), 20))
	}
	t.Logf("define+start took %s", time.Since(tDefine).Round(time.Millisecond))

	args, source := qemuArgs(t, env, name)
	qc, err := ParseVhostUserArgs(args)
	if err != nil {
		t.Fatalf("%s: %v", source, err)
	}
	dev, ok := qc.Disks["ua-datadisk"]
	switch {
	case !ok:
		t.Errorf("QEMU (%s) has no vhost-user-blk device ua-datadisk; has %v", source, qc.Disks)
	case dev.Socket != sock:
		t.Errorf("vhost-user-blk chardev %q dials %q, want %s", dev.Chardev, dev.Socket, sock)
	case dev.NumQueues != 2:
		t.Errorf("vhost-user-blk num-queues %d, want 2", dev.NumQueues)
	case dev.QueueSize != serve.QueueSize:
		t.Errorf("vhost-user-blk queue-size %d, want %d", dev.QueueSize, serve.QueueSize)
	}
	t.Logf("QEMU: %+v, memory backends %+v", dev, qc.Backends)
	memfd := false
	for _, b := range qc.Backends {
		memfd = memfd || (b.Type == "memory-backend-memfd" && b.Share)
	}
	if !memfd {
		t.Errorf("QEMU has no shared memory-backend-memfd: %+v", qc.Backends)
	}

	tBoot := time.Now()
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(console)
			t.Logf("guest console:\n%s\nvirtblkd:\n%s", vuTail(string(b), 3000), vuTail(daemon.logs(), 3000))
		}
	})
	waitShutOff(t, env, name, 2*time.Minute)
	t.Logf("guest ran and powered off in %s", time.Since(tBoot).Round(time.Millisecond))
	out, err := os.ReadFile(console)
	if err != nil {
		t.Fatalf("read guest console: %v", err)
	}
	if code, ok := vmtest.ParseExit(string(out)); !ok || code != 0 {
		t.Fatalf("guest script exit %d (reported: %v); console:\n%s\nvirtblkd:\n%s", code, ok, out, vuTail(daemon.logs(), 20))
	}
	found := false
	for _, m := range diskLineRE.FindAllStringSubmatch(string(out), -1) {
		t.Logf("guest: %s", m[0])
		if m[2] == strconv.Itoa(vuImageSize/512) {
			found = true
			if m[3] != "2" {
				t.Errorf("guest vhost-user disk %s has %s blk-mq queues, want 2", m[1], m[3])
			}
		}
	}
	if !found {
		t.Errorf("guest did not see the 64 MiB vhost-user disk; console:\n%s", out)
	}
	daemon.stop(t)
	got, err := os.ReadFile(vuImg)
	if err != nil {
		t.Fatal(err)
	}
	want := vuPattern()
	if !bytes.Equal(got[16*mib:16*mib+len(want)], want) {
		t.Errorf("raw image at 16 MiB does not hold the guest's write")
	}
	if got[16*mib-1] != 0x5a || got[16*mib+len(want)] != 0x5a {
		t.Errorf("guest write spilled outside 16-17 MiB")
	}
	t.Logf("total %s", time.Since(start).Round(time.Millisecond))
}

// vuPattern is 1 MiB no disk holds by accident.
func vuPattern() []byte {
	p := make([]byte, 1<<20)
	for i := range p {
		p[i] = byte(i*7 + i>>12)
	}
	copy(p, "virtblk libvirt vhost-user e2e")
	return p
}

func findAlias(dom *libvirtxml.Domain, alias string) *libvirtxml.DomainDisk {
	for i := range dom.Devices.Disks {
		if diskAlias(dom.Devices.Disks[i]) == alias {
			return &dom.Devices.Disks[i]
		}
	}
	return nil
}

func takeDisk(t *testing.T, dom *libvirtxml.Domain, alias string) libvirtxml.DomainDisk {
	t.Helper()
	for i, d := range dom.Devices.Disks {
		if diskAlias(d) == alias {
			dom.Devices.Disks = append(dom.Devices.Disks[:i], dom.Devices.Disks[i+1:]...)
			return d
		}
	}
	t.Fatalf("domain has no disk %s", alias)
	return libvirtxml.DomainDisk{}
}

// checkServedDisk checks the disk is what serve mode promises: vhost-user
// on sock with reconnect, queues 2, queue_size 256, nothing block-layer.
func checkServedDisk(t *testing.T, dom *libvirtxml.Domain, d libvirtxml.DomainDisk, sock string) {
	t.Helper()
	s := d.Source
	if s == nil || s.VHostUser == nil || s.VHostUser.UNIX == nil || s.VHostUser.UNIX.Path != sock {
		t.Fatalf("disk %s is not vhost-user on %s: %+v", diskAlias(d), sock, s)
	}
	if r := s.VHostUser.UNIX.Reconnect; r == nil || r.Enabled != "yes" {
		t.Errorf("disk %s has no reconnect", diskAlias(d))
	}
	drv := d.Driver
	if drv == nil || drv.Queues == nil || *drv.Queues != 2 || drv.QueueSize == nil || *drv.QueueSize != serve.QueueSize {
		t.Errorf("disk %s driver %+v, want queues=2 queue_size=%d", diskAlias(d), drv, serve.QueueSize)
	} else if drv.Cache != "" || drv.IOThread != nil || drv.IOThreads != nil || drv.IO != "" {
		t.Errorf("disk %s driver keeps block-layer settings: %+v", diskAlias(d), drv)
	}
	if dom.MemoryBacking == nil || dom.MemoryBacking.MemoryAccess == nil || dom.MemoryBacking.MemoryAccess.Mode != "shared" {
		t.Errorf("domain memory is not shared: %+v", dom.MemoryBacking)
	}
}

// qemuArgs is QEMU's argv from /proc (the truth) or, if the guest already
// powered off, from the command line libvirt logged before exec.
func qemuArgs(t *testing.T, env *libvirtEnv, name string) ([]string, string) {
	t.Helper()
	pidFile := filepath.Join(env.root, "run/libvirt/qemu", name+".pid")
	if b, err := os.ReadFile(pidFile); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			if raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && len(raw) > 0 {
				return strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00"), fmt.Sprintf("/proc/%d/cmdline", pid)
			}
		}
	}
	logPath := filepath.Join(env.root, "var/log/libvirt/qemu", name+".log")
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatalf("QEMU for %s is gone and its libvirt log is unreadable: %v", name, err)
	}
	args, err := logArgs(string(b))
	if err != nil {
		t.Fatalf("%s: %v", logPath, err)
	}
	return args, logPath
}

// vuDaemonQueueSize is virtblkd's largest virtqueue: serve mode's QueueSize,
// unless VIRTBLK_E2E_VU_QUEUE_SIZE overrides it (diagnosis only).
func vuDaemonQueueSize() string {
	if v := os.Getenv("VIRTBLK_E2E_VU_QUEUE_SIZE"); v != "" {
		return v
	}
	return strconv.Itoa(serve.QueueSize)
}
