//go:build linux

package uring

import (
	"math/rand/v2"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkRandRead4kQD32 is the raw ceiling for the storage stack: 4 KiB
// random O_DIRECT reads from one goroutine with 32 in flight, registered
// buffers and file, one io_uring_enter per batch. The file is written with
// real data first so reads hit the disk rather than unwritten extents.
func BenchmarkRandRead4kQD32(b *testing.B) {
	const qd, bs, fileSize = 32, 4096, 64 << 20
	f, _ := tempFile(b, unix.O_DIRECT)
	fd := int(f.Fd())
	chunk := mmapBuf(b, 1<<20)
	fill(chunk, 1)
	for off := int64(0); off < fileSize; off += int64(len(chunk)) {
		if _, err := unix.Pwrite(fd, chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := unix.Fdatasync(fd); err != nil {
		b.Fatal(err)
	}
	r := newRing(b, qd, Options{})
	slab, err := NewSlab(qd, bs)
	if err != nil {
		b.Fatal(err)
	}
	defer slab.Close()
	if err := r.RegisterBuffers([][]byte{slab.Region()}); err != nil {
		b.Fatal(err)
	}
	if err := r.RegisterFiles([]int{fd}); err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	blocks := uint64(fileSize / bs)
	submit := func(i int) {
		sqe := r.GetSQE()
		sqe.PrepReadFixed(0, slab.Buf(i)[:bs], rng.Uint64N(blocks)*bs, 0, uint64(i))
		sqe.SetFlags(SQEFixedFile)
	}
	cqes := make([]CQE, qd)
	b.ResetTimer()
	inflight, issued := 0, 0
	for i := 0; i < qd && issued < b.N; i++ {
		submit(i)
		inflight++
		issued++
	}
	for inflight > 0 {
		n, err := r.Wait(cqes, 1)
		if err != nil {
			b.Fatal(err)
		}
		for _, c := range cqes[:n] {
			if c.Res != bs {
				b.Fatalf("read res %d", c.Res)
			}
			inflight--
			if issued < b.N {
				submit(int(c.UserData))
				inflight++
				issued++
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
}

// BenchmarkNop measures the ring overhead alone: batches of 32 NOPs.
func BenchmarkNop(b *testing.B) {
	r := newRing(b, 32, Options{})
	cqes := make([]CQE, 32)
	for done := 0; done < b.N; {
		n := min(32, b.N-done)
		for i := 0; i < n; i++ {
			r.GetSQE().PrepNop(uint64(i))
		}
		got, err := r.Wait(cqes, n)
		if err != nil || got != n {
			b.Fatalf("Wait = %d, %v", got, err)
		}
		done += n
	}
}
