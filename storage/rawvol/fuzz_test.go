//go:build linux

package rawvol

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/storage"
)

// FuzzRequest feeds guest-controlled request fields (op, offset, length,
// segmentation, buffer alignment) to a real queue and checks every result
// against a byte-for-byte model of the volume: the right error class for
// bad requests, the right data for good ones, and never a panic or hang.
func FuzzRequest(f *testing.F) {
	f.Add(uint8(storage.OpWrite), uint64(0), uint32(4096), uint8(1), uint8(0), false, uint64(1))
	f.Add(uint8(storage.OpRead), uint64(512), uint32(1024), uint8(3), uint8(5), false, uint64(2))
	f.Add(uint8(storage.OpWrite), uint64(65536-512), uint32(1024), uint8(2), uint8(0), false, uint64(3))
	f.Add(uint8(storage.OpDiscard), uint64(4096), uint32(8192), uint8(0), uint8(0), false, uint64(4))
	f.Add(uint8(storage.OpWriteZeroes), uint64(1024), uint32(512), uint8(0), uint8(0), true, uint64(5))
	f.Add(uint8(storage.OpWriteZeroes), uint64(100), uint32(512), uint8(0), uint8(0), false, uint64(6))
	f.Add(uint8(storage.OpFlush), uint64(0), uint32(0), uint8(0), uint8(0), false, uint64(7))
	f.Add(uint8(0), ^uint64(0), ^uint32(0), uint8(255), uint8(255), true, uint64(8))
	f.Add(uint8(storage.OpRead), uint64(65536), uint32(0), uint8(1), uint8(0), false, uint64(9))

	const size = 64 << 10
	v := openVol(f, imageFile(f, size), Options{})
	q := openQ(f, v, 4)
	arena := mem(f, 256<<10)
	model := make([]byte, size)

	f.Fuzz(func(t *testing.T, op uint8, off uint64, length uint32, nseg uint8, shift uint8, unmap bool, seed uint64) {
		n := uint64(length) % (80 << 10) // up to a little past the volume
		req := storage.Request{Op: storage.Op(op % 7), Offset: off, Unmap: unmap, Tag: seed}
		var data []byte
		switch req.Op {
		case storage.OpRead, storage.OpWrite:
			start := int(shift) % 4096
			data = arena[start : start+int(n)]
			pattern(data, seed)
			segs := max(1, int(nseg)%8)
			step := max(1, len(data)/segs)
			for s := 0; s < len(data); s += step {
				req.Bufs = append(req.Bufs, data[s:min(len(data), s+step)])
			}
		default:
			req.Length = n
		}
		want := data
		if req.Op == storage.OpWrite {
			want = bytes.Clone(data)
		}
		err := do1(t, q, req)

		// The oracle.
		var expect error
		switch req.Op {
		case storage.OpRead, storage.OpWrite, storage.OpDiscard, storage.OpWriteZeroes:
			switch {
			case off%512 != 0 || n%512 != 0:
				expect = unix.EINVAL
			case off > size || n > size-off:
				expect = storage.ErrRange
			}
		case storage.OpFlush:
		default:
			expect = storage.ErrUnsupported
		}
		if expect == nil && err != nil || expect != nil && !errors.Is(err, expect) {
			t.Fatalf("%s off %d len %d: err %v, want %v", req.Op, off, n, err, expect)
		}
		if err != nil || n == 0 {
			return
		}
		switch req.Op {
		case storage.OpWrite:
			copy(model[off:], want)
		case storage.OpRead:
			if !bytes.Equal(data, model[off:off+n]) {
				t.Fatalf("read off %d len %d differs from the model", off, n)
			}
		case storage.OpDiscard, storage.OpWriteZeroes:
			clear(model[off : off+n])
		}
	})
}
