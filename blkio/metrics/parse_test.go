package metrics

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// A strict reader of the text exposition format, for checking WriteText's
// output. It accepts a subset of the format (what we emit) and rejects
// anything doubtful: comments other than HELP/TYPE, blank lines,
// timestamps, samples before their TYPE, families split in two, duplicate
// series, non-monotonic or incomplete histograms.

type sample struct {
	name   string
	labels map[string]string
	value  float64
}

type family struct {
	name, typ, help string
	samples         []sample
}

type exposition struct {
	families map[string]*family
	order    []string
}

// find returns the value of the sample with exactly these labels.
func (x *exposition) find(name string, labels ...string) (float64, bool) {
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for _, f := range x.families {
		for _, s := range f.samples {
			if s.name != name || len(s.labels) != len(want) {
				continue
			}
			ok := true
			for k, v := range want {
				if s.labels[k] != v {
					ok = false
					break
				}
			}
			if ok {
				return s.value, true
			}
		}
	}
	return 0, false
}

func validMetricName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		if c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9' {
			continue
		}
		return false
	}
	return true
}

func validLabelName(s string) bool {
	return validMetricName(s) && !strings.Contains(s, ":") && !strings.HasPrefix(s, "__")
}

func parseExposition(text string) (*exposition, error) {
	x := &exposition{families: map[string]*family{}}
	if text == "" {
		return x, nil
	}
	if !utf8.ValidString(text) {
		return nil, fmt.Errorf("output is not valid UTF-8")
	}
	if !strings.HasSuffix(text, "\n") {
		return nil, fmt.Errorf("output does not end with a newline")
	}
	series := map[string]bool{}
	var cur *family
	closed := map[string]bool{} // families whose block has ended
	open := func(name string) (*family, error) {
		if cur != nil && cur.name == name {
			return cur, nil
		}
		if closed[name] {
			return nil, fmt.Errorf("family %s appears in two separate blocks", name)
		}
		if cur != nil {
			closed[cur.name] = true
		}
		if x.families[name] == nil {
			x.families[name] = &family{name: name}
			x.order = append(x.order, name)
		}
		cur = x.families[name]
		return cur, nil
	}
	for n, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		ln := n + 1
		switch {
		case line == "":
			return nil, fmt.Errorf("line %d: blank line", ln)
		case strings.HasPrefix(line, "# HELP "):
			name, help, ok := strings.Cut(line[len("# HELP "):], " ")
			if !ok || !validMetricName(name) || help == "" {
				return nil, fmt.Errorf("line %d: bad HELP: %q", ln, line)
			}
			f, err := open(name)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", ln, err)
			}
			if f.help != "" || f.typ != "" || len(f.samples) > 0 {
				return nil, fmt.Errorf("line %d: HELP for %s after its HELP, TYPE or samples", ln, name)
			}
			f.help = help
		case strings.HasPrefix(line, "# TYPE "):
			name, typ, ok := strings.Cut(line[len("# TYPE "):], " ")
			if !ok || !validMetricName(name) {
				return nil, fmt.Errorf("line %d: bad TYPE: %q", ln, line)
			}
			switch typ {
			case "counter", "gauge", "histogram":
			default:
				return nil, fmt.Errorf("line %d: unexpected type %q", ln, typ)
			}
			f, err := open(name)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", ln, err)
			}
			if f.typ != "" || len(f.samples) > 0 {
				return nil, fmt.Errorf("line %d: second TYPE or TYPE after samples for %s", ln, name)
			}
			if f.help == "" {
				return nil, fmt.Errorf("line %d: TYPE for %s without HELP", ln, name)
			}
			f.typ = typ
		case strings.HasPrefix(line, "#"):
			return nil, fmt.Errorf("line %d: unexpected comment %q", ln, line)
		default:
			s, err := parseSample(line)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", ln, err)
			}
			if cur == nil || cur.typ == "" {
				return nil, fmt.Errorf("line %d: sample %s before any TYPE", ln, s.name)
			}
			if !belongs(cur, s.name) {
				return nil, fmt.Errorf("line %d: sample %s is not part of family %s (%s)", ln, s.name, cur.name, cur.typ)
			}
			key := seriesKey(s.name, s.labels, "")
			if series[key] {
				return nil, fmt.Errorf("line %d: duplicate series %s", ln, key)
			}
			series[key] = true
			if math.IsNaN(s.value) || (cur.typ != "gauge" && s.value < 0) {
				return nil, fmt.Errorf("line %d: bad value %v for %s %s", ln, s.value, cur.typ, s.name)
			}
			cur.samples = append(cur.samples, s)
		}
	}
	for _, f := range x.families {
		if f.typ == "" {
			return nil, fmt.Errorf("family %s has HELP but no TYPE", f.name)
		}
		if f.typ == "histogram" {
			if err := checkHistogram(f); err != nil {
				return nil, err
			}
		}
	}
	return x, nil
}

func belongs(f *family, name string) bool {
	if f.typ != "histogram" {
		return name == f.name
	}
	return name == f.name+"_bucket" || name == f.name+"_sum" || name == f.name+"_count"
}

