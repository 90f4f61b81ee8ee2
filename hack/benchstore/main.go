// Command benchstore compares a block store volume with a raw file served by
// virtblkd, in one run, with the same blkio/bench jobs: each job runs on
// both targets back to back, in an order that alternates between rounds
// (the shared machine's load drifts), and the report gives medians and
// per-round store/raw ratios. hack/bench-store.sh builds and runs it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/virtblk/virtblk/blkio/bench"
	"github.com/virtblk/virtblk/blkio/frontend"
	"github.com/virtblk/virtblk/hack/benchproc"
	"github.com/virtblk/virtblk/storage/store"
)

func main() {
	if err := runBench(os.Args[1:]); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "benchstore:", err)
		os.Exit(1)
	}
}

type jobSpec struct {
	name   string
	queues int
	job    bench.Job
	// flushOnly times each FLUSH alone, after a 4k random write that has
	// completed (runFlushJob), instead of running job with the engine.
	flushOnly bool
}

func jobs(runtime time.Duration) []jobSpec {
	j := func(name string, queues int, p bench.Pattern, bs, qd int) jobSpec {
		return jobSpec{name: name, queues: queues, job: bench.Job{Pattern: p, BlockSize: bs, QueueDepth: qd, Runtime: runtime, Seed: 1}}
	}
	return []jobSpec{
		j("4k randread QD32 x2", 2, bench.RandRead, 4096, 32),
		j("4k randwrite QD32 x2", 2, bench.RandWrite, 4096, 32),
		j("128k seq read QD8", 1, bench.SeqRead, 128<<10, 8),
		j("128k seq write QD8", 1, bench.SeqWrite, 128<<10, 8),
		j("4k write+flush QD1", 1, bench.WriteFlush, 4096, 1),
		{name: "flush after 4k write QD1", queues: 1, job: bench.Job{Pattern: bench.WriteFlush, BlockSize: 4096, QueueDepth: 1, Runtime: runtime, Seed: 1}, flushOnly: true},
	}
}

const (
	tStore = "store"
	tRaw   = "raw"
)

type config struct {
	virtblkd       string
	raw, storePath string
	volume         string
	queues         int
	dir            string
}

func runBench(args []string) error {
	fs := flag.NewFlagSet("benchstore", flag.ContinueOnError)
	var (
		virtblkd = fs.String("virtblkd", "", "virtblkd binary (required)")
		dir      = fs.String("dir", "/var/tmp/virtblk-bench-store", "directory for the raw image, the store file, sockets and logs")
		sizeMiB  = fs.Int("size-mib", 1024, "volume and raw image size in MiB")
		rounds   = fs.Int("rounds", 2, "rounds; each runs every job on both targets, order alternating")
		runtime  = fs.Duration("runtime", 4*time.Second, "duration of each job on each target")
		queues   = fs.Int("queues", 2, "queues each back-end is started with")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *virtblkd == "" {
		return errors.New("--virtblkd BIN is required")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return err
	}
	c := config{
		virtblkd: *virtblkd,
		raw:      filepath.Join(*dir, "raw.img"), storePath: filepath.Join(*dir, "bench.vbs"),
		volume: "bench", queues: *queues, dir: *dir,
	}
	size := uint64(*sizeMiB) << 20
	if err := benchproc.PrepareImage(c.raw, int64(size), log); err != nil {
		return err
	}
	if err := prepareStore(ctx, c, size, log); err != nil {
		return err
	}
	js := jobs(*runtime)
	results := map[string]map[string][]*bench.Result{}
	for _, j := range js {
		results[j.name] = map[string][]*bench.Result{}
	}
	started := time.Now()
	targets := []string{tStore, tRaw}
	for r := 0; r < *rounds; r++ {
		for ji, j := range js {
			for k := range targets {
				tgt := targets[(k+r+ji)%2]
				res, err := runJob(ctx, c, tgt, j, log)
				if err != nil {
					return fmt.Errorf("round %d, %s, %s: %w", r+1, tgt, j.name, err)
				}
				results[j.name][tgt] = append(results[j.name][tgt], res)
			}
		}
	}
	host, _ := os.Hostname()
	fmt.Printf("Run on %s, %s, kernel %s; %d rounds x %v per job; volume and raw image %d MiB in %s; %d back-end queues; store served by virtblkd serve --store; took %v.\n\n",
		host, benchproc.CPUModel(), benchproc.Kernel(), *rounds, *runtime, *sizeMiB, *dir, *queues, time.Since(started).Round(time.Second))
	return report(os.Stdout, js, results)
}

// prepareStore creates a fresh store (twice the volume size: overwrites
// allocate new blocks before the old ones are freed) with one volume, and
// writes the whole volume once through the server, so reads hit mapped
// blocks as they do on the written raw image.
func prepareStore(ctx context.Context, c config, size uint64, log *slog.Logger) error {
	os.Remove(c.storePath)
	log.Info("preparing store", "path", c.storePath, "volume_bytes", size)
	if err := store.CreateFile(c.storePath, 2*size+256<<20); err != nil {
		return err
	}
	d, _, err := store.OpenDisk(c.storePath)
	if err != nil {
		return err
	}
	if err := store.Format(d, store.FormatOptions{}, store.Options{}); err != nil {
		d.Close()
		return fmt.Errorf("format store %s: %w", c.storePath, err)
	}
	st, err := store.Open(d, store.Options{})
	if err == nil {
		err = st.CreateVolume(c.volume, size)
		if cerr := st.Close(); err == nil {
			err = cerr
		}
	}
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("store %s: %w", c.storePath, err)
	}
	fill := jobSpec{name: "fill", queues: 1, job: bench.Job{Pattern: bench.SeqWrite, BlockSize: 1 << 20, QueueDepth: 4, Ops: size >> 20, Seed: 7}}
	_, err = runJob(ctx, c, tStore, fill, log)
	return err
}

