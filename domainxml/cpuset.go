package domainxml

import (
	"fmt"
	"strconv"
	"strings"
)

// maxCPU bounds cpuset numbers. libvirt sizes its cpuset bitmaps with
// VIR_DOMAIN_CPUMASK_LEN (16384), so larger numbers cannot be valid.
const maxCPU = 16383

// ParseCPUSet parses a libvirt cpuset ("2-5", "0,2,4-6", "0-7,^3"): a comma
// list of N, N-M and ^N (exclude N). It returns the selected CPUs in
// ascending order and fails on syntax errors, reversed ranges, numbers above
// 16383 and sets that end up empty, because libvirt rejects all of those at
// define time and the VM would not start.
func ParseCPUSet(s string) ([]uint, error) {
	if s == "" {
		return nil, fmt.Errorf("cpuset %q: empty; use a list like \"2-5\" or \"0,2,4-6\"", s)
	}
	// A fixed bitmap, not a map: repeated wide ranges cost one pass over
	// 16384 bits each at worst, never a map insert per CPU.
	var set [maxCPU + 1]bool
	var excl []uint
	for _, item := range strings.Split(s, ",") {
		if item == "" {
			return nil, fmt.Errorf("cpuset %q: empty item; use a list like \"2-5\" or \"0,2,4-6\"", s)
		}
		if rest, ok := strings.CutPrefix(item, "^"); ok {
			n, err := parseCPU(s, rest)
			if err != nil {
				return nil, err
			}
			excl = append(excl, n)
			continue
		}
		lo, hi := item, item
		if a, b, ok := strings.Cut(item, "-"); ok {
			lo, hi = a, b
		}
		l, err := parseCPU(s, lo)
		if err != nil {
			return nil, err
		}
		h, err := parseCPU(s, hi)
		if err != nil {
			return nil, err
		}
		if l > h {
			return nil, fmt.Errorf("cpuset %q: range %q is reversed; write it low-high", s, item)
		}
		for c := l; c <= h; c++ {
			set[c] = true
		}
	}
	for _, c := range excl {
		set[c] = false
	}
	var out []uint
	for c, on := range set {
		if on {
			out = append(out, uint(c))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("cpuset %q selects no CPU", s)
	}
	return out, nil
}

func parseCPU(set, s string) (uint, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("cpuset %q: %q is not a CPU number; use a list like \"2-5\" or \"0,2,4-6\"", set, s)
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n > maxCPU {
		return 0, fmt.Errorf("cpuset %q: CPU %s is above the maximum %d", set, s, maxCPU)
	}
	return uint(n), nil
}
