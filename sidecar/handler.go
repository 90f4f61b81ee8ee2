// Package sidecar owns virtblk's KubeVirt hook sidecar: the gRPC server that
// virt-launcher calls (Info, Callbacks v1alpha1/2/3, and the v1.9 Plugin
// API's MutateDomain), and the per-call pipeline that turns (domain XML,
// VMI JSON) into the domain XML to define. The pipeline (Handler) is
// independent of gRPC so it can be tested and benchmarked without sockets,
// and is also what `virtblk-hook render` runs.
package sidecar

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/virtblk/virtblk/domainxml"
	"github.com/virtblk/virtblk/sidecar/config"
)

// Call describes one OnDefineDomain or MutateDomain request.
type Call struct {
	// Number counts define calls served by this process, from 1. It is for
	// logs only: hooks must not behave differently on later calls, because
	// virt-launcher's 2nd and 3rd calls carry a lossy re-parse of the 1st
	// call's output, not a repeat of it.
	Number int64
	// API is the protocol the call came in on: "v1alpha1", "v1alpha2",
	// "v1alpha3", "plugin" or "render".
	API string
	// InvocationContext is the Plugin API's sidecar_context (Boot,
	// MigrationTarget, ...); empty for the legacy hook API.
	InvocationContext string
	// VMIJSON is the VirtualMachineInstance as virt-launcher sent it.
	VMIJSON []byte
	// Config is what the VMI's virtblk.io/ annotations ask for; never nil
	// when a Hook is called.
	Config *config.Config
}

// Hook is one step of the define pipeline. Hooks run in order, each on the
// previous one's output.
//
// DefineDomain must compute the desired domain from its input alone and be
// idempotent: virt-launcher calls it 2-3 times per VM start with lossy
// input, again on every retried define, and once more (result discarded) on
// a migration target. A hook that starts something outside the XML (the
// future vhost-user back-end) must make that start idempotent too, and undo
// it in Shutdown.
type Hook interface {
	// Name identifies the hook in logs and errors.
	Name() string
	// DefineDomain returns the rewritten domain XML and attributes for the
	// call's log line.
	DefineDomain(ctx context.Context, call *Call, domainXML []byte) ([]byte, []slog.Attr, error)
	// Shutdown is called once when the sidecar stops (virt-launcher's
	// Shutdown call or SIGTERM), after the gRPC server stopped serving.
	Shutdown(ctx context.Context) error
}

// DefaultHooks is the pipeline the sidecar runs: IOThread mapping only.
func DefaultHooks() []Hook {
	return []Hook{IOThreadHook{}}
}

// InvalidInputError marks an error caused by the request (bad annotation,
// unparsable XML, a disk the plan cannot map) rather than by the sidecar.
// The gRPC layer reports it as InvalidArgument.
type InvalidInputError struct{ Err error }

func (e *InvalidInputError) Error() string { return e.Err.Error() }
func (e *InvalidInputError) Unwrap() error { return e.Err }

func invalidInput(err error) error { return &InvalidInputError{Err: err} }

// Handler runs the define pipeline for one call at a time or many at once.
// It keeps no per-VM state: its only field that changes is the call counter
// used in logs.
type Handler struct {
	hooks []Hook
	log   *slog.Logger
	calls atomic.Int64
}

