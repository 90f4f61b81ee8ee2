// Package vmtest boots virtblk's tiny test guest (hack/guest-image.sh) under
// QEMU from Go tests: it owns finding or building the guest image, packing a
// guest shell script into an initramfs overlay, running QEMU with the
// caller's extra arguments, and reporting the script's exit code and the
// serial console.
//
// A typical test:
//
//	res := vmtest.Run(t, vmtest.Config{
//		Args:   []string{"-drive", "file=" + img + ",if=virtio,format=raw"},
//		Script: "dd if=/dev/zero of=/dev/vda bs=4k count=1",
//	})
//	if res.ExitCode != 0 { t.Fatalf(...) }
//
// The guest runs under TCG (/dev/kvm here cannot run a stock kernel), boots
// in a few seconds, runs Script as /test.sh with busybox sh, and powers off.
// Missing infrastructure (not root, no QEMU) skips the test, except under
// CI=true where it fails it; -short skips it.
package vmtest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/virtblk/virtblk/internal/testenv"
)

// Marker lines printed by the guest's /init on the serial console.
const (
	BootedMarker = "VIRTBLK-BOOTED"
	exitMarker   = "VIRTBLK-TEST-EXIT="
)

// DefaultTimeout bounds a guest run when Config.Timeout is zero. A boot
// takes ~3-5 s under TCG; the rest is for the caller's script.
const DefaultTimeout = 3 * time.Minute

// Config describes one guest run.
type Config struct {
	// Args are extra QEMU arguments, e.g. disks and memory backends. With
	// Trixie set, every path in them must be under /tmp (the only host
	// directory visible inside the trixie root).
	Args []string
	// Script is the guest shell script (busybox sh), run as /test.sh after
	// the virtio modules are loaded. Empty means boot and power off.
	Script string
	// Files are extra files for the guest, by absolute guest path.
	Files map[string][]byte
	// Memory is QEMU's -m (default "512M"); a memory-backend object in
	// Args must have the same size.
	Memory string
	// CPUs is QEMU's -smp (default 2).
	CPUs int
	// KernelArgs are appended to the kernel command line.
	KernelArgs string
	// Timeout kills QEMU and fails the test (default DefaultTimeout).
	Timeout time.Duration
	// Trixie runs QEMU 10 from the trixie root (hack/trixie-root.sh)
	// instead of the host's qemu-system-x86_64.
	Trixie bool
}

// Result is the outcome of a guest run.
type Result struct {
	// ExitCode is the exit status of Script in the guest, or -1 when the
	// config had no script.
	ExitCode int
	// Console is everything QEMU wrote to stdout/stderr: the serial
	// console, kernel messages and QEMU's own errors.
	Console string
}

// Image is the built guest.
type Image struct {
	Kernel    string // uncompressed vmlinux (PVH entry)
	Initramfs string // uncompressed newc archive with /init, busybox, fio
}

// repoRoot is the module root, found from this file's location: tests run
// from a source checkout, and the hack scripts sit beside this package.
func repoRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("vmtest: cannot locate own source file")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..")), nil
}

// Script returns the path of a hack/ script in this checkout.
func Script(name string) (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	p := filepath.Join(root, "hack", name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("vmtest: hack script %s: %w", name, err)
	}
	return p, nil
}

// RequireRoot skips (fails under CI) unless running as root, which the
// image build, the trixie root and libvirt need.
func RequireRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM; skipped under -short")
	}
	if os.Geteuid() != 0 {
		testenv.Missing(t, "must run as root to build the guest image and boot QEMU")
	}
}

// EnsureImage builds the guest image if missing or stale (a no-op when the
// cache is current) and returns its paths.
func EnsureImage(t testing.TB) Image {
	t.Helper()
	RequireRoot(t)
	script, err := Script("guest-image.sh")
	if err != nil {
		t.Fatal(err)
	}
	runScript(t, script)
	dir := os.Getenv("VIRTBLK_GUEST")
	if dir == "" {
		dir = "/var/cache/virtblk/guest"
	}
	img := Image{Kernel: filepath.Join(dir, "vmlinux"), Initramfs: filepath.Join(dir, "initramfs.cpio")}
	for _, p := range []string{img.Kernel, img.Initramfs} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("guest-image.sh succeeded but %s is missing: %v", p, err)
		}
	}
	return img
}

