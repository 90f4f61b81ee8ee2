// Package hookapi holds virtblk's own .proto definitions of the KubeVirt hook
// wire protocol (Info, Callbacks v1alpha1/v1alpha2/v1alpha3, and the v1.9
// Plugin API) and the Go code generated from them. The protos are written
// from the wire facts only (package, service, method names, field numbers),
// so virtblk does not import kubevirt.io/kubevirt and its replace directives.
package hookapi

//go:generate ./generate.sh
