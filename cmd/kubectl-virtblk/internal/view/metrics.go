package view

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
)

// Sample is one line of the Prometheus text exposition format.
type Sample struct {
	Name   string
	Labels [][2]string // in exposition order
	Value  float64
}

// Bounds on untrusted metrics text: the back-end exports a few hundred
// series; anything far beyond is not worth printing or holding.
const (
	maxMetricsLines = 100000
	maxLineBytes    = 64 << 10
)

// ParseMetrics reads the Prometheus text format (version 0.0.4): comments,
// and samples `name{label="value",...} value [timestamp]`.
func ParseMetrics(r io.Reader) ([]Sample, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxLineBytes)
	var out []Sample
	for n := 1; sc.Scan(); n++ {
		if n > maxMetricsLines {
			return nil, fmt.Errorf("metrics: more than %d lines", maxMetricsLines)
		}
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		s, err := parseSample(line)
		if err != nil {
			return nil, fmt.Errorf("metrics line %d: %w", n, err)
		}
		out = append(out, s)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read metrics: %w", err)
	}
	return out, nil
}

func parseSample(line string) (Sample, error) {
	var s Sample
	i := strings.IndexAny(line, "{ \t")
	if i <= 0 {
		return s, fmt.Errorf("no value in %q", line)
	}
	s.Name = line[:i]
	if !validName(s.Name) {
		return s, fmt.Errorf("bad metric name %q", s.Name)
	}
	rest := line[i:]
	if rest[0] == '{' {
		labels, tail, err := parseLabels(rest[1:])
		if err != nil {
			return s, fmt.Errorf("metric %s: %w", s.Name, err)
		}
		s.Labels, rest = labels, tail
	}
	fields := strings.Fields(rest)
	if len(fields) < 1 || len(fields) > 2 {
		return s, fmt.Errorf("metric %s: want a value and an optional timestamp, got %q", s.Name, rest)
	}
	v, err := parseValue(fields[0])
	if err != nil {
		return s, fmt.Errorf("metric %s: value %q: %w", s.Name, fields[0], err)
	}
	s.Value = v
	return s, nil
}

func parseValue(f string) (float64, error) {
	switch f {
	case "+Inf", "Inf":
		return math.Inf(1), nil
	case "-Inf":
		return math.Inf(-1), nil
	case "NaN":
		return math.NaN(), nil
	}
	return strconv.ParseFloat(f, 64)
}

func validName(s string) bool {
	for i, r := range s {
		ok := r == '_' || r == ':' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || (i > 0 && r >= '0' && r <= '9')
		if !ok {
			return false
		}
	}
	return s != ""
}

// parseLabels reads `a="x",b="y"}` and returns what follows the brace.
func parseLabels(s string) ([][2]string, string, error) {
	var labels [][2]string
	for {
		s = strings.TrimLeft(s, " \t")
		if strings.HasPrefix(s, "}") {
			return labels, s[1:], nil
		}
		eq := strings.IndexByte(s, '=')
		if eq <= 0 {
			return nil, "", errors.New("label without =")
		}
		name := strings.TrimSpace(s[:eq])
		if !validName(name) {
			return nil, "", fmt.Errorf("bad label name %q", name)
		}
		s = strings.TrimLeft(s[eq+1:], " \t")
		if !strings.HasPrefix(s, `"`) {
			return nil, "", fmt.Errorf("label %s: value is not quoted", name)
		}
		var val strings.Builder
		j := 1
		for ; j < len(s) && s[j] != '"'; j++ {
			if s[j] != '\\' {
				val.WriteByte(s[j])
				continue
			}
			j++
			if j == len(s) {
				break
			}
			switch s[j] {
			case 'n':
				val.WriteByte('\n')
			case '\\', '"':
				val.WriteByte(s[j])
			default:
				return nil, "", fmt.Errorf("label %s: bad escape \\%c", name, s[j])
			}
		}
		if j >= len(s) {
			return nil, "", fmt.Errorf("label %s: unterminated value", name)
		}
		labels = append(labels, [2]string{name, val.String()})
		s = strings.TrimLeft(s[j+1:], " \t")
		if strings.HasPrefix(s, ",") {
			s = s[1:]
		} else if !strings.HasPrefix(s, "}") {
			return nil, "", fmt.Errorf("label %s: want , or } after the value", name)
		}
	}
}

// RenderMetrics prints the samples whose name starts with prefix, sorted
// by name then labels. Histogram buckets are left out (their _sum and
// _count are printed, and the mean latency derived from them).
func RenderMetrics(w io.Writer, samples []Sample, prefix string) error {
	var rows []Sample
	sums := map[string]float64{}
	for _, s := range samples {
		if !strings.HasPrefix(s.Name, prefix) || strings.HasSuffix(s.Name, "_bucket") {
			continue
		}
		rows = append(rows, s)
		if base, ok := strings.CutSuffix(s.Name, "_sum"); ok {
			sums[base+"|"+labelText(s.Labels)] = s.Value
		}
	}
	if len(rows) == 0 {
		return fmt.Errorf("no %s* metrics in the back-end's output", prefix)
	}
	sort.SliceStable(rows, func(i, j int) bool {
		if rows[i].Name != rows[j].Name {
			return rows[i].Name < rows[j].Name
		}
		return labelText(rows[i].Labels) < labelText(rows[j].Labels)
	})
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "METRIC\tLABELS\tVALUE")
	for _, s := range rows {
		val := strconv.FormatFloat(s.Value, 'g', -1, 64)
		if base, ok := strings.CutSuffix(s.Name, "_count"); ok {
			if sum, ok := sums[base+"|"+labelText(s.Labels)]; ok && s.Value > 0 {
				val += fmt.Sprintf(" (mean %s)", strconv.FormatFloat(sum/s.Value, 'g', 4, 64))
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", s.Name, dash(labelText(s.Labels)), val)
	}
	return tw.Flush()
}

func labelText(labels [][2]string) string {
	var b bytes.Buffer
	for i, l := range labels {
		if i > 0 {
			b.WriteByte(',')
		}
		v := l[1]
		if v == "" || strings.ContainsAny(v, ",= ") || clean(v) != v {
			v = strconv.Quote(v)
		}
		fmt.Fprintf(&b, "%s=%s", l[0], v)
	}
	return b.String()
}
