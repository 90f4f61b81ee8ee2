#!/bin/bash
# Builds the tiny test guest, once, into $VIRTBLK_GUEST
# (default /var/cache/virtblk/guest):
#
#   vmlinux          uncompressed kernel from Debian's linux-image-amd64,
#                    booted through its PVH ELF note (qboot, -kernel)
#   initramfs.cpio   uncompressed newc: busybox-static, fio and its libraries,
#                    the virtio_pci/virtio_blk modules, and /init
#
# /init mounts proc/sys/dev, loads the modules, runs /test.sh if a second
# (appended) cpio archive provides one, prints
#   VIRTBLK-TEST-EXIT=<code>
# on the serial console, and powers the guest off.
#
# The stamp records this script's hash, so an edit here rebuilds the image;
# otherwise it is reused. Delete the directory to pick up a newer kernel.
set -euo pipefail

OUT=${VIRTBLK_GUEST:-/var/cache/virtblk/guest}
SELF=$(readlink -f "${BASH_SOURCE[0]}")

die() { echo "guest-image.sh: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (mknod, apt-get download)"
for t in apt-get dpkg-deb cpio xz modinfo ldd; do
	command -v "$t" >/dev/null || die "$t missing: run hack/install-deps.sh"
done
[[ -x /bin/busybox && $'\n'$(/bin/busybox --list)$'\n' == *$'\n'insmod$'\n'* ]] ||
	die "/bin/busybox (static) missing: apt-get install busybox-static (hack/install-deps.sh)"
command -v fio >/dev/null || die "fio missing: apt-get install fio (hack/install-deps.sh)"
[[ $(ldd /bin/busybox 2>&1 || true) == *'not a dynamic'* ]] || die "/bin/busybox is dynamic; install busybox-static"

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

# The stamp is this script's hash: cheap to check on every test run (apt is
# slow to ask). A kernel update does not rebuild by itself; delete $OUT to
# pick it up.
STAMP_CONTENT="$(sha256sum "$SELF" | cut -d' ' -f1)"
if [[ -f $OUT/.stamp && $(cat "$OUT/.stamp") == "$STAMP_CONTENT" && -f $OUT/vmlinux && -f $OUT/initramfs.cpio ]]; then
	exit 0
fi
# The metapackage names the current ABI package, e.g. linux-image-6.1.0-56-amd64.
resolve_kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
KPKG=$(resolve_kpkg)
if [[ -z $KPKG ]]; then
	# A fresh machine may have no package lists yet.
	apt-get -q -o DPkg::Lock::Timeout=900 update >/dev/null || true
	KPKG=$(resolve_kpkg)
fi
[[ -n $KPKG ]] || die "cannot resolve linux-image-amd64's kernel package (apt-get update failed?)"
rm -f "$OUT/.stamp"

WORK=$(mktemp -d "$OUT/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

echo "guest-image.sh: downloading $KPKG" >&2
# apt-get download drops privileges to _apt, which must be able to write here.
chmod 777 "$WORK"
apt-get -q download "$KPKG" >/dev/null || die "apt-get download $KPKG failed"
dpkg-deb -x ./"$KPKG"_*.deb kpkg
BZ=$(ls kpkg/boot/vmlinuz-*)
KVER=${BZ##*/vmlinuz-}
MODDIR=kpkg/lib/modules/$KVER

# vmlinux: the bzImage carries the compressed ELF after the setup code. Try
# every compression magic we know at every offset until one yields an ELF.
extract_vmlinux() {
	local bz=$1 out=$2 magic cmd off
	for spec in 'fd377a585a00|xz -dc --single-stream' '28b52ffd|zstd -dcq' '1f8b08|gzip -dc'; do
		magic=${spec%%|*}
		cmd=${spec#*|}
		for off in $(LC_ALL=C grep -obUaP "$(echo "$magic" | sed 's/../\\x&/g')" "$bz" | cut -d: -f1); do
			tail -c +$((off + 1)) "$bz" | $cmd >"$out" 2>/dev/null || true
			if [[ -s $out && $(head -c 4 "$out" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
				return 0
			fi
		done
	done
	return 1
}
extract_vmlinux "$BZ" vmlinux || die "no ELF payload found in $BZ"
# PVH entry is what lets QEMU -kernel boot the ELF directly.
LC_ALL=C grep -qa 'Xen' vmlinux || echo "guest-image.sh: warning: no Xen/PVH note string found in vmlinux" >&2

# initramfs tree
R=root
mkdir -p $R/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,lib/modules,etc}
cp /bin/busybox $R/bin/busybox
for a in $(/bin/busybox --list); do
	[[ -e $R/bin/$a ]] || ln -s busybox "$R/bin/$a"
done
mknod -m 600 $R/dev/console c 5 1
mknod -m 666 $R/dev/null c 1 3

FIO=$(command -v fio)
cp "$FIO" $R/bin/fio
# Copy fio's shared libraries at the paths ldd resolves them to, plus the
# ELF interpreter at its canonical path.
for lib in $(ldd "$FIO" | awk '/=> \// {print $3} /^\s*\/lib/ {print $1}'); do
	mkdir -p "$R$(dirname "$lib")"
	cp -L "$lib" "$R$lib"
done
interp=$(LC_ALL=C readelf -l "$FIO" 2>/dev/null | sed -n 's/.*interpreter: \(.*\)]/\1/p' || true)
interp=${interp:-/lib64/ld-linux-x86-64.so.2}
mkdir -p "$R$(dirname "$interp")"
cp -L "$interp" "$R$interp"

# Modules: virtio_pci and virtio_blk plus what they depend on, dependencies
# first (modinfo reads the .ko; the package has no modules.dep).
order=()
declare -A seen=()
modpath() { find "$MODDIR" -name "$1.ko*" | head -n1; }
add_mod() {
	local m=$1 p d
	[[ -n ${seen[$m]:-} ]] && return 0
	seen[$m]=1
	p=$(modpath "$m")
	[[ -n $p ]] || die "module $m not found in $KPKG"
	for d in $(modinfo -F depends "$p" | tr ',' ' '); do
		add_mod "$d"
	done
	case $p in
	*.ko.xz) xz -dc "$p" >"$R/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -dcq "$p" >"$R/lib/modules/$m.ko" ;;
	*) cp "$p" "$R/lib/modules/$m.ko" ;;
	esac
	order+=("$m")
}
for m in virtio_pci virtio_blk; do add_mod "$m"; done
printf '%s\n' "${order[@]}" >$R/lib/modules/order

cat >$R/init <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
while read -r m; do
	insmod "/lib/modules/$m.ko" || echo "VIRTBLK-INIT: insmod $m failed"
done </lib/modules/order
# Block devices probe asynchronously after insmod; give them a moment.
i=0
while [ $i -lt 50 ] && [ -n "$(ls /sys/bus/virtio/devices 2>/dev/null)" ] && [ -z "$(ls /sys/block | grep '^vd')" ]; do
	sleep 0.1
	i=$((i + 1))
done
echo "VIRTBLK-BOOTED"
if [ -f /test.sh ]; then
	sh /test.sh
	rc=$?
	sync
	echo "VIRTBLK-TEST-EXIT=$rc"
else
	echo "VIRTBLK-TEST-EXIT=none"
fi
poweroff -f
# If power-off is unavailable the kernel halts; panic=-1 plus QEMU's
# -no-reboot turn the following reboot into a QEMU exit.
sleep 2
reboot -f
INIT
chmod 755 $R/init

(cd $R && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >initramfs.cpio

mv vmlinux "$OUT/vmlinux.new" && mv "$OUT/vmlinux.new" "$OUT/vmlinux"
mv initramfs.cpio "$OUT/initramfs.cpio.new" && mv "$OUT/initramfs.cpio.new" "$OUT/initramfs.cpio"
echo "$KPKG $KVER" >"$OUT/kernel-version"
echo "$STAMP_CONTENT" >"$OUT/.stamp"
echo "guest-image.sh: ready: $OUT/vmlinux $OUT/initramfs.cpio (kernel $KVER)" >&2
