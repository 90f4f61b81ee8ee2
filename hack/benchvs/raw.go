package main

import (
	"log/slog"

	"github.com/virtblk/virtblk/blkio/bench"
	"github.com/virtblk/virtblk/storage/rawvol"
)

// openRaw opens the io_uring ceiling on image: storage/rawvol (O_DIRECT, one
// io_uring per queue) driven by the same job engine, no device in between.
func openRaw(image string, queues, depth, maxIO int) (bench.Target, func() error, error) {
	vol, err := rawvol.Open(image, rawvol.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return nil, nil, err
	}
	t, err := bench.NewVolume(vol, queues, depth, maxIO)
	if err != nil {
		vol.Close()
		return nil, nil, err
	}
	return t, func() error {
		err := t.Close()
		if cerr := vol.Close(); err == nil {
			err = cerr
		}
		return err
	}, nil
}
