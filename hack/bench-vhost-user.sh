#!/bin/bash
# Benchmarks virtblkd against qemu-storage-daemon's vhost-user-blk export and
# the raw io_uring ceiling on one preallocated image, in one invocation, and
# prints a Markdown report on stdout (progress on stderr). See
# docs/benchmarks.md. Needs qemu-storage-daemon (Debian: qemu-system-common)
# and Go; builds virtblkd and the benchmark driver from this tree.
#
#   hack/bench-vhost-user.sh [benchvs flags...]
#   e.g. hack/bench-vhost-user.sh --rounds 3 --runtime 10s --image /var/tmp/b.img
#
# Without cmd/virtblkd in the tree (or with VIRTBLKD= set empty) virtblkd is
# skipped and qsd is compared with the raw ceiling only.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d /tmp/bench-vhost-user.XXXXXX)
trap 'rm -rf "$out"' EXIT
export PATH=$PATH:/usr/local/go/bin

if ! command -v qemu-storage-daemon >/dev/null; then
	echo "bench-vhost-user.sh: qemu-storage-daemon not found: apt-get install qemu-system-common" >&2
	exit 1
fi

cd "$root"
go build -o "$out/benchvs" ./hack/benchvs
vd=${VIRTBLKD-}
if [[ -z ${VIRTBLKD+x} && -d cmd/virtblkd ]]; then
	if go build -o "$out/virtblkd" ./cmd/virtblkd; then
		vd=$out/virtblkd
	else
		echo "bench-vhost-user.sh: cmd/virtblkd does not build; benchmarking without it" >&2
	fi
fi
"$out/benchvs" --virtblkd "$vd" "$@"