// NewHandler returns a Handler running hooks in order. A nil logger
// discards logs; nil hooks means DefaultHooks.
func NewHandler(hooks []Hook, log *slog.Logger) *Handler {
	if hooks == nil {
		hooks = DefaultHooks()
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Handler{hooks: hooks, log: log}
}

// Define rewrites one domain. When the VMI has no virtblk.io/ annotation it
// returns domainXML itself, byte for byte. Every call logs exactly one line.
func (h *Handler) Define(ctx context.Context, api, invocation string, domainXML, vmiJSON []byte) ([]byte, error) {
	start := time.Now()
	call := &Call{Number: h.calls.Add(1), API: api, InvocationContext: invocation, VMIJSON: vmiJSON}
	attrs := []slog.Attr{slog.Int64("call", call.Number), slog.String("api", api)}
	if invocation != "" {
		attrs = append(attrs, slog.String("invocation", invocation))
	}
	out, more, err := h.define(ctx, call, domainXML)
	attrs = append(attrs, more...)
	attrs = append(attrs, slog.String("took", time.Since(start).Round(time.Microsecond).String()))
	if err != nil {
		attrs = append(attrs, slog.String("error", err.Error()))
		h.log.LogAttrs(ctx, slog.LevelError, "define domain failed", attrs...)
		return nil, err
	}
	h.log.LogAttrs(ctx, slog.LevelInfo, "define domain", attrs...)
	return out, nil
}

func (h *Handler) define(ctx context.Context, call *Call, domainXML []byte) ([]byte, []slog.Attr, error) {
	cfg, err := config.FromVMIJSON(call.VMIJSON)
	if err != nil {
		return nil, nil, invalidInput(err)
	}
	if cfg == nil {
		return domainXML, []slog.Attr{slog.Bool("changed", false), slog.String("reason", "no virtblk.io/ annotation")}, nil
	}
	call.Config = cfg
	var attrs []slog.Attr
	out := domainXML
	for _, hook := range h.hooks {
		if err := ctx.Err(); err != nil {
			return nil, attrs, err
		}
		next, a, err := hook.DefineDomain(ctx, call, out)
		if err != nil {
			return nil, attrs, fmt.Errorf("%s: %w", hook.Name(), err)
		}
		out = next
		attrs = append(attrs, a...)
	}
	return out, attrs, nil
}

// Shutdown calls every hook's Shutdown, in reverse order, and returns all
// their errors.
func (h *Handler) Shutdown(ctx context.Context) error {
	var errs []error
	for i := len(h.hooks) - 1; i >= 0; i-- {
		if err := h.hooks[i].Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("shut down %s: %w", h.hooks[i].Name(), err))
		}
	}
	return errors.Join(errs...)
}

// IOThreadHook maps virtqueues of virtio disks onto an IOThread pool, as
// the virtblk.io/iothreads annotations ask. It is a pure function of its
// input.
type IOThreadHook struct{}

// Name implements Hook.
func (IOThreadHook) Name() string { return "iothreads" }

// Shutdown implements Hook; there is nothing to stop.
func (IOThreadHook) Shutdown(context.Context) error { return nil }

// DefineDomain implements Hook.
func (IOThreadHook) DefineDomain(_ context.Context, call *Call, domainXML []byte) ([]byte, []slog.Attr, error) {
	plan := call.Config.IOThreads
	if plan == nil {
		return domainXML, nil, nil
	}
	out, rep, err := domainxml.RewriteIOThreads(domainXML, *plan)
	if err != nil {
		return nil, nil, invalidInput(err)
	}
	return out, reportAttrs(rep), nil
}

// reportAttrs summarises a rewrite for the call's log line: how many disks
// changed, the domain's IOThread count and pool ids, and per disk its
// queue count and the IOThreads serving it.
func reportAttrs(rep domainxml.Report) []slog.Attr {
	disks := make([]string, 0, len(rep.Disks))
	totalQueues := 0
	for _, d := range rep.Disks {
		ids := make([]string, 0, len(d.Threads))
		for _, t := range d.Threads {
			ids = append(ids, fmt.Sprint(t.ID))
		}
		name := strings.TrimPrefix(d.Alias, config.AliasPrefix)
		if d.Dev != "" {
			name += "/" + d.Dev
		}
		disks = append(disks, fmt.Sprintf("%s:queues=%d:iothreads=%s", name, d.Queues, strings.Join(ids, "+")))
		totalQueues += d.Queues
	}
	pool := ""
	if n := len(rep.PoolIDs); n > 0 {
		pool = fmt.Sprintf("%d-%d", rep.PoolIDs[0], rep.PoolIDs[n-1])
	}
	return []slog.Attr{
		slog.Bool("changed", len(rep.Disks) > 0),
		slog.Int("disks_changed", len(rep.Disks)),
		slog.Uint64("iothreads", uint64(rep.IOThreads)),
		slog.String("pool", pool),
		slog.Int("queues", totalQueues),
		slog.String("disks", strings.Join(disks, " ")),
	}
}
