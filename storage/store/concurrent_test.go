package store

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/virtblk/virtblk/storage"
)

type diskOpener func(path string) (DiskCloser, error)

var diskOpeners = map[string]diskOpener{
	"uring": func(p string) (DiskCloser, error) { return OpenUringDisk(p) },
	"file":  func(p string) (DiskCloser, error) { return OpenFileDisk(p) },
}

func openFileStore(t testing.TB, size uint64, open diskOpener) (*Store, DiskCloser, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "store")
	if err := CreateFile(path, size); err != nil {
		t.Fatal(err)
	}
	d, err := open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := Format(d, FormatOptions{JournalSlots: 32, SlotSize: 16384}, Options{}); err != nil {
		t.Fatal(err)
	}
	s, err := Open(d, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s, d, path
}

// TestConcurrentQueues drives one volume from several queues on real
// goroutines (run with -race): each queue owns a region it overwrites and
// checks, all queues also write one shared block, and snapshots are taken
// meanwhile. After reopening, everything flushed is there.
func TestConcurrentQueues(t *testing.T) {
	for name, open := range diskOpeners {
		t.Run(name, func(t *testing.T) { testConcurrentQueues(t, open) })
	}
}

func testConcurrentQueues(t *testing.T, open diskOpener) {
	s, d, path := openFileStore(t, 64<<20, open)
	const queues, perQueue, rounds = 4, 64, 12
	if err := s.CreateVolume("v", queues*perQueue*blockSize+blockSize); err != nil {
		t.Fatal(err)
	}
	bv, err := s.BlockVolume("v")
	if err != nil {
		t.Fatal(err)
	}
	want := make([][]byte, queues)
	var wg sync.WaitGroup
	errs := make(chan error, queues+1)
	for qi := range queues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- driveQueue(bv, qi, perQueue, rounds, &want[qi])
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 5 {
			if err := s.Snapshot("v", fmt.Sprintf("snap%d", i)); err != nil {
				errs <- err
				return
			}
		}
		errs <- nil
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := bv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	d.Close()
	d2, err := open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	s2, err := Open(d2, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	v, _ := s2.Volume("v")
	for qi := range queues {
		got := make([]byte, perQueue*blockSize)
		if err := waitIO(nil, func(done func(error)) { v.ReadAt(got, uint64(qi*perQueue*blockSize), done) }); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[qi]) {
			t.Fatalf("queue %d region differs after reopen", qi)
		}
	}
	rep, err := s2.Verify(nil)
	if err != nil || !rep.Clean() {
		t.Fatalf("verify: %v %+v", err, rep)
	}
	if len(s2.List()) != 6 {
		t.Fatalf("list: %+v", s2.List())
	}
}

func driveQueue(bv *BlockVolume, qi, perQueue, rounds int, final *[]byte) error {
	q, err := bv.OpenQueue(8)
	if err != nil {
		return err
	}
	defer q.Close()
	region := make([]byte, perQueue*blockSize)
	base := uint64(qi * perQueue * blockSize)
	out := make([]storage.Completion, 8)
	for r := range rounds {
		// Write the region with mixed sizes: whole blocks and sectors.
		var reqs []storage.Request
		for b := 0; b < perQueue; b++ {
			off := b * blockSize
			n := blockSize
			if (b+r)%3 == 0 {
				off += 512 * ((b + r) % 7)
				n = 512
			}
			buf := make([]byte, n)
			for i := 0; i < n; i += 8 {
				binary.LittleEndian.PutUint64(buf[i:], uint64(qi<<40|r<<20|b<<8|i))
			}
			copy(region[off:], buf)
			reqs = append(reqs, storage.Request{Op: storage.OpWrite, Offset: base + uint64(off), Bufs: [][]byte{buf}, Tag: uint64(b)})
		}
		// Everyone also hammers the shared last block.
		shared := make([]byte, 512)
		reqs = append(reqs, storage.Request{Op: storage.OpWrite, Offset: bv.Size() - blockSize + uint64(qi*512), Bufs: [][]byte{shared}, Tag: 999})
		if r%4 == 3 {
			reqs = append(reqs, storage.Request{Op: storage.OpWriteZeroes, Offset: base, Length: 2 * blockSize, Unmap: true, Tag: 1000})
			clear(region[:2*blockSize])
		}
		if err := runReqs(q, reqs, out); err != nil {
			return err
		}
		if err := runReqs(q, []storage.Request{{Op: storage.OpFlush, Tag: 7}}, out); err != nil {
			return err
		}
		got := make([]byte, len(region))
		if err := runReqs(q, []storage.Request{{Op: storage.OpRead, Offset: base, Bufs: [][]byte{got[:blockSize], got[blockSize:]}}}, out); err != nil {
			return err
		}
		if !bytes.Equal(got, region) {
			return fmt.Errorf("queue %d round %d: read back differs", qi, r)
		}
	}
	*final = region
	return nil
}

// runReqs submits reqs with at most len(out) in flight and waits for all.
func runReqs(q storage.Queue, reqs []storage.Request, out []storage.Completion) error {
	flight := 0
	for len(reqs) > 0 || flight > 0 {
		n := min(len(out)-flight, len(reqs))
		if n > 0 {
			if err := q.Submit(reqs[:n]); err != nil {
				return err
			}
			reqs = reqs[n:]
			flight += n
		}
		got, err := q.Reap(out, 1)
		if err != nil {
			return err
		}
		for _, c := range out[:got] {
			if c.Err != nil {
				return fmt.Errorf("request %d: %w", c.Tag, c.Err)
			}
		}
		flight -= got
	}
	return nil
}
