// Command benchvs benchmarks vhost-user-blk back-ends against each other and
// against the raw io_uring ceiling, on one preallocated image, in one run:
// virtblkd, qemu-storage-daemon's vhost-user-blk export (aio=io_uring,
// cache.direct=on) and io_uring O_DIRECT on the file with no device in
// between. Each job runs on every target back to back, in an order that
// rotates between rounds, because the load of a shared VM drifts; the report
// gives medians over rounds and per-round ratios. hack/bench-vhost-user.sh
// builds and runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/virtblk/virtblk/blkio/bench"
	"github.com/virtblk/virtblk/hack/benchproc"
)

type jobSpec struct {
	name   string
	queues int
	job    bench.Job
}

func jobs(runtime time.Duration) []jobSpec {
	j := func(name string, queues int, p bench.Pattern, bs, qd int) jobSpec {
		return jobSpec{name, queues, bench.Job{Pattern: p, BlockSize: bs, QueueDepth: qd, Runtime: runtime, Seed: 1}}
	}
	return []jobSpec{
		j("4k randread QD1", 1, bench.RandRead, 4096, 1),
		j("4k randread QD32 x2", 2, bench.RandRead, 4096, 32),
		j("4k randwrite QD32 x2", 2, bench.RandWrite, 4096, 32),
		j("4k write+flush QD1", 1, bench.WriteFlush, 4096, 1),
		j("128k seq read QD8", 1, bench.SeqRead, 128<<10, 8),
		j("128k seq write QD8", 1, bench.SeqWrite, 128<<10, 8),
	}
}

