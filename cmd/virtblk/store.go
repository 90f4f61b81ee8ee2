package main

import (
	"bytes"
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
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage/store"
)

// errUnclean makes main exit 1 without printing another message: the
// command already reported why.
var errUnclean = errors.New("store is not clean")

// errUsage makes main exit 2.
type errUsage struct{ msg string }

func (e errUsage) Error() string { return e.msg }

const storeUsage = `usage:
  virtblk store create --store FILE --size 4G
  virtblk volume create --store FILE --name NAME --size 1G
  virtblk volume list   --store FILE [-o json]
  virtblk volume delete --store FILE --name NAME
  virtblk volume resize --store FILE --name NAME --size 2G
  virtblk snapshot create --store FILE --volume VOLUME --name NAME
  virtblk snapshot list   --store FILE [--volume VOLUME] [-o json]
  virtblk snapshot delete --store FILE --name NAME
  virtblk clone  --store FILE --snapshot NAME --name NEW
  virtblk fsck   --store FILE [-o json]
  virtblk import --store FILE --name NAME --from disk.raw
  virtblk stats  --store FILE [-o json]
`

// parseStoreSize reads sizes like 4096, 512K, 1M, 4G, 1T (powers of 1024).
func parseStoreSize(s string) (uint64, error) {
	orig := s
	mult := uint64(1)
	if n := len(s); n > 0 {
		switch strings.ToUpper(s[n-1:]) {
		case "K":
			mult = 1 << 10
		case "M":
			mult = 1 << 20
		case "G":
			mult = 1 << 30
		case "T":
			mult = 1 << 40
		}
		if mult != 1 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || v == 0 || v > (1<<63)/mult {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G or T suffix, e.g. 4G", orig)
	}
	return v * mult, nil
}

type storeCmd struct {
	fs     *flag.FlagSet
	store  *string
	output *string
	stdout io.Writer
	stderr io.Writer
}

func newStoreCmd(name string, stdout, stderr io.Writer) *storeCmd {
	c := &storeCmd{fs: flag.NewFlagSet(name, flag.ContinueOnError), stdout: stdout, stderr: stderr}
	c.fs.SetOutput(stderr)
	c.fs.Usage = func() { fmt.Fprint(stderr, storeUsage) }
	c.store = c.fs.String("store", "", "store file or block device")
	c.output = c.fs.String("o", "table", "output format: table or json")
	return c
}

func (c *storeCmd) parse(args []string, required ...string) error {
	if err := c.fs.Parse(args); err != nil {
		return errUsage{err.Error()}
	}
	if c.fs.NArg() > 0 {
		return errUsage{fmt.Sprintf("%s: unexpected argument %q (flags only)", c.fs.Name(), c.fs.Arg(0))}
	}
	if *c.output != "table" && *c.output != "json" {
		return errUsage{fmt.Sprintf("%s: -o %q: use table or json", c.fs.Name(), *c.output)}
	}
	for _, r := range required {
		if f := c.fs.Lookup(r); f == nil || f.Value.String() == "" {
			return errUsage{fmt.Sprintf("%s: --%s is required", c.fs.Name(), r)}
		}
	}
	return nil
}

// open opens the store and returns a close function that makes every change
// durable.
func (c *storeCmd) open() (*store.Store, func() error, error) {
	logger := slog.New(slog.NewTextHandler(c.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	return store.OpenPath(*c.store, store.Options{Logger: logger})
}

func (c *storeCmd) json(v any) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// withStore runs fn on the open store and closes it, keeping fn's error.
func (c *storeCmd) withStore(fn func(s *store.Store) error) error {
	s, closeStore, err := c.open()
	if err != nil {
		return err
	}
	err = fn(s)
	if cerr := closeStore(); err == nil && cerr != nil {
		err = fmt.Errorf("close store: %w", cerr)
	}
	return err
}

func runStoreCreate(args []string, stdout, stderr io.Writer) error {
	c := newStoreCmd("store create", stdout, stderr)
	sizeStr := c.fs.String("size", "", "store size, e.g. 4G (not needed for a block device)")
	if err := c.parse(args, "store"); err != nil {
		return err
	}
	fi, statErr := os.Stat(*c.store)
	switch {
	case statErr == nil && fi.Mode()&os.ModeDevice != 0:
		// Format the whole block device.
	case statErr == nil:
		return fmt.Errorf("store create: %s already exists; remove it first or choose another path", *c.store)
	case *sizeStr == "":
		return errUsage{"store create: --size is required for a new file"}
	default:
		size, err := parseStoreSize(*sizeStr)
		if err != nil {
			return fmt.Errorf("store create: %w", err)
		}
		if err := store.CreateFile(*c.store, size&^4095); err != nil {
			return err
		}
	}
	d, note, err := store.OpenDisk(*c.store)
	if err != nil {
		return err
	}
	defer d.Close()
	if note != "" {
		fmt.Fprintln(stderr, "virtblk: warning:", note)
	}
	if err := store.Format(d, store.FormatOptions{}, store.Options{}); err != nil {
		if statErr != nil {
			os.Remove(*c.store)
		}
		return fmt.Errorf("store create %s: %w", *c.store, err)
	}
	fmt.Fprintf(stdout, "created store %s (%s)\n", *c.store, human(d.Size()))
	return nil
}

func human(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	f := float64(n)
	i := 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return fmt.Sprintf("%.1f %s", f, units[i])
}

func runVolume(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errUsage{"volume: want create, list, delete or resize"}
	}
	c := newStoreCmd("volume "+args[0], stdout, stderr)
	name := c.fs.String("name", "", "volume name")
	sizeStr := c.fs.String("size", "", "volume size, e.g. 1G")
	switch args[0] {
	case "create", "resize":
		if err := c.parse(args[1:], "store", "name", "size"); err != nil {
			return err
		}
		size, err := parseStoreSize(*sizeStr)
		if err != nil {
			return fmt.Errorf("volume %s: %w", args[0], err)
		}
		return c.withStore(func(s *store.Store) error {
			if args[0] == "create" {
				return s.CreateVolume(*name, size)
			}
			return s.Resize(*name, size)
		})
	case "delete":
		if err := c.parse(args[1:], "store", "name"); err != nil {
			return err
		}
		return c.withStore(func(s *store.Store) error { return s.Delete(*name) })
	case "list":
		if err := c.parse(args[1:], "store"); err != nil {
			return err
		}
		return c.withStore(func(s *store.Store) error {
			return c.printVolumes(s.List(), func(v store.VolumeInfo) bool { return !v.Snapshot })
		})
	}
	return errUsage{fmt.Sprintf("volume: unknown action %q: want create, list, delete or resize", args[0])}
}

func (c *storeCmd) printVolumes(all []store.VolumeInfo, keep func(store.VolumeInfo) bool) error {
	list := []store.VolumeInfo{}
	for _, v := range all {
		if keep(v) {
			list = append(list, v)
		}
	}
	if *c.output == "json" {
		return c.json(list)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSIZE\tUSED\tTYPE\tSOURCE")
	for _, v := range list {
		kind := "volume"
		switch {
		case v.Snapshot:
			kind = "snapshot"
		case v.Source != "":
			kind = "clone"
		}
		src := v.Source
		if src == "" {
			src = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", v.Name, human(v.Size), human(v.MappedBlocks*4096), kind, src)
	}
	return tw.Flush()
}

func runSnapshot(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errUsage{"snapshot: want create, list or delete"}
	}
	c := newStoreCmd("snapshot "+args[0], stdout, stderr)
	name := c.fs.String("name", "", "snapshot name")
	vol := c.fs.String("volume", "", "volume to snapshot (create) or to list snapshots of")
	switch args[0] {
	case "create":
		if err := c.parse(args[1:], "store", "volume", "name"); err != nil {
			return err
		}
		return c.withStore(func(s *store.Store) error { return s.Snapshot(*vol, *name) })
	case "delete":
		if err := c.parse(args[1:], "store", "name"); err != nil {
			return err
		}
		return c.withStore(func(s *store.Store) error {
			for _, v := range s.List() {
				if v.Name == *name && !v.Snapshot {
					return fmt.Errorf("snapshot delete: %q is a volume, not a snapshot; use volume delete", *name)
				}
			}
			return s.Delete(*name)
		})
	case "list":
		if err := c.parse(args[1:], "store"); err != nil {
			return err
		}
		return c.withStore(func(s *store.Store) error {
			return c.printVolumes(s.List(), func(v store.VolumeInfo) bool {
				return v.Snapshot && (*vol == "" || v.Source == *vol)
			})
		})
	}
	return errUsage{fmt.Sprintf("snapshot: unknown action %q: want create, list or delete", args[0])}
}

func runClone(args []string, stdout, stderr io.Writer) error {
	c := newStoreCmd("clone", stdout, stderr)
	snap := c.fs.String("snapshot", "", "snapshot to clone")
	name := c.fs.String("name", "", "name of the new volume")
	if err := c.parse(args, "store", "snapshot", "name"); err != nil {
		return err
	}
	return c.withStore(func(s *store.Store) error { return s.Clone(*snap, *name) })
}

func runFsck(args []string, stdout, stderr io.Writer) error {
	c := newStoreCmd("fsck", stdout, stderr)
	if err := c.parse(args, "store"); err != nil {
		return err
	}
	var rep store.Report
	err := c.withStore(func(s *store.Store) error {
		var err error
		rep, err = s.Verify(nil)
		return err
	})
	if err != nil {
		if *c.output == "json" {
			_ = c.json(map[string]any{"clean": false, "error": err.Error()})
		}
		return err
	}
	if *c.output == "json" {
		if err := c.json(struct {
			Clean bool `json:"clean"`
			store.Report
		}{rep.Clean(), rep}); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "%d volumes, %d mapped entries, %d data blocks checked\n", rep.Volumes, rep.MappedEntries, rep.DataBlocks)
		for _, r := range rep.Repairs {
			fmt.Fprintf(stdout, "repaired: %s\n", r)
		}
		for _, f := range rep.Findings {
			fmt.Fprintf(stdout, "%s error: volume %q block %d, physical block %d at offset %d: %s\n", f.Kind, f.Volume, f.Block, f.Physical, f.Offset, f.Detail)
		}
		if rep.Clean() {
			fmt.Fprintln(stdout, "clean")
		}
	}
	if !rep.Clean() {
		return errUnclean
	}
	return nil
}

func runStats(args []string, stdout, stderr io.Writer) error {
	c := newStoreCmd("stats", stdout, stderr)
	if err := c.parse(args, "store"); err != nil {
		return err
	}
	return c.withStore(func(s *store.Store) error {
		st := s.Stats()
		vols := s.List()
		if *c.output == "json" {
			return c.json(struct {
				store.Stats
				Geometry store.Geometry     `json:"geometry"`
				Volumes  []store.VolumeInfo `json:"volumes"`
			}{st, s.Geometry(), vols})
		}
		g := s.Geometry()
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "store size\t%s\n", human(g.DiskSize))
		fmt.Fprintf(tw, "data blocks\t%d (%s)\n", st.DataBlocks, human(st.DataBlocks*4096))
		fmt.Fprintf(tw, "used blocks\t%d (%s)\n", st.UsedBlocks, human(st.UsedBlocks*4096))
		fmt.Fprintf(tw, "free blocks\t%d\n", st.DataBlocks-st.UsedBlocks)
		fmt.Fprintf(tw, "volumes and snapshots\t%d\n", len(vols))
		fmt.Fprintf(tw, "map leaves\t%d\n", st.Leaves)
		fmt.Fprintf(tw, "journal sequence\t%d\n", st.JournalSeq)
		fmt.Fprintf(tw, "journal\t%d slots x %s\n", g.JournalSlots, human(uint64(g.SlotSize)))
		fmt.Fprintf(tw, "checkpoint areas\t2 x %s\n", human(g.CkptSize))
		fmt.Fprintf(tw, "checksum errors\t%d\n", st.ChecksumErrors)
		fmt.Fprintf(tw, "i/o errors\t%d\n", st.IOErrors)
		return tw.Flush()
	})
}

func isTTY(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func runImport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newStoreCmd("import", stdout, stderr)
	name := c.fs.String("name", "", "name of the new volume")
	from := c.fs.String("from", "", "raw disk image to import")
	if err := c.parse(args, "store", "name", "from"); err != nil {
		return err
	}
	src, err := os.Open(*from)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	defer src.Close()
	end, err := src.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("import: size of %s: %w", *from, err)
	}
	if end == 0 {
		return fmt.Errorf("import: %s is empty", *from)
	}
	size := (uint64(end) + 4095) &^ 4095
	progress := isTTY(stderr)
	return c.withStore(func(s *store.Store) error {
		if err := s.CreateVolume(*name, size); err != nil {
			return fmt.Errorf("import: %w", err)
		}
		v, err := s.Volume(*name)
		if err != nil {
			return err
		}
		const chunk = 1 << 20
		buf := make([]byte, chunk)
		zero := make([]byte, 4096)
		start := time.Now()
		var skipped uint64
		for off := uint64(0); off < size; off += chunk {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("import: interrupted at %d of %d bytes: %w", off, size, err)
			}
			n := min(chunk, size-off)
			b := buf[:n]
			clear(b)
			if _, err := src.ReadAt(b, int64(off)); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("import: read %s at %d: %w", *from, off, err)
			}
			// Zero blocks stay unmapped: the volume is thin. The chunk's
			// blocks are written concurrently.
			errs := make(chan error, n/4096)
			issued := 0
			for bo := uint64(0); bo < n; bo += 4096 {
				blk := b[bo : bo+4096]
				if bytes.Equal(blk, zero) {
					skipped++
					continue
				}
				issued++
				v.WriteAt(blk, off+bo, func(err error) {
					if err != nil {
						err = fmt.Errorf("import: write at %d: %w", off+bo, err)
					}
					errs <- err
				})
			}
			for range issued {
				if err := <-errs; err != nil {
					return err
				}
			}
			if progress {
				drawProgress(stderr, off+n, size, start)
			}
		}
		if progress {
			fmt.Fprintln(stderr)
		}
		if err := s.Sync(); err != nil {
			return fmt.Errorf("import: %w", err)
		}
		fmt.Fprintf(stdout, "imported %s into volume %q (%s, %d zero blocks left unallocated)\n", *from, *name, human(size), skipped)
		return nil
	})
}

func drawProgress(w io.Writer, done, total uint64, start time.Time) {
	const width = 40
	frac := float64(done) / float64(total)
	bar := strings.Repeat("=", int(frac*width)) + strings.Repeat(" ", width-int(frac*width))
	rate := float64(done) / max(time.Since(start).Seconds(), 1e-3)
	fmt.Fprintf(w, "\r[%s] %5.1f%% %s/%s %s/s", bar, frac*100, human(done), human(total), human(uint64(rate)))
}
