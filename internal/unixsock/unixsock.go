// Package unixsock owns binding the unix sockets virtblk serves on (hook
// sockets, vhost-user sockets): a socket file left behind by a process that
// died is replaced, one that still answers is never stolen.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"
)

// MaxPath is the longest socket path: sun_path minus its terminating NUL.
const MaxPath = 107

// CheckPath refuses a path too long for a unix socket, with the fix.
func CheckPath(path string) error {
	if len(path) > MaxPath {
		return fmt.Errorf("listen on %s: path is %d bytes, longer than the %d a unix socket allows; use a shorter directory", path, len(path), MaxPath)
	}
	return nil
}

// ErrInUse: another process answers on the socket. Callers wrap it with
// what to do about it in their context.
var ErrInUse = errors.New("another process is serving this socket")

// Listen binds a unix socket at path. A SIGKILLed server leaves its socket
// file behind, so a path that exists is probed: no answer means stale and
// it is replaced; an answer means ErrInUse; not a socket at all is refused.
func Listen(path string) (*net.UnixListener, error) {
	if err := CheckPath(path); err != nil {
		return nil, err
	}
	addr := &net.UnixAddr{Name: path, Net: "unix"}
	ln, err := net.ListenUnix("unix", addr)
	if err == nil {
		return ln, nil
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	fi, serr := os.Lstat(path)
	if serr != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("listen on %s: the path exists and is not a socket; remove it", path)
	}
	if c, derr := net.DialTimeout("unix", path, time.Second); derr == nil {
		c.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, ErrInUse)
	}
	if err := os.Remove(path); err != nil {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	ln, err = net.ListenUnix("unix", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return ln, nil
}