const (
	tVirtblkd = "virtblkd"
	tQSD      = "qsd"
	tRaw      = "raw"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "benchvs:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		image    = flag.String("image", "/var/tmp/virtblk-bench.img", "benchmark image (created and fully written if missing or of another size)")
		sizeGiB  = flag.Int("size-gib", 2, "image size in GiB")
		rounds   = flag.Int("rounds", 5, "rounds; each runs every job on every target, in rotating order")
		runtime  = flag.Duration("runtime", 4*time.Second, "duration of each job on each target")
		virtblkd = flag.String("virtblkd", "", "virtblkd binary (empty: skip virtblkd)")
		qsd      = flag.String("qsd", "qemu-storage-daemon", "qemu-storage-daemon binary (empty: skip qsd)")
		queues   = flag.Int("queues", 2, "queues each back-end is started with")
		only     = flag.String("jobs", "", "comma-separated job numbers (1-6) to run; default all")
		workdir  = flag.String("workdir", "", "directory for sockets and logs (default: a temp dir)")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	size := int64(*sizeGiB) << 30
	if err := benchproc.PrepareImage(*image, size, log); err != nil {
		return err
	}
	dir := *workdir
	if dir == "" {
		d, err := os.MkdirTemp("", "benchvs-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	targets := []string{}
	if *virtblkd != "" {
		targets = append(targets, tVirtblkd)
	}
	if *qsd != "" {
		targets = append(targets, tQSD)
	}
	targets = append(targets, tRaw)
	all := jobs(*runtime)
	var js []jobSpec
	if *only == "" {
		js = all
	} else {
		for _, s := range strings.Split(*only, ",") {
			var n int
			if _, err := fmt.Sscanf(s, "%d", &n); err != nil || n < 1 || n > len(all) {
				return fmt.Errorf("--jobs: %q is not a job number 1..%d", s, len(all))
			}
			js = append(js, all[n-1])
		}
	}

	results := map[string]map[string][]*bench.Result{} // job -> target -> rounds
	for _, j := range js {
		results[j.name] = map[string][]*bench.Result{}
	}
	started := time.Now()
	// The machine is shared and its load drifts within minutes, so each job
	// runs on all targets back to back (one comparison spans seconds, not
	// the whole run), in an order that rotates from round to round and job
	// to job; each back-end is started fresh for each job.
	for r := 0; r < *rounds; r++ {
		for ji, j := range js {
			for k := range targets {
				tgt := targets[(k+r+ji)%len(targets)]
				res, err := runJob(ctx, tgt, j, *image, dir, *queues, *virtblkd, *qsd, log)
				if err != nil {
					return fmt.Errorf("round %d, %s, %s: %w", r+1, tgt, j.name, err)
				}
				results[j.name][tgt] = append(results[j.name][tgt], res)
			}
		}
	}
	host, _ := os.Hostname()
	fmt.Printf("Run on %s, %s, kernel %s, %d rounds x %v per job, image %s (%d GiB), back-ends started with %d queues; took %v.\n\n",
		host, benchproc.CPUModel(), benchproc.Kernel(), *rounds, *runtime, *image, *sizeGiB, *queues, time.Since(started).Round(time.Second))
	return report(os.Stdout, js, targets, results)
}

// runJob starts the back-end (if any), runs one job against it and stops it.
func runJob(ctx context.Context, tgt string, j jobSpec, image, dir string, queues int, virtblkd, qsd string, log *slog.Logger) (*bench.Result, error) {
	var (
		t     bench.Target
		close func() error
		pid   = os.Getpid()
	)
	switch tgt {
	case tVirtblkd, tQSD:
		sock := filepath.Join(dir, tgt+".sock")
		os.Remove(sock)
		var args []string
		bin := virtblkd
		if tgt == tVirtblkd {
			args = []string{"serve", "--socket", sock, "--file", image, "--queues", fmt.Sprint(queues)}
		} else {
			bin = qsd
			args = []string{
				"--blockdev", "driver=file,node-name=f,filename=" + image + ",aio=io_uring,cache.direct=on",
				"--blockdev", "driver=raw,node-name=d,file=f",
				"--export", fmt.Sprintf("type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=%s,writable=on,num-queues=%d", sock, queues),
			}
		}
		p, err := benchproc.Start(bin, args, sock, filepath.Join(dir, tgt+".log"))
		if err != nil {
			return nil, err
		}
		defer p.Stop(log)
		pid = p.PID()
		vt, err := bench.DialVhostUser(ctx, sock, j.queues, j.job.QueueDepth, j.job.BlockSize)
		if err != nil {
			return nil, err
		}
		t, close = vt, vt.Close
	default:
		var err error
		if t, close, err = openRaw(image, j.queues, j.job.QueueDepth, j.job.BlockSize); err != nil {
			return nil, err
		}
	}
	res, err := bench.Run(ctx, t, j.job, bench.ProcessCPU{PID: pid})
	if cerr := close(); cerr != nil && err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	res.Target = tgt
	log.Info("job", "target", tgt, "job", j.name, "iops", int(res.IOPS), "p99_us", res.LatP99, "cpu_s_per_mio", res.CPUPerMIO)
	return res, nil
}

func report(w io.Writer, js []jobSpec, targets []string, results map[string]map[string][]*bench.Result) error {
	var b strings.Builder
	b.WriteString("| job | target | IOPS | MB/s | mean µs | p99 µs | CPU s / M I/O | IOPS per round |\n")
	b.WriteString("|---|---|---:|---:|---:|---:|---:|---|\n")
	for _, j := range js {
		for _, t := range targets {
			rs := results[j.name][t]
			var rounds []string
			for _, r := range rs {
				rounds = append(rounds, fmt.Sprintf("%.0f", r.IOPS))
			}
			cpu := fmt.Sprintf("%.1f", benchproc.Med(rs, func(r *bench.Result) float64 { return r.CPUPerMIO }))
			if t == tRaw {
				cpu += "*"
			}
			fmt.Fprintf(&b, "| %s | %s | %.0f | %.1f | %.1f | %.1f | %s | %s |\n", j.name, t,
				benchproc.Med(rs, func(r *bench.Result) float64 { return r.IOPS }),
				benchproc.Med(rs, func(r *bench.Result) float64 { return r.MBps }),
				benchproc.Med(rs, func(r *bench.Result) float64 { return r.LatMean }),
				benchproc.Med(rs, func(r *bench.Result) float64 { return r.LatP99 }),
				cpu, strings.Join(rounds, " / "))
		}
	}
	b.WriteString("\n\\* raw has no back-end process: its CPU column is this benchmark process itself (load generator + io_uring submission).\n")
	has := func(t string) bool {
		for _, x := range targets {
			if x == t {
				return true
			}
		}
		return false
	}
	// Ratios are taken within each round (the two targets ran seconds
	// apart, under about the same machine load) and the median of those
	// per-round ratios is reported, with the individual rounds.
	ratio := func(job, a, c string, f func(*bench.Result) float64) string {
		ra, rc := results[job][a], results[job][c]
		var xs []float64
		var parts []string
		for i := range min(len(ra), len(rc)) {
			if d := f(rc[i]); d > 0 {
				xs = append(xs, f(ra[i])/d)
				parts = append(parts, fmt.Sprintf("%.2f", f(ra[i])/d))
			}
		}
		if len(xs) == 0 {
			return "-"
		}
		return fmt.Sprintf("**%.2f** (%s)", benchproc.Median(xs), strings.Join(parts, ", "))
	}
	iops := func(r *bench.Result) float64 { return r.IOPS }
	cpu := func(r *bench.Result) float64 { return r.CPUPerMIO }
	if has(tVirtblkd) {
		b.WriteString("\nRatios: median of the per-round ratios (each round's ratio in parentheses).\n\n")
		b.WriteString("| job | virtblkd/raw IOPS | virtblkd/qsd IOPS | virtblkd/qsd CPU per I/O |\n|---|---|---|---|\n")
		for _, j := range js {
			qsdIOPS, qsdCPU := "-", "-"
			if has(tQSD) {
				qsdIOPS, qsdCPU = ratio(j.name, tVirtblkd, tQSD, iops), ratio(j.name, tVirtblkd, tQSD, cpu)
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", j.name, ratio(j.name, tVirtblkd, tRaw, iops), qsdIOPS, qsdCPU)
		}
	} else if has(tQSD) {
		b.WriteString("\n| job | qsd/raw IOPS |\n|---|---|\n")
		for _, j := range js {
			fmt.Fprintf(&b, "| %s | %s |\n", j.name, ratio(j.name, tQSD, tRaw, iops))
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}
