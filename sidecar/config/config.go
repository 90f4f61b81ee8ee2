// Package config owns virtblk's user-facing contract: the virtblk.io/
// annotations on a VirtualMachineInstance. It turns them, together with the
// VMI spec they refer to, into a domainxml plan, or into a list of errors
// that each name the annotation, its value and the fix. It is pure: no I/O,
// no clock, no global state.
package config

import (
	"encoding/json"
	"fmt"
	"strings"

	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/virtblk/virtblk/domainxml"
)

// Prefix starts every annotation key virtblk reads. Any key under it that
// virtblk does not know is an error, so typos never pass silently.
const Prefix = "virtblk.io/"

// Limits on counts. They keep a typo such as "40000" from turning into a
// domain QEMU refuses, and bound the work a hostile annotation can cause.
const (
	// MaxIOThreads bounds virtblk.io/iothreads.
	MaxIOThreads = 256
	// MaxQueues is QEMU's VIRTIO_QUEUE_MAX, the most virtqueues a
	// virtio-blk device can have.
	MaxQueues = domainxml.MaxQueues
)

// Config is what a VMI's virtblk.io/ annotations ask for.
type Config struct {
	// IOThreads is the IOThread pool and virtqueue mapping plan; nil when
	// only the serve mode is asked for.
	IOThreads *domainxml.IOThreadPlan
	// Serve lists the disks served from virtblk's store over
	// vhost-user-blk; nil without virtblk.io/serve.
	Serve *ServePlan
}

// FromVMIJSON parses the VMI JSON that virt-launcher sends with every hook
// call. It returns (nil, nil) when the VMI carries no virtblk.io/
// annotation: the hook then has nothing to do. The annotations are looked at
// before the full VMI is decoded, so an unrelated VMI never fails here.
func FromVMIJSON(vmiJSON []byte) (*Config, error) {
	var meta struct {
		Metadata struct {
			Annotations map[string]string `json:"annotations"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(vmiJSON, &meta); err != nil {
		return nil, fmt.Errorf("decode VMI JSON metadata: %w", err)
	}
	if !hasVirtblkKey(meta.Metadata.Annotations) {
		return nil, nil
	}
	vmi := &kubevirtv1.VirtualMachineInstance{}
	if err := json.Unmarshal(vmiJSON, vmi); err != nil {
		return nil, fmt.Errorf("decode VMI JSON: %w", err)
	}
	return Parse(vmi)
}

// Parse reads vmi's virtblk.io/ annotations. It returns (nil, nil) when
// there are none, and an Errors value listing every problem found otherwise.
func Parse(vmi *kubevirtv1.VirtualMachineInstance) (*Config, error) {
	if vmi == nil || !hasVirtblkKey(vmi.Annotations) {
		return nil, nil
	}
	p := parser{vmi: vmi, s: settings{queueMaps: map[string]queueMapSetting{}}}
	p.readAnnotations()
	serve := p.buildServePlan()
	var plan *domainxml.IOThreadPlan
	// With virtblk.io/serve alone there is no IOThread mapping to ask for;
	// otherwise virtblk.io/iothreads is required as before.
	_, serveGiven := p.vmi.Annotations[KeyServe]
	if !serveGiven || p.iothreadKeysGiven() {
		plan = p.buildIOThreadPlan()
	}
	if len(p.errs) > 0 {
		return nil, p.errs.sorted()
	}
	return &Config{IOThreads: plan, Serve: serve}, nil
}

func hasVirtblkKey(annotations map[string]string) bool {
	for k := range annotations {
		if strings.HasPrefix(k, Prefix) {
			return true
		}
	}
	return false
}

// Error is one problem with one annotation.
type Error struct {
	// Annotation is the full annotation key.
	Annotation string
	// Value is the annotation's value as given ("" when it is missing).
	Value string
	// Problem says what is wrong.
	Problem string
	// Fix says what to write instead.
	Fix string
}

func (e *Error) Error() string {
	return fmt.Sprintf("annotation %s=%q: %s; fix: %s", e.Annotation, e.Value, e.Problem, e.Fix)
}

// Errors is every problem found in one VMI's annotations.
type Errors []*Error

func (es Errors) Error() string {
	if len(es) == 1 {
		return "virtblk.io annotations: " + es[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "virtblk.io annotations: %d problems:", len(es))
	for i, e := range es {
		fmt.Fprintf(&b, " (%d) %s", i+1, e.Error())
	}
	return b.String()
}

// Unwrap lets errors.As find a single *Error.
func (es Errors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

// sorted orders errors by annotation key, so the message does not depend on
// map iteration order and two calls with the same input say the same thing.
func (es Errors) sorted() Errors {
	out := append(Errors(nil), es...)
	for i := 1; i < len(out); i++ {
		for j := i; j > 0 && out[j].Annotation < out[j-1].Annotation; j-- {
			out[j], out[j-1] = out[j-1], out[j]
		}
	}
	return out
}
