//go:build linux

package rawvol

import (
	"math/rand/v2"
	"os"
	"testing"

	"github.com/virtblk/virtblk/storage"
)

// BenchmarkRandRead4kQD32 is uring's BenchmarkRandRead4kQD32 through the
// Volume API (READV on a registered file, slot bookkeeping), to show what
// the volume layer costs over the raw ring.
func BenchmarkRandRead4kQD32(b *testing.B) {
	const qd, bs, fileSize = 32, 4096, 64 << 20
	path := imageFile(b, 0)
	data := make([]byte, fileSize)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		b.Fatal(err)
	}
	v := openVol(b, path, Options{})
	q := openQ(b, v, qd)
	arena := mem(b, qd*bs)
	rng := rand.New(rand.NewPCG(1, 2))
	blocks := uint64(fileSize / bs)
	req := func(i int) storage.Request {
		return storage.Request{Op: storage.OpRead, Offset: rng.Uint64N(blocks) * bs, Bufs: [][]byte{arena[i*bs : (i+1)*bs]}, Tag: uint64(i)}
	}
	out := make([]storage.Completion, qd)
	batch := make([]storage.Request, 0, qd)
	b.ResetTimer()
	inflight, issued := 0, 0
	for i := 0; i < qd && issued < b.N; i++ {
		batch = append(batch, req(i))
		issued++
	}
	for {
		if len(batch) > 0 {
			if err := q.Submit(batch); err != nil {
				b.Fatal(err)
			}
			inflight += len(batch)
			batch = batch[:0]
		}
		if inflight == 0 {
			break
		}
		n, err := q.Reap(out, 1)
		if err != nil {
			b.Fatal(err)
		}
		for _, c := range out[:n] {
			if c.Err != nil {
				b.Fatal(c.Err)
			}
			inflight--
			if issued < b.N {
				batch = append(batch, req(int(c.Tag)))
				issued++
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
}
