package main

// The image builder's pure core: from in-memory binaries to the bytes of an
// image archive. No file system, clock or daemon: the same inputs give the
// same bytes, so the same binaries give the same image digest.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Media types of the OCI image spec (v1.1).
const (
	MediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	MediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	MediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	MediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar+gzip"
)

// The image runs as KubeVirt's qemu user: virt-controller starts hook
// sidecars of non-root VMIs with runAsNonRoot and the launcher's uid 107,
// and QEMU (uid 107) must be able to connect to the sockets the sidecar
// creates.
const (
	QemuUID = 107
	QemuGID = 107

	BinDir     = "usr/local/bin"
	Entrypoint = "/usr/local/bin/virtblk-hook"
)

// Binary is one executable to put in /usr/local/bin.
type Binary struct {
	Name string // file name in /usr/local/bin
	Data []byte
}

// Spec is everything that determines the image.
type Spec struct {
	// Ref is the image reference recorded for docker load and ctr import,
	// e.g. ghcr.io/virtblk/virtblk:latest.
	Ref string
	// OS and Arch are the platform of the binaries (GOOS/GOARCH names).
	OS, Arch string
	// Created is the timestamp of every file and of the image; fix it (e.g.
	// from SOURCE_DATE_EPOCH) for reproducible digests.
	Created time.Time
	// Binaries go to /usr/local/bin; one must be virtblk-hook, the
	// entrypoint.
	Binaries []Binary
	// Labels are image config labels (org.opencontainers.image.*).
	Labels map[string]string
}

// Descriptor is an OCI content descriptor.
type Descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Platform    *Platform         `json:"platform,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Platform is an index entry's platform.
type Platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// Manifest is an OCI image manifest.
type Manifest struct {
	SchemaVersion int               `json:"schemaVersion"`
	MediaType     string            `json:"mediaType"`
	Config        Descriptor        `json:"config"`
	Layers        []Descriptor      `json:"layers"`
	Annotations   map[string]string `json:"annotations,omitempty"`
}

// Index is an OCI image index (index.json of the layout).
type Index struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []Descriptor `json:"manifests"`
}

// ImageConfig is the OCI image configuration.
type ImageConfig struct {
	Created      string        `json:"created"`
	Architecture string        `json:"architecture"`
	OS           string        `json:"os"`
	Config       RuntimeConfig `json:"config"`
	RootFS       RootFS        `json:"rootfs"`
	History      []History     `json:"history"`
}

// RuntimeConfig is the "config" member of the image configuration.
type RuntimeConfig struct {
	User       string            `json:"User"`
	Env        []string          `json:"Env"`
	Entrypoint []string          `json:"Entrypoint"`
	WorkingDir string            `json:"WorkingDir"`
	Labels     map[string]string `json:"Labels,omitempty"`
}

// RootFS lists the layers by the digest of their uncompressed tar.
type RootFS struct {
	Type    string   `json:"type"`
	DiffIDs []string `json:"diff_ids"`
}

// History is one entry of the image history.
type History struct {
	Created   string `json:"created"`
	CreatedBy string `json:"created_by"`
}

// DockerManifest is one entry of manifest.json, the file `docker load`
// reads (docker's own archive format, written next to the OCI layout).
type DockerManifest struct {
	Config   string   `json:"Config"`
	RepoTags []string `json:"RepoTags"`
	Layers   []string `json:"Layers"`
}

// Result names what Build wrote.
type Result struct {
	Manifest Descriptor
	Config   Descriptor
	Layer    Descriptor
	DiffID   string // sha256 of the uncompressed layer
}

var (
	binaryName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
	// A docker-style reference: registry/repo path and a tag (digests are
	// assigned by the registry, not chosen here).
	refSyntax = regexp.MustCompile(`^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
)

