package config

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/virtblk/virtblk/domainxml"
)

// Annotation keys, all under Prefix.
const (
	KeyIOThreads      = Prefix + "iothreads"
	KeyDisks          = Prefix + "disks"
	KeyQueues         = Prefix + "queues"
	KeyIOThreadCPUSet = Prefix + "iothread-cpuset"
	KeyIOThreadPoll   = Prefix + "iothread-poll"
	// KeyQueueMapPrefix is followed by a VMI disk name.
	KeyQueueMapPrefix = Prefix + "queue-map."
)

// settings holds the annotation values after each one was parsed on its
// own; cross-checks against each other and the VMI happen afterwards.
type settings struct {
	poolSize  *setting[int]
	disks     *setting[[]string]
	queues    *setting[int]
	cpuset    *setting[string]
	poll      *setting[domainxml.Polling]
	queueMaps map[string]queueMapSetting

	serve       *setting[[]serveEntry]
	store       *setting[string]
	metricsPort *setting[int]
}

// setting is one parsed value with the raw annotation it came from, so later
// checks can still name it in their errors.
type setting[T any] struct {
	key, raw string
	v        T
}

type queueMapSetting struct {
	key, raw string
	// threads are the 1-based pool IOThread numbers, one per queue.
	threads []int
}

// keySpec is one known annotation. Adding an annotation is one entry here
// plus, if it must be checked against others, a step in the build phase.
type keySpec struct {
	// key is the full key, or a prefix followed by a disk name when perDisk.
	key     string
	perDisk bool
	// example is a valid value, quoted in fixes and the unknown-key error.
	example string
	// parse checks the value on its own and stores it in s. suffix is the
	// part after key for perDisk keys.
	parse func(s *settings, key, suffix, raw string) *Error
}

var knownKeys = []keySpec{
	{key: KeyIOThreads, example: "4", parse: parseIOThreads},
	{key: KeyDisks, example: "data,scratch", parse: parseDisks},
	{key: KeyQueues, example: "8", parse: parseQueues},
	{key: KeyIOThreadCPUSet, example: "2-5", parse: parseCPUSet},
	{key: KeyIOThreadPoll, example: "max=32768,grow=2,shrink=2", parse: parsePoll},
	{key: KeyQueueMapPrefix, perDisk: true, example: "1,1,2,2", parse: parseQueueMap},
	{key: KeyServe, example: "data:10Gi,logs:2Gi", parse: parseServe},
	{key: KeyStore, example: "/var/lib/virtblk/store.vbs", parse: parseStore},
	{key: KeyMetricsPort, example: "9090", parse: parseMetricsPort},
}

func lookupKey(key string) (keySpec, string, bool) {
	for _, k := range knownKeys {
		if k.perDisk {
			if suffix, ok := strings.CutPrefix(key, k.key); ok {
				return k, suffix, true
			}
			continue
		}
		if key == k.key {
			return k, "", true
		}
	}
	return keySpec{}, "", false
}

func knownKeyList() string {
	names := make([]string, 0, len(knownKeys))
	for _, k := range knownKeys {
		if k.perDisk {
			names = append(names, k.key+"<disk>")
		} else {
			names = append(names, k.key)
		}
	}
	return strings.Join(names, ", ")
}

func parseIOThreads(s *settings, key, _, raw string) *Error {
	n, e := parseCount(key, raw, MaxIOThreads, "the number of IOThreads in virtblk's pool")
	if e != nil {
		return e
	}
	s.poolSize = &setting[int]{key: key, raw: raw, v: n}
	return nil
}

func parseQueues(s *settings, key, _, raw string) *Error {
	n, e := parseCount(key, raw, MaxQueues, "the number of virtqueues per mapped disk, or remove it to use one per vCPU")
	if e != nil {
		return e
	}
	s.queues = &setting[int]{key: key, raw: raw, v: n}
	return nil
}

// parseCount reads a whole number in [1, max]. Only plain decimal digits are
// accepted: "+4", "4.0" and "0x4" are more likely typos than intent.
func parseCount(key, raw string, max int, what string) (int, *Error) {
	fix := fmt.Sprintf("set it to a whole number from 1 to %d: %s", max, what)
	v := strings.TrimSpace(raw)
	if v == "" {
		return 0, &Error{key, raw, "value is empty", fix}
	}
	n, ok := parseDecimal(v)
	if !ok {
		return 0, &Error{key, raw, "not a whole number", fix}
	}
	if n == 0 {
		return 0, &Error{key, raw, "must be at least 1", fix}
	}
	if n > max {
		return 0, &Error{key, raw, fmt.Sprintf("%d is more than the limit of %d", n, max), fix}
	}
	return n, nil
}

// parseDecimal parses plain ASCII digits, saturating instead of overflowing.
func parseDecimal(v string) (int, bool) {
	if v == "" {
		return 0, false
	}
	n := 0
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		if n < 1<<40 {
			n = n*10 + int(c-'0')
		}
	}
	return n, true
}

