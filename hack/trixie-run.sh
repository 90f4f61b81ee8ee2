#!/bin/bash
# Runs a command inside the trixie root built by hack/trixie-root.sh.
#
#   hack/trixie-run.sh CMD [ARGS...]     e.g. hack/trixie-run.sh virsh list --all
#   hack/trixie-run.sh --start-libvirtd  start libvirtd (daemonised) and wait for its socket
#   hack/trixie-run.sh --stop-libvirtd   stop it, and any QEMU it left behind
#
# Each invocation gets a private mount namespace in which /proc, /sys, /dev and
# /tmp are mounted into the root; the mounts disappear with the namespace when
# its last process exits, so nothing leaks onto the host. A daemon started here
# keeps its namespace (and mounts) alive until it exits.
#
# virsh inside the root talks to libvirtd through the root's
# /run/libvirt/libvirt-sock, which every invocation shares.
set -euo pipefail

ROOT=${VIRTBLK_TRIXIE:-/var/cache/virtblk/trixie}
die() { echo "trixie-run.sh: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (mount namespace, chroot)"
[[ -f $ROOT/.virtblk-stamp ]] || die "$ROOT is not a finished trixie root: run hack/trixie-root.sh"
[[ $# -gt 0 ]] || die "usage: trixie-run.sh CMD [ARGS...] | --start-libvirtd | --stop-libvirtd"

run_in_root() {
	# Private propagation: our mounts never reach the host's namespace.
	exec unshare --mount --propagation private -- /bin/bash -euc '
		root=$1; shift
		mount -t proc proc "$root/proc"
		mount --rbind /sys "$root/sys"
		mount --rbind /dev "$root/dev"
		mount --bind /tmp "$root/tmp"
		exec chroot "$root" /usr/bin/env -i \
			PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb \
			LIBVIRT_DEFAULT_URI="qemu+unix:///system?socket=/run/libvirt/libvirt-sock" \
			"$@"
	' trixie-run "$ROOT" "$@"
}

SOCK=$ROOT/run/libvirt/libvirt-sock
PIDFILE=$ROOT/run/libvirtd.pid

case $1 in
--start-libvirtd)
	if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
		exit 0
	fi
	rm -f "$SOCK" "$PIDFILE"
	"$0" libvirtd --daemon --pid-file /run/libvirtd.pid
	for _ in $(seq 1 300); do
		[[ -S $SOCK ]] && exit 0
		sleep 0.1
	done
	die "libvirtd did not create $SOCK within 30s (see $ROOT/var/log/libvirt/)"
	;;
--stop-libvirtd)
	for pf in "$ROOT"/run/libvirt/qemu/*.pid; do
		[[ -f $pf ]] || continue
		pid=$(cat "$pf")
		# A stale pid file may name a reused pid: only kill a QEMU.
		if [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q qemu-system; then
			kill -KILL "$pid" 2>/dev/null || true
		fi
	done
	if [[ -f $PIDFILE ]]; then
		pid=$(cat "$PIDFILE")
		if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q libvirtd; then
			rm -f "$PIDFILE"
			exit 0
		fi
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
		rm -f "$PIDFILE"
	fi
	;;
*)
	run_in_root "$@"
	;;
esac
