package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/virtblk/virtblk/blkio/frontend"
	"github.com/virtblk/virtblk/storage/store"
)

func TestParseServeStore(t *testing.T) {
	bad := map[string][]string{
		"file and store":       {"--socket", "s", "--file", "x", "--store", "st", "--volume", "a"},
		"store without volume": {"--socket", "s", "--store", "st"},
		"volume without store": {"--socket", "s", "--file", "x", "--volume", "a"},
		"two take --socket":    {"--socket", "s", "--store", "st", "--volume", "a", "--volume", "b"},
		"no socket":            {"--store", "st", "--volume", "a"},
		"unused --socket":      {"--socket", "s", "--store", "st", "--volume", "a=s1"},
		"duplicate name":       {"--store", "st", "--volume", "a=s1", "--volume", "a=s2"},
		"duplicate socket":     {"--store", "st", "--volume", "a=s1", "--volume", "b=s1"},
		"empty socket":         {"--store", "st", "--volume", "a="},
		"serial for two":       {"--store", "st", "--volume", "a=s1", "--volume", "b=s2", "--serial", "x"},
	}
	for name, args := range bad {
		if _, err := parseServe(args, io.Discard); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	c, err := parseServe([]string{"--store", "st", "--socket", "s0", "--volume", "a", "--volume", "b=s1"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	got, err := storeTargets(c)
	if err != nil || len(got) != 2 || got[0] != (volumeSpec{"a", "s0"}) || got[1] != (volumeSpec{"b", "s1"}) {
		t.Fatalf("targets %+v %v", got, err)
	}
}

// One daemon serves two volumes of one store on two sockets; each gets its
// own data, and after a stop the store holds both.
func TestServeStoreVolumes(t *testing.T) {
	dir, err := os.MkdirTemp("/tmp", "vbd-store-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	st := filepath.Join(dir, "s.vbs")
	if err := store.CreateFile(st, 128<<20); err != nil {
		t.Fatal(err)
	}
	func() {
		d, _, err := store.OpenDisk(st)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if err := store.Format(d, store.FormatOptions{}, store.Options{}); err != nil {
			t.Fatal(err)
		}
		s, err := store.Open(d, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{"a", "b"} {
			if err := s.CreateVolume(n, 8<<20); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}()
	socks := map[string]string{"a": filepath.Join(dir, "a.sock"), "b": filepath.Join(dir, "b.sock")}
	c, err := parseServe([]string{"--store", st, "--volume", "a=" + socks["a"], "--volume", "b=" + socks["b"], "--queues", "2", "--queue-size", "128"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- serve(ctx, c, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	for _, s := range socks {
		for {
			if _, err := os.Stat(s); err == nil {
				break
			}
			select {
			case err := <-done:
				t.Fatalf("serve exited early: %v", err)
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	for name, sock := range socks {
		dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
		dev, err := frontend.Dial(dctx, sock, frontend.Options{Queues: 2, QueueDepth: 4})
		dcancel()
		if err != nil {
			t.Fatal(err)
		}
		q := dev.Queues()[0]
		for _, r := range []struct {
			typ uint32
			n   int
		}{{frontend.TypeOut, 4096}, {frontend.TypeFlush, 0}, {frontend.TypeGetID, 20}} {
			if r.typ == frontend.TypeOut {
				copy(q.Buffer(0), bytes.Repeat([]byte(name), 4096))
			}
			if err := q.Submit(0, r.typ, 8, r.n); err != nil {
				t.Fatal(err)
			}
			q.Kick()
			var cs [1]frontend.Completion
			if _, err := q.Reap(cs[:], 1); err != nil || cs[0].Status != frontend.StatusOK {
				t.Fatalf("%s: request %d: %v status %d", name, r.typ, err, cs[0].Status)
			}
		}
		if got := strings.TrimRight(string(q.Buffer(0)[:20]), "\x00"); got != name {
			t.Errorf("volume %s serial %q", name, got)
		}
		dev.Close()
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
	s, closeStore, err := store.OpenPath(st, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore()
	for name := range socks {
		v, err := s.Volume(name)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		ch := make(chan error, 1)
		v.ReadAt(buf, 8*512, func(err error) { ch <- err })
		if err := <-ch; err != nil || !bytes.Equal(buf, bytes.Repeat([]byte(name), 4096)) {
			t.Errorf("volume %s does not hold its data (%v)", name, err)
		}
	}
}