func parseDisks(s *settings, key, _, raw string) *Error {
	fix := "list VMI disk names (spec.domain.devices.disks[].name) separated by commas, e.g. \"data,scratch\", or remove it to map every virtio disk"
	var names []string
	seen := map[string]bool{}
	for _, part := range strings.Split(raw, ",") {
		name := strings.TrimSpace(part)
		if name == "" {
			return &Error{key, raw, "empty disk name in the list", fix}
		}
		if seen[name] {
			return &Error{key, raw, fmt.Sprintf("disk %q is listed twice", name), fix}
		}
		seen[name] = true
		names = append(names, name)
	}
	s.disks = &setting[[]string]{key: key, raw: raw, v: names}
	return nil
}

// maxCPUSetLen bounds a cpuset annotation. Real ones are short; the bound
// keeps a pathological one ("0-16383," repeated) from costing seconds of
// CPU in every define call.
const maxCPUSetLen = 1024

func parseCPUSet(s *settings, key, _, raw string) *Error {
	v := strings.TrimSpace(raw)
	if len(v) > maxCPUSetLen {
		return &Error{key, raw, fmt.Sprintf("%d characters is more than the limit of %d", len(v), maxCPUSetLen),
			"use ranges (\"0-63\") instead of long lists of single CPUs"}
	}
	// domainxml owns the cpuset grammar, so what passes here is exactly what
	// the rewrite accepts.
	if _, err := domainxml.ParseCPUSet(v); err != nil {
		return &Error{key, raw, err.Error(),
			"use libvirt cpuset syntax without spaces: host CPU numbers and ranges separated by commas, \"^N\" to exclude, e.g. \"2-5\" or \"0,2,4-7,^6\""}
	}
	s.cpuset = &setting[string]{key: key, raw: raw, v: v}
	return nil
}

func parsePoll(s *settings, key, _, raw string) *Error {
	fix := "give max=<ns> and optionally grow=<factor>, shrink=<divisor> (0 or omitted: QEMU's default) separated by commas, e.g. \"max=32768,grow=2,shrink=2\""
	var p domainxml.Polling
	seen := map[string]bool{}
	for _, part := range strings.Split(raw, ",") {
		part = strings.TrimSpace(part)
		name, val, ok := strings.Cut(part, "=")
		name, val = strings.TrimSpace(name), strings.TrimSpace(val)
		if !ok || name == "" {
			return &Error{key, raw, fmt.Sprintf("%q is not name=value", part), fix}
		}
		if seen[name] {
			return &Error{key, raw, fmt.Sprintf("%s is given twice", name), fix}
		}
		seen[name] = true
		n, err := strconv.ParseUint(val, 10, 32)
		if err != nil {
			return &Error{key, raw, fmt.Sprintf("%s=%q is not a whole number below 2^32", name, val), fix}
		}
		switch name {
		case "max":
			p.MaxNS = uint(n)
		case "grow":
			p.Grow = uint(n)
		case "shrink":
			p.Shrink = uint(n)
		default:
			return &Error{key, raw, fmt.Sprintf("unknown setting %q", name), fix}
		}
	}
	// Polling without max would write poll max 0, which switches polling
	// off: surely not what someone tuning grow or shrink meant.
	if !seen["max"] {
		return &Error{key, raw, "max is missing (without it polling would be switched off)", fix + "; use max=0 to switch polling off"}
	}
	s.poll = &setting[domainxml.Polling]{key: key, raw: raw, v: p}
	return nil
}

func parseQueueMap(s *settings, key, disk, raw string) *Error {
	fix := "list, for each virtqueue in order, the pool IOThread (1 to virtblk.io/iothreads) that serves it, separated by commas, e.g. \"1,1,2,2\""
	if disk == "" {
		return &Error{key, raw, "no disk name after " + KeyQueueMapPrefix,
			"name the annotation " + KeyQueueMapPrefix + "<VMI disk name>, e.g. " + KeyQueueMapPrefix + "data"}
	}
	parts := strings.Split(raw, ",")
	if len(parts) > MaxQueues {
		return &Error{key, raw, fmt.Sprintf("%d entries is more than the limit of %d queues", len(parts), MaxQueues), fix}
	}
	threads := make([]int, 0, len(parts))
	for i, part := range parts {
		part = strings.TrimSpace(part)
		n, ok := parseDecimal(part)
		if !ok {
			return &Error{key, raw, fmt.Sprintf("entry %d (%q) is not a whole number", i+1, part), fix}
		}
		if n == 0 {
			return &Error{key, raw, fmt.Sprintf("entry %d is 0, but pool IOThreads are numbered from 1", i+1), fix}
		}
		threads = append(threads, n)
	}
	s.queueMaps[disk] = queueMapSetting{key: key, raw: raw, threads: threads}
	return nil
}

// readAnnotations parses every virtblk.io/ annotation on its own, in key
// order so that the collected errors are deterministic.
func (p *parser) readAnnotations() {
	keys := make([]string, 0, len(p.vmi.Annotations))
	for k := range p.vmi.Annotations {
		if strings.HasPrefix(k, Prefix) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, key := range keys {
		raw := p.vmi.Annotations[key]
		spec, suffix, ok := lookupKey(key)
		if !ok {
			p.errs = append(p.errs, &Error{key, raw, "unknown virtblk annotation",
				"remove it or correct the spelling; known keys: " + knownKeyList()})
			continue
		}
		if e := spec.parse(&p.s, key, suffix, raw); e != nil {
			p.errs = append(p.errs, e)
		}
	}
}
