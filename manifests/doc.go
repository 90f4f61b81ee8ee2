// Package manifests holds virtblk's Kubernetes manifests (a kustomize base
// enabling KubeVirt's Sidecar feature gate and sizing hook sidecars, the
// example workloads, and overlays) as YAML files. It has no Go API: its tests
// decode every manifest strictly into the k8s.io/api and kubevirt.io/api
// types and check the virtblk annotations, so a typo fails CI instead of
// being silently ignored by the API server or by KubeVirt.
package manifests
