package serve

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"
)

// Permissions for QEMU (uid/gid 107 in virt-launcher, all capabilities
// dropped) to reach the sockets: the socket directory and the sockets
// belong to QEMU's group with group rwx / rw. Only when the group cannot be
// set (a sidecar that is neither root nor in that group) do they fall back
// to world access, which stays inside the pod: the directory lives in the
// pod-private hook-sidecar-sockets emptyDir.
const (
	dirMode        os.FileMode = 0o770
	socketMode     os.FileMode = 0o660
	dirModeOpen    os.FileMode = 0o777
	socketModeOpen os.FileMode = 0o666
)

// grant gives QEMU's group access to path; gid < 0 skips the group and
// grants world access. It reports whether it had to fall back.
func grant(path string, gid int, mode, open os.FileMode) (fellBack bool, err error) {
	if gid >= 0 {
		if err := os.Lchown(path, -1, gid); err == nil {
			if err := os.Chmod(path, mode); err != nil {
				return false, fmt.Errorf("chmod %s: %w", path, err)
			}
			return false, nil
		} else if !errors.Is(err, os.ErrPermission) {
			return false, fmt.Errorf("chown %s to group %d: %w", path, gid, err)
		}
	}
	if err := os.Chmod(path, open); err != nil {
		return true, fmt.Errorf("chmod %s: %w", path, err)
	}
	return true, nil
}

// listen binds a unix socket at path. A socket file left by a sidecar
// that died is replaced; a socket that still answers is not stolen.
func listen(path string) (*net.UnixListener, error) {
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
		return nil, fmt.Errorf("listen on %s: another process serves this socket; is a second sidecar running in this pod?", path)
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