// EnsureTrixie builds the trixie root if needed (hack/trixie-root.sh) and
// returns the path of hack/trixie-run.sh, which runs a command inside it.
func EnsureTrixie(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	if _, err := os.Stat(filepath.Join(testenv.TrixieRoot(), ".virtblk-stamp")); err != nil {
		if _, err := exec.LookPath("debootstrap"); err != nil {
			testenv.Missing(t, "debootstrap not installed (hack/install-deps.sh)")
		}
	}
	script, err := Script("trixie-root.sh")
	if err != nil {
		t.Fatal(err)
	}
	runScript(t, script)
	run, err := Script("trixie-run.sh")
	if err != nil {
		t.Fatal(err)
	}
	return run
}

func runScript(t testing.TB, script string) {
	t.Helper()
	start := time.Now()
	out, err := exec.Command("bash", script).CombinedOutput()
	if err != nil {
		t.Fatalf("%s failed: %v\n%s", filepath.Base(script), err, out)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Logf("%s took %s", filepath.Base(script), d.Round(time.Second))
	}
}

// Initrd writes the guest's initrd for one run into dir: the base image
// followed by a second newc archive with /test.sh (if script is not empty)
// and files. The kernel unpacks both.
func Initrd(img Image, dir, script string, files map[string][]byte) (string, error) {
	overlay := map[string][]byte{}
	for k, v := range files {
		overlay[k] = v
	}
	if script != "" {
		overlay["/test.sh"] = []byte(script)
	}
	base, err := os.ReadFile(img.Initramfs)
	if err != nil {
		return "", fmt.Errorf("read guest initramfs: %w", err)
	}
	var buf bytes.Buffer
	buf.Write(base)
	// The kernel expects the next archive on a 4-byte boundary.
	for buf.Len()%4 != 0 {
		buf.WriteByte(0)
	}
	if len(overlay) > 0 {
		if err := writeCPIO(&buf, overlay); err != nil {
			return "", err
		}
	}
	p := filepath.Join(dir, "initrd.cpio")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		return "", fmt.Errorf("write initrd %s: %w", p, err)
	}
	return p, nil
}

var exitRE = regexp.MustCompile(exitMarker + `(\d+|none)`)

// ParseExit finds the guest's exit marker in console output: the script's
// exit code, -1 when the guest ran no script, and ok=false when the guest
// never reported (crash, hang, QEMU error).
func ParseExit(console string) (code int, ok bool) {
	m := exitRE.FindAllStringSubmatch(console, -1)
	if len(m) == 0 {
		return 0, false
	}
	last := m[len(m)-1][1]
	if last == "none" {
		return -1, true
	}
	n, err := strconv.Atoi(last)
	if err != nil {
		return 0, false
	}
	return n, true
}

// VM is a running guest.
type VM struct {
	t        testing.TB
	cmd      *exec.Cmd
	console  *consoleBuffer
	LogPath  string // console log file (in the test's temp dir)
	done     chan struct{}
	waitErr  error
	timedOut atomic.Bool
	timeout  time.Duration
}

// Run boots the guest, waits for it to power off and returns the result.
// It fails the test if the guest does not report an exit code in time.
func Run(t testing.TB, cfg Config) Result {
	t.Helper()
	return Start(t, cfg).Wait()
}

