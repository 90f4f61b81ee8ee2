package store

import (
	"math/rand/v2"

	"github.com/virtblk/virtblk/storage"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// fillTree maps n blocks of t (physical block = logical block + 1).
func fillTree(t *tree, n uint32) {
	for lb := range n {
		slot := t.leafSlot(leafIndex(lb), true)
		l := slot.Load()
		if l == nil {
			l = new(leaf)
			l.refs.Store(1)
			slot.Store(l)
		}
		l.e[lb%leafEntries].Store(makeEntry(lb+1, lb))
	}
}

// BenchmarkLookupParallel measures block-map lookups from concurrent readers
// (lock-free atomic loads) at random places in a million mapped blocks.
func BenchmarkLookupParallel(b *testing.B) { benchLookup(b, false) }

// BenchmarkLookupParallelWriter is the same while a writer replaces an
// entry every microsecond.
func BenchmarkLookupParallelWriter(b *testing.B) { benchLookup(b, true) }

func benchLookup(b *testing.B, writer bool) {
	const n = 1 << 20
	t := new(tree)
	fillTree(t, n)
	var stop atomic.Bool
	if writer {
		go func() {
			r := rand.New(rand.NewPCG(1, 2))
			for !stop.Load() {
				lb := r.Uint32N(n)
				t.leafSlot(leafIndex(lb), false).Load().e[lb%leafEntries].Store(makeEntry(lb+2, lb))
				time.Sleep(time.Microsecond)
			}
		}()
	}
	defer stop.Store(true)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(rand.Uint64(), 3))
		var sink uint64
		for pb.Next() {
			sink += t.lookup(r.Uint32N(n))
		}
		_ = sink
	})
}

// buildMillion formats a sparse file store and maps a million blocks of
// one volume through the normal install path (stripes, journal records),
// then syncs. The data blocks are never written: Open does not read data.
func buildMillion(tb testing.TB, extraRecords int) (string, time.Duration) {
	tb.Helper()
	const blocks = 1 << 20
	path := filepath.Join(tb.TempDir(), "big.store")
	if err := CreateFile(path, (blocks+blocks/8)*blockSize+512<<20); err != nil {
		tb.Fatal(err)
	}
	d, err := OpenUringDisk(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer d.Close()
	if err := Format(d, FormatOptions{}, Options{}); err != nil {
		tb.Fatal(err)
	}
	s, err := Open(d, Options{CommitRecords: 1 << 30})
	if err != nil {
		tb.Fatal(err)
	}
	if err := s.CreateVolume("big", blocks*blockSize); err != nil {
		tb.Fatal(err)
	}
	v := s.table().byName["big"]
	install := func(lb uint32) {
		p, err := s.alloc()
		if err != nil {
			tb.Fatal(err)
		}
		st := v.stripeOf(lb)
		st.mu.Lock()
		e := makeEntry(p, lb)
		if _, err := s.setEntry(v.t, lb, e, &st.frees); err != nil {
			tb.Fatal(err)
		}
		st.recs = append(st.recs, record{kind: recSet, vol: v.id, lblock: lb, entry: e})
		s.pending.Add(1)
		st.mu.Unlock()
	}
	for lb := range uint32(blocks) {
		install(lb)
		if lb%(1<<16) == 0 {
			s.Tick()
		}
	}
	if err := s.Sync(); err != nil {
		tb.Fatal(err)
	}
	// Force checkpoints so most state is in the checkpoint, then leave
	// extraRecords journaled after it for Open to replay.
	for range 2 {
		s.c.forceCkpt.Store(true)
		install(0)
		if err := s.Sync(); err != nil {
			tb.Fatal(err)
		}
	}
	for i := range extraRecords {
		install(uint32(i))
	}
	if err := s.Sync(); err != nil {
		tb.Fatal(err)
	}
	s.abandon() // crash: no sync
	start := time.Now()
	s2, err := Open(d, Options{})
	if err != nil {
		tb.Fatal(err)
	}
	if got := s2.List()[0].MappedBlocks; got != blocks {
		tb.Fatalf("reopened store maps %d blocks, want %d", got, blocks)
	}
	if s2.c.sb.Current.Seq == 0 || s2.c.nextSeq-1 == s2.c.sb.Current.Seq {
		tb.Fatalf("want a checkpoint and a journal tail: checkpoint %d, journal %d", s2.c.sb.Current.Seq, s2.c.nextSeq-1)
	}
	s2.abandon()
	return path, time.Since(start)
}

// BenchmarkRecoverMillion measures Open after a crash of a store with a
// million mapped blocks: superblock quorum, checkpoint load and checksum,
// replay of 100k journaled records, reference counts and free map.
func BenchmarkRecoverMillion(b *testing.B) {
	if testing.Short() {
		b.Skip("builds a 4.5 GiB sparse store")
	}
	path, _ := buildMillion(b, 100_000)
	b.ResetTimer()
	for range b.N {
		d, err := OpenUringDisk(path)
		if err != nil {
			b.Fatal(err)
		}
		s, err := Open(d, Options{Pump: nil})
		if err != nil {
			b.Fatal(err)
		}
		s.abandon()
		d.Close()
	}
}

// benchVolumeIO drives one queue at depth 32 with 4 KiB random requests on
// an io_uring disk: the store's own overhead (copy, checksum, map install,
// allocation) on top of the raw device.
func benchVolumeIO(b *testing.B, op storage.Op) {
	s, d, _ := openFileStore(b, 512<<20, diskOpeners["uring"])
	defer d.Close()
	const blocks = 16384
	if err := s.CreateVolume("v", blocks*blockSize); err != nil {
		b.Fatal(err)
	}
	bv, _ := s.BlockVolume("v")
	q, err := bv.OpenQueue(32)
	if err != nil {
		b.Fatal(err)
	}
	out := make([]storage.Completion, 32)
	bufs := make([][]byte, 32)
	for i := range bufs {
		bufs[i] = alignedBuf(blockSize)
	}
	// Map every block first so reads hit data.
	for i := 0; i < blocks; i += 32 {
		reqs := make([]storage.Request, 32)
		for j := range reqs {
			reqs[j] = storage.Request{Op: storage.OpWrite, Offset: uint64(i+j) * blockSize, Bufs: [][]byte{bufs[j]}}
		}
		if err := runReqs(q, reqs, out); err != nil {
			b.Fatal(err)
		}
	}
	r := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(blockSize)
	b.ResetTimer()
	reqs := make([]storage.Request, 0, b.N)
	for i := range b.N {
		reqs = append(reqs, storage.Request{Op: op, Offset: uint64(r.IntN(blocks)) * blockSize, Bufs: [][]byte{bufs[i%32]}, Tag: uint64(i)})
	}
	if err := runReqs(q, reqs, out); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	q.Close()
	s.Close()
}

func BenchmarkVolumeRandRead4k(b *testing.B)  { benchVolumeIO(b, storage.OpRead) }
func BenchmarkVolumeRandWrite4k(b *testing.B) { benchVolumeIO(b, storage.OpWrite) }
