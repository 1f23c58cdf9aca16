#!/bin/bash
# Boot the guest disk twice from disk (SeaBIOS -> SYSLINUX -> kernel), with the
# disk served by qemu-nbd over a unix socket, and check the console output:
# booted, wrote == readback, and boot 2's "previous" == boot 1's marker.
# Usage: guest/smoke.sh [OUTDIR]   (same OUTDIR / GUEST_OUT as build.sh)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$here/build.sh" "$@" >/dev/null
out=${1:-${GUEST_OUT:-$here/../build/guest}}
# shellcheck disable=SC1091
. "$out/guest.env"
out=$GUEST_DIR

log=
timeout_s=${SMOKE_TIMEOUT:-120}
accel=tcg
[ -w /dev/kvm ] && accel=kvm
tmp=$(mktemp -d)
nbd_pid=
cleanup() {
	[ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null && wait "$nbd_pid" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT

fail() {
	echo "smoke.sh: FAIL: $*" >&2
	[ -f "$log" ] && { echo "--- console ($log) ---" >&2; cat "$log" >&2; }
	exit 1
}

# boot N: one VM run; console goes to $out/smoke-bootN.log.
boot() {
	log="$out/smoke-boot$1.log"
	sock="$tmp/nbd.sock"
	rm -f "$sock"
	# qemu-nbd serves one client, then exits when QEMU disconnects.
	qemu-nbd -f raw -k "$sock" "$GUEST_DISK" &
	nbd_pid=$!
	for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
	[ -S "$sock" ] || fail "qemu-nbd did not create $sock"

	local t0 t1 rc=0
	t0=$(date +%s.%N)
	timeout "$timeout_s" qemu-system-x86_64 -nographic -m 256 -accel "$accel" \
		-nic none -no-reboot \
		-drive "file=nbd:unix:$sock,format=raw,if=virtio" \
		</dev/null >"$log" 2>&1 || rc=$?
	t1=$(date +%s.%N)
	wait "$nbd_pid" 2>/dev/null || true
	nbd_pid=
	tr -d '\r' <"$log" >"$log.tmp" && mv "$log.tmp" "$log"
	[ "$rc" = 0 ] || fail "boot $1: qemu exited with $rc (124 = timeout ${timeout_s}s)"
	echo "smoke.sh: boot $1 ($accel) took $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s" >&2
}

# field NAME: the value after "vmbond-guest: NAME " in the current log.
field() { sed -n "s/^vmbond-guest: $1 //p" "$log" | tail -n 1; }
# Kernel messages could share a line; we only trust lines that start with our prefix.

check() {
	grep -qx 'vmbond-guest: booted' "$log" || fail "boot $1: no 'booted' line"
	wrote=$(field wrote)
	back=$(field readback)
	prev=$(field previous)
	[[ "$wrote" =~ ^vmbond-guest-marker:[0-9a-f]{32}$ ]] || fail "boot $1: bad wrote line '$wrote'"
	[ "$back" = "$wrote" ] || fail "boot $1: readback '$back' != wrote '$wrote'"
	grep -qx 'vmbond-guest: disk test ok' "$log" || fail "boot $1: no 'disk test ok'"
}

boot 1
check 1
first=$wrote
boot 2
check 2
[ "$prev" = "$first" ] || fail "boot 2: previous '$prev' != boot 1 marker '$first'"
[ "$wrote" != "$first" ] || fail "boot 2 wrote the same marker as boot 1"

grep '^vmbond-guest:' "$log"
echo "smoke.sh: OK (boot 1 wrote $first, boot 2 saw it as previous)"
