#!/usr/bin/env bash
# Installs what building and testing virtblk needs on Debian 12 (bookworm).
# Idempotent: apt-get runs only when a package is missing, so a developer's
# second `make test` costs nothing. Heavier test fixtures (the trixie root
# with QEMU 10 / libvirt 11, the tiny guest image) are built and cached by
# hack/trixie-root.sh and hack/guest-image.sh the first time a test needs them.
set -euo pipefail

pkgs=(
	qemu-system-x86   # guests under TCG, qboot.rom, qemu-storage-daemon (reference back-end)
	qemu-utils        # qemu-img for test images
	debootstrap       # trixie root for QEMU 10 / libvirt 11 tests
	libxml2-utils     # xmllint: validate generated domain XML against libvirt's schema
	busybox-static    # guest initramfs userland
	fio               # guest I/O with verification
	cpio xz-utils zstd # guest image packing / kernel extraction
	prometheus        # promtool: checks our metrics exposition in tests
	skopeo            # reads our OCI image archive in its test
	kmod              # modinfo: module dependency order for the guest initramfs
	ca-certificates
)

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	sudo_cmd=()
	[ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
	echo "install-deps: installing ${missing[*]}" >&2
	"${sudo_cmd[@]}" apt-get update -qq
	DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
		-o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v go >/dev/null; then
	if [ -x /usr/local/go/bin/go ]; then
		echo "install-deps: add /usr/local/go/bin to PATH" >&2
	else
		echo "install-deps: Go 1.24+ is required (https://go.dev/dl); not found on PATH" >&2
		exit 1
	fi
fi
