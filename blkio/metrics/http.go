package metrics

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"
)

// Handler serves /metrics (the registry in text format) and /healthz.
func Handler(reg *Registry, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "metrics: use GET", http.StatusMethodNotAllowed)
			return
		}
		// Render fully first so a failure is a 500, not a truncated 200.
		var buf bytes.Buffer
		if err := reg.WriteText(&buf); err != nil {
			log.Error("render metrics", "err", err)
			http.Error(w, "metrics: render failed", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", ContentType)
		w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
		if r.Method == http.MethodHead {
			return
		}
		if _, err := w.Write(buf.Bytes()); err != nil {
			log.Debug("write metrics response", "remote", r.RemoteAddr, "err", err)
		}
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// Listen opens the metrics TCP listener on addr (":9090", "127.0.0.1:0").
// The error names the address and the flag that sets it.
func Listen(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, fmt.Errorf("metrics: empty listen address: set --metrics-addr (e.g. :9090) or the virtblk.io/metrics-port annotation")
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: listen on %q: %w (choose a free port with --metrics-addr or the virtblk.io/metrics-port annotation)", addr, err)
	}
	return ln, nil
}

// shutdownGrace bounds how long in-flight scrapes may finish after ctx ends.
const shutdownGrace = 5 * time.Second

// Serve listens on addr and serves Handler(reg) until ctx is done, then shuts
// the server down. It returns nil after a shutdown caused by ctx and an error
// if it cannot listen or the server fails.
func Serve(ctx context.Context, addr string, reg *Registry, log *slog.Logger) error {
	ln, err := Listen(addr)
	if err != nil {
		return err
	}
	return ServeListener(ctx, ln, reg, log)
}

// ServeListener is Serve on a listener the caller opened (with Listen, to
// learn the port of ":0" before serving). It closes ln.
func ServeListener(ctx context.Context, ln net.Listener, reg *Registry, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	srv := &http.Server{
		Handler:           Handler(reg, log),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	addr := ln.Addr().String()
	log.Info("metrics server listening", "addr", addr)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("metrics: serve on %s: %w", addr, err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
		log.Warn("metrics server shutdown", "addr", addr, "err", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: serve on %s: %w", addr, err)
	}
	log.Info("metrics server stopped", "addr", addr)
	return nil
}
