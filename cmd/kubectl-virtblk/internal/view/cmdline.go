package view

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// ParseCmdline splits /proc/PID/cmdline (NUL-separated, NUL-terminated).
func ParseCmdline(raw []byte) ([]string, error) {
	s := strings.TrimRight(string(raw), "\x00")
	if strings.TrimSpace(s) == "" {
		return nil, errors.New("empty command line: the process has exited or is a zombie")
	}
	return strings.Split(s, "\x00"), nil
}

// RenderCmdline writes a command line one option per line, shell-quoted so
// it can be pasted. With match set, only the program and the options whose
// text contains match are printed (e.g. "iothread" to see the IOThread
// objects and the iothread-vq-mapping of the disks).
func RenderCmdline(w io.Writer, args []string, match string) error {
	if len(args) == 0 {
		return errors.New("no command line")
	}
	// Group each option with its value: "-device" "virtio-blk-pci,...".
	var lines [][]string
	for _, a := range args {
		if len(lines) == 0 || (strings.HasPrefix(a, "-") && len(a) > 1) {
			lines = append(lines, []string{a})
			continue
		}
		last := &lines[len(lines)-1]
		if len(*last) == 1 && strings.HasPrefix((*last)[0], "-") {
			*last = append(*last, a)
		} else {
			lines = append(lines, []string{a})
		}
	}
	var out []string
	for i, l := range lines {
		text := make([]string, len(l))
		for j, a := range l {
			text[j] = shellQuote(a)
		}
		joined := strings.Join(text, " ")
		if i > 0 && match != "" && !strings.Contains(strings.Join(l, " "), match) {
			continue
		}
		out = append(out, joined)
	}
	if match != "" && len(out) == 1 {
		return fmt.Errorf("no option of the QEMU command line contains %q", match)
	}
	_, err := io.WriteString(w, strings.Join(out, " \\\n    ")+"\n")
	return err
}

func shellQuote(s string) string {
	if s == "" {
		return "''"
	}
	if clean(s) != s {
		// Control characters: Go quoting keeps the terminal safe (no
		// longer pasteable, but such an argument never is).
		return strconv.Quote(s)
	}
	if strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=,:+@%", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
