// Package benchproc owns what the benchmark drivers (hack/benchvs,
// hack/benchstore) share: running a back-end process for one job, the
// fully written raw image both compare against, medians over rounds, and a
// description of the host for the report.
package benchproc

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/virtblk/virtblk/blkio/bench"
)

// Backend is a running back-end process whose output goes to a log file.
type Backend struct {
	cmd  *exec.Cmd
	done chan struct{}
	logf *os.File
}

// Start runs bin with args, logging to logPath, and waits until it has
// created sock (30 s at most).
func Start(bin string, args []string, sock, logPath string) (*Backend, error) {
	os.Remove(sock)
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	b := &Backend{cmd: cmd, done: make(chan struct{}), logf: logf}
	go func() { cmd.Wait(); close(b.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return b, nil
		}
		select {
		case <-b.done:
			logf.Close()
			tail, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("%s exited before listening on %s: %s", bin, sock, tail)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.Stop(nil)
			return nil, fmt.Errorf("%s did not listen on %s within 30s (log %s)", bin, sock, logPath)
		}
	}
}

// PID is the back-end's process id (for its CPU time).
func (b *Backend) PID() int { return b.cmd.Process.Pid }

// Stop sends SIGTERM, and SIGKILL after 30 s.
func (b *Backend) Stop(log *slog.Logger) {
	b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(30 * time.Second):
		if log != nil {
			log.Warn("back-end ignored SIGTERM for 30s; killing", "pid", b.cmd.Process.Pid)
		}
		b.cmd.Process.Kill()
		<-b.done
	}
	b.logf.Close()
}

// PrepareImage makes path a fully allocated and written file of size
// bytes (kept when it already is one): fallocate leaves unwritten extents
// whose first write costs an extent conversion, and holes read for free;
// either would distort the jobs.
func PrepareImage(path string, size int64, log *slog.Logger) error {
	if fi, err := os.Stat(path); err == nil && fi.Size() == size {
		var st syscall.Stat_t
		if syscall.Stat(path, &st) == nil && st.Blocks*512 >= size {
			return nil
		}
	}
	log.Info("preparing raw image", "path", path, "bytes", size)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create raw image %s: %w", path, err)
	}
	defer f.Close()
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		return fmt.Errorf("preallocate raw image %s: %w", path, err)
	}
	buf := make([]byte, 4<<20)
	for i := range buf {
		buf[i] = byte(i*7 + i>>12 | 1)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
			return fmt.Errorf("write raw image %s: %w", path, err)
		}
	}
	return f.Sync()
}

// Median of xs (0 for none).
func Median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	switch n := len(s); {
	case n == 0:
		return 0
	case n%2 == 1:
		return s[n/2]
	default:
		return (s[n/2-1] + s[n/2]) / 2
	}
}

// Med is the median of f over rs.
func Med(rs []*bench.Result, f func(*bench.Result) float64) float64 {
	xs := make([]float64, len(rs))
	for i, r := range rs {
		xs[i] = f(r)
	}
	return Median(xs)
}

// CPUModel is "N x model name" from /proc/cpuinfo.
func CPUModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	n := 0
	model := ""
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "processor") {
			n++
		}
		if model == "" && strings.HasPrefix(l, "model name") {
			if i := strings.IndexByte(l, ':'); i >= 0 {
				model = strings.TrimSpace(l[i+1:])
			}
		}
	}
	return fmt.Sprintf("%d x %s", n, model)
}

// Kernel is the running kernel's release.
func Kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}
