// Command ociimage writes virtblk's container image as an image archive
// without a container daemon: one layer holding the static binaries, the
// qemu user (uid/gid 107) and the directories the hook sidecar needs. The
// archive is an OCI image layout with docker's manifest.json alongside, so
// `skopeo copy oci-archive:`, `ctr images import` and `docker load` all take
// it. Builds are reproducible: same binaries and epoch, same digest.
//
//	ociimage --out virtblk.tar --bin out/virtblk-hook --bin out/virtblkd --bin out/virtblk
package main

import (
	"bytes"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("ociimage", flag.ContinueOnError)
	out := fs.String("out", "", "archive to write (required)")
	ref := fs.String("ref", "ghcr.io/virtblk/virtblk:latest", "image reference recorded for docker load / ctr import")
	arch := fs.String("arch", runtime.GOARCH, "image architecture (GOARCH of the binaries)")
	goos := fs.String("os", "linux", "image OS")
	epoch := fs.String("epoch", os.Getenv("SOURCE_DATE_EPOCH"), "timestamp of files and image, Unix seconds (default $SOURCE_DATE_EPOCH, else 0)")
	var bins, labels listFlag
	fs.Var(&bins, "bin", "static binary to put in /usr/local/bin (repeatable; virtblk-hook is required)")
	fs.Var(&labels, "label", "image label KEY=VALUE (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" || len(bins) == 0 || fs.NArg() > 0 {
		fs.Usage()
		return errors.New("need --out and at least one --bin, and no other arguments")
	}
	created := time.Unix(0, 0)
	if *epoch != "" {
		sec, err := strconv.ParseInt(*epoch, 10, 64)
		if err != nil || sec < 0 {
			return fmt.Errorf("epoch %q: want Unix seconds >= 0", *epoch)
		}
		created = time.Unix(sec, 0)
	}
	spec := Spec{Ref: *ref, OS: *goos, Arch: *arch, Created: created, Labels: map[string]string{}}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return fmt.Errorf("label %q: want KEY=VALUE", l)
		}
		spec.Labels[k] = v
	}
	if len(spec.Labels) == 0 {
		spec.Labels = nil
	}
	for _, p := range bins {
		data, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("read binary: %w", err)
		}
		if err := checkStatic(data, *arch); err != nil {
			return fmt.Errorf("binary %s: %w", p, err)
		}
		spec.Binaries = append(spec.Binaries, Binary{Name: filepath.Base(p), Data: data})
	}

	var buf bytes.Buffer
	res, err := Build(&buf, spec)
	if err != nil {
		return err
	}
	// Write beside the target and rename, so an interrupted build never
	// leaves a truncated archive under the final name.
	tmp, err := os.CreateTemp(filepath.Dir(*out), ".ociimage-*")
	if err != nil {
		return fmt.Errorf("create archive: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(buf.Bytes()); err != nil {
		tmp.Close()
		return fmt.Errorf("write archive %s: %w", tmp.Name(), err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("chmod archive: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close archive: %w", err)
	}
	if err := os.Rename(tmp.Name(), *out); err != nil {
		return fmt.Errorf("rename archive: %w", err)
	}
	slog.Info("image written", "out", *out, "ref", spec.Ref, "manifest", res.Manifest.Digest,
		"config", res.Config.Digest, "layer", res.Layer.Digest, "layer_bytes", res.Layer.Size, "archive_bytes", buf.Len())
	return nil
}

var goarchToELF = map[string]elf.Machine{
	"amd64":   elf.EM_X86_64,
	"arm64":   elf.EM_AARCH64,
	"s390x":   elf.EM_S390,
	"ppc64le": elf.EM_PPC64,
	"riscv64": elf.EM_RISCV,
}

// checkStatic rejects what would fail only at container start: a
// non-ELF file, a binary for another architecture, or a dynamically linked
// one (the image has no libc or loader; build with CGO_ENABLED=0).
func checkStatic(data []byte, goarch string) error {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("not an ELF executable: %w", err)
	}
	defer f.Close()
	if want, ok := goarchToELF[goarch]; ok && f.Machine != want {
		return fmt.Errorf("built for %s, image is %s: set GOARCH or --arch", f.Machine, goarch)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return errors.New("dynamically linked (has an ELF interpreter): build with CGO_ENABLED=0")
		}
	}
	if libs, err := f.ImportedLibraries(); err == nil && len(libs) > 0 {
		return fmt.Errorf("needs shared libraries %v: build with CGO_ENABLED=0", libs)
	}
	return nil
}
