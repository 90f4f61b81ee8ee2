#!/bin/sh
# Regenerates the Go code for virtblk's copies of the KubeVirt hook protos.
# Needs: protoc (Debian protobuf-compiler), and
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.6
#   go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1
# The generated files are committed; builds and tests never run protoc.
set -eu
cd "$(dirname "$0")"
PATH="$(go env GOPATH)/bin:$PATH"
for proto in info/info.proto v1alpha1/v1alpha1.proto v1alpha2/v1alpha2.proto \
	v1alpha3/v1alpha3.proto plugins/v1alpha1/plugins.proto; do
	protoc --proto_path=. \
		--go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative \
		"$proto"
done
