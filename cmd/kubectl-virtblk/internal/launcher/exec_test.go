package launcher

import (
	"context"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// TestRemoteExecutorRequest runs the real executor against an HTTP server
// that refuses the exec: the request must name the pod's exec subresource,
// the container and the command, and the refusal must come back as an
// error naming the command and pod (after trying WebSocket and SPDY).
func TestRemoteExecutorRequest(t *testing.T) {
	var mu sync.Mutex
	var reqs []*http.Request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		reqs = append(reqs, r.Clone(context.Background()))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods \"p\" is forbidden: cannot create pods/exec","reason":"Forbidden","code":403}`))
	}))
	defer srv.Close()

	cfg := &rest.Config{Host: srv.URL}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ex := RemoteExecutor{Config: cfg, REST: cs.CoreV1().RESTClient()}
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "virt-launcher-vm-abcde"}}
	_, err = ex.Exec(context.Background(), p, "compute", []string{"virsh", "-c", "qemu:///system", "dumpxml", "default_vm"})
	if err == nil || !strings.Contains(err.Error(), "virsh in virt-launcher-vm-abcde/compute") {
		t.Fatalf("err = %v, want a refusal naming the command and pod", err)
	}

	mu.Lock()
	defer mu.Unlock()
	if len(reqs) == 0 {
		t.Fatal("no request reached the server")
	}
	var methods []string
	for _, r := range reqs {
		methods = append(methods, r.Method)
		if r.URL.Path != "/api/v1/namespaces/default/pods/virt-launcher-vm-abcde/exec" {
			t.Errorf("path %s", r.URL.Path)
		}
		q := r.URL.Query()
		if q.Get("container") != "compute" || !slices.Equal(q["command"], []string{"virsh", "-c", "qemu:///system", "dumpxml", "default_vm"}) ||
			q.Get("stdout") != "true" || q.Get("stderr") != "true" || q.Get("stdin") == "true" {
			t.Errorf("query %v", q)
		}
	}
	t.Logf("exec attempts: %v", methods)

	if _, err := ex.Exec(context.Background(), p, "compute", nil); err == nil {
		t.Error("empty command accepted")
	}
}

func TestLimitedBuffer(t *testing.T) {
	b := &limitedBuffer{max: 5}
	for _, s := range []string{"ab", "cd", "efg", "h"} {
		if n, err := b.Write([]byte(s)); n != len(s) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", s, n, err)
		}
	}
	if b.String() != "abcde" || !b.overflow {
		t.Errorf("buffer %q overflow %v", b.String(), b.overflow)
	}
}