func (s Spec) validate() error {
	if !refSyntax.MatchString(s.Ref) {
		return fmt.Errorf("image reference %q: want lowercase REGISTRY/REPO:TAG, e.g. ghcr.io/virtblk/virtblk:latest", s.Ref)
	}
	if s.OS == "" || s.Arch == "" {
		return fmt.Errorf("platform %q/%q: set both OS and architecture", s.OS, s.Arch)
	}
	seen := map[string]bool{}
	hasEntry := false
	for _, b := range s.Binaries {
		if !binaryName.MatchString(b.Name) {
			return fmt.Errorf("binary name %q: want a plain file name", b.Name)
		}
		if seen[b.Name] {
			return fmt.Errorf("binary %s given twice", b.Name)
		}
		seen[b.Name] = true
		if len(b.Data) == 0 {
			return fmt.Errorf("binary %s is empty", b.Name)
		}
		hasEntry = hasEntry || "/"+BinDir+"/"+b.Name == Entrypoint
	}
	if !hasEntry {
		return fmt.Errorf("no binary named virtblk-hook: the image's entrypoint is %s", Entrypoint)
	}
	return nil
}

// fileEntry is one entry of the layer.
type fileEntry struct {
	name     string // relative, "/"-terminated for directories
	mode     int64
	uid, gid int
	data     []byte
}

