package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
)

// VhostUserBlk is what QEMU was told about one vhost-user-blk disk: the
// device, the chardev it talks through, and the socket that chardev dials.
type VhostUserBlk struct {
	ID        string
	Chardev   string
	NumQueues uint
	QueueSize uint
	// Socket is the chardev's unix socket path; empty if no -chardev with
	// the device's chardev id was found.
	Socket string
}

// SharedMemory is a memory backend on QEMU's command line.
type SharedMemory struct {
	ID    string
	Type  string // qom-type, e.g. memory-backend-memfd
	Share bool
}

// VhostUserCommand is the part of a QEMU command line that a vhost-user
// disk depends on.
type VhostUserCommand struct {
	Disks    map[string]VhostUserBlk // by device id (the disk alias)
	Backends []SharedMemory
}

// ParseVhostUserArgs reads vhost-user-blk devices (JSON -device, as libvirt
// writes them), their -chardev (JSON or key=value) and memory-backend
// -objects from a QEMU argv.
func ParseVhostUserArgs(args []string) (VhostUserCommand, error) {
	cmd := VhostUserCommand{Disks: map[string]VhostUserBlk{}}
	chardevs := map[string]string{}
	for i := 0; i+1 < len(args); i++ {
		opt, val := args[i], args[i+1]
		switch opt {
		case "-chardev":
			id, path, err := chardevSocket(val)
			if err != nil {
				return VhostUserCommand{}, err
			}
			if id != "" {
				chardevs[id] = path
			}
		case "-object":
			if !strings.HasPrefix(val, "{") {
				continue
			}
			var o struct {
				QOMType string `json:"qom-type"`
				ID      string `json:"id"`
				Share   *bool  `json:"share"`
			}
			if err := json.Unmarshal([]byte(val), &o); err != nil {
				return VhostUserCommand{}, fmt.Errorf("-object %.60s...: %w", val, err)
			}
			if strings.HasPrefix(o.QOMType, "memory-backend-") {
				cmd.Backends = append(cmd.Backends, SharedMemory{ID: o.ID, Type: o.QOMType, Share: o.Share != nil && *o.Share})
			}
		case "-device":
			if !strings.HasPrefix(val, "{") {
				continue
			}
			var d struct {
				Driver    string `json:"driver"`
				ID        string `json:"id"`
				Chardev   string `json:"chardev"`
				NumQueues *uint  `json:"num-queues"`
				QueueSize *uint  `json:"queue-size"`
			}
			if err := json.Unmarshal([]byte(val), &d); err != nil {
				return VhostUserCommand{}, fmt.Errorf("-device %.60s...: %w", val, err)
			}
			if !strings.HasPrefix(d.Driver, "vhost-user-blk") {
				continue
			}
			if _, dup := cmd.Disks[d.ID]; dup {
				return VhostUserCommand{}, fmt.Errorf("two vhost-user-blk devices with id %q", d.ID)
			}
			b := VhostUserBlk{ID: d.ID, Chardev: d.Chardev}
			if d.NumQueues != nil {
				b.NumQueues = *d.NumQueues
			}
			if d.QueueSize != nil {
				b.QueueSize = *d.QueueSize
			}
			cmd.Disks[d.ID] = b
		}
	}
	// -chardev may come before or after its -device.
	for id, b := range cmd.Disks {
		b.Socket = chardevs[b.Chardev]
		cmd.Disks[id] = b
	}
	return cmd, nil
}

// chardevSocket returns a socket chardev's id and unix path; other chardev
// backends return an empty path.
func chardevSocket(val string) (id, path string, err error) {
	if strings.HasPrefix(val, "{") {
		var c struct {
			ID      string `json:"id"`
			Backend struct {
				Type string `json:"type"`
				Data struct {
					Addr struct {
						Type string `json:"type"`
						Path string `json:"path"`
					} `json:"addr"`
				} `json:"data"`
			} `json:"backend"`
		}
		if err := json.Unmarshal([]byte(val), &c); err != nil {
			return "", "", fmt.Errorf("-chardev %.60s...: %w", val, err)
		}
		return c.ID, c.Backend.Data.Addr.Path, nil
	}
	// Legacy form: socket,id=chr-vu-ua-datadisk,path=/tmp/x.sock,reconnect-ms=1000
	// (QEMU doubles commas inside values; none of our paths have them).
	parts := strings.Split(val, ",")
	for _, p := range parts[1:] {
		if v, ok := strings.CutPrefix(p, "id="); ok {
			id = v
		}
		if v, ok := strings.CutPrefix(p, "path="); ok && parts[0] == "socket" {
			path = v
		}
	}
	return id, path, nil
}

// logArgs is QEMU's argv from the last command line libvirt logged in
// /var/log/libvirt/qemu/NAME.log (see ParseLogCmdline for the format).
func logArgs(log string) ([]string, error) {
	lines := strings.Split(log, "\n")
	start := -1
	for i, l := range lines {
		if strings.Contains(l, "qemu-system-") && strings.HasSuffix(l, "\\") {
			start = i
		}
	}
	if start < 0 {
		return nil, fmt.Errorf("no QEMU command line in libvirt log")
	}
	var joined strings.Builder
	for _, l := range lines[start:] {
		joined.WriteString(strings.TrimSuffix(l, "\\"))
		joined.WriteByte(' ')
		if !strings.HasSuffix(l, "\\") {
			break
		}
	}
	return shellSplit(joined.String())
}
