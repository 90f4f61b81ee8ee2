package main

import (
	"fmt"

	"github.com/virtblk/virtblk/blkio/bench"
)

// openRaw opens the io_uring ceiling on image.
func openRaw(image string, queues, depth, maxIO int) (bench.Target, func() error, error) {
	return nil, nil, fmt.Errorf("%s: %w", image, errNoRaw)
}
