#!/bin/bash
# Builds virtblk's container image as an archive, without a container
# daemon: static binaries (CGO_ENABLED=0) packed by hack/ociimage into an
# OCI image layout that also carries docker's manifest.json.
#
#   hack/build-image.sh [OUT.tar] [REF]
#     OUT.tar  default: _out/virtblk-image.tar
#     REF      default: ghcr.io/virtblk/virtblk:latest
#   Environment: GOARCH (default: the host's), SOURCE_DATE_EPOCH (default:
#   the last commit's time, so rebuilding a commit gives the same digest).
#
# Load it with one of:
#   docker load -i _out/virtblk-image.tar
#   skopeo copy oci-archive:_out/virtblk-image.tar docker://REGISTRY/virtblk:TAG
#   ctr -n k8s.io images import _out/virtblk-image.tar
set -euo pipefail

cd "$(dirname "$0")/.."
out=${1:-_out/virtblk-image.tar}
ref=${2:-ghcr.io/virtblk/virtblk:latest}
export PATH=$PATH:/usr/local/go/bin
arch=${GOARCH:-$(go env GOARCH)}
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
	SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH

bindir=$(mktemp -d)
trap 'rm -rf "$bindir"' EXIT

bins=()
for cmd in virtblk-hook virtblkd virtblk; do
	if [[ ! -d cmd/$cmd ]]; then
		echo "build-image.sh: cmd/$cmd does not exist; the image needs all of virtblk-hook, virtblkd and virtblk" >&2
		exit 1
	fi
	CGO_ENABLED=0 GOOS=linux GOARCH=$arch go build -trimpath -ldflags='-s -w' -o "$bindir/$cmd" "./cmd/$cmd"
	bins+=(--bin "$bindir/$cmd")
done

mkdir -p "$(dirname "$out")"
go run ./hack/ociimage --out "$out" --ref "$ref" --arch "$arch" \
	--label org.opencontainers.image.source=https://github.com/virtblk/virtblk \
	--label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
	"${bins[@]}"
