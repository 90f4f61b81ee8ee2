package serve

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/virtblk/virtblk/internal/unixsock"
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

// listen binds a vhost-user socket (see unixsock.Listen).
func listen(path string) (*net.UnixListener, error) {
	ln, err := unixsock.Listen(path)
	if errors.Is(err, unixsock.ErrInUse) {
		return nil, fmt.Errorf("%w; is a second sidecar running in this pod?", err)
	}
	return ln, err
}