func seriesKey(name string, labels map[string]string, drop string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		if k != drop {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var b strings.Builder
	b.WriteString(name)
	for _, k := range keys {
		fmt.Fprintf(&b, ",%s=%q", k, labels[k])
	}
	return b.String()
}

type histSeries struct {
	les      []float64
	counts   []float64
	sum, cnt float64
	hasSum   bool
	hasCount bool
}

func checkHistogram(f *family) error {
	groups := map[string]*histSeries{}
	get := func(labels map[string]string) *histSeries {
		k := seriesKey("", labels, "le")
		if groups[k] == nil {
			groups[k] = &histSeries{}
		}
		return groups[k]
	}
	for _, s := range f.samples {
		switch s.name {
		case f.name + "_bucket":
			le, ok := s.labels["le"]
			if !ok {
				return fmt.Errorf("%s: bucket without le", f.name)
			}
			v, err := strconv.ParseFloat(le, 64)
			if err != nil {
				return fmt.Errorf("%s: bad le %q", f.name, le)
			}
			g := get(s.labels)
			if n := len(g.les); n > 0 && v <= g.les[n-1] {
				return fmt.Errorf("%s: le %v not after %v", f.name, v, g.les[n-1])
			}
			if n := len(g.counts); n > 0 && s.value < g.counts[n-1] {
				return fmt.Errorf("%s: bucket le=%v count %v below previous %v (not cumulative)", f.name, v, s.value, g.counts[n-1])
			}
			g.les = append(g.les, v)
			g.counts = append(g.counts, s.value)
		case f.name + "_sum":
			if _, ok := s.labels["le"]; ok {
				return fmt.Errorf("%s: le on _sum", f.name)
			}
			g := get(s.labels)
			g.sum, g.hasSum = s.value, true
		case f.name + "_count":
			if _, ok := s.labels["le"]; ok {
				return fmt.Errorf("%s: le on _count", f.name)
			}
			g := get(s.labels)
			g.cnt, g.hasCount = s.value, true
		}
	}
	for k, g := range groups {
		n := len(g.les)
		if n == 0 || !math.IsInf(g.les[n-1], 1) {
			return fmt.Errorf("%s%s: no +Inf bucket", f.name, k)
		}
		if !g.hasSum || !g.hasCount {
			return fmt.Errorf("%s%s: missing _sum or _count", f.name, k)
		}
		if g.counts[n-1] != g.cnt {
			return fmt.Errorf("%s%s: +Inf bucket %v != _count %v", f.name, k, g.counts[n-1], g.cnt)
		}
	}
	return nil
}

func parseSample(line string) (sample, error) {
	s := sample{labels: map[string]string{}}
	i := strings.IndexAny(line, "{ ")
	if i <= 0 {
		return s, fmt.Errorf("no metric name in %q", line)
	}
	s.name = line[:i]
	if !validMetricName(s.name) {
		return s, fmt.Errorf("bad metric name %q", s.name)
	}
	rest := line[i:]
	if rest[0] == '{' {
		rest = rest[1:]
		for {
			if strings.HasPrefix(rest, "}") {
				rest = rest[1:]
				break
			}
			eq := strings.IndexByte(rest, '=')
			if eq <= 0 {
				return s, fmt.Errorf("bad label in %q", line)
			}
			name := rest[:eq]
			if !validLabelName(name) {
				return s, fmt.Errorf("bad label name %q", name)
			}
			if _, dup := s.labels[name]; dup {
				return s, fmt.Errorf("duplicate label %q", name)
			}
			rest = rest[eq+1:]
			if !strings.HasPrefix(rest, `"`) {
				return s, fmt.Errorf("label %s value not quoted", name)
			}
			val, n, err := unquoteLabel(rest[1:])
			if err != nil {
				return s, fmt.Errorf("label %s: %w", name, err)
			}
			s.labels[name] = val
			rest = rest[1+n:]
			switch {
			case strings.HasPrefix(rest, ","):
				rest = rest[1:]
				if strings.HasPrefix(rest, "}") {
					return s, fmt.Errorf("trailing comma in %q", line)
				}
			case strings.HasPrefix(rest, "}"):
			default:
				return s, fmt.Errorf("junk after label %s in %q", name, line)
			}
		}
	}
	if !strings.HasPrefix(rest, " ") {
		return s, fmt.Errorf("no space before value in %q", line)
	}
	rest = rest[1:]
	if strings.ContainsAny(rest, " \t") {
		return s, fmt.Errorf("timestamp or junk after value in %q", line)
	}
	v, err := strconv.ParseFloat(rest, 64)
	if err != nil {
		return s, fmt.Errorf("bad value %q", rest)
	}
	s.value = v
	return s, nil
}

// unquoteLabel reads an escaped value up to its closing quote and returns
// the value and the bytes consumed including the quote.
func unquoteLabel(s string) (string, int, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '"':
			return b.String(), i + 1, nil
		case '\n':
			return "", 0, fmt.Errorf("raw newline in value")
		case '\\':
			if i+1 >= len(s) {
				return "", 0, fmt.Errorf("dangling backslash")
			}
			i++
			switch s[i] {
			case '\\':
				b.WriteByte('\\')
			case '"':
				b.WriteByte('"')
			case 'n':
				b.WriteByte('\n')
			default:
				return "", 0, fmt.Errorf("bad escape \\%c", s[i])
			}
		default:
			b.WriteByte(c)
		}
	}
	return "", 0, fmt.Errorf("unterminated value")
}
