package inflight

import (
	"slices"
	"testing"
)

func TestGetPutRecover(t *testing.T) {
	const n = 8
	region := make([]byte, RegionSize(2, n))
	q, err := Open(region, 2, 1, n)
	if err != nil {
		t.Fatal(err)
	}
	// Fetch 5, 2, 7, 0 in that order.
	for _, h := range []uint16{5, 2, 7, 0} {
		q.Get(h)
	}
	// Complete 2 and 7 cleanly: used.idx 0 -> 2.
	q.PrePut([]uint16{2, 7})
	q.PostPut([]uint16{2, 7}, 2)
	// Complete 0 and 5 but crash after publishing used.idx = 4 and before
	// PostPut.
	q.PrePut([]uint16{0, 5})

	// A new process opens the same region.
	q2, err := Open(region, 2, 1, n)
	if err != nil {
		t.Fatal(err)
	}
	if got := q2.Recover(4); len(got) != 0 {
		t.Fatalf("after interrupted batch, still in flight: %v", got)
	}
	// Crash before publishing: the ring still says 4, so 0 and 5 are resubmitted
	// in fetch order.
	q3, _ := Open(region, 2, 1, n)
	q3.Get(5)
	q3.Get(0)
	q3.PrePut([]uint16{5, 0})
	q4, _ := Open(region, 2, 1, n)
	if got := q4.Recover(4); !slices.Equal(got, []uint16{5, 0}) {
		t.Fatalf("resubmit order %v, want [5 0]", got)
	}
	// Queue 0 is untouched.
	q0, _ := Open(region, 2, 0, n)
	if got := q0.Recover(0); len(got) != 0 {
		t.Fatalf("queue 0 has %v", got)
	}
}

func TestOpenRejects(t *testing.T) {
	region := make([]byte, RegionSize(1, 16))
	if _, err := Open(region, 1, 0, 16); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(region, 1, 0, 8); err == nil {
		t.Error("queue size change accepted")
	}
	if _, err := Open(region[:10], 1, 0, 16); err == nil {
		t.Error("short region accepted")
	}
	if _, err := Open(region, 1, 1, 16); err == nil {
		t.Error("queue index out of range accepted")
	}
}

// Recovery must survive arbitrary region contents (the front-end hands the
// region back to us, so it is not fully trusted).
func FuzzRecover(f *testing.F) {
	f.Add(make([]byte, RegionSize(1, 8)), uint16(3))
	f.Fuzz(func(t *testing.T, b []byte, used uint16) {
		region := make([]byte, RegionSize(1, 8))
		copy(region, b)
		q, err := Open(region, 1, 0, 8)
		if err != nil {
			return
		}
		for _, h := range q.Recover(used) {
			if h >= 8 {
				t.Fatalf("head %d out of range", h)
			}
		}
	})
}
