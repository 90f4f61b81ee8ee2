package bench

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Result is the outcome of one job on one target.
type Result struct {
	Target  string  `json:"target"`
	Job     Job     `json:"job"`
	Queues  int     `json:"queues"`
	Seconds float64 `json:"seconds"`
	IOs     uint64  `json:"ios"`
	Reads   uint64  `json:"reads"`
	Writes  uint64  `json:"writes"`
	Flushes uint64  `json:"flushes"`
	Errors  uint64  `json:"errors"`
	Bytes   uint64  `json:"bytes"`
	IOPS    float64 `json:"iops"`
	MBps    float64 `json:"mb_per_s"` // 10^6 bytes per second
	LatMean float64 `json:"lat_mean_us"`
	LatP50  float64 `json:"lat_p50_us"`
	LatP99  float64 `json:"lat_p99_us"`
	LatP999 float64 `json:"lat_p999_us"`
	LatMax  float64 `json:"lat_max_us"`
	// CPU seconds charged to the measured process (the back-end, or this
	// process for the in-process ceiling) during the run, and per million I/Os.
	CPUSeconds  float64 `json:"backend_cpu_s,omitempty"`
	CPUPerMIO   float64 `json:"backend_cpu_s_per_mio,omitempty"`
	CPUPID      int     `json:"backend_pid,omitempty"`
	SelfCPUSecs float64 `json:"self_cpu_s,omitempty"`

	hist Histogram
}

// Histogram returns the merged latency histogram (nanoseconds).
func (r *Result) Histogram() *Histogram { return &r.hist }

func summarize(j Job, stats []queueStats, elapsed time.Duration) *Result {
	r := &Result{Job: j, Queues: len(stats), Seconds: elapsed.Seconds()}
	for i := range stats {
		s := &stats[i]
		r.hist.Merge(&s.hist)
		r.IOs += s.ios
		r.Reads += s.reads
		r.Writes += s.writes
		r.Flushes += s.flushes
		r.Errors += s.errs
		r.Bytes += s.bytes
	}
	if r.Seconds > 0 {
		r.IOPS = float64(r.IOs) / r.Seconds
		r.MBps = float64(r.Bytes) / r.Seconds / 1e6
	}
	us := func(ns uint64) float64 { return float64(ns) / 1e3 }
	r.LatMean = r.hist.Mean() / 1e3
	r.LatP50 = us(r.hist.Quantile(0.50))
	r.LatP99 = us(r.hist.Quantile(0.99))
	r.LatP999 = us(r.hist.Quantile(0.999))
	r.LatMax = us(r.hist.Max())
	return r
}

func (r *Result) addCPU(before, after CPUSample) {
	r.CPUPID = after.PID
	r.CPUSeconds = (after.Process - before.Process).Seconds()
	r.SelfCPUSecs = (after.Self - before.Self).Seconds()
	if r.IOs > 0 {
		r.CPUPerMIO = r.CPUSeconds / float64(r.IOs) * 1e6
	}
}

// CPUSample is the CPU time consumed so far by a process and by this one.
type CPUSample struct {
	PID     int
	Process time.Duration
	Self    time.Duration
}

// CPUSampler reads CPU counters.
type CPUSampler interface {
	Sample() (CPUSample, error)
}

// ProcessCPU samples a process's user+system time (all its threads,
// including kernel io_uring workers it owns) from /proc/PID/stat, in clock
// ticks of 1/100 s, and this process's own time from getrusage.
type ProcessCPU struct {
	PID  int
	Proc string // /proc mount, default "/proc"
}

// clkTck is USER_HZ, the unit of /proc/PID/stat times; Linux fixes it at 100
// for user-visible interfaces on every architecture Go supports here.
const clkTck = 100

func (p ProcessCPU) Sample() (CPUSample, error) {
	self, err := selfCPU()
	if err != nil {
		return CPUSample{}, err
	}
	s := CPUSample{PID: p.PID, Self: self}
	if p.PID == os.Getpid() {
		s.Process = self
		return s, nil
	}
	proc := p.Proc
	if proc == "" {
		proc = "/proc"
	}
	path := fmt.Sprintf("%s/%d/stat", proc, p.PID)
	b, err := os.ReadFile(path)
	if err != nil {
		return CPUSample{}, fmt.Errorf("read back-end CPU time: %w", err)
	}
	ticks, err := ParseStatCPU(b)
	if err != nil {
		return CPUSample{}, fmt.Errorf("%s: %w", path, err)
	}
	s.Process = time.Duration(ticks) * time.Second / clkTck
	return s, nil
}

func selfCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}

// ParseStatCPU returns utime+stime (fields 14 and 15, in clock ticks) from
// the contents of /proc/PID/stat. The command name (field 2) may contain
// spaces and parentheses, so fields are counted after its last ')'.
func ParseStatCPU(b []byte) (uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("no ')' closing the command name in /proc stat line")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime is field 14 => f[11], stime f[12].
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc stat line has %d fields after the command name, need 13", len(f))
	}
	u, err := strconv.ParseUint(f[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("utime %q: %w", f[11], err)
	}
	s, err := strconv.ParseUint(f[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stime %q: %w", f[12], err)
	}
	if u+s < u {
		return 0, fmt.Errorf("utime+stime overflows")
	}
	return u + s, nil
}

// Describe is a short job label such as "4k randread qd32 x2".
func Describe(j Job, queues int) string {
	s := fmt.Sprintf("%s %s qd%d", sizeLabel(j.BlockSize), j.Pattern, j.QueueDepth)
	if j.Pattern == Mix {
		s += fmt.Sprintf(" %d%%r", j.ReadPercent)
	}
	if queues > 1 {
		s += fmt.Sprintf(" x%d", queues)
	}
	return s
}

func sizeLabel(n int) string {
	switch {
	case n%(1<<20) == 0:
		return fmt.Sprintf("%dm", n>>20)
	case n%1024 == 0:
		return fmt.Sprintf("%dk", n>>10)
	}
	return strconv.Itoa(n)
}

// WriteTable prints results as an aligned human-readable table.
func WriteTable(w io.Writer, rs []*Result) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%-12s %-26s %10s %9s %9s %9s %9s %12s\n", "target", "job", "IOPS", "MB/s", "mean µs", "p99 µs", "max µs", "cpu s/MIO")
	for _, r := range rs {
		cpu := "-"
		if r.CPUPID != 0 {
			cpu = fmt.Sprintf("%.2f", r.CPUPerMIO)
		}
		fmt.Fprintf(&b, "%-12s %-26s %10.0f %9.1f %9.1f %9.1f %9.1f %12s\n",
			r.Target, Describe(r.Job, r.Queues), r.IOPS, r.MBps, r.LatMean, r.LatP99, r.LatMax, cpu)
	}
	_, err := io.WriteString(w, b.String())
	return err
}