// Start boots the guest and returns at once; Wait collects the result.
// QEMU is killed at the timeout and in the test's cleanup.
func Start(t testing.TB, cfg Config) *VM {
	t.Helper()
	img := EnsureImage(t)
	dir := t.TempDir()

	qemu := []string{"qemu-system-x86_64"}
	bios := "/usr/share/qemu/qboot.rom"
	kernel := img.Kernel
	if cfg.Trixie {
		run := EnsureTrixie(t)
		qemu = []string{run, "qemu-system-x86_64"}
		// Only /tmp is visible inside the root: hard-link (or copy) the
		// kernel next to the initrd.
		k := filepath.Join(dir, "vmlinux")
		if err := linkOrCopy(img.Kernel, k); err != nil {
			t.Fatal(err)
		}
		kernel = k
	} else {
		if _, err := exec.LookPath(qemu[0]); err != nil {
			testenv.Missing(t, "%s not installed (apt-get install qemu-system-x86; hack/install-deps.sh)", qemu[0])
		}
		if _, err := os.Stat(bios); err != nil {
			testenv.Missing(t, "%s missing (apt-get install qemu-system-data)", bios)
		}
	}
	initrd, err := Initrd(img, dir, cfg.Script, cfg.Files)
	if err != nil {
		t.Fatal(err)
	}
	mem := cfg.Memory
	if mem == "" {
		mem = "512M"
	}
	cpus := cfg.CPUs
	if cpus == 0 {
		cpus = 2
	}
	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	appendLine := strings.TrimSpace("console=ttyS0 panic=-1 quiet " + cfg.KernelArgs)
	args := append(append([]string{}, qemu[1:]...),
		"-accel", "tcg,thread=multi", "-cpu", "max",
		"-m", mem, "-smp", strconv.Itoa(cpus),
		"-bios", bios, "-kernel", kernel, "-initrd", initrd,
		"-append", appendLine,
		"-nographic", "-no-reboot")
	args = append(args, cfg.Args...)

	logPath := filepath.Join(dir, "console.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatalf("create console log: %v", err)
	}
	cmd := exec.Command(qemu[0], args...)
	cb := newConsoleBuffer(logFile)
	cmd.Stdout = cb
	cmd.Stderr = cb
	// QEMU dies with the test process even if cleanup never runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	vm := &VM{t: t, cmd: cmd, console: cb, LogPath: logPath, done: make(chan struct{}), timeout: timeout}

	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the forking OS thread exits, not the
		// process: keep this thread alive (locked) until QEMU is gone.
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			runtime.UnlockOSThread()
			return
		}
		started <- nil
		vm.waitErr = cmd.Wait()
		logFile.Close()
		close(vm.done)
	}()
	if err := <-started; err != nil {
		logFile.Close()
		t.Fatalf("start %s: %v", qemu[0], err)
	}
	t.Logf("vmtest: %s %s (console: %s)", qemu[0], strings.Join(args, " "), logPath)
	timer := time.AfterFunc(timeout, func() {
		vm.timedOut.Store(true)
		cmd.Process.Kill()
	})
	t.Cleanup(func() {
		timer.Stop()
		vm.Kill()
		if t.Failed() {
			t.Logf("guest console (%s):\n%s", logPath, tail(vm.Console(), 64<<10))
		}
	})
	return vm
}

// Wait waits for QEMU to exit and returns the guest's result. It fails the
// test on timeout or when the guest reported no exit code.
func (vm *VM) Wait() Result {
	vm.t.Helper()
	<-vm.done
	out := vm.Console()
	if vm.timedOut.Load() {
		vm.t.Fatalf("guest did not finish within %s (QEMU killed); console tail:\n%s", vm.timeout, tail(out, 8<<10))
	}
	code, ok := ParseExit(out)
	if !ok {
		vm.t.Fatalf("guest reported no exit code (QEMU: %v); console tail:\n%s", vm.waitErr, tail(out, 8<<10))
	}
	return Result{ExitCode: code, Console: out}
}

// Console returns the console output so far.
func (vm *VM) Console() string { return vm.console.String() }

// WaitConsole waits until the console contains substr. It returns an error
// if QEMU exits or the timeout passes first.
func (vm *VM) WaitConsole(substr string, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		changed := vm.console.changed()
		if strings.Contains(vm.console.String(), substr) {
			return nil
		}
		select {
		case <-changed:
		case <-vm.done:
			if strings.Contains(vm.console.String(), substr) {
				return nil
			}
			return fmt.Errorf("guest exited before printing %q", substr)
		case <-deadline.C:
			return fmt.Errorf("guest did not print %q within %s", substr, timeout)
		}
	}
}

// Kill stops QEMU at once (idempotent) and waits for it to exit.
func (vm *VM) Kill() {
	select {
	case <-vm.done:
		return
	default:
	}
	vm.cmd.Process.Kill()
	<-vm.done
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "...\n" + s[len(s)-n:]
}

func linkOrCopy(src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := os.WriteFile(dst, data, 0o644); err != nil {
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return nil
}

// consoleBuffer tees QEMU's output into the log file and memory, and wakes
// WaitConsole callers on every write.
type consoleBuffer struct {
	mu   sync.Mutex
	file *os.File
	buf  bytes.Buffer
	ch   chan struct{}
}

func newConsoleBuffer(f *os.File) *consoleBuffer {
	return &consoleBuffer{file: f, ch: make(chan struct{})}
}

func (c *consoleBuffer) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(p)
	c.file.Write(p) // best effort: the in-memory copy is authoritative
	close(c.ch)
	c.ch = make(chan struct{})
	return len(p), nil
}

func (c *consoleBuffer) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

func (c *consoleBuffer) changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ch
}
