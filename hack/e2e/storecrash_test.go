package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/virtblk/virtblk/blkio/frontend"

	"github.com/virtblk/virtblk/internal/testenv"
)

// The store crash test: a block store volume served by a real back-end
// process, written by the Go vhost-user front-end with self-describing
// blocks and interleaved FLUSHes on two queues, SIGKILLed at a random
// moment, restarted and read back, over many cycles; then a neighbour
// volume of the same store is checked unchanged and fsck must pass.
//
//	go test ./hack/e2e -run TestStoreCrash -v
//	VIRTBLK_CRASH_SEED=N VIRTBLK_CRASH_CYCLES=100 go test ./hack/e2e -run TestStoreCrashKill -v
//
// SIGKILL loses the process, not the machine: what the kernel accepted
// stays, so this proves the store's recovery (journal replay, intent log
// replay, torn-tail handling, map and free-space rebuild) under real
// concurrency, and that no acknowledged write is lost, flushed or not.
// Lost unflushed writes and torn sectors of a machine crash are the
// simulator's job (storage/store sim tests).

const (
	scVolSize     = 64 << 20
	scRegion      = 2048 // 4 KiB blocks the writers use (8 MiB)
	scQueueDepth  = 16
	scMaxBlocks   = 4 // blocks per write request
	scFlushPermil = 60
)

// scServer starts virtblkd serving one volume of a store.
type scServer struct {
	bin       string
	storePath string
	volume    string
}

func scNewServer(t *testing.T, storePath, volume string) scServer {
	return scServer{testenv.Build(t, "./cmd/virtblkd"), storePath, volume}
}

// forVolume is the same server for another volume of the store.
func (s scServer) forVolume(v string) scServer { s.volume = v; return s }

// start starts the server on sock. A SIGKILLed predecessor's io_uring can
// hold the store's lock a moment after it is gone; store.OpenPath waits
// for that itself.
func (s scServer) start(t *testing.T, sock string) *vuDaemon {
	t.Helper()
	return vuSpawn(t, s.bin, sock, "serve", "--store", s.storePath, "--volume", s.volume, "--queues", "2", "--socket", sock)
}

