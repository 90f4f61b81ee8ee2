package sidecar

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"github.com/virtblk/virtblk/sidecar/hookapi/info"
	pluginsv1alpha1 "github.com/virtblk/virtblk/sidecar/hookapi/plugins/v1alpha1"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha1"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha2"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha3"

	"github.com/virtblk/virtblk/internal/unixsock"
)

// Default socket directories, as KubeVirt mounts them.
const (
	// DefaultHooksDir is where a hook sidecar container sees its slice of
	// the volume virt-launcher scans for hook sockets.
	DefaultHooksDir = "/var/run/kubevirt-hooks"
	// DefaultPluginDir is where a v1.9 Plugin's Sidecar.SocketPath must
	// live for a plugin named "virtblk".
	DefaultPluginDir = "/var/run/kubevirt-plugin/virtblk"
	// PluginSocketName is the fixed socket file name under the plugin
	// directory: the Plugin CR names the path, so it cannot be random.
	PluginSocketName = "virtblk.sock"
)

// SocketDir is a directory to serve a socket in.
type SocketDir struct {
	// Path is the directory; empty means no socket there.
	Path string
	// Optional makes failure to create the socket a logged warning
	// instead of an error. The command sets it for directories left at
	// their default, so that a plain hook sidecar (which has no plugin
	// volume and runs without permission to create /var/run/...) starts.
	Optional bool
}

// Options configures a Server.
type Options struct {
	// HooksDir gets a uniquely named socket (virtblk-<random>.sock) for
	// the legacy hook API; virt-launcher finds it by scanning.
	HooksDir SocketDir
	// PluginDir gets PluginSocketName for the Plugin API.
	PluginDir SocketDir
	// Hooks is the define pipeline; nil means DefaultHooks.
	Hooks []Hook
	// Logger receives one line per call and the server's lifecycle; nil
	// discards.
	Logger *slog.Logger
	// StopTimeout bounds the graceful stop before connections are cut;
	// zero means 10s.
	StopTimeout time.Duration
}

// Server serves every hook service on each of its sockets.
type Server struct {
	opts    Options
	log     *slog.Logger
	handler *Handler

	stopOnce sync.Once
	stop     chan struct{}
	ready    chan struct{}

	mu      sync.Mutex
	sockets []string
}

// New checks opts and returns a Server that is not yet listening.
func New(opts Options) (*Server, error) {
	if opts.HooksDir.Path == "" && opts.PluginDir.Path == "" {
		return nil, errors.New("sidecar: no socket directory; set a hooks directory, a plugin directory or both")
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 10 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		opts:    opts,
		log:     log,
		handler: NewHandler(opts.Hooks, log),
		stop:    make(chan struct{}),
		ready:   make(chan struct{}),
	}, nil
}

// Ready is closed once every socket accepts connections.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Sockets returns the socket paths being served, once Ready is closed.
func (s *Server) Sockets() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.sockets...)
}

// Stop asks Run to stop gracefully. It does not wait and is safe to call
// more than once and from a handler.
func (s *Server) Stop() {
	s.stopOnce.Do(func() { close(s.stop) })
}

// Run listens, serves until ctx is done, Stop is called or virt-launcher
// sends Shutdown, then stops gracefully, removes its sockets and shuts the
// hooks down. A requested stop returns nil.
func (s *Server) Run(ctx context.Context) error {
	var listeners []net.Listener
	closeAll := func() {
		for _, l := range listeners {
			l.Close()
		}
	}
	if d := s.opts.HooksDir; d.Path != "" {
		l, err := listenUnique(d.Path)
		if err != nil {
			if !d.Optional {
				return err
			}
			s.log.Warn("hook socket not created; the legacy hook API is not served", "dir", d.Path, "error", err.Error())
		} else {
			listeners = append(listeners, l)
		}
	}
	if d := s.opts.PluginDir; d.Path != "" {
		l, err := listenFixed(d.Path, PluginSocketName)
		if err != nil {
			if !d.Optional {
				closeAll()
				return err
			}
			s.log.Warn("plugin socket not created; the Plugin API is served on the hook socket only", "dir", d.Path, "error", err.Error())
		} else {
			listeners = append(listeners, l)
		}
	}
	if len(listeners) == 0 {
		return errors.New("sidecar: no socket could be created; see the warnings above")
	}

	gs := grpc.NewServer()
	info.RegisterInfoServer(gs, infoService{})
	v1alpha1.RegisterCallbacksServer(gs, v1alpha1Service{h: s.handler})
	v1alpha2.RegisterCallbacksServer(gs, v1alpha2Service{h: s.handler})
	v1alpha3.RegisterCallbacksServer(gs, v1alpha3Service{h: s.handler, shutdown: s.Stop})
	pluginsv1alpha1.RegisterDomainHookServiceServer(gs, domainHookService{h: s.handler})

	serveErr := make(chan error, len(listeners))
	var paths []string
	for _, l := range listeners {
		paths = append(paths, l.Addr().String())
		go func() { serveErr <- gs.Serve(l) }()
	}
	s.mu.Lock()
	s.sockets = paths
	s.mu.Unlock()
	close(s.ready)
	s.log.Info("serving", "sockets", paths, "versions", Versions)

	var runErr error
	reason := ""
	select {
	case <-ctx.Done():
		reason = "signal or context: " + context.Cause(ctx).Error()
	case <-s.stop:
		reason = "shutdown requested"
	case err := <-serveErr:
		runErr = fmt.Errorf("sidecar: serve: %w", err)
		reason = "serve failed"
	}
	s.log.Info("stopping", "reason", reason)
	s.gracefulStop(gs)
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("remove socket", "path", p, "error", err.Error())
		}
	}
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.opts.StopTimeout)
	defer cancel()
	if err := s.handler.Shutdown(hctx); err != nil {
		runErr = errors.Join(runErr, err)
	}
	s.log.Info("stopped", "calls", s.handler.calls.Load())
	return runErr
}

// gracefulStop lets in-flight calls (including the Shutdown call that asked
// for the stop) finish, but does not wait forever on a stuck client.
func (s *Server) gracefulStop(gs *grpc.Server) {
	done := make(chan struct{})
	go func() {
		gs.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(s.opts.StopTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		s.log.Warn("graceful stop timed out; closing connections", "timeout", s.opts.StopTimeout)
		gs.Stop()
		<-done
	}
}

// listenUnique creates dir/virtblk-<random>.sock. virt-launcher tracks hook
// sockets by file name across all sidecars, so the name must not collide
// with another sidecar's.
func listenUnique(dir string) (net.Listener, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create hooks directory %s: %w", dir, err)
	}
	var lastErr error
	for range 10 {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("random socket name: %w", err)
		}
		path := filepath.Join(dir, "virtblk-"+hex.EncodeToString(b[:])+".sock")
		l, err := listenUnix(path)
		if err == nil {
			return l, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			return nil, err
		}
		lastErr = err
	}
	return nil, lastErr
}

// listenFixed creates dir/name, replacing a stale socket left by a process
// that died, but never one that still answers.
func listenFixed(dir, name string) (net.Listener, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create plugin directory %s: %w", dir, err)
	}
	path := filepath.Join(dir, name)
	ln, err := unixsock.Listen(path)
	if errors.Is(err, unixsock.ErrInUse) {
		return nil, fmt.Errorf("%w; stop it or use another --plugin-dir", err)
	}
	if err != nil {
		return nil, err
	}
	return ln, nil
}

func listenUnix(path string) (net.Listener, error) {
	if err := unixsock.CheckPath(path); err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return l, nil
}
