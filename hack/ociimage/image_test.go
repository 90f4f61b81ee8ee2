package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/virtblk/virtblk/internal/testenv"
)

// fakeBinaries are small generated stand-ins for the real binaries: the
// builder does not care what it packs (main's checkStatic does, tested
// separately).
func fakeBinaries() []Binary {
	var bins []Binary
	for i, name := range []string{"virtblk-hook", "virtblkd", "virtblk"} {
		data := make([]byte, 4096+i*1000)
		for j := range data {
			data[j] = byte(j*7 + i)
		}
		bins = append(bins, Binary{Name: name, Data: data})
	}
	return bins
}

func testSpec() Spec {
	return Spec{
		Ref:      "ghcr.io/virtblk/virtblk:test",
		OS:       "linux",
		Arch:     "amd64",
		Created:  time.Unix(1700000000, 0),
		Binaries: fakeBinaries(),
		Labels:   map[string]string{"org.opencontainers.image.source": "https://github.com/virtblk/virtblk"},
	}
}

type tarFile struct {
	hdr  *tar.Header
	data []byte
}

func readTar(t *testing.T, r io.Reader) (map[string]tarFile, []string) {
	t.Helper()
	tr := tar.NewReader(r)
	files := map[string]tarFile{}
	var order []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files, order
		}
		if err != nil {
			t.Fatalf("read tar: %v", err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatalf("read tar entry %s: %v", h.Name, err)
		}
		if _, dup := files[h.Name]; dup {
			t.Fatalf("tar entry %s appears twice", h.Name)
		}
		files[h.Name] = tarFile{h, data}
		order = append(order, h.Name)
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// blob returns the blob a descriptor names, after checking its digest and
// size against the bytes in the archive.
func blob(t *testing.T, files map[string]tarFile, d Descriptor) []byte {
	t.Helper()
	f, ok := files["blobs/sha256/"+strings.TrimPrefix(d.Digest, "sha256:")]
	if !ok {
		t.Fatalf("descriptor %s: blob missing from archive", d.Digest)
	}
	if got := sha(f.data); got != d.Digest {
		t.Errorf("blob %s has digest %s", d.Digest, got)
	}
	if int64(len(f.data)) != d.Size {
		t.Errorf("blob %s: descriptor size %d, blob size %d", d.Digest, d.Size, len(f.data))
	}
	return f.data
}

func decode(t *testing.T, name string, data []byte, v any) {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v\n%s", name, err, data)
	}
}

