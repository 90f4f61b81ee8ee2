package frontend

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/virtblk/virtblk/internal/testenv"
)

// makeImage creates a sparse image of size bytes.
func makeImage(t *testing.T, size int64) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	return img
}

// startProcess runs a back-end until the test ends and waits for its socket.
func startProcess(t *testing.T, sock string, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(name), stderr.String())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return cmd
		}
		select {
		case <-done:
			t.Fatalf("%s exited before creating %s: %s", name, sock, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not create %s within 20s", name, sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func startQSD(t *testing.T, img string, queues int) string {
	t.Helper()
	qsd := testenv.Tool(t, "qemu-storage-daemon", "qemu-system-common")
	sock := filepath.Join(t.TempDir(), "qsd.sock")
	startProcess(t, sock, qsd,
		"--blockdev", "driver=file,node-name=f,filename="+img+",aio=io_uring,cache.direct=on",
		"--blockdev", "driver=raw,node-name=d,file=f",
		"--export", fmt.Sprintf("type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=%s,writable=on,num-queues=%d", sock, queues))
	return sock
}

// do submits one request on slot 0 and waits for it.
func do(t *testing.T, q *Queue, typ uint32, sector uint64, n int) Completion {
	t.Helper()
	c, err := q.Do(typ, sector, n)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// exerciseDevice runs the functional checks shared by every back-end.
func exerciseDevice(t *testing.T, sock string, img string, queues int, opts Options) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts.Queues = queues
	dev, err := Dial(ctx, sock, opts)
	if err != nil {
		t.Fatal(err)
	}
	info := dev.Info()
	t.Logf("info: %+v", info)
	if info.Capacity != 64<<20 {
		t.Fatalf("capacity %d, want %d", info.Capacity, 64<<20)
	}
	if info.MaxQueues < queues {
		t.Fatalf("max queues %d < %d", info.MaxQueues, queues)
	}
	if !info.Flush {
		t.Fatal("back-end does not offer FLUSH")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	const bs = 64 << 10
	for _, q := range dev.Queues() {
		depth := q.Depth()
		// Fill every slot with a distinct pattern and write them all at once,
		// each to its own 64 KiB extent of this queue's area.
		base := uint64(q.Index()) * uint64(depth) * bs
		for s := 0; s < depth; s++ {
			buf := q.Buffer(s)[:bs]
			for i := range buf {
				buf[i] = byte(rng.Uint32())
			}
			if err := q.Submit(s, TypeOut, (base+uint64(s)*bs)/SectorSize, bs); err != nil {
				t.Fatal(err)
			}
		}
		if err := q.Kick(); err != nil {
			t.Fatal(err)
		}
		want := make([][]byte, depth)
		comps := make([]Completion, depth)
		for done := 0; done < depth; {
			n, err := q.Reap(comps, 1)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range comps[:n] {
				if c.Status != StatusOK {
					t.Fatalf("queue %d write slot %d: status %d", q.Index(), c.Slot, c.Status)
				}
				want[c.Slot] = bytes.Clone(q.Buffer(c.Slot)[:bs])
			}
			done += n
		}
		if c := do(t, q, TypeFlush, 0, 0); c.Status != StatusOK {
			t.Fatalf("queue %d flush: status %d", q.Index(), c.Status)
		}
		// Read back through the device into cleared buffers.
		for s := 0; s < depth; s++ {
			clear(q.Buffer(s)[:bs])
			if err := q.Submit(s, TypeIn, (base+uint64(s)*bs)/SectorSize, bs); err != nil {
				t.Fatal(err)
			}
		}
		if err := q.Kick(); err != nil {
			t.Fatal(err)
		}
		for done := 0; done < depth; {
			n, err := q.Reap(comps, 1)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range comps[:n] {
				if c.Status != StatusOK {
					t.Fatalf("queue %d read slot %d: status %d", q.Index(), c.Slot, c.Status)
				}
				if !bytes.Equal(q.Buffer(c.Slot)[:bs], want[c.Slot]) {
					t.Fatalf("queue %d slot %d: data read back differs from data written", q.Index(), c.Slot)
				}
			}
			done += n
		}
		// And check the image file itself.
		f, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		for s := 0; s < depth; s++ {
			off := base + uint64(s)*bs
			if !bytes.Equal(f[off:off+bs], want[s]) {
				t.Fatalf("queue %d slot %d: image bytes at %d differ from data written", q.Index(), s, off)
			}
		}
	}
	q := dev.Queues()[0]
	// A read past the end of the disk must fail, not succeed or hang.
	if c := do(t, q, TypeIn, info.Capacity/SectorSize, 4096); c.Status == StatusOK {
		t.Fatal("read beyond capacity succeeded")
	}
	if info.WriteZeroes {
		copy(q.Buffer(0), bytes.Repeat([]byte{0xab}, 8192))
		if c := do(t, q, TypeOut, 0, 8192); c.Status != StatusOK {
			t.Fatalf("write: status %d", c.Status)
		}
		PutSegment(q.Buffer(0), 0, 8192/SectorSize, 0)
		if c := do(t, q, TypeWriteZeroes, 0, 16); c.Status != StatusOK {
			t.Fatalf("write-zeroes: status %d", c.Status)
		}
		clear(q.Buffer(0)[:8192])
		q.Buffer(0)[0] = 1
		if c := do(t, q, TypeIn, 0, 8192); c.Status != StatusOK || !bytes.Equal(q.Buffer(0)[:8192], make([]byte, 8192)) {
			t.Fatalf("read after write-zeroes: status %d, zero=%v", c.Status, bytes.Equal(q.Buffer(0)[:8192], make([]byte, 8192)))
		}
	}
	if info.Discard {
		PutSegment(q.Buffer(0), 1<<20/SectorSize, 1<<20/SectorSize, 0)
		if c := do(t, q, TypeDiscard, 0, 16); c.Status != StatusOK {
			t.Fatalf("discard: status %d", c.Status)
		}
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestQSD(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"event-idx", Options{QueueDepth: 8}},
		{"no-event-idx", Options{QueueDepth: 8, NoEventIdx: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := makeImage(t, 64<<20)
			sock := startQSD(t, img, 2)
			exerciseDevice(t, sock, img, 2, tc.opts)
			// The back-end must accept a second front-end after the first
			// one tore down cleanly.
			exerciseDevice(t, sock, img, 1, tc.opts)
		})
	}
}

func TestVirtblkd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs virtblkd")
	}
	bin := testenv.Build(t, "./cmd/virtblkd")
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"event-idx", Options{QueueDepth: 8}},
		{"no-event-idx", Options{QueueDepth: 8, NoEventIdx: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := makeImage(t, 64<<20)
			sock := filepath.Join(t.TempDir(), "virtblkd.sock")
			startProcess(t, sock, bin, "serve", "--socket", sock, "--file", img, "--queues", "2")
			exerciseDevice(t, sock, img, 2, tc.opts)
			exerciseDevice(t, sock, img, 1, tc.opts)
		})
	}
}
