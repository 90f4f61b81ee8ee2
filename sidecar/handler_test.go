package sidecar

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/virtblk/virtblk/domainxml/kvsim"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha3"
	"github.com/virtblk/virtblk/sidecar/hooktest"
)

// wantFixtureMapping is what the VMI fixture's annotations produce on
// block-multiqueue.xml: rootdisk keeps KubeVirt's IOThread 1, so the pool of
// 4 is ids 2-5; data follows its explicit map, scratch is round-robin.
var wantFixtureMapping = hooktest.Mapping{
	IOThreads: 5,
	Disks: map[string][]uint{
		"ua-data":    {2, 2, 3, 3, 4, 4, 5, 5},
		"ua-scratch": {2, 3, 4, 5, 2, 3, 4, 5},
	},
}

func logBuffer() (*slog.Logger, *syncBuffer) {
	var buf syncBuffer
	return slog.New(slog.NewJSONHandler(&buf, nil)), &buf
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(s.b.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

func TestDefineMapsAndLogsOneLine(t *testing.T) {
	log, buf := logBuffer()
	h := NewHandler(nil, log)
	out, err := h.Define(context.Background(), "v1alpha3", "", hooktest.Domain(t, "block-multiqueue"), hooktest.VMI(t, map[string]string{
		"virtblk.io/iothreads": "4", "virtblk.io/disks": "data,scratch", "virtblk.io/queue-map.data": "1,1,2,2,3,3,4,4",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if got := hooktest.ReadMapping(t, out); !reflect.DeepEqual(got, wantFixtureMapping) {
		t.Fatalf("mapping %+v\nwant %+v", got, wantFixtureMapping)
	}
	lines := buf.lines(t)
	if len(lines) != 1 {
		t.Fatalf("%d log lines, want 1: %v", len(lines), lines)
	}
	l := lines[0]
	want := map[string]any{
		"msg": "define domain", "call": 1.0, "api": "v1alpha3", "changed": true,
		"disks_changed": 2.0, "iothreads": 5.0, "pool": "2-5", "queues": 16.0,
		"disks": "data/vdb:queues=8:iothreads=2+3+4+5 scratch/vdc:queues=8:iothreads=2+3+4+5",
	}
	for k, v := range want {
		if l[k] != v {
			t.Errorf("log %s = %v, want %v (line %v)", k, l[k], v, l)
		}
	}
}

func TestNoAnnotationReturnsInputByteIdentical(t *testing.T) {
	h := NewHandler(nil, nil)
	vmi := hooktest.VMI(t, nil)
	for _, in := range [][]byte{
		hooktest.Domain(t, "mixed-sata-cdrom"),
		// Not even parsed: a domain virtblk has nothing to do with is none
		// of its business.
		[]byte("<domain><devices><disk>unclosed"),
	} {
		out, err := h.Define(context.Background(), "v1alpha3", "", in, vmi)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, in) {
			t.Fatalf("output differs from input:\n%s", out)
		}
	}
}

// TestLossyThreeCallSequence drives the handler the way virt-launcher does
// on a q35 VM: call 1 gets KubeVirt's domain, calls 2 and 3 get KubeVirt's
// lossy re-parse of what was defined. Every call must produce the mapping.
func TestLossyThreeCallSequence(t *testing.T) {
	for _, fixture := range []string{"block-multiqueue", "pci-defined"} {
		t.Run(fixture, func(t *testing.T) {
			h := NewHandler(nil, nil)
			ann := map[string]string{"virtblk.io/iothreads": "4", "virtblk.io/queues": "8"}
			vmi := hooktest.VMI(t, ann)
			orig := hooktest.Domain(t, fixture)
			if fixture == "pci-defined" {
				// Its disks are rootdisk and pgdata.
				vmi = vmiWithDisks(t, ann, "rootdisk", "pgdata")
			}
			out1, err := h.Define(context.Background(), "v1alpha3", "", orig, vmi)
			if err != nil {
				t.Fatal(err)
			}
			in2, err := kvsim.Refeed(orig, out1)
			if err != nil {
				t.Fatal(err)
			}
			out2, err := h.Define(context.Background(), "v1alpha3", "", in2, vmi)
			if err != nil {
				t.Fatal(err)
			}
			in3, err := kvsim.RefeedAddingRootPorts(orig, out2, 3)
			if err != nil {
				t.Fatal(err)
			}
			out3, err := h.Define(context.Background(), "v1alpha3", "", in3, vmi)
			if err != nil {
				t.Fatal(err)
			}
			m1 := hooktest.ReadMapping(t, out1)
			if len(m1.Disks) == 0 {
				t.Fatal("call 1 mapped no disk")
			}
			if lost := hooktest.ReadMapping(t, in2); reflect.DeepEqual(lost, m1) {
				t.Fatal("the re-feed kept the mapping; the test would prove nothing")
			}
			for i, out := range [][]byte{out2, out3} {
				if m := hooktest.ReadMapping(t, out); !reflect.DeepEqual(m, m1) {
					t.Errorf("call %d mapping %+v\ndiffers from call 1 %+v", i+2, m, m1)
				}
			}
		})
	}
}

// vmiWithDisks is the VMI fixture with its disks renamed, all virtio.
func vmiWithDisks(t *testing.T, ann map[string]string, names ...string) []byte {
	t.Helper()
	var vmi map[string]any
	if err := json.Unmarshal(hooktest.VMI(t, ann), &vmi); err != nil {
		t.Fatal(err)
	}
	var disks []any
	for _, n := range names {
		disks = append(disks, map[string]any{"name": n, "disk": map[string]any{"bus": "virtio"}})
	}
	vmi["spec"].(map[string]any)["domain"].(map[string]any)["devices"].(map[string]any)["disks"] = disks
	b, err := json.Marshal(vmi)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestInvalidAnnotationIsInvalidArgumentWithFullMessage(t *testing.T) {
	log, buf := logBuffer()
	svc := v1alpha3Service{h: NewHandler(nil, log)}
	_, err := svc.OnDefineDomain(context.Background(), &v1alpha3.OnDefineDomainParams{
		DomainXML: hooktest.Domain(t, "block-multiqueue"),
		Vmi:       hooktest.VMI(t, map[string]string{"virtblk.io/iothreads": "0", "virtblk.io/disks": "data,nosuch"}),
	})
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.InvalidArgument {
		t.Fatalf("err = %v, want InvalidArgument", err)
	}
	for _, want := range []string{
		"virtblk: virtblk.io annotations: 2 problems:",
		`annotation virtblk.io/disks="data,nosuch": the VMI has no disk named "nosuch"`,
		`annotation virtblk.io/iothreads="0": must be at least 1; fix: set it to a whole number from 1 to 256`,
	} {
		if !strings.Contains(st.Message(), want) {
			t.Errorf("message %q\nlacks %q", st.Message(), want)
		}
	}
	lines := buf.lines(t)
	if len(lines) != 1 || lines[0]["level"] != "ERROR" || !strings.Contains(fmt.Sprint(lines[0]["error"]), "nosuch") {
		t.Fatalf("log = %v", lines)
	}
}

func TestDomainErrorIsInvalidArgument(t *testing.T) {
	h := NewHandler(nil, nil)
	_, err := h.Define(context.Background(), "v1alpha3", "", []byte("<domain><devices>"), hooktest.VMI(t, map[string]string{"virtblk.io/iothreads": "2"}))
	var in *InvalidInputError
	if !errors.As(err, &in) {
		t.Fatalf("err = %v, want InvalidInputError", err)
	}
	if st := status.Convert(grpcError(err)); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "iothreads: parse domain XML") {
		t.Fatalf("status = %v", st)
	}
}

func TestGRPCErrorCodes(t *testing.T) {
	if c := status.Code(grpcError(context.DeadlineExceeded)); c != codes.DeadlineExceeded {
		t.Errorf("deadline: %v", c)
	}
	if c := status.Code(grpcError(fmt.Errorf("start back-end: %w", errors.New("boom")))); c != codes.Internal {
		t.Errorf("internal: %v", c)
	}
}

// recordingHook is a real Hook implementation that appends a marker, to
// test the pipeline's ordering and shutdown without the IOThread logic.
type recordingHook struct {
	name     string
	mu       *sync.Mutex
	shutdown *[]string
	failStop bool
}

func (r recordingHook) Name() string { return r.name }

func (r recordingHook) DefineDomain(_ context.Context, call *Call, in []byte) ([]byte, []slog.Attr, error) {
	if call.Config == nil {
		return nil, nil, errors.New("hook called without config")
	}
	return append(append([]byte(nil), in...), "+"+r.name...), []slog.Attr{slog.String(r.name, "ran")}, nil
}

func (r recordingHook) Shutdown(context.Context) error {
	r.mu.Lock()
	*r.shutdown = append(*r.shutdown, r.name)
	r.mu.Unlock()
	if r.failStop {
		return errors.New("stuck")
	}
	return nil
}

func TestPipelineOrderAndShutdown(t *testing.T) {
	var mu sync.Mutex
	var stopped []string
	h := NewHandler([]Hook{
		recordingHook{name: "a", mu: &mu, shutdown: &stopped},
		recordingHook{name: "b", mu: &mu, shutdown: &stopped, failStop: true},
	}, nil)
	out, err := h.Define(context.Background(), "plugin", "Boot", []byte("x"), hooktest.VMI(t, map[string]string{"virtblk.io/iothreads": "1"}))
	if err != nil || string(out) != "x+a+b" {
		t.Fatalf("out %q, err %v", out, err)
	}
	err = h.Shutdown(context.Background())
	if err == nil || !strings.Contains(err.Error(), "shut down b: stuck") {
		t.Fatalf("shutdown err = %v", err)
	}
	if !reflect.DeepEqual(stopped, []string{"b", "a"}) {
		t.Fatalf("shutdown order %v", stopped)
	}
}

// TestConcurrentDefine runs many calls at once (run with -race): the
// handler keeps no per-call state, so every result must be the same.
func TestConcurrentDefine(t *testing.T) {
	h := NewHandler(nil, nil)
	in := hooktest.Domain(t, "block-multiqueue")
	vmi := hooktest.VMI(t, map[string]string{"virtblk.io/iothreads": "4", "virtblk.io/disks": "data,scratch", "virtblk.io/queue-map.data": "1,1,2,2,3,3,4,4"})
	want, err := h.Define(context.Background(), "v1alpha3", "", in, vmi)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := h.Define(context.Background(), "v1alpha3", "", in, vmi)
			if err == nil && !bytes.Equal(out, want) {
				err = errors.New("concurrent call returned a different domain")
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := h.calls.Load(); n != 17 {
		t.Fatalf("call counter %d, want 17", n)
	}
}