// TestArchive builds an image from generated files, reopens the archive and
// checks it the way skopeo/containerd/docker would: every digest and size,
// the layer's diff_id, the config, and the layer's files.
func TestArchive(t *testing.T) {
	spec := testSpec()
	var buf bytes.Buffer
	res, err := Build(&buf, spec)
	if err != nil {
		t.Fatal(err)
	}
	files, _ := readTar(t, bytes.NewReader(buf.Bytes()))

	// Every blob is stored under its own digest.
	blobs := 0
	for name, f := range files {
		if hexd, ok := strings.CutPrefix(name, "blobs/sha256/"); ok && hexd != "" {
			blobs++
			if got := sha(f.data); got != "sha256:"+hexd {
				t.Errorf("%s has digest %s", name, got)
			}
		}
	}
	if blobs != 3 {
		t.Errorf("%d blobs, want 3 (layer, config, manifest)", blobs)
	}

	if got := string(files["oci-layout"].data); got != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout = %q", got)
	}
	var idx Index
	decode(t, "index.json", files["index.json"].data, &idx)
	if idx.SchemaVersion != 2 || idx.MediaType != MediaTypeIndex || len(idx.Manifests) != 1 {
		t.Fatalf("index.json = %+v", idx)
	}
	md := idx.Manifests[0]
	if md.MediaType != MediaTypeManifest || md.Digest != res.Manifest.Digest {
		t.Errorf("index entry %+v, want manifest %s", md, res.Manifest.Digest)
	}
	if md.Annotations["io.containerd.image.name"] != spec.Ref || md.Annotations["org.opencontainers.image.ref.name"] != "test" {
		t.Errorf("index annotations %v", md.Annotations)
	}
	if md.Platform == nil || md.Platform.OS != "linux" || md.Platform.Architecture != "amd64" {
		t.Errorf("index platform %+v", md.Platform)
	}

	var man Manifest
	decode(t, "manifest", blob(t, files, md), &man)
	if man.SchemaVersion != 2 || man.MediaType != MediaTypeManifest {
		t.Errorf("manifest header %d %s", man.SchemaVersion, man.MediaType)
	}
	if man.Config.MediaType != MediaTypeConfig || len(man.Layers) != 1 || man.Layers[0].MediaType != MediaTypeLayer {
		t.Fatalf("manifest descriptors %+v", man)
	}

	var cfg ImageConfig
	decode(t, "config", blob(t, files, man.Config), &cfg)
	if cfg.Config.User != "107:107" {
		t.Errorf("config User = %q, want 107:107", cfg.Config.User)
	}
	if len(cfg.Config.Entrypoint) != 1 || cfg.Config.Entrypoint[0] != "/usr/local/bin/virtblk-hook" {
		t.Errorf("config Entrypoint = %q", cfg.Config.Entrypoint)
	}
	if cfg.OS != "linux" || cfg.Architecture != "amd64" || cfg.Created != "2023-11-14T22:13:20Z" {
		t.Errorf("config platform/created = %s/%s %s", cfg.OS, cfg.Architecture, cfg.Created)
	}
	if cfg.Config.Labels["org.opencontainers.image.source"] == "" {
		t.Errorf("config labels %v", cfg.Config.Labels)
	}

	// diff_id is the digest of the UNCOMPRESSED layer.
	layerGz := blob(t, files, man.Layers[0])
	zr, err := gzip.NewReader(bytes.NewReader(layerGz))
	if err != nil {
		t.Fatal(err)
	}
	layer, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != sha(layer) || cfg.RootFS.Type != "layers" {
		t.Errorf("rootfs %+v, uncompressed layer digest %s", cfg.RootFS, sha(layer))
	}
	if sha(layer) == sha(layerGz) {
		t.Error("layer is not compressed")
	}

	// docker load's manifest.json points at the same blobs.
	var dm []DockerManifest
	decode(t, "manifest.json", files["manifest.json"].data, &dm)
	if len(dm) != 1 || len(dm[0].RepoTags) != 1 || dm[0].RepoTags[0] != spec.Ref {
		t.Fatalf("manifest.json = %+v", dm)
	}
	if got := sha(files[dm[0].Config].data); got != man.Config.Digest {
		t.Errorf("manifest.json Config %s has digest %s, want %s", dm[0].Config, got, man.Config.Digest)
	}
	if len(dm[0].Layers) != 1 || sha(files[dm[0].Layers[0]].data) != man.Layers[0].Digest {
		t.Errorf("manifest.json Layers %v do not match the manifest", dm[0].Layers)
	}

	checkLayer(t, layer, spec)
}

func checkLayer(t *testing.T, layer []byte, spec Spec) {
	t.Helper()
	files, order := readTar(t, bytes.NewReader(layer))
	type want struct {
		typ      byte
		mode     int64
		uid, gid int
	}
	wants := map[string]want{
		"etc/":                    {tar.TypeDir, 0o755, 0, 0},
		"etc/passwd":              {tar.TypeReg, 0o644, 0, 0},
		"etc/group":               {tar.TypeReg, 0o644, 0, 0},
		"tmp/":                    {tar.TypeDir, 0o1777, 0, 0},
		"usr/local/bin/":          {tar.TypeDir, 0o755, 0, 0},
		"var/lib/virtblk/":        {tar.TypeDir, 0o750, 107, 107},
		"var/run/kubevirt-hooks/": {tar.TypeDir, 0o755, 107, 107},
	}
	for _, b := range spec.Binaries {
		wants["usr/local/bin/"+b.Name] = want{tar.TypeReg, 0o755, 0, 0}
	}
	for name, w := range wants {
		f, ok := files[name]
		if !ok {
			t.Errorf("layer lacks %s", name)
			continue
		}
		h := f.hdr
		if h.Typeflag != w.typ || h.Mode != w.mode || h.Uid != w.uid || h.Gid != w.gid {
			t.Errorf("%s: type %c mode %o owner %d:%d, want type %c mode %o owner %d:%d",
				name, h.Typeflag, h.Mode, h.Uid, h.Gid, w.typ, w.mode, w.uid, w.gid)
		}
	}
	for _, name := range order {
		h := files[name].hdr
		if !h.ModTime.Equal(spec.Created) {
			t.Errorf("%s: mtime %v, want the fixed %v", name, h.ModTime, spec.Created)
		}
		if strings.HasPrefix(name, "/") || strings.Contains(name, "..") {
			t.Errorf("unsafe layer path %q", name)
		}
	}
	// Parents come before children, as extractors expect.
	seen := map[string]bool{}
	for _, name := range order {
		parent := filepath.Dir(strings.TrimSuffix(name, "/"))
		if parent != "." && !seen[parent+"/"] {
			t.Errorf("%s comes before its directory %s/", name, parent)
		}
		seen[name] = true
	}
	for _, b := range spec.Binaries {
		if !bytes.Equal(files["usr/local/bin/"+b.Name].data, b.Data) {
			t.Errorf("usr/local/bin/%s content differs from the input", b.Name)
		}
	}
	if !strings.Contains(string(files["etc/passwd"].data), "\nqemu:x:107:107:") {
		t.Errorf("etc/passwd lacks qemu 107:107:\n%s", files["etc/passwd"].data)
	}
	if !strings.Contains(string(files["etc/group"].data), "\nqemu:x:107:") {
		t.Errorf("etc/group lacks qemu 107:\n%s", files["etc/group"].data)
	}
}

