package domainxml

import (
	"fmt"
	"strings"
	"testing"
)

func TestParseCPUSet(t *testing.T) {
	good := map[string]string{
		"2-5":        "[2 3 4 5]",
		"0,2,4-6":    "[0 2 4 5 6]",
		"0-7,^3,^5":  "[0 1 2 4 6 7]",
		"3":          "[3]",
		"5,5,4-5":    "[4 5]",
		"16383":      "[16383]",
		"^1,0-2":     "[0 2]",
		"0000012":    "[12]",
		"1-1":        "[1]",
		"10-12,^11":  "[10 12]",
		"0-3,8-9,^9": "[0 1 2 3 8]",
	}
	for in, want := range good {
		got, err := ParseCPUSet(in)
		if err != nil || fmt.Sprint(got) != want {
			t.Errorf("ParseCPUSet(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	bad := map[string]string{
		"":                     "empty",
		"1,":                   "empty item",
		",1":                   "empty item",
		"a":                    "not a CPU number",
		"1-":                   "not a CPU number",
		"-1":                   "not a CPU number",
		"5-2":                  "reversed",
		"1-2-3":                "not a CPU number",
		"^":                    "not a CPU number",
		"^1-2":                 "not a CPU number",
		"16384":                "above the maximum",
		"1 ,2":                 "not a CPU number",
		"+1":                   "not a CPU number",
		"^3":                   "selects no CPU",
		"2,^2":                 "selects no CPU",
		"99999999999999999999": "above the maximum",
	}
	for in, want := range bad {
		_, err := ParseCPUSet(in)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), fmt.Sprintf("%q", in)) {
			t.Errorf("ParseCPUSet(%q) error %v; want one naming the value and %q", in, err, want)
		}
	}
}

func FuzzParseCPUSet(f *testing.F) {
	for _, s := range []string{"2-5", "0,2,4-6", "0-7,^3", "^1", "1-", "16383", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		cpus, err := ParseCPUSet(s)
		if err != nil {
			return
		}
		if len(cpus) == 0 {
			t.Fatal("success with an empty set")
		}
		for i, c := range cpus {
			if c > maxCPU || (i > 0 && cpus[i-1] >= c) {
				t.Fatalf("bad result %v", cpus)
			}
		}
	})
}

// A hostile annotation of many full-width ranges must parse in bounded time.
func TestParseCPUSetManyWideRanges(t *testing.T) {
	s := strings.Repeat("0-16383,", 2000) + "1"
	got, err := ParseCPUSet(s)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != maxCPU+1 {
		t.Fatalf("got %d CPUs, want %d", len(got), maxCPU+1)
	}
}
