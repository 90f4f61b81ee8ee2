package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
)

// BlkDevice is what QEMU was told about one virtio-blk-pci device, decoded
// from its JSON -device argument (the only syntax that can carry
// iothread-vq-mapping, a list of objects).
type BlkDevice struct {
	ID        string
	NumQueues uint
	// IOThread is the single-IOThread property (libvirt's iothread='N').
	IOThread string
	// Mapping is iothread-vq-mapping as a set; nil when absent.
	Mapping VQMapping
}

// QEMUCommand is the part of a QEMU command line the proof checks.
type QEMUCommand struct {
	// IOThreads are the ids of -object iothread objects.
	IOThreads map[string]bool
	// Blk are the virtio-blk-pci devices by device id (libvirt uses the
	// disk alias, "ua-<disk>" for KubeVirt disks).
	Blk map[string]BlkDevice
}

// ParseCmdline decodes /proc/PID/cmdline of a libvirt-started QEMU (NUL
// separated arguments).
func ParseCmdline(raw []byte) (QEMUCommand, error) {
	args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
	return parseArgs(args)
}

// ParseLogCmdline decodes the command line libvirt writes to
// /var/log/libvirt/qemu/NAME.log before it execs QEMU: one shell-quoted
// line per option, "\"-continued. Only single quotes are used by libvirt's
// quoting; the last command line in the log wins (a log accumulates runs).
func ParseLogCmdline(log string) (QEMUCommand, error) {
	// The command line is the last run of lines ending in " \" plus the
	// one after it; find the last line that starts the binary.
	lines := strings.Split(log, "\n")
	start := -1
	for i, l := range lines {
		if strings.Contains(l, "qemu-system-") && strings.HasSuffix(l, "\\") {
			start = i
		}
	}
	if start < 0 {
		return QEMUCommand{}, fmt.Errorf("no QEMU command line in libvirt log")
	}
	var joined strings.Builder
	for i := start; i < len(lines); i++ {
		l := lines[i]
		cont := strings.HasSuffix(l, "\\")
		joined.WriteString(strings.TrimSuffix(l, "\\"))
		joined.WriteByte(' ')
		if !cont {
			break
		}
	}
	args, err := shellSplit(joined.String())
	if err != nil {
		return QEMUCommand{}, fmt.Errorf("libvirt log command line: %w", err)
	}
	return parseArgs(args)
}

// shellSplit splits POSIX-shell words with single quotes, double quotes and
// backslash escapes, which covers libvirt's virCommandToString output.
func shellSplit(s string) ([]string, error) {
	var out []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, fmt.Errorf("unterminated single quote at byte %d", i)
			}
			cur.WriteString(s[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case c == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) {
					i++
				}
				cur.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, fmt.Errorf("unterminated double quote")
			}
			inWord = true
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			inWord = true
		case c == ' ' || c == '\t' || c == '\n':
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out, nil
}

type deviceJSON struct {
	Driver    string          `json:"driver"`
	ID        string          `json:"id"`
	NumQueues *uint           `json:"num-queues"`
	IOThread  string          `json:"iothread"`
	Mapping   json.RawMessage `json:"iothread-vq-mapping"`
}

type vqEntry struct {
	IOThread string  `json:"iothread"`
	VQs      *[]uint `json:"vqs"`
}

func parseArgs(args []string) (QEMUCommand, error) {
	cmd := QEMUCommand{IOThreads: map[string]bool{}, Blk: map[string]BlkDevice{}}
	for i := 0; i+1 < len(args); i++ {
		opt, val := args[i], args[i+1]
		switch opt {
		case "-object":
			if id, ok := iothreadObject(val); ok {
				cmd.IOThreads[id] = true
			}
		case "-device":
			if !strings.HasPrefix(val, "{") {
				continue // legacy key=value devices carry no mapping
			}
			var dj deviceJSON
			if err := json.Unmarshal([]byte(val), &dj); err != nil {
				return QEMUCommand{}, fmt.Errorf("-device %.60s...: %w", val, err)
			}
			// KubeVirt's model="virtio-non-transitional" makes libvirt use
			// virtio-blk-pci-non-transitional; all variants share the
			// properties we check.
			if !strings.HasPrefix(dj.Driver, "virtio-blk-pci") {
				continue
			}
			dev := BlkDevice{ID: dj.ID, IOThread: dj.IOThread}
			if dj.NumQueues != nil {
				dev.NumQueues = *dj.NumQueues
			}
			if len(dj.Mapping) > 0 {
				m, err := parseVQMapping(dj.Mapping)
				if err != nil {
					return QEMUCommand{}, fmt.Errorf("device %s: %w", dj.ID, err)
				}
				dev.Mapping = m
			}
			if _, dup := cmd.Blk[dev.ID]; dup {
				return QEMUCommand{}, fmt.Errorf("two virtio-blk-pci devices with id %q", dev.ID)
			}
			cmd.Blk[dev.ID] = dev
		}
	}
	return cmd, nil
}

func iothreadObject(val string) (string, bool) {
	if strings.HasPrefix(val, "{") {
		var o struct {
			QOMType string `json:"qom-type"`
			ID      string `json:"id"`
		}
		if json.Unmarshal([]byte(val), &o) != nil || o.QOMType != "iothread" {
			return "", false
		}
		return o.ID, true
	}
	// Legacy form: iothread,id=iothread1
	parts := strings.Split(val, ",")
	if parts[0] != "iothread" {
		return "", false
	}
	for _, p := range parts[1:] {
		if id, ok := strings.CutPrefix(p, "id="); ok {
			return id, true
		}
	}
	return "", false
}

func parseVQMapping(raw json.RawMessage) (VQMapping, error) {
	var entries []vqEntry
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&entries); err != nil {
		return nil, fmt.Errorf("iothread-vq-mapping %s: %w", raw, err)
	}
	m := VQMapping{}
	for _, e := range entries {
		if e.IOThread == "" {
			return nil, fmt.Errorf("iothread-vq-mapping entry without iothread: %s", raw)
		}
		if _, dup := m[e.IOThread]; dup {
			return nil, fmt.Errorf("iothread-vq-mapping names %s twice", e.IOThread)
		}
		var qs []uint
		if e.VQs != nil {
			qs = append([]uint{}, *e.VQs...)
			sort.Slice(qs, func(i, j int) bool { return qs[i] < qs[j] })
		}
		m[e.IOThread] = qs
	}
	return m, nil
}

// Diff lists the differences between two mappings ("" when equal).
func (m VQMapping) Diff(other VQMapping) string {
	var diffs []string
	keys := map[string]bool{}
	for k := range m {
		keys[k] = true
	}
	for k := range other {
		keys[k] = true
	}
	sorted := make([]string, 0, len(keys))
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	for _, k := range sorted {
		a, inA := m[k]
		b, inB := other[k]
		switch {
		case !inA:
			diffs = append(diffs, fmt.Sprintf("%s: absent, other has %v", k, b))
		case !inB:
			diffs = append(diffs, fmt.Sprintf("%s: has %v, other absent", k, a))
		case fmt.Sprint(a) != fmt.Sprint(b):
			diffs = append(diffs, fmt.Sprintf("%s: %v vs %v", k, a, b))
		}
	}
	return strings.Join(diffs, "; ")
}
