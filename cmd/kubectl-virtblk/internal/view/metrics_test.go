package view

import (
	"bytes"
	"math"
	"strings"
	"testing"
)

const exposition = `# HELP virtblk_requests_total Requests completed per volume and queue.
# TYPE virtblk_requests_total counter
virtblk_requests_total{volume="data",queue="0",op="read"} 1500
virtblk_requests_total{volume="data",queue="1",op="write"} 250 1700000000000
# HELP virtblk_request_seconds Request latency.
# TYPE virtblk_request_seconds histogram
virtblk_request_seconds_bucket{volume="data",le="0.001"} 90
virtblk_request_seconds_bucket{volume="data",le="+Inf"} 100
virtblk_request_seconds_sum{volume="data"} 0.05
virtblk_request_seconds_count{volume="data"} 100
virtblk_checksum_failures_total{volume="da\"ta\\x\ny"} 0
go_goroutines 42
process_open_fds NaN
`

func TestParseMetrics(t *testing.T) {
	s, err := ParseMetrics(strings.NewReader(exposition))
	if err != nil {
		t.Fatal(err)
	}
	if len(s) != 9 {
		t.Fatalf("%d samples, want 9: %+v", len(s), s)
	}
	if s[0].Name != "virtblk_requests_total" || s[0].Value != 1500 || len(s[0].Labels) != 3 || s[0].Labels[2] != [2]string{"op", "read"} {
		t.Errorf("sample 0 = %+v", s[0])
	}
	if s[3].Labels[1] != [2]string{"le", "+Inf"} {
		t.Errorf("sample 3 = %+v", s[3])
	}
	if got := s[6].Labels[0][1]; got != "da\"ta\\x\ny" {
		t.Errorf("escaped label value = %q", got)
	}
	if !math.IsNaN(s[8].Value) {
		t.Errorf("NaN sample = %v", s[8].Value)
	}
}

func TestParseMetricsErrors(t *testing.T) {
	for _, in := range []string{
		"novalue",
		"m{a=\"x\"}",
		"m{a=x} 1",
		"m{a=\"x} 1",
		"m{a=\"x\" b=\"y\"} 1",
		"m{a=\"\\q\"} 1",
		"m 1 2 3",
		"m one",
		"1m 1",
		"m{=\"x\"} 1",
	} {
		if _, err := ParseMetrics(strings.NewReader(in)); err == nil {
			t.Errorf("ParseMetrics(%q) accepted", in)
		}
	}
}

func TestRenderMetrics(t *testing.T) {
	s, err := ParseMetrics(strings.NewReader(exposition))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := RenderMetrics(&buf, s, "virtblk_"); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if strings.Contains(out, "_bucket") || strings.Contains(out, "go_goroutines") {
		t.Errorf("buckets or foreign metrics shown:\n%s", out)
	}
	wantCols(t, row(t, out, "METRIC"), "METRIC", "LABELS", "VALUE")
	wantCols(t, row(t, out, "virtblk_request_seconds_count"), "virtblk_request_seconds_count", "volume=data", "100 (mean 0.0005)")
	// Sorted by name, then labels.
	names := []string{}
	for _, line := range strings.Split(out, "\n")[1:] {
		if cols := splitCols(line); len(cols) > 0 {
			names = append(names, cols[0])
		}
	}
	want := []string{"virtblk_checksum_failures_total", "virtblk_request_seconds_count", "virtblk_request_seconds_sum", "virtblk_requests_total", "virtblk_requests_total"}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Errorf("row order %q, want %q", names, want)
	}
	wantCols(t, row(t, out, "virtblk_checksum_failures_total"), "virtblk_checksum_failures_total", `volume="da\"ta\\x\ny"`, "0")
	if err := RenderMetrics(&buf, s, "nothing_"); err == nil {
		t.Error("no matching metrics: want an error")
	}
}

func FuzzParseMetrics(f *testing.F) {
	f.Add(exposition)
	f.Add(`m{a="\"",b="\\"} -Inf`)
	f.Add("m{a=\"x\\")
	f.Fuzz(func(t *testing.T, in string) {
		s, err := ParseMetrics(strings.NewReader(in))
		if err != nil {
			return
		}
		var buf bytes.Buffer
		_ = RenderMetrics(&buf, s, "")
	})
}
