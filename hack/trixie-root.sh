#!/bin/bash
# Builds (once) a Debian trixie minbase root with the QEMU 10 / libvirt 11
# stack that the e2e tests need: bookworm's QEMU 7.2 and libvirt 9.0 predate
# IOThread virtqueue mapping (QEMU 9.0, libvirt 10.0).
#
#   hack/trixie-root.sh            # build or reuse $VIRTBLK_TRIXIE
#   VIRTBLK_TRIXIE=/some/dir hack/trixie-root.sh
#
# The root is cached: a stamp file records the package set; a matching stamp
# means nothing to do. Concurrent callers serialise on a lock file. A failed
# build leaves no stamp, so the next run starts over.
set -euo pipefail

ROOT=${VIRTBLK_TRIXIE:-/var/cache/virtblk/trixie}
MIRROR=${VIRTBLK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Keep in sync with docs/testing.md. On trixie qemu-storage-daemon ships in
# qemu-utils, the blkio block driver in qemu-block-extra (libblkio has no
# tools package). The binaries we rely on are checked after the install, so
# a packaging change fails loudly.
PKGS=(
	qemu-system-x86
	qemu-system-common
	qemu-utils
	qemu-block-extra
	libvirt-daemon
	libvirt-daemon-driver-qemu
	libvirt-clients
	libblkio1
	fio
	util-linux
	procps
)
STAMP_CONTENT="v1 trixie ${PKGS[*]}"
STAMP=$ROOT/.virtblk-stamp

die() { echo "trixie-root.sh: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, chroot)"

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9

if [[ -f $STAMP && $(cat "$STAMP") == "$STAMP_CONTENT" ]]; then
	exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap missing: run hack/install-deps.sh (apt-get install debootstrap)"

# in_root runs a command in the root inside a private mount namespace: the
# /proc, /sys and /dev mounts vanish with it, even if this script is killed.
in_root() {
	unshare --mount --propagation private -- /bin/bash -euc '
		root=$1; shift
		mount -t proc proc "$root/proc"
		mount -t sysfs sysfs "$root/sys"
		mount --rbind /dev "$root/dev"
		exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
			HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
	' trixie-root "$ROOT" "$@"
}

rm -f "$STAMP"
if [[ ! -f $ROOT/.virtblk-debootstrap ]]; then
	# A half-finished debootstrap cannot be resumed reliably: start clean.
	if [[ -d $ROOT ]]; then
		# Refuse to rm -rf something that does not look like our root.
		[[ -z $(ls -A "$ROOT") || -d $ROOT/debootstrap || -f $ROOT/etc/debian_version ]] ||
			die "$ROOT exists and is not a trixie root; remove it or set VIRTBLK_TRIXIE"
		findmnt -R -n -o TARGET | grep -q "^$ROOT/" && die "$ROOT has mounts under it; unmount them first"
		rm -rf "$ROOT"
	fi
	echo "trixie-root.sh: debootstrap trixie into $ROOT" >&2
	debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" ||
		die "debootstrap trixie $ROOT $MIRROR failed (see $ROOT/debootstrap/debootstrap.log)"
	touch "$ROOT/.virtblk-debootstrap"
fi

# Services must not start inside the chroot while packages install.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"

cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

echo "trixie-root.sh: installing ${PKGS[*]}" >&2
in_root apt-get -q update || die "apt-get update in $ROOT failed"
in_root apt-get -q -y --no-install-recommends install "${PKGS[@]}" ||
	die "apt-get install ${PKGS[*]} in $ROOT failed"
in_root apt-get clean

for bin in qemu-system-x86_64 qemu-storage-daemon libvirtd virsh fio; do
	in_root sh -c "command -v $bin" >/dev/null || die "$bin missing in $ROOT after install"
done

# libvirtd runs as root inside a plain chroot: no mount namespaces, cgroups,
# security labels or virtlogd, and QEMU runs as root so it can open test
# files under /tmp.
conf=$ROOT/etc/libvirt/qemu.conf
[[ -f $conf ]] || die "$conf missing after install"
sed -i '/^# virtblk begin/,/^# virtblk end/d' "$conf"
cat >>"$conf" <<'CONF'
# virtblk begin
namespaces = [ ]
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
# virtblk end
CONF

echo "$STAMP_CONTENT" >"$STAMP"
echo "trixie-root.sh: ready: $ROOT" >&2
