package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/virtblk/virtblk/blkio/bench"
	"github.com/virtblk/virtblk/storage/rawvol"
)

const benchUsage = `usage: virtblk bench (--vhost-user SOCKET | --file IMG) [options]

Load-tests a vhost-user-blk back-end through virtblk's Go front-end
(--vhost-user), or a raw file/block device through io_uring with O_DIRECT
and no device in between (--file: the ceiling a back-end can approach).

options:
`

// runBench implements "virtblk bench".
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, benchUsage)
		fs.PrintDefaults()
	}
	var (
		socket  = fs.String("vhost-user", "", "vhost-user-blk back-end socket to connect to")
		file    = fs.String("file", "", "raw image or block device to drive with io_uring (the ceiling)")
		queues  = fs.Int("queues", 1, "number of queues, one goroutine on its own OS thread each")
		qd      = fs.Int("qd", 1, "requests in flight per queue")
		bsStr   = fs.String("bs", "4k", "block size (512, 4k, 128k, 1m ...)")
		rw      = fs.String("rw", "randread", "pattern: randread, randwrite, read, write, writeflush (each write followed by a flush), mix")
		rwmix   = fs.Int("rwmix", 70, "read percentage for --rw mix")
		runtime = fs.Duration("runtime", 10*time.Second, "how long to run (ignored with --ops)")
		ops     = fs.Uint64("ops", 0, "stop after this many I/Os in total instead of after --runtime")
		sizeStr = fs.String("size", "", "length of the region to use (default: the whole disk)")
		offStr  = fs.String("offset", "0", "start of the region")
		pid     = fs.Int("backend-pid", 0, "PID of the back-end process whose CPU time to report per million I/Os")
		seed    = fs.Uint64("seed", 1, "random seed for offsets and data")
		output  = fs.String("o", "table", "output format: table or json")
		label   = fs.String("label", "", "target name in the report (default: vhost-user or raw)")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench: unexpected argument %q (flags only)", fs.Arg(0))
	}
	if (*socket == "") == (*file == "") {
		return errors.New("bench: give exactly one of --vhost-user SOCKET or --file IMG")
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("bench: output format %q: want table or json", *output)
	}
	bs, err := parseSize(*bsStr)
	if err != nil {
		return fmt.Errorf("bench: --bs: %w", err)
	}
	size, off := uint64(0), uint64(0)
	if *sizeStr != "" {
		if size, err = parseSize64(*sizeStr); err != nil {
			return fmt.Errorf("bench: --size: %w", err)
		}
	}
	if off, err = parseSize64(*offStr); err != nil {
		return fmt.Errorf("bench: --offset: %w", err)
	}
	if *queues < 1 || *queues > 64 {
		return fmt.Errorf("bench: --queues %d out of range 1..64", *queues)
	}
	job := bench.Job{
		Pattern: bench.Pattern(*rw), BlockSize: bs, QueueDepth: *qd, ReadPercent: *rwmix,
		Runtime: *runtime, Ops: *ops, Offset: off, Size: size, Seed: *seed,
	}
	if *ops > 0 {
		job.Runtime = 0
	}
	// Validate the parts that do not depend on the disk before connecting.
	if err := job.Validate(1 << 62); err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	job.Size = size

	var (
		target bench.Target
		name   string
		closer func() error
	)
	if *socket != "" {
		t, err := bench.DialVhostUser(ctx, *socket, *queues, *qd, bs)
		if err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		target, name, closer = t, "vhost-user", t.Close
	} else {
		t, c, err := openFileTarget(*file, *queues, *qd, bs, stderr)
		if err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		target, name, closer = t, "raw", c
		if *pid == 0 {
			// The ceiling has no back-end process: charge our own CPU.
			*pid = os.Getpid()
		}
	}
	if *label != "" {
		name = *label
	}
	var cpu bench.CPUSampler
	if *pid != 0 {
		cpu = bench.ProcessCPU{PID: *pid}
	}
	res, runErr := bench.Run(ctx, target, job, cpu)
	if err := closer(); err != nil && runErr == nil {
		runErr = fmt.Errorf("close %s: %w", name, err)
	}
	if res != nil {
		res.Target = name
		switch *output {
		case "json":
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			if err := enc.Encode(res); err != nil {
				return err
			}
		default:
			if err := bench.WriteTable(stdout, []*bench.Result{res}); err != nil {
				return err
			}
		}
	}
	if runErr != nil {
		return fmt.Errorf("bench: %w", runErr)
	}
	return nil
}

// parseSize parses "4096", "4k", "128K", "1m", "2g" (binary units).
func parseSize64(s string) (uint64, error) {
	s = strings.TrimSpace(strings.ToLower(s))
	mult := uint64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'k':
			mult, s = 1<<10, s[:n-1]
		case 'm':
			mult, s = 1<<20, s[:n-1]
		case 'g':
			mult, s = 1<<30, s[:n-1]
		case 't':
			mult, s = 1<<40, s[:n-1]
		}
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: want a number with an optional k, m, g or t suffix", s)
	}
	if v > (1<<64-1)/mult {
		return 0, fmt.Errorf("size %q overflows", s)
	}
	return v * mult, nil
}

func parseSize(s string) (int, error) {
	v, err := parseSize64(s)
	if err != nil {
		return 0, err
	}
	if v > 64<<20 {
		return 0, fmt.Errorf("%d bytes is larger than the 64 MiB limit", v)
	}
	return int(v), nil
}

// openFileTarget opens the raw io_uring ceiling target: the image opened
// O_DIRECT by storage/rawvol, one io_uring per queue, no device in between.
func openFileTarget(path string, queues, depth, maxIO int, stderr io.Writer) (bench.Target, func() error, error) {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	vol, err := rawvol.Open(path, rawvol.Options{Logger: log})
	if err != nil {
		return nil, nil, err
	}
	t, err := bench.NewVolume(vol, queues, depth, maxIO)
	if err != nil {
		vol.Close()
		return nil, nil, err
	}
	return t, func() error {
		err := t.Close()
		if cerr := vol.Close(); err == nil {
			err = cerr
		}
		return err
	}, nil
}
