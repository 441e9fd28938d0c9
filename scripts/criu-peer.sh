#!/bin/bash
# setup.sh - give a Debian 12 (bookworm) machine a working CRIU >= 4.1
# without touching its own libc or apt sources, and without building
# anything: debootstrap a minimal Debian 13 (trixie) root into $CRIU_ROOT,
# install trixie's "criu" package in it with apt, and mount what CRIU needs.
#
#   setup.sh [up]   install (if missing) + mount + checks   (idempotent)
#   setup.sh down   unmount everything below $CRIU_ROOT, restore sysctl
#
# Environment: CRIU_ROOT (default /opt/criu-root),
#              DEBIAN_MIRROR (default http://deb.debian.org/debian).
# Use it afterwards as:  chroot "$CRIU_ROOT" criu <args>
#
# lazymig's copy of the shared peers/criu/setup.sh (unchanged apart from this
# note), so that a fresh machine needs nothing outside this repository.
# tests/test_criu_interop.py runs it when the chroot is missing or unmounted.
set -euo pipefail

R=${CRIU_ROOT:-/opt/criu-root}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
# criu itself, plus what lazy_migrate.sh uses inside the root
PKGS=criu,gcc,libc6-dev,procps,iproute2,time,util-linux
# CRIU's lazy page server wants pipes of ~3.2 MiB (PIPE_MAX_SIZE); without
# CAP_SYS_RESOURCE the kernel refuses sizes above fs.pipe-max-size.
PIPE_MAX_WANT=4194304

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

have_cap_sys_resource() {
	# CAP_SYS_RESOURCE is bit 24 of CapEff
	local eff
	eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
	(( (16#$eff >> 24) & 1 ))
}

criu_ok() {
	[ -x "$R/usr/sbin/criu" ] || return 1
	local v
	v=$(chroot "$R" dpkg-query -W -f='${Version}' criu 2>/dev/null) || return 1
	dpkg --compare-versions "$v" ge 4.1
}

install_root() {
	if criu_ok; then
		log "CRIU $(chroot "$R" dpkg-query -W -f='${Version}' criu) already installed in $R"
		return
	fi
	if ! command -v debootstrap >/dev/null || [ ! -e /usr/share/debootstrap/scripts/$SUITE ]; then
		log "installing debootstrap + debian-archive-keyring on the host"
		apt-get update -q
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap debian-archive-keyring
	fi
	[ -e /usr/share/debootstrap/scripts/$SUITE ] || die "this debootstrap does not know $SUITE"
	if [ -d "$R" ] && [ ! -x "$R/usr/bin/apt-get" -o -d "$R/debootstrap" ]; then
		# a previous debootstrap died half-way: start over
		umount_all
		log "removing incomplete $R"
		rm -rf --one-file-system "$R"
	fi
	if [ ! -d "$R" ]; then
		log "debootstrap $SUITE -> $R (minbase + $PKGS), takes 1-3 minutes"
		mkdir -p "$(dirname "$R")"
		debootstrap --variant=minbase --include="$PKGS" \
			--keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
			"$SUITE" "$R" "$MIRROR"
	else
		log "root exists, installing $PKGS with apt inside it"
		mount_all
		chroot "$R" apt-get update -q
		chroot "$R" env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q --no-install-recommends ${PKGS//,/ }
	fi
	criu_ok || die "criu >= 4.1 not installed in $R"
}

is_mnt() { mountpoint -q "$1"; }

mount_all() {
	# 1. The root itself must be a mount point, or CRIU cannot place the
	#    mounts below it in its mount tree ("No parent found for mountpoint").
	if ! is_mnt "$R"; then
		mount --bind "$R" "$R"
		mount --make-private "$R"
	fi
	# 2. proc, sys, dev (slave, so an unmount never propagates to the host)
	is_mnt "$R/proc" || mount -t proc proc "$R/proc"
	if ! is_mnt "$R/sys"; then
		mount --rbind /sys "$R/sys"
		mount --make-rslave "$R/sys"
	fi
	if ! is_mnt "$R/dev"; then
		mount --rbind /dev "$R/dev"
		mount --make-rslave "$R/dev"
	fi
	# 3. a tmpfs /run: CRIU keeps its kernel-feature cache /run/criu.kdat
	#    only on tmpfs (else every criu call re-probes the kernel, ~25 ms)
	is_mnt "$R/run" || mount -t tmpfs -o mode=755,size=64m tmpfs "$R/run"
	# a bind of the host's resolv.conf is not needed: apt uses the mirror URL
	cp -f /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
}

users_of_root() { # pids whose root directory is $R (they pin its mounts)
	local p
	for p in /proc/[0-9]*; do
		[ "$(readlink "$p/root" 2>/dev/null)" = "$R" ] && echo "${p#/proc/}"
	done
	return 0
}

umount_all() {
	local m u
	[ -d "$R" ] || return 0
	u=$(users_of_root)
	if [ -n "$u" ]; then
		for m in $u; do echo "  $m: $(tr '\0' ' ' < /proc/$m/cmdline 2>/dev/null)" >&2; done
		die "processes still run inside $R (listed above): stop them first"
	fi
	for m in run dev sys proc; do
		if is_mnt "$R/$m"; then umount -R "$R/$m" || umount -R -l "$R/$m"; fi
	done
	if is_mnt "$R"; then umount "$R" || umount -l "$R"; fi
}

sysctl_up() {
	have_cap_sys_resource && return 0
	local cur
	cur=$(cat /proc/sys/fs/pipe-max-size)
	if [ "$cur" -lt "$PIPE_MAX_WANT" ]; then
		[ -e "$R/.pipe-max-size.orig" ] || echo "$cur" > "$R/.pipe-max-size.orig"
		echo "$PIPE_MAX_WANT" > /proc/sys/fs/pipe-max-size
		log "no CAP_SYS_RESOURCE: raised fs.pipe-max-size $cur -> $PIPE_MAX_WANT (lazy page server needs it)"
	fi
}

sysctl_down() {
	if [ -e "$R/.pipe-max-size.orig" ]; then
		cat "$R/.pipe-max-size.orig" > /proc/sys/fs/pipe-max-size
		rm -f "$R/.pipe-max-size.orig"
		log "restored fs.pipe-max-size to $(cat /proc/sys/fs/pipe-max-size)"
	fi
}

checks() {
	log "$(chroot "$R" criu --version | head -1)"
	chroot "$R" criu check
	chroot "$R" criu check --feature uffd
	chroot "$R" criu check --feature uffd-noncoop
}

case "${1:-up}" in
up)
	install_root
	mount_all
	sysctl_up
	checks
	log "ready: chroot $R criu ..."
	;;
down)
	umount_all
	sysctl_down
	log "unmounted $R (the root stays in place)"
	;;
*)
	die "usage: $0 [up|down]"
	;;
esac