// runJob starts the target's back-end, runs one job against it and stops it.
func runJob(ctx context.Context, c config, tgt string, j jobSpec, log *slog.Logger) (*bench.Result, error) {
	sock := filepath.Join(c.dir, tgt+".sock")
	args := []string{"serve", "--socket", sock, "--queues", fmt.Sprint(c.queues)}
	if tgt == tRaw {
		args = append(args, "--file", c.raw)
	} else {
		args = append(args, "--store", c.storePath, "--volume", c.volume)
	}
	p, err := benchproc.Start(c.virtblkd, args, sock, filepath.Join(c.dir, tgt+".log"))
	if err != nil {
		return nil, err
	}
	defer p.Stop(log)
	if j.flushOnly {
		res, err := runFlushJob(ctx, sock, j.job)
		if err == nil {
			res.Target = tgt
			log.Info("job", "target", tgt, "job", j.name, "flushes_per_s", int(res.IOPS), "mean_us", int(res.LatMean), "p99_us", int(res.LatP99))
		}
		return res, err
	}
	t, err := bench.DialVhostUser(ctx, sock, j.queues, j.job.QueueDepth, j.job.BlockSize)
	if err != nil {
		return nil, err
	}
	res, err := bench.Run(ctx, t, j.job, bench.ProcessCPU{PID: p.PID()})
	if cerr := t.Close(); cerr != nil && err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	res.Target = tgt
	log.Info("job", "target", tgt, "job", j.name, "iops", int(res.IOPS), "mean_us", int(res.LatMean), "p99_us", int(res.LatP99))
	return res, nil
}

// runFlushJob writes 4 KiB at a random offset, waits for it, then times a
// FLUSH alone, over and over for j.Runtime: the cost of making one
// completed write durable.
func runFlushJob(ctx context.Context, sock string, j bench.Job) (*bench.Result, error) {
	dev, err := frontend.Dial(ctx, sock, frontend.Options{Queues: 1, QueueDepth: 1, MaxIO: 4096})
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	q := dev.Queues()[0]
	blocks := dev.Info().Capacity / 4096
	rng := rand.New(rand.NewPCG(j.Seed, 99))
	buf := q.Buffer(0)
	for i := range buf {
		buf[i] = byte(rng.Uint32() | 1)
	}
	do := func(typ uint32, sector uint64, n int) error {
		c, err := q.Do(typ, sector, n)
		if err == nil && c.Status != frontend.StatusOK {
			err = fmt.Errorf("request type %d: status %d", typ, c.Status)
		}
		return err
	}
	var lat []float64
	var flushTime time.Duration
	start := time.Now()
	for time.Since(start) < j.Runtime {
		if err := do(frontend.TypeOut, rng.Uint64N(blocks)*8, 4096); err != nil {
			return nil, err
		}
		t0 := time.Now()
		if err := do(frontend.TypeFlush, 0, 0); err != nil {
			return nil, err
		}
		d := time.Since(t0)
		flushTime += d
		lat = append(lat, float64(d.Microseconds()))
	}
	sort.Float64s(lat)
	n := len(lat)
	return &bench.Result{
		Job: j, Queues: 1, Seconds: time.Since(start).Seconds(), IOs: uint64(n), Flushes: uint64(n),
		IOPS:    float64(n) / flushTime.Seconds(),
		LatMean: float64(flushTime.Microseconds()) / float64(n),
		LatP99:  lat[min(n-1, n*99/100)],
	}, nil
}