// TestReproducible: the same inputs give the same bytes; binaries given
// in another order too; a changed binary changes the digest.
func TestReproducible(t *testing.T) {
	build := func(s Spec) ([]byte, Result) {
		var buf bytes.Buffer
		res, err := Build(&buf, s)
		if err != nil {
			t.Fatal(err)
		}
		return buf.Bytes(), res
	}
	a, ra := build(testSpec())
	b, _ := build(testSpec())
	if !bytes.Equal(a, b) {
		t.Fatal("two builds of the same spec differ")
	}
	s := testSpec()
	s.Binaries[0], s.Binaries[2] = s.Binaries[2], s.Binaries[0]
	if c, _ := build(s); !bytes.Equal(a, c) {
		t.Error("binary order changes the archive")
	}
	s = testSpec()
	s.Binaries[1].Data = append([]byte{}, s.Binaries[1].Data...)
	s.Binaries[1].Data[0] ^= 1
	if _, rd := build(s); rd.Manifest.Digest == ra.Manifest.Digest || rd.DiffID == ra.DiffID {
		t.Error("a changed binary did not change the image digest")
	}
	s = testSpec()
	s.Created = s.Created.Add(time.Second)
	if _, rd := build(s); rd.DiffID == ra.DiffID {
		t.Error("the epoch did not change the layer")
	}
}

func TestSpecRejects(t *testing.T) {
	cases := []struct {
		name string
		edit func(*Spec)
		want string
	}{
		{"no tag", func(s *Spec) { s.Ref = "ghcr.io/virtblk/virtblk" }, "REGISTRY/REPO:TAG"},
		{"upper case", func(s *Spec) { s.Ref = "ghcr.io/VirtBlk/virtblk:v1" }, "REGISTRY/REPO:TAG"},
		{"no arch", func(s *Spec) { s.Arch = "" }, "architecture"},
		{"no entrypoint", func(s *Spec) { s.Binaries = s.Binaries[1:] }, "no binary named virtblk-hook"},
		{"duplicate", func(s *Spec) { s.Binaries = append(s.Binaries, s.Binaries[0]) }, "given twice"},
		{"empty", func(s *Spec) { s.Binaries[1].Data = nil }, "is empty"},
		{"path name", func(s *Spec) { s.Binaries[1].Name = "../evil" }, "plain file name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := testSpec()
			c.edit(&s)
			var buf bytes.Buffer
			_, err := Build(&buf, s)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want one containing %q", err, c.want)
			}
			if buf.Len() != 0 {
				t.Error("wrote output for an invalid spec")
			}
		})
	}
}

// staticHook compiles a tiny static Go program to stand in for
// virtblk-hook, so the command-line path (with its ELF checks) runs on a
// real executable. Built once per test binary run; TestMain removes it.
func staticHook(t *testing.T) string {
	t.Helper()
	hookOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ociimage-test-")
		if err != nil {
			hookErr = err
			return
		}
		hookDir = dir
		src := filepath.Join(dir, "main.go")
		if err := os.WriteFile(src, []byte("package main\nfunc main() { println(\"hook\") }\n"), 0o644); err != nil {
			hookErr = err
			return
		}
		bin := filepath.Join(dir, "virtblk-hook")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, src)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=", "GO111MODULE=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			hookErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		hookBin = bin
	})
	if hookErr != nil {
		t.Fatal(hookErr)
	}
	return hookBin
}

var (
	hookOnce sync.Once
	hookDir  string
	hookBin  string
	hookErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if hookDir != "" {
		os.RemoveAll(hookDir)
	}
	os.Exit(code)
}

