package main

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/virtblk/virtblk/blkio/bench"
	"github.com/virtblk/virtblk/blkio/frontend"
	"github.com/virtblk/virtblk/blkio/vhostblk"
	"github.com/virtblk/virtblk/blkio/vhostuser"
	"github.com/virtblk/virtblk/blkio/virtioblk"
	"github.com/virtblk/virtblk/domainxml"
	"github.com/virtblk/virtblk/domainxml/kvsim"
	"github.com/virtblk/virtblk/sidecar"
	"github.com/virtblk/virtblk/storage/store"
)

// The demo's embedded default: a KubeVirt v1.9 domain for an 8-vCPU VM with
// three virtio disks, and its VMI asking for a pool of 4 IOThreads on two of
// them (one with an explicit queue map).
var (
	//go:embed demo/domain.xml
	demoDomain []byte
	//go:embed demo/vmi.json
	demoVMI []byte
)

// runDemo shows both halves of virtblk on one machine, no cluster needed:
// the hook sidecar's rewrite under virt-launcher's three lossy calls, then a
// store volume served over vhost-user-blk and driven by the Go front-end.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "", "work directory for the demo store and socket (default: a new temporary directory, removed afterwards)")
	runtime := fs.Duration("runtime", 3*time.Second, "length of each benchmark job")
	if err := fs.Parse(args); err != nil {
		return errUsage{err.Error()}
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "virtblk-demo-")
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	if err := demoHook(ctx, stdout); err != nil {
		return fmt.Errorf("demo: hook: %w", err)
	}
	if err := demoDataPlane(ctx, *dir, *runtime, stdout); err != nil {
		return fmt.Errorf("demo: data plane: %w", err)
	}
	fmt.Fprintln(stdout, "\ndemo finished: the mapping converged and every byte read back matched.")
	return nil
}