// ratio is the median over rounds of store/raw within each round (the two
// ran seconds apart under about the same load), with each round's ratio.
func ratio(rs map[string][]*bench.Result, f func(*bench.Result) float64) (float64, string) {
	a, b := rs[tStore], rs[tRaw]
	var xs []float64
	var parts []string
	for i := range min(len(a), len(b)) {
		if d := f(b[i]); d > 0 {
			xs = append(xs, f(a[i])/d)
			parts = append(parts, fmt.Sprintf("%.2f", f(a[i])/d))
		}
	}
	return benchproc.Median(xs), strings.Join(parts, ", ")
}

func report(w io.Writer, js []jobSpec, results map[string]map[string][]*bench.Result) error {
	var b strings.Builder
	b.WriteString("| job | target | IOPS | MB/s | mean µs | p99 µs | IOPS per round |\n|---|---|---:|---:|---:|---:|---|\n")
	for _, j := range js {
		for _, t := range []string{tStore, tRaw} {
			rs := results[j.name][t]
			var per []string
			for _, r := range rs {
				per = append(per, fmt.Sprintf("%.0f", r.IOPS))
			}
			fmt.Fprintf(&b, "| %s | %s | %.0f | %.1f | %.1f | %.1f | %s |\n", j.name, t,
				benchproc.Med(rs, func(r *bench.Result) float64 { return r.IOPS }),
				benchproc.Med(rs, func(r *bench.Result) float64 { return r.MBps }),
				benchproc.Med(rs, func(r *bench.Result) float64 { return r.LatMean }),
				benchproc.Med(rs, func(r *bench.Result) float64 { return r.LatP99 }),
				strings.Join(per, " / "))
		}
	}
	b.WriteString("\nStore/raw: median of per-round ratios (rounds in parentheses). For write+flush, latency is a write plus its FLUSH (time until durable); the flush job times the FLUSH alone, IOPS there is flushes per second.\n\n")
	b.WriteString("| job | metric | store/raw | target | met |\n|---|---|---|---|---|\n")
	for _, j := range js {
		rs := results[j.name]
		metric, f, target, ok := "IOPS", func(r *bench.Result) float64 { return r.IOPS }, ">= 0.90", func(x float64) bool { return x >= 0.9 }
		if j.flushOnly {
			metric, f, target, ok = "mean flush latency", func(r *bench.Result) float64 { return r.LatMean }, "<= 1.50", func(x float64) bool { return x <= 1.5 }
		} else if j.job.Pattern == bench.WriteFlush {
			metric, f, target, ok = "mean write+flush latency", func(r *bench.Result) float64 { return r.LatMean }, "<= 1.50", func(x float64) bool { return x <= 1.5 }
		}
		x, per := ratio(rs, f)
		met := "no"
		if ok(x) {
			met = "yes"
		}
		fmt.Fprintf(&b, "| %s | %s | **%.2f** (%s) | %s | %s |\n", j.name, metric, x, per, target, met)
		if j.job.Pattern == bench.WriteFlush {
			what := "write+flush"
			if j.flushOnly {
				what = "flush"
			}
			x, per := ratio(rs, func(r *bench.Result) float64 { return r.LatP99 })
			fmt.Fprintf(&b, "| %s | p99 "+what+" latency | %.2f (%s) | - | - |\n", j.name, x, per)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}
