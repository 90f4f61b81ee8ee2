#!/bin/bash
# Installs the Debian 12 host packages that virtblk's VM tests need:
# the tiny-guest builder (guest-image.sh), the host QEMU that boots it,
# and debootstrap for the trixie root (trixie-root.sh).
# Safe to re-run; apt-get waits for a dpkg lock held by someone else.
set -euo pipefail

PKGS=(
	debootstrap     # trixie-root.sh
	qemu-system-x86 # host QEMU 7.2 + qboot.rom (via qemu-system-data)
	busybox-static  # guest userland
	fio             # guest I/O tool (its libraries are copied by ldd)
	cpio            # initramfs archives
	xz-utils        # kernel payload and module decompression
	zstd            # same, when the kernel uses zstd
	kmod            # modinfo: module dependency order for the initramfs
)

if [[ $(id -u) -ne 0 ]]; then
	echo "host-deps.sh: must run as root (apt-get install)" >&2
	exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
	exit 0
fi
echo "host-deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o DPkg::Lock::Timeout=900 --no-install-recommends)
apt-get -q -o DPkg::Lock::Timeout=900 update || apt-get -q -o DPkg::Lock::Timeout=900 update
apt-get install "${apt_opts[@]}" "${missing[@]}"
