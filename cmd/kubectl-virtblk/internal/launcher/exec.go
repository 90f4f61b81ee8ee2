package launcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
)

// maxExecOutput bounds what a command may send back: a domain XML or a
// command line is kilobytes; a runaway command must not exhaust memory.
const maxExecOutput = 16 << 20

// RemoteExecutor runs commands in pod containers through the API server's
// exec subresource, like `kubectl exec`: WebSocket first, SPDY when the
// server (or a proxy in between) does not upgrade to WebSocket.
type RemoteExecutor struct {
	Config *rest.Config
	// REST is a client for the core API group, e.g.
	// clientset.CoreV1().RESTClient().
	REST rest.Interface
}

// Exec implements Executor.
func (e RemoteExecutor) Exec(ctx context.Context, pod *corev1.Pod, container string, cmd []string) ([]byte, error) {
	if len(cmd) == 0 {
		return nil, errors.New("exec: no command")
	}
	req := e.REST.Post().Resource("pods").Namespace(pod.Namespace).Name(pod.Name).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{
			Container: container,
			Command:   cmd,
			Stdout:    true,
			Stderr:    true,
		}, scheme.ParameterCodec)
	spdy, err := remotecommand.NewSPDYExecutor(e.Config, "POST", req.URL())
	if err != nil {
		return nil, fmt.Errorf("exec in %s/%s: %w", pod.Name, container, err)
	}
	ws, err := remotecommand.NewWebSocketExecutor(e.Config, "GET", req.URL().String())
	if err != nil {
		return nil, fmt.Errorf("exec in %s/%s: %w", pod.Name, container, err)
	}
	ex, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	if err != nil {
		return nil, fmt.Errorf("exec in %s/%s: %w", pod.Name, container, err)
	}
	stdout := &limitedBuffer{max: maxExecOutput}
	stderr := &limitedBuffer{max: 64 << 10}
	err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: stdout, Stderr: stderr})
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg != "" {
			return nil, fmt.Errorf("%s in %s/%s: %w: %s", cmd[0], pod.Name, container, err, msg)
		}
		return nil, fmt.Errorf("%s in %s/%s: %w", cmd[0], pod.Name, container, err)
	}
	if stdout.overflow {
		return nil, fmt.Errorf("%s in %s/%s: output exceeds %d bytes", cmd[0], pod.Name, container, maxExecOutput)
	}
	return stdout.Bytes(), nil
}

// limitedBuffer keeps at most max bytes and notes that there was more.
type limitedBuffer struct {
	bytes.Buffer
	max      int
	overflow bool
}

var _ io.Writer = (*limitedBuffer)(nil)

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.Len(); len(p) > room {
		b.overflow = true
		if room > 0 {
			b.Buffer.Write(p[:room])
		}
		return len(p), nil
	}
	return b.Buffer.Write(p)
}
