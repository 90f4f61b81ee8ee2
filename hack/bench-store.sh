#!/bin/bash
# Benchmarks a block store volume against a raw file of the same size, both
# served by virtblkd and driven by the same blkio/bench jobs, in one
# invocation; prints a Markdown report on stdout (progress on stderr). See
# docs/benchmarks.md, "Block store". Needs only Go; builds virtblkd and the
# driver (hack/benchstore) from this tree.
#
#   hack/bench-store.sh [benchstore flags...]
#   e.g. hack/bench-store.sh --rounds 3 --runtime 8s --size-mib 2048
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d /tmp/bench-store.XXXXXX)
trap 'rm -rf "$out"' EXIT
export PATH=$PATH:/usr/local/go/bin

cd "$root"
go build -o "$out/benchstore" ./hack/benchstore
go build -o "$out/virtblkd" ./cmd/virtblkd
"$out/benchstore" --virtblkd "$out/virtblkd" "$@"
