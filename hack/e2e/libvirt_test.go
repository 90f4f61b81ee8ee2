package e2e

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/virtblk/virtblk/domainxml"
	"github.com/virtblk/virtblk/hack/vmtest"

	"github.com/virtblk/virtblk/internal/testenv"
)

// libvirtEnv is a running libvirtd in the trixie root.
type libvirtEnv struct {
	t    *testing.T
	run  string // hack/trixie-run.sh
	root string
}

// virsh runs virsh inside the trixie root and returns combined output.
func (e *libvirtEnv) virsh(args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command(e.run, append([]string{"virsh", "-q"}, args...)...)
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

func (e *libvirtEnv) mustVirsh(args ...string) string {
	e.t.Helper()
	out, err := e.virsh(args...)
	if err != nil {
		e.t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// startLibvirtd runs libvirtd in the foreground as our child (so it dies
// with the test binary) and stops it in cleanup. Its private mount
// namespace, and so its mounts, go away with it.
func startLibvirtd(t *testing.T) *libvirtEnv {
	t.Helper()
	run := vmtest.EnsureTrixie(t)
	root := testenv.TrixieRoot()
	env := &libvirtEnv{t: t, run: run, root: root}
	sock := filepath.Join(root, "run/libvirt/libvirt-sock")
	if c, err := net.Dial("unix", sock); err == nil {
		c.Close()
		t.Fatalf("a libvirtd is already running in %s; stop it with hack/trixie-run.sh --stop-libvirtd", root)
	}
	os.Remove(sock)
	logPath := filepath.Join(t.TempDir(), "libvirtd.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(run, "libvirtd")
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	done := make(chan struct{})
	started := make(chan error, 1)
	go func() {
		// Pdeathsig follows the forking thread: keep it alive with libvirtd.
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			runtime.UnlockOSThread()
			return
		}
		started <- nil
		cmd.Wait()
		logFile.Close()
		close(done)
	}()
	if err := <-started; err != nil {
		t.Fatalf("start libvirtd: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("libvirtd output:\n%s", b)
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("libvirtd exited before listening:\n%s", b)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("libvirtd did not listen on %s within 60s", sock)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return env
}

// defineAndCleanup defines a domain and undefines (destroying first) it
// when the test ends.
func (e *libvirtEnv) define(name string, xml []byte) (string, error) {
	path := filepath.Join(e.t.TempDir(), name+".xml")
	if err := os.WriteFile(path, xml, 0o644); err != nil {
		e.t.Fatal(err)
	}
	out, err := e.virsh("define", path)
	if err == nil {
		e.t.Cleanup(func() {
			e.virsh("destroy", name)
			if out, err := e.virsh("undefine", name); err != nil {
				e.t.Errorf("virsh undefine %s: %v\n%s", name, err, out)
			}
		})
	}
	return out, err
}

func rawImage(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

// guestScript prints one line per virtio disk: name, size in 512-byte
// sectors, and how many blk-mq hardware queues the guest driver created.
const guestScript = `for d in /sys/block/vd*; do
	echo "VBLK-DISK ${d##*/} sectors=$(cat $d/size) mq=$(ls $d/mq | wc -l)"
done
ls /sys/block/vd* >/dev/null 2>&1 || exit 20
`

var diskLineRE = regexp.MustCompile(`VBLK-DISK (vd[a-z]+) sectors=(\d+) mq=(\d+)`)

// TestLibvirtIOThreadVQMapping is the proof for issue 2: a KubeVirt domain
// rewritten by domainxml is accepted by libvirt 11 (virsh define), started
// by QEMU 10 with exactly the iothread-vq-mapping the XML asked for, and the
// guest sees every mapped disk with all its queues.
func TestLibvirtIOThreadVQMapping(t *testing.T) {
	start := time.Now()
	img := vmtest.EnsureImage(t)
	// Registered first, so it runs last: after libvirtd and every helper
	// process are gone, nothing of the root may stay mounted on the host.
	t.Cleanup(func() { checkNoMounts(t, testenv.TrixieRoot()) })
	env := startLibvirtd(t)
	t.Logf("trixie root + libvirtd ready after %s", time.Since(start).Round(time.Millisecond))

	src, err := os.ReadFile(filepath.Join("..", "..", "domainxml", "testdata", "supplemental-pool.xml"))
	if err != nil {
		t.Fatalf("read KubeVirt domain: %v", err)
	}
	// 4 queues on 2 disks over a pool of 3 IOThreads; datadisk has an
	// explicit map, rootdisk round-robin. cloudinitdisk is not planned and
	// keeps KubeVirt's own supplementalPool IOThreads 1-4.
	plan := domainxml.IOThreadPlan{
		PoolSize: 3,
		Disks: []domainxml.DiskPlan{
			{Alias: "ua-rootdisk", Queues: 4},
			{Alias: "ua-datadisk", Queues: 4, QueueMap: []int{2, 0, 2, 1}},
		},
	}
	rewritten, rep, err := domainxml.RewriteIOThreads(src, plan)
	if err != nil {
		t.Fatalf("RewriteIOThreads: %v", err)
	}
	if len(rep.PoolIDs) != 3 {
		t.Fatalf("report pool ids %v, want 3", rep.PoolIDs)
	}

	dir := t.TempDir()
	// Only /tmp is visible inside the trixie root.
	if !strings.HasPrefix(dir, "/tmp/") {
		t.Fatalf("test temp dir %s is not under /tmp; unset TMPDIR", dir)
	}
	const mib = 1 << 20
	sizes := map[string]int64{"ua-rootdisk": 8 * mib, "ua-datadisk": 12 * mib, "ua-cloudinitdisk": 4 * mib}
	initrd, kernel, files := libvirtGuestFiles(t, img, dir, guestScript, nil, sizes)
	name := fmt.Sprintf("virtblk-e2e-%d", os.Getpid())
	console := filepath.Join(dir, "console.log")
	dom, err := domainxml.ParseDomain(rewritten)
	if err != nil {
		t.Fatal(err)
	}
	err = AdaptForTestGuest(dom, TestGuest{
		Name: name, Kernel: kernel, Initrd: initrd,
		Cmdline: "console=ttyS0 panic=-1 quiet",
		BIOS:    "/usr/share/qemu/qboot.rom",
		Console: console, DiskFiles: files, KeepDisks: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	want, wantQueues := DiskMappings(dom)
	checkPlanned(t, want, wantQueues, rep.PoolIDs)
	domXML, err := domainxml.MarshalDomain(dom)
	if err != nil {
		t.Fatal(err)
	}

	// libvirt must refuse a mapping with a queue missing (queue 2 shares
	// its IOThread with queue 0, so the "all or none" rule is not what
	// trips): that validation
	// is what lets the hook rely on define failing loudly.
	t.Run("define rejects missing queue", func(t *testing.T) {
		broken, err := domainxml.ParseDomain(domXML)
		if err != nil {
			t.Fatal(err)
		}
		broken.Name = name + "-broken"
		broken.UUID = ""
		removed := false
		for i := range broken.Devices.Disks {
			d := &broken.Devices.Disks[i]
			if d.Alias == nil || d.Alias.Name != "ua-datadisk" {
				continue
			}
			for j := range d.Driver.IOThreads.IOThread {
				it := &d.Driver.IOThreads.IOThread[j]
				for k, q := range it.Queues {
					if q.ID == 2 && !removed {
						it.Queues = append(it.Queues[:k], it.Queues[k+1:]...)
						removed = true
						break
					}
				}
			}
		}
		if !removed {
			t.Fatal("datadisk mapping has no queue 2 to remove")
		}
		bx, err := domainxml.MarshalDomain(broken)
		if err != nil {
			t.Fatal(err)
		}
		out, err := env.define(broken.Name, bx)
		if err == nil {
			t.Fatalf("virsh define accepted a mapping without queue 2:\n%s", out)
		}
		if !strings.Contains(out, "missing iothread mapping for queue '2'") {
			t.Fatalf("virsh define failed, but not with libvirt's missing-queue error:\n%s", out)
		}
		t.Logf("libvirt rejected it: %s", strings.TrimSpace(out))
	})

	tDefine := time.Now()
	if out, err := env.define(name, domXML); err != nil {
		t.Fatalf("virsh define rejected the rewritten domain: %v\n%s\n%s", err, out, domXML)
	}
	// libvirt's own view after define must still carry the mapping.
	defined, err := domainxml.ParseDomain([]byte(env.mustVirsh("dumpxml", "--inactive", name)))
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := DiskMappings(defined); !sameMappings(got, want) {
		t.Errorf("libvirt's defined XML mapping %v differs from what we defined %v", got, want)
	}
	env.mustVirsh("start", name)
	t.Logf("define+start took %s", time.Since(tDefine).Round(time.Millisecond))

	qemu, source := qemuCommand(t, env, name)
	t.Logf("QEMU command line read from %s", source)
	for alias, wm := range want {
		dev, ok := qemu.Blk[alias]
		if !ok {
			t.Errorf("QEMU has no virtio-blk-pci device %q; devices: %v", alias, keys(qemu.Blk))
			continue
		}
		if d := wm.Diff(dev.Mapping); d != "" || dev.Mapping == nil {
			t.Errorf("disk %s: QEMU iothread-vq-mapping %v, XML asked %v (%s)", alias, dev.Mapping, wm, d)
		}
		if dev.NumQueues != wantQueues[alias] {
			t.Errorf("disk %s: QEMU num-queues %d, XML asked %d", alias, dev.NumQueues, wantQueues[alias])
		}
		if dev.IOThread != "" {
			t.Errorf("disk %s: has both iothread=%s and a mapping", alias, dev.IOThread)
		}
		for it := range dev.Mapping {
			if !qemu.IOThreads[it] {
				t.Errorf("disk %s maps to %s, which QEMU has no -object for", alias, it)
			}
		}
	}

	// The guest powers itself off; libvirt then marks the domain shut off.
	tBoot := time.Now()
	waitShutOff(t, env, name, 4*time.Minute)
	t.Logf("guest ran and powered off in %s", time.Since(tBoot).Round(time.Millisecond))
	out, err := os.ReadFile(console)
	if err != nil {
		t.Fatalf("read guest console: %v", err)
	}
	code, ok := vmtest.ParseExit(string(out))
	if !ok || code != 0 {
		t.Fatalf("guest script exit %d (reported: %v); console:\n%s", code, ok, out)
	}
	bySize := map[int64]string{}
	for alias, size := range sizes {
		bySize[size/512] = alias
	}
	seen := map[string]bool{}
	for _, m := range diskLineRE.FindAllStringSubmatch(string(out), -1) {
		sectors, _ := strconv.ParseInt(m[2], 10, 64)
		mq, _ := strconv.Atoi(m[3])
		alias, ok := bySize[sectors]
		if !ok {
			t.Errorf("guest disk %s has %d sectors, matching no test image", m[1], sectors)
			continue
		}
		seen[alias] = true
		if q, planned := wantQueues[alias]; planned && mq != int(q) {
			t.Errorf("guest disk %s (%s) has %d blk-mq queues, want %d", m[1], alias, mq, q)
		}
		t.Logf("guest: %s = %s, %d queues", m[1], alias, mq)
	}
	for alias := range sizes {
		if !seen[alias] {
			t.Errorf("guest did not see disk %s; console:\n%s", alias, out)
		}
	}
	t.Logf("total %s", time.Since(start).Round(time.Millisecond))
}

// checkPlanned ties the XML back to the plan: rootdisk round-robin over the
// pool, datadisk as its explicit map, every queue exactly once.
func checkPlanned(t *testing.T, got map[string]VQMapping, queues map[string]uint, pool []uint) {
	t.Helper()
	id := func(i int) string { return fmt.Sprintf("iothread%d", pool[i]) }
	want := map[string]VQMapping{
		"ua-rootdisk": {id(0): {0, 3}, id(1): {1}, id(2): {2}},
		"ua-datadisk": {id(0): {1}, id(1): {3}, id(2): {0, 2}},
	}
	for alias, wm := range want {
		if d := wm.Diff(got[alias]); d != "" {
			t.Errorf("rewritten XML for %s: %s (got %v, want %v)", alias, d, got[alias], wm)
		}
		if queues[alias] != 4 {
			t.Errorf("rewritten XML for %s: queues=%d, want 4", alias, queues[alias])
		}
	}
}

func sameMappings(a, b map[string]VQMapping) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if v.Diff(b[k]) != "" {
			return false
		}
	}
	return true
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// qemuCommand reads the running QEMU's argv from /proc (the truth), or, if
// the guest already powered off, from the command line libvirt logged just
// before exec.
func qemuCommand(t *testing.T, env *libvirtEnv, name string) (QEMUCommand, string) {
	t.Helper()
	pidFile := filepath.Join(env.root, "run/libvirt/qemu", name+".pid")
	if b, err := os.ReadFile(pidFile); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			if raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && len(raw) > 0 {
				cmd, err := ParseCmdline(raw)
				if err != nil {
					t.Fatalf("parse /proc/%d/cmdline: %v", pid, err)
				}
				return cmd, fmt.Sprintf("/proc/%d/cmdline", pid)
			}
		}
	}
	logPath := filepath.Join(env.root, "var/log/libvirt/qemu", name+".log")
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatalf("QEMU for %s is gone and its libvirt log is unreadable: %v", name, err)
	}
	cmd, err := ParseLogCmdline(string(b))
	if err != nil {
		t.Fatalf("%s: %v", logPath, err)
	}
	return cmd, logPath
}

func waitShutOff(t *testing.T, env *libvirtEnv, name string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := env.virsh("domstate", name)
		if err != nil {
			t.Fatalf("virsh domstate %s: %v\n%s", name, err, out)
		}
		if strings.TrimSpace(out) == "shut off" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("domain %s still %q after %s", name, strings.TrimSpace(out), timeout)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// checkNoMounts fails the test if the host's mount table has anything under
// root: trixie-run.sh mounts only inside private mount namespaces.
func checkNoMounts(t *testing.T, root string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Errorf("read mountinfo: %v", err)
		return
	}
	for _, m := range mountsUnder(string(b), root) {
		t.Errorf("mount left behind on the host: %s", m)
	}
}

// mountsUnder lists the mount points in a /proc/PID/mountinfo text that are
// root or below it.
func mountsUnder(mountinfo, root string) []string {
	var out []string
	for _, line := range strings.Split(mountinfo, "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == root || strings.HasPrefix(f[4], root+"/")) {
			out = append(out, f[4])
		}
	}
	return out
}

func TestMountsUnder(t *testing.T) {
	info := `22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:5 / /var/cache/virtblk/trixie/proc rw - proc proc rw
41 22 0:6 / /var/cache/virtblk/trixie-other rw - tmpfs tmpfs rw
`
	got := mountsUnder(info, "/var/cache/virtblk/trixie")
	if len(got) != 1 || got[0] != "/var/cache/virtblk/trixie/proc" {
		t.Fatalf("mountsUnder = %v", got)
	}
}

// libvirtGuestFiles puts what a libvirt test guest boots from into dir
// (under /tmp, the only host path the trixie root sees): the initramfs
// running script with extra files, the kernel, and a raw image of the
// given size per disk alias.
func libvirtGuestFiles(t *testing.T, img vmtest.Image, dir, script string, extra map[string][]byte, sizes map[string]int64) (initrd, kernel string, disks map[string]string) {
	t.Helper()
	initrd, err := vmtest.Initrd(img, dir, script, extra)
	if err != nil {
		t.Fatal(err)
	}
	kernel = filepath.Join(dir, "vmlinux")
	if err := os.Link(img.Kernel, kernel); err != nil {
		b, rerr := os.ReadFile(img.Kernel)
		if rerr != nil || os.WriteFile(kernel, b, 0o644) != nil {
			t.Fatalf("place kernel in %s: %v", dir, err)
		}
	}
	disks = map[string]string{}
	for alias, size := range sizes {
		disks[alias] = rawImage(t, dir, alias+".img", size)
	}
	return initrd, kernel, disks
}