func scVirtblk(t *testing.T, bin string, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("virtblk %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// scSyncIO runs one request on q and waits for it.
func scSyncIO(q *frontend.Queue, typ uint32, sector uint64, n int) error {
	c, err := q.Do(typ, sector, n)
	if err == nil && c.Status != frontend.StatusOK {
		err = fmt.Errorf("request type %d at sector %d: status %d", typ, sector, c.Status)
	}
	return err
}

func scDial(t *testing.T, sock string, depth int) *frontend.Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dev, err := frontend.Dial(ctx, sock, frontend.Options{Queues: 2, QueueDepth: depth, MaxIO: scMaxBlocks * scBlock})
	if err != nil {
		t.Fatal(err)
	}
	if got := dev.Info().Capacity; got != scVolSize {
		t.Fatalf("capacity %d, want %d", got, scVolSize)
	}
	return dev
}

// scVerify reads every block of the region and checks it against the
// model, then flushes and makes what it read the baseline.
//
// lost counts blocks that came back older than a write the front-end saw
// complete. virtio-blk would allow it when no FLUSH covered the write (a
// volatile write cache), but the guest is still running and has seen the
// write complete: the store's intent log must keep every acknowledged write
// across a crash of the back-end process, so callers require lost == 0.
func scVerify(t *testing.T, dev *frontend.Device, m *scModel, cycle int) (mapped, newer, lost int) {
	t.Helper()
	watchdog := time.AfterFunc(2*time.Minute, dev.Abort)
	defer watchdog.Stop()
	q := dev.Queues()[cycle%2]
	const per = scMaxBlocks
	found := make([]uint64, scRegion)
	for lba := 0; lba < scRegion; lba += per {
		if err := scSyncIO(q, frontend.TypeIn, uint64(lba*scBlock/scSector), per*scBlock); err != nil {
			t.Fatalf("cycle %d: read lba %d: %v", cycle, lba, err)
		}
		buf := q.Buffer(0)
		for i := 0; i < per; i++ {
			g, err := m.check(lba+i, buf[i*scBlock:(i+1)*scBlock])
			if err != nil {
				t.Fatalf("cycle %d: %v", cycle, err)
			}
			found[lba+i] = g
		}
	}
	if err := scSyncIO(q, frontend.TypeFlush, 0, 0); err != nil {
		t.Fatalf("cycle %d: flush after verify: %v", cycle, err)
	}
	for l, g := range found {
		if g != m.durable[l] {
			newer++
		}
		if g < m.completed[l] {
			lost++
		}
		m.rebase(l, g)
		if g != 0 {
			mapped++
		}
	}
	return mapped, newer, lost
}

// scWriter is the shared state of one cycle's writers.
type scWriter struct {
	mu    sync.Mutex
	m     *scModel
	gen   *uint64
	busy  []bool
	stats struct{ writes, completed, flushes, flushed int }
}

// run keeps q busy with writes of 1-4 self-describing blocks at random free
// places and, now and then, a FLUSH, until the device is aborted. It
// returns the first failure other than the abort.
func (w *scWriter) run(q *frontend.Queue, rng *rand.Rand) error {
	type slotOp struct {
		flush    bool
		lba, n   int
		gen      uint64
		snapshot []uint64
	}
	ops := make([]slotOp, q.Depth())
	free := make([]int, 0, q.Depth())
	for s := q.Depth() - 1; s >= 0; s-- {
		free = append(free, s)
	}
	comps := make([]frontend.Completion, q.Depth())
	for {
		for len(free) > 0 {
			s := free[len(free)-1]
			op := slotOp{}
			w.mu.Lock()
			if rng.IntN(1000) < scFlushPermil {
				op.flush = true
				op.snapshot = w.m.flushSnapshot()
				w.stats.flushes++
			} else {
				op.n = 1 + rng.IntN(scMaxBlocks)
				op.lba = rng.IntN(scRegion - op.n + 1)
				for i := 0; i < op.n; i++ {
					if w.busy[op.lba+i] {
						op.n = i
						break
					}
				}
				if op.n > 0 {
					*w.gen++
					op.gen = *w.gen
					for i := 0; i < op.n; i++ {
						w.busy[op.lba+i] = true
						w.m.submitted(op.lba+i, op.gen)
					}
					w.stats.writes++
				}
			}
			w.mu.Unlock()
			if !op.flush && op.n == 0 {
				break // the random place is busy; try again after a completion
			}
			var err error
			if op.flush {
				err = q.Submit(s, frontend.TypeFlush, 0, 0)
			} else {
				buf := q.Buffer(s)
				for i := 0; i < op.n; i++ {
					scEncodeBlock(buf[i*scBlock:(i+1)*scBlock], w.m.tag, uint64(op.lba+i), op.gen)
				}
				err = q.Submit(s, frontend.TypeOut, uint64(op.lba*scBlock/scSector), op.n*scBlock)
			}
			if err != nil {
				return err
			}
			ops[s] = op
			free = free[:len(free)-1]
		}
		if err := q.Kick(); err != nil {
			return err
		}
		n, err := q.Reap(comps, 1)
		for _, c := range comps[:n] {
			op := ops[c.Slot]
			if c.Status != frontend.StatusOK {
				return fmt.Errorf("queue %d: request (flush=%v lba=%d blocks=%d gen=%d) failed with status %d", q.Index(), op.flush, op.lba, op.n, op.gen, c.Status)
			}
			w.mu.Lock()
			if op.flush {
				w.m.flushed(op.snapshot)
				w.stats.flushed++
			} else {
				for i := 0; i < op.n; i++ {
					w.m.completedWrite(op.lba+i, op.gen)
					w.busy[op.lba+i] = false
				}
				w.stats.completed++
			}
			w.mu.Unlock()
			free = append(free, c.Slot)
		}
		if err != nil {
			if errors.Is(err, frontend.ErrAborted) {
				return nil
			}
			return err
		}
	}
}

// scFill writes gen 1 to every block of the region of srv's volume,
// flushes, and stops the server cleanly.
func scFill(t *testing.T, srv scServer, sock string, m *scModel) {
	t.Helper()
	d := srv.start(t, sock)
	dev := scDial(t, sock, 1)
	q := dev.Queues()[0]
	for lba := 0; lba < scRegion; lba += scMaxBlocks {
		for i := 0; i < scMaxBlocks; i++ {
			scEncodeBlock(q.Buffer(0)[i*scBlock:(i+1)*scBlock], m.tag, uint64(lba+i), 1)
		}
		if err := scSyncIO(q, frontend.TypeOut, uint64(lba*scBlock/scSector), scMaxBlocks*scBlock); err != nil {
			t.Fatalf("fill volume %s: %v", srv.volume, err)
		}
	}
	if err := scSyncIO(q, frontend.TypeFlush, 0, 0); err != nil {
		t.Fatalf("fill volume %s: flush: %v", srv.volume, err)
	}
	for l := range m.durable {
		m.rebase(l, 1)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	d.stop(t)
}

// scSeed is the workload seed: VIRTBLK_CRASH_SEED replays one.
func scSeed(t *testing.T) uint64 {
	if s := os.Getenv("VIRTBLK_CRASH_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("VIRTBLK_CRASH_SEED=%q: want an unsigned integer", s)
		}
		return v
	}
	return uint64(time.Now().UnixNano())
}

func TestStoreCrashKill(t *testing.T) {
	if testing.Short() {
		t.Skip("store crash test: ~1-2 minutes of kill/restart cycles")
	}
	cycles := 24
	if s := os.Getenv("VIRTBLK_CRASH_CYCLES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("VIRTBLK_CRASH_CYCLES=%q: want a positive integer", s)
		}
		cycles = n
	}
	seed := scSeed(t)
	t.Logf("seed %d (replay the workload with VIRTBLK_CRASH_SEED=%d; kill moments are timer-driven and vary)", seed, seed)
	dir := vuTempDir(t)
	vb := testenv.Build(t, "./cmd/virtblk")
	storePath := filepath.Join(dir, "crash.vbs")
	scVirtblk(t, vb, "store", "create", "--store", storePath, "--size", "256M")
	scVirtblk(t, vb, "volume", "create", "--store", storePath, "--name", "crash", "--size", "64M")
	scVirtblk(t, vb, "volume", "create", "--store", storePath, "--name", "other", "--size", "64M")
	srv := scNewServer(t, storePath, "crash")
	sock := filepath.Join(dir, "crash.sock")

	rng := rand.New(rand.NewPCG(seed, 1))
	m := newSCModel(rng.Uint64()|1, scRegion)
	// A neighbour volume full of its own flushed data: the crash volume must
	// never read it, and it must come through every crash unchanged.
	other := newSCModel(m.tag+1, scRegion)
	scFill(t, srv.forVolume("other"), sock, other)
	var gen uint64
	totalLost := 0
	for cycle := 1; cycle <= cycles; cycle++ {
		d := srv.start(t, sock)
		dev := scDial(t, sock, scQueueDepth)
		mapped, newer, lost := scVerify(t, dev, m, cycle)
		totalLost += lost
		if cycle > 1 {
			t.Logf("cycle %d: after the restart %d blocks hold a write newer than their last flushed one; %d lost a completed, unflushed write", cycle-1, newer, lost)
			if lost > 0 {
				t.Fatalf("cycle %d: %d blocks lost a write the killed back-end had acknowledged: the intent log did not bring it back", cycle-1, lost)
			}
		}
		w := &scWriter{m: m, gen: &gen, busy: make([]bool, scRegion)}
		killAfter := time.Duration(100+rng.IntN(1400)) * time.Millisecond
		errs := make(chan error, 2)
		for i, q := range dev.Queues() {
			qrng := rand.New(rand.NewPCG(seed, uint64(cycle)<<8|uint64(i)))
			go func() { errs <- w.run(q, qrng) }()
		}
		select {
		case err := <-errs:
			t.Fatalf("cycle %d: writer stopped before the kill: %v\n%s", cycle, err, vuTail(d.logs(), 3000))
		case <-time.After(killAfter):
		}
		d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.done
		dev.Abort()
		for range 2 {
			if err := <-errs; err != nil {
				// A write or flush that completed with an error before the
				// kill is a failure; the kill itself only aborts.
				t.Fatalf("cycle %d: %v\n%s", cycle, err, vuTail(d.logs(), 3000))
			}
		}
		dev.Close()
		w.mu.Lock()
		t.Logf("cycle %d: %d blocks held data at start; SIGKILL after %v: %d writes submitted, %d completed, %d flushes submitted, %d completed",
			cycle, mapped, killAfter, w.stats.writes, w.stats.completed, w.stats.flushes, w.stats.flushed)
		w.mu.Unlock()
	}
	// One more restart to check the last cycle, then a clean stop and fsck.
	d := srv.start(t, sock)
	dev := scDial(t, sock, scQueueDepth)
	mapped, newer, lost := scVerify(t, dev, m, cycles+1)
	totalLost += lost
	t.Logf("cycle %d: after the restart %d blocks hold a write newer than their last flushed one; %d lost a completed, unflushed write", cycles, newer, lost)
	if totalLost > 0 {
		t.Fatalf("%d times a block lost an acknowledged write across a SIGKILL of the back-end", totalLost)
	}
	if err := dev.Close(); err != nil {
		t.Fatalf("close front-end: %v", err)
	}
	d.stop(t)
	t.Logf("after %d kills: %d of %d blocks hold data, all as the model allows; %d writes in total", cycles, mapped, scRegion, gen)
	if mapped == 0 {
		t.Fatal("no block survived any cycle: the writers did not get data to the disk")
	}
	d = srv.forVolume("other").start(t, sock)
	dev = scDial(t, sock, 1)
	if mapped, _, _ := scVerify(t, dev, other, cycles+2); mapped != scRegion {
		t.Fatalf("volume other: %d of %d blocks hold data after the crashes", mapped, scRegion)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	d.stop(t)
	out, err := exec.Command(vb, "fsck", "--store", storePath).CombinedOutput()
	if err != nil {
		t.Fatalf("virtblk fsck --store %s: %v\n%s", storePath, err, out)
	}
	t.Logf("fsck:\n%s", out)
}

const scGuestScript = `set -e
fail() { echo "SC-FAIL: $*"; exit 1; }
[ -b /dev/vda ] || fail "no /dev/vda"
[ "$(cat /sys/block/vda/size)" = 131072 ] || fail "size $(cat /sys/block/vda/size)"
# The pattern at 8 MiB, made durable: O_DIRECT writes, then fsync (FLUSH).
dd if=/hostpattern of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || fail "write pattern"
# More writes, back to back from one process so requests are in flight
# when the host, told by SC-WRITTEN, SIGKILLs and restarts the back-end.
dd if=/second of=/dev/vda bs=64k seek=512 oflag=direct 2>/dev/null &
ddpid=$!
echo SC-WRITTEN
wait $ddpid || fail "writes across the back-end restart"
sync
dd if=/dev/vda of=/tmp/r bs=1M skip=8 count=4 iflag=direct 2>/dev/null || fail "read pattern"
cmp /hostpattern /tmp/r || fail "flushed pattern differs after the back-end was killed"
dd if=/dev/vda of=/tmp/r2 bs=512k skip=64 count=16 iflag=direct 2>/dev/null || fail "read second"
# Some of these writes were acknowledged but not flushed when the back-end
# died; the guest kept running, so none may revert (the store's intent log).
cmp /second /tmp/r2 || fail "acknowledged, unflushed writes reverted after the back-end was killed"
if dmesg | grep -i "I/O error"; then fail "kernel logged I/O errors"; fi
echo SC-ALL-OK
`

// TestStoreCrashGuest runs the same promise through a real guest kernel
// once: the TCG guest writes a pattern to a store-backed vhost-user-blk disk
// and fsyncs it, the back-end is SIGKILLed and restarted under the guest's
// further O_DIRECT writes (QEMU reconnects), the guest reads back with
// O_DIRECT and the fsynced pattern must be intact; the host checks it again
// through a fresh back-end and runs fsck. The writes the guest saw complete
// across the kill, flushed or not, must all be there.
func TestStoreCrashGuest(t *testing.T) {
	vmtestRequireRoot(t)
	dir := vuTempDir(t)
	vb := testenv.Build(t, "./cmd/virtblk")
	storePath := filepath.Join(dir, "guest.vbs")
	scVirtblk(t, vb, "store", "create", "--store", storePath, "--size", "256M")
	scVirtblk(t, vb, "volume", "create", "--store", storePath, "--name", "vm", "--size", "64M")
	srv := scNewServer(t, storePath, "vm")
	sock := filepath.Join(dir, "vm.sock")
	d1 := srv.start(t, sock)

	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 2))
	pattern, second := make([]byte, 4<<20), make([]byte, 8<<20)
	for i := range pattern {
		pattern[i] = byte(rng.Uint32())
	}
	for i := range second {
		second[i] = byte(rng.Uint32())
	}
	vm := vmtestStart(t, sock, scGuestScript, map[string][]byte{"/hostpattern": pattern, "/second": second})
	if err := vm.WaitConsole("SC-WRITTEN", 5*time.Minute); err != nil {
		t.Fatalf("guest did not write its pattern: %v\n%s\n%s", err, vuTail(vm.Console(), 3000), vuTail(d1.logs(), 2000))
	}
	// Let the guest's dd get going, then kill mid-stream.
	time.Sleep(200 * time.Millisecond)
	d1.cmd.Process.Signal(syscall.SIGKILL)
	<-d1.done
	d2 := srv.start(t, sock)
	res := vm.Wait()
	if res.ExitCode != 0 || !strings.Contains(res.Console, "SC-ALL-OK") {
		t.Fatalf("guest exit %d after the back-end restart\nconsole:\n%s\nkilled back-end:\n%s\nrestarted back-end:\n%s",
			res.ExitCode, vuTail(res.Console, 4000), vuTail(d1.logs(), 2000), vuTail(d2.logs(), 3000))
	}
	if !strings.Contains(d2.logs(), "front-end connected") {
		t.Fatalf("QEMU never reconnected to the restarted back-end:\n%s", d2.logs())
	}
	d2.stop(t)
	t.Logf("restarted back-end resubmitted %d in-flight requests", strings.Count(d2.logs(), "resubmitting in-flight"))

	// The host's own look, through a fresh back-end and the Go front-end.
	d3 := srv.start(t, sock)
	dev := scDial(t, sock, 1)
	q := dev.Queues()[0]
	checks := []struct {
		off  int
		want []byte
	}{{8 << 20, pattern}, {32 << 20, second}}
	for _, r := range checks {
		for o := 0; o < len(r.want); o += scMaxBlocks * scBlock {
			if err := scSyncIO(q, frontend.TypeIn, uint64((r.off+o)/scSector), scMaxBlocks*scBlock); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(q.Buffer(0)[:scMaxBlocks*scBlock], r.want[o:o+scMaxBlocks*scBlock]) {
				t.Fatalf("host read of %d: differs from what the guest wrote", r.off+o)
			}
		}
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	d3.stop(t)
	out, err := exec.Command(vb, "fsck", "--store", storePath).CombinedOutput()
	if err != nil {
		t.Fatalf("virtblk fsck --store %s: %v\n%s", storePath, err, out)
	}
	t.Logf("guest data survived the SIGKILL; fsck: %s", strings.TrimSpace(string(out)))
}