func TestCheckStatic(t *testing.T) {
	if err := checkStatic(mustRead(t, staticHook(t)), "amd64"); err != nil {
		t.Errorf("static Go binary rejected: %v", err)
	}
	if err := checkStatic(mustRead(t, staticHook(t)), "arm64"); err == nil || !strings.Contains(err.Error(), "built for") {
		t.Errorf("amd64 binary for an arm64 image: err = %v", err)
	}
	if err := checkStatic([]byte("#!/bin/sh\necho hi\n"), "amd64"); err == nil || !strings.Contains(err.Error(), "not an ELF") {
		t.Errorf("shell script: err = %v", err)
	}
	// /bin/sh on Debian is dynamically linked against libc.
	if err := checkStatic(mustRead(t, "/bin/sh"), "amd64"); err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("dynamic /bin/sh: err = %v", err)
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRun drives the command line twice and checks the archive is written
// and byte-identical.
func TestRun(t *testing.T) {
	hook := staticHook(t)
	dir := t.TempDir()
	var outs [][]byte
	for i := range 2 {
		out := filepath.Join(dir, "img"+string(rune('a'+i))+".tar")
		if err := run([]string{"--out", out, "--bin", hook, "--arch", "amd64", "--epoch", "0", "--label", "a=b"}); err != nil {
			t.Fatal(err)
		}
		outs = append(outs, mustRead(t, out))
	}
	if !bytes.Equal(outs[0], outs[1]) {
		t.Error("two runs on the same binary wrote different archives")
	}
	if err := run([]string{"--out", filepath.Join(dir, "x.tar"), "--bin", "/bin/sh"}); err == nil {
		t.Error("a dynamic binary was accepted")
	}
	if err := run([]string{"--out", filepath.Join(dir, "y.tar"), "--bin", hook, "--epoch", "yesterday"}); err == nil {
		t.Error("a bad epoch was accepted")
	}
	if _, err := os.Stat(filepath.Join(dir, "x.tar")); !errors.Is(err, os.ErrNotExist) {
		t.Error("a failed run left an archive behind")
	}
}

// TestSkopeoAcceptsArchive has skopeo (apt package skopeo) read the
// archive as oci-archive and copy it, which verifies every blob's digest,
// and convert it to a docker-archive.
func TestSkopeoAcceptsArchive(t *testing.T) {
	testenv.Tool(t, "skopeo", "skopeo")
	dir := t.TempDir()
	var buf bytes.Buffer
	res, err := Build(&buf, Spec{Ref: "ghcr.io/virtblk/virtblk:test", OS: "linux", Arch: "amd64",
		Created: time.Unix(0, 0), Binaries: []Binary{{Name: "virtblk-hook", Data: mustRead(t, staticHook(t))}}})
	if err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "img.tar")
	if err := os.WriteFile(archive, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	skopeo := func(args ...string) []byte {
		t.Helper()
		cmd := exec.Command("skopeo", append([]string{"--insecure-policy", "--tmpdir", dir}, args...)...)
		cmd.Env = append(os.Environ(), "HOME="+dir)
		out, err := cmd.Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				t.Fatalf("skopeo %v: %v\n%s", args, err, ee.Stderr)
			}
			t.Fatalf("skopeo %v: %v", args, err)
		}
		return out
	}
	var info struct {
		Digest       string
		Architecture string
		Os           string
		Layers       []string
	}
	if err := json.Unmarshal(skopeo("inspect", "oci-archive:"+archive+":test"), &info); err != nil {
		t.Fatal(err)
	}
	if info.Digest != res.Manifest.Digest || info.Os != "linux" || info.Architecture != "amd64" ||
		len(info.Layers) != 1 || info.Layers[0] != res.Layer.Digest {
		t.Errorf("skopeo inspect = %+v, want manifest %s layer %s", info, res.Manifest.Digest, res.Layer.Digest)
	}
	var cfg ImageConfig
	if err := json.Unmarshal(skopeo("inspect", "--config", "oci-archive:"+archive), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Config.User != "107:107" || cfg.RootFS.DiffIDs[0] != res.DiffID {
		t.Errorf("skopeo config = %+v", cfg)
	}
	skopeo("copy", "oci-archive:"+archive, "dir:"+filepath.Join(dir, "copy"))
	skopeo("copy", "oci-archive:"+archive, "docker-archive:"+filepath.Join(dir, "docker.tar")+":ghcr.io/virtblk/virtblk:test")
	// The same archive read through docker's manifest.json (what
	// `docker load` uses) must give an image too.
	var dinfo struct{ Digest string }
	if err := json.Unmarshal(skopeo("inspect", "docker-archive:"+archive), &dinfo); err != nil {
		t.Fatal(err)
	}
	if dinfo.Digest == "" {
		t.Error("skopeo could not read the archive as docker-archive")
	}
}