func demoHook(ctx context.Context, out io.Writer) error {
	fmt.Fprintln(out, "== 1. Hook sidecar: OnDefineDomain, three calls as virt-launcher makes them")
	h := sidecar.NewHandler(sidecar.DefaultHooks(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	// From call 2 on virt-launcher feeds the original domain with the
	// devices libvirt stored, re-parsed through KubeVirt's lossy model.
	outs, err := kvsim.DefineCalls(demoDomain, 2, func(call int, in []byte) ([]byte, error) {
		if call > 1 {
			lost := !bytes.Contains(in, []byte("<queue ")) && !bytes.Contains(in, []byte("<iothreadids"))
			fmt.Fprintf(out, "call %d input lost <queue> and <iothreadids>: %v\n", call, lost)
		}
		res, err := h.Define(ctx, "v1alpha3", "", in, demoVMI)
		if err == nil {
			fmt.Fprintf(out, "call %d: %d bytes out\n", call, len(res))
		}
		return res, err
	})
	if err != nil {
		return err
	}
	if !bytes.Equal(outs[0], outs[1]) || !bytes.Equal(outs[1], outs[2]) {
		// Devices may gain libvirt addresses between calls; the mapping
		// itself must be the same, which is what the summary compares.
		if summary(outs[0]) != summary(outs[2]) || summary(outs[1]) != summary(outs[2]) {
			return errors.New("the three calls produced different IOThread mappings")
		}
	}
	fmt.Fprintln(out, "all three calls give the same mapping:")
	fmt.Fprint(out, summary(outs[2]))
	return nil
}

// summary renders the domain's IOThread pool and per-disk queue map.
func summary(domXML []byte) string {
	dom, err := domainxml.ParseDomain(domXML)
	if err != nil {
		return "unparsable: " + err.Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "  domain <iothreads>%d</iothreads>\n", dom.IOThreads)
	if dom.Devices == nil {
		return b.String()
	}
	for _, d := range dom.Devices.Disks {
		if d.Target == nil || d.Driver == nil {
			continue
		}
		alias := ""
		if d.Alias != nil {
			alias = d.Alias.Name
		}
		q := 0
		if d.Driver.Queues != nil {
			q = int(*d.Driver.Queues)
		}
		fmt.Fprintf(&b, "  %-4s %-12s queues=%d", d.Target.Dev, alias, q)
		if d.Driver.IOThread != nil {
			fmt.Fprintf(&b, " iothread=%d (KubeVirt's)", *d.Driver.IOThread)
		}
		if d.Driver.IOThreads != nil {
			for _, t := range d.Driver.IOThreads.IOThread {
				var qs []string
				for _, qq := range t.Queues {
					qs = append(qs, fmt.Sprint(qq.ID))
				}
				fmt.Fprintf(&b, " | iothread %d: queues %s", t.ID, strings.Join(qs, ","))
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func demoDataPlane(ctx context.Context, dir string, runtime time.Duration, out io.Writer) error {
	fmt.Fprintln(out, "\n== 2. Data plane: a store volume served over vhost-user-blk")
	path := filepath.Join(dir, "demo.vbs")
	const storeSize, volSize = 1 << 30, 256 << 20
	if err := store.CreateFile(path, storeSize); err != nil {
		return err
	}
	d, _, err := store.OpenDisk(path)
	if err != nil {
		return err
	}
	err = store.Format(d, store.FormatOptions{}, store.Options{})
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	st, closeFn, err := store.OpenPath(path, store.Options{})
	if err != nil {
		return err
	}
	closed := false
	closeStore := func() error {
		if closed {
			return nil
		}
		closed = true
		return closeFn()
	}
	defer closeStore()
	if err := st.CreateVolume("vm1", volSize); err != nil {
		return err
	}
	vol, err := st.BlockVolume("vm1")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "store %s (1 GiB), thin volume vm1 (256 MiB)\n", path)

	const queues = 2
	dev, err := virtioblk.NewDevice(vol, virtioblk.Options{NumQueues: queues, QueueSize: 256, Serial: "vm1"})
	if err != nil {
		return err
	}
	sock := filepath.Join(dir, "vm1.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return fmt.Errorf("listen on %s: %w", sock, err)
	}
	srvCtx, stopServer := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() {
		srv := vhostuser.NewServer(vhostblk.New(dev), vhostuser.Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
		served <- srv.Serve(srvCtx, ln)
	}()
	stop := func() error {
		stopServer()
		err := <-served
		ln.Close()
		return err
	}
	fmt.Fprintf(out, "virtio-blk device with %d queues on %s\n", queues, sock)

	if err := demoVerify(ctx, sock, queues, out); err != nil {
		stop()
		return err
	}
	if err := demoBench(ctx, sock, queues, runtime, out); err != nil {
		stop()
		return err
	}
	if err := stop(); err != nil {
		return fmt.Errorf("stop back-end: %w", err)
	}
	if err := vol.Close(); err != nil {
		return err
	}
	rep, err := st.Verify(nil)
	if err != nil {
		return fmt.Errorf("verify store: %w", err)
	}
	if !rep.Clean() {
		return fmt.Errorf("store check found problems: %+v", rep)
	}
	fmt.Fprintf(out, "fsck: %d volumes, %d mapped blocks, %d data blocks checked: clean\n", rep.Volumes, rep.MappedEntries, rep.DataBlocks)
	return closeStore()
}

// demoVerify writes a distinct pattern through every queue, flushes, reads
// it all back through the other queue and compares.
func demoVerify(ctx context.Context, sock string, queues int, out io.Writer) error {
	fe, err := frontend.Dial(ctx, sock, frontend.Options{Queues: queues, QueueDepth: 16, MaxIO: 64 << 10})
	if err != nil {
		return err
	}
	defer fe.Close()
	const chunk, chunks = 64 << 10, 32
	pattern := func(i, j int) byte { return byte(i*131 + j*7 + 1) }
	do := func(q *frontend.Queue, typ uint32, sector uint64, n int) error {
		c, err := q.Do(typ, sector, n)
		if err == nil && c.Status != frontend.StatusOK {
			err = fmt.Errorf("request type %d at sector %d: status %d", typ, sector, c.Status)
		}
		return err
	}
	qs := fe.Queues()
	for i := 0; i < chunks; i++ {
		q := qs[i%queues]
		buf := q.Buffer(0)[:chunk]
		for j := range buf {
			buf[j] = pattern(i, j)
		}
		if err := do(q, frontend.TypeOut, uint64(i*chunk/512), chunk); err != nil {
			return fmt.Errorf("write chunk %d: %w", i, err)
		}
	}
	if err := do(qs[0], frontend.TypeFlush, 0, 0); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	for i := 0; i < chunks; i++ {
		q := qs[(i+1)%queues]
		if err := do(q, frontend.TypeIn, uint64(i*chunk/512), chunk); err != nil {
			return fmt.Errorf("read chunk %d: %w", i, err)
		}
		buf := q.Buffer(0)[:chunk]
		for j := range buf {
			if buf[j] != pattern(i, j) {
				return fmt.Errorf("chunk %d byte %d: read %#x, wrote %#x", i, j, buf[j], pattern(i, j))
			}
		}
	}
	fmt.Fprintf(out, "wrote %d KiB over %d queues, flushed, read back through the other queue: identical\n", chunks*chunk>>10, queues)
	return nil
}

func demoBench(ctx context.Context, sock string, queues int, runtime time.Duration, out io.Writer) error {
	for _, j := range []bench.Job{
		{Pattern: bench.RandWrite, BlockSize: 4096, QueueDepth: 16, Runtime: runtime, Size: 64 << 20},
		{Pattern: bench.RandRead, BlockSize: 4096, QueueDepth: 16, Runtime: runtime, Size: 64 << 20},
	} {
		t, err := bench.DialVhostUser(ctx, sock, queues, j.QueueDepth, j.BlockSize)
		if err != nil {
			return err
		}
		res, err := bench.Run(ctx, t, j, nil)
		t.Close()
		if err != nil {
			return fmt.Errorf("bench %s: %w", j.Pattern, err)
		}
		fmt.Fprintf(out, "bench 4k %-9s QD%d x %d queues: %8.0f IOPS %7.1f MB/s  mean %6.0f us  p99 %6.0f us  errors %d\n",
			j.Pattern, j.QueueDepth, queues, res.IOPS, res.MBps, res.LatMean, res.LatP99, res.Errors)
		if res.Errors != 0 {
			return fmt.Errorf("bench %s: %d I/O errors", j.Pattern, res.Errors)
		}
	}
	return nil
}
