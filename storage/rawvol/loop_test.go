//go:build linux

package rawvol

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// attachLoop binds img to a free loop device with direct I/O and returns
// the device path. Loop ioctls are used directly so the test needs no
// losetup binary.
func attachLoop(img string) (string, error) {
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open /dev/loop-control: %w", err)
	}
	defer unix.Close(ctl)
	backing, err := unix.Open(img, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(backing)
	// Another process may grab the same free device; try a few.
	for attempt := 0; attempt < 10; attempt++ {
		n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return "", fmt.Errorf("open %s: %w", dev, err)
		}
		cfg := unix.LoopConfig{Fd: uint32(backing), Size: 512}
		cfg.Info.Flags = unix.LO_FLAGS_DIRECT_IO
		err = unix.IoctlLoopConfigure(fd, &cfg)
		unix.Close(fd)
		if errors.Is(err, unix.EBUSY) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("LOOP_CONFIGURE %s: %w", dev, err)
		}
		return dev, nil
	}
	return "", errors.New("no free loop device after 10 attempts")
}

func detachLoop(dev string) {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	for i := 0; i < 100; i++ {
		if err := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); !errors.Is(err, unix.EBUSY) {
			return
		}
	}
}