// rootfs is the image's file system: the binaries, a passwd/group naming
// the qemu user, and the directories the sidecar uses, owned so that uid
// 107 can write them even with all capabilities dropped.
func rootfs(s Spec) []fileEntry {
	dir := func(name string, mode int64, owner int) fileEntry {
		return fileEntry{name: name + "/", mode: mode, uid: owner, gid: owner}
	}
	entries := []fileEntry{
		dir("etc", 0o755, 0),
		{name: "etc/passwd", mode: 0o644, data: []byte(
			"root:x:0:0:root:/root:/sbin/nologin\n" +
				fmt.Sprintf("qemu:x:%d:%d:qemu:/var/lib/virtblk:/sbin/nologin\n", QemuUID, QemuGID))},
		{name: "etc/group", mode: 0o644, data: []byte(
			"root:x:0:\n" + fmt.Sprintf("qemu:x:%d:\n", QemuGID))},
		// Go's os.TempDir and the store's scratch files.
		dir("tmp", 0o1777, 0),
		dir("usr", 0o755, 0),
		dir("usr/local", 0o755, 0),
		dir(BinDir, 0o755, 0),
		dir("var", 0o755, 0),
		dir("var/lib", 0o755, 0),
		// Default store location (the hookSidecars pvc's volumePath).
		dir("var/lib/virtblk", 0o750, QemuUID),
		dir("var/run", 0o755, 0),
		// Mount point of the hook-sidecar-sockets emptyDir.
		dir("var/run/kubevirt-hooks", 0o755, QemuUID),
	}
	for _, b := range s.Binaries {
		entries = append(entries, fileEntry{name: BinDir + "/" + b.Name, mode: 0o755, data: b.Data})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	return entries
}

// writeTar writes entries as a USTAR archive with one fixed timestamp.
func writeTar(w io.Writer, entries []fileEntry, mtime time.Time) error {
	tw := tar.NewWriter(w)
	for _, e := range entries {
		h := &tar.Header{
			Name:    e.name,
			Mode:    e.mode,
			Uid:     e.uid,
			Gid:     e.gid,
			Uname:   userName(e.uid),
			Gname:   userName(e.gid),
			ModTime: mtime,
			Format:  tar.FormatUSTAR,
		}
		if strings.HasSuffix(e.name, "/") {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("tar header %s: %w", e.name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return fmt.Errorf("tar data %s: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("close tar: %w", err)
	}
	return nil
}

func userName(id int) string {
	if id == QemuUID {
		return "qemu"
	}
	return "root"
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func blobPath(digest string) string {
	return "blobs/sha256/" + strings.TrimPrefix(digest, "sha256:")
}

// Build writes the image archive to w: an OCI image layout (oci-layout,
// index.json, blobs/sha256/...) that skopeo (oci-archive:) and
// `ctr images import` read, plus docker's manifest.json pointing at the
// same blobs so that `docker load` reads it too.
func Build(w io.Writer, s Spec) (Result, error) {
	if err := s.validate(); err != nil {
		return Result{}, err
	}
	mtime := s.Created.UTC().Truncate(time.Second)
	created := mtime.Format(time.RFC3339)

	var layerTar bytes.Buffer
	if err := writeTar(&layerTar, rootfs(s), mtime); err != nil {
		return Result{}, fmt.Errorf("layer: %w", err)
	}
	var layerGz bytes.Buffer
	gz, err := gzip.NewWriterLevel(&layerGz, gzip.BestCompression)
	if err != nil {
		return Result{}, fmt.Errorf("gzip layer: %w", err)
	}
	// The gzip header keeps its zero ModTime and no name: both would make
	// the layer digest depend on when and where it was built.
	if _, err := gz.Write(layerTar.Bytes()); err != nil {
		return Result{}, fmt.Errorf("gzip layer: %w", err)
	}
	if err := gz.Close(); err != nil {
		return Result{}, fmt.Errorf("gzip layer: %w", err)
	}
	res := Result{
		DiffID: digestOf(layerTar.Bytes()),
		Layer:  Descriptor{MediaType: MediaTypeLayer, Digest: digestOf(layerGz.Bytes()), Size: int64(layerGz.Len())},
	}

	cfg := ImageConfig{
		Created:      created,
		Architecture: s.Arch,
		OS:           s.OS,
		Config: RuntimeConfig{
			User:       fmt.Sprintf("%d:%d", QemuUID, QemuGID),
			Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin"},
			Entrypoint: []string{Entrypoint},
			WorkingDir: "/",
			Labels:     s.Labels,
		},
		RootFS:  RootFS{Type: "layers", DiffIDs: []string{res.DiffID}},
		History: []History{{Created: created, CreatedBy: "virtblk hack/ociimage: static binaries, passwd/group, directories"}},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return Result{}, fmt.Errorf("encode image config: %w", err)
	}
	res.Config = Descriptor{MediaType: MediaTypeConfig, Digest: digestOf(cfgJSON), Size: int64(len(cfgJSON))}

	man := Manifest{
		SchemaVersion: 2,
		MediaType:     MediaTypeManifest,
		Config:        res.Config,
		Layers:        []Descriptor{res.Layer},
		Annotations:   map[string]string{"org.opencontainers.image.created": created},
	}
	manJSON, err := json.Marshal(man)
	if err != nil {
		return Result{}, fmt.Errorf("encode manifest: %w", err)
	}
	res.Manifest = Descriptor{MediaType: MediaTypeManifest, Digest: digestOf(manJSON), Size: int64(len(manJSON))}

	_, tag, _ := cutLast(s.Ref, ":")
	entry := res.Manifest
	entry.Platform = &Platform{Architecture: s.Arch, OS: s.OS}
	entry.Annotations = map[string]string{
		// containerd (ctr import, docker >= 25) names the image by this.
		"io.containerd.image.name": s.Ref,
		// skopeo's oci-archive:FILE:TAG picks the manifest by this.
		"org.opencontainers.image.ref.name": tag,
	}
	idxJSON, err := json.Marshal(Index{SchemaVersion: 2, MediaType: MediaTypeIndex, Manifests: []Descriptor{entry}})
	if err != nil {
		return Result{}, fmt.Errorf("encode index: %w", err)
	}
	dockerJSON, err := json.Marshal([]DockerManifest{{
		Config:   blobPath(res.Config.Digest),
		RepoTags: []string{s.Ref},
		Layers:   []string{blobPath(res.Layer.Digest)},
	}})
	if err != nil {
		return Result{}, fmt.Errorf("encode manifest.json: %w", err)
	}

	archive := []fileEntry{
		{name: "blobs/", mode: 0o755},
		{name: "blobs/sha256/", mode: 0o755},
		{name: blobPath(res.Layer.Digest), mode: 0o644, data: layerGz.Bytes()},
		{name: blobPath(res.Config.Digest), mode: 0o644, data: cfgJSON},
		{name: blobPath(res.Manifest.Digest), mode: 0o644, data: manJSON},
		{name: "oci-layout", mode: 0o644, data: []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{name: "index.json", mode: 0o644, data: idxJSON},
		{name: "manifest.json", mode: 0o644, data: dockerJSON},
	}
	if err := writeTar(w, archive, mtime); err != nil {
		return Result{}, fmt.Errorf("image archive: %w", err)
	}
	return res, nil
}

func cutLast(s, sep string) (before, after string, found bool) {
	if i := strings.LastIndex(s, sep); i >= 0 {
		return s[:i], s[i+len(sep):], true
	}
	return s, "", false
}
