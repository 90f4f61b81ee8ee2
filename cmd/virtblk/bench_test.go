package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/virtblk/virtblk/internal/testenv"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"4096": 4096, "4k": 4096, "128K": 128 << 10, "1m": 1 << 20, "2g": 2 << 30, " 1t ": 1 << 40} {
		got, err := parseSize64(in)
		if err != nil || got != want {
			t.Errorf("parseSize64(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "k", "-1", "4x", "1.5m", "99999999999999999999t"} {
		if _, err := parseSize64(in); err == nil {
			t.Errorf("parseSize64(%q) accepted", in)
		}
	}
	if _, err := parseSize("1g"); err == nil {
		t.Error("1 GiB block size accepted")
	}
}

func TestBenchFlagErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"--vhost-user", "/x", "--file", "/y"},
		{"--vhost-user", "/x", "--rw", "randrw"},
		{"--vhost-user", "/x", "--bs", "1000"},
		{"--vhost-user", "/x", "--qd", "0"},
		{"--vhost-user", "/x", "-o", "yaml"},
		{"--vhost-user", "/x", "extra"},
	} {
		var out, errb bytes.Buffer
		if err := runBench(context.Background(), args, &out, &errb); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
	var out, errb bytes.Buffer
	err := runBench(context.Background(), []string{"--vhost-user", filepath.Join(t.TempDir(), "none.sock")}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "none.sock") {
		t.Errorf("missing socket: %v", err)
	}
}

// TestBenchQSD runs a short job against qemu-storage-daemon and checks the
// JSON report adds up.
func TestBenchQSD(t *testing.T) {
	qsd := testenv.Tool(t, "qemu-storage-daemon", "qemu-system-common")
	dir := t.TempDir()
	img, sock := filepath.Join(dir, "img"), filepath.Join(dir, "sock")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(qsd,
		"--blockdev", "driver=file,node-name=f,filename="+img+",cache.direct=on",
		"--blockdev", "driver=raw,node-name=d,file=f",
		"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path="+sock+",writable=on,num-queues=2")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 1000 {
			t.Fatal("qemu-storage-daemon did not create its socket")
		}
		time.Sleep(10 * time.Millisecond)
	}
	var out, errb bytes.Buffer
	args := []string{"--vhost-user", sock, "--queues", "2", "--qd", "4", "--rw", "mix", "--rwmix", "50",
		"--ops", "2000", "--size", "8m", "--backend-pid", fmt.Sprint(cmd.Process.Pid), "-o", "json"}
	if err := runBench(context.Background(), args, &out, &errb); err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	var res struct {
		IOs, Reads, Writes, Bytes, Errors uint64
		IOPS                              float64
		Queues                            int
		BackendPID                        int `json:"backend_pid"`
	}
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	if res.IOs != 2000 || res.Reads+res.Writes != 2000 || res.Bytes != 2000*4096 || res.Errors != 0 || res.Queues != 2 || res.IOPS <= 0 || res.BackendPID != cmd.Process.Pid {
		t.Fatalf("report does not add up: %+v", res)
	}
}

// TestBenchFile runs the raw io_uring ceiling on a temp image.
func TestBenchFile(t *testing.T) {
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, rw := range []string{"randread", "writeflush", "write"} {
		var out, errb bytes.Buffer
		if err := runBench(context.Background(), []string{"--file", img, "--rw", rw, "--qd", "2", "--ops", "300", "-o", "json"}, &out, &errb); err != nil {
			t.Fatalf("%s: %v\n%s", rw, err, errb.String())
		}
		var res struct {
			IOs, Flushes uint64
			CPUPID       int `json:"backend_pid"`
		}
		if err := json.Unmarshal(out.Bytes(), &res); err != nil {
			t.Fatal(err)
		}
		if res.IOs != 300 || (rw == "writeflush") != (res.Flushes == 300) || res.CPUPID != os.Getpid() {
			t.Fatalf("%s: %+v", rw, res)
		}
	}
}
