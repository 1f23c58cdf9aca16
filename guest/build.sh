#!/bin/bash
# Build the tiny vmbond test guest from Debian packages only (kernel + busybox
# initramfs + SYSLINUX on a raw MBR disk). Usage: guest/build.sh [OUTDIR]
# OUTDIR defaults to $GUEST_OUT, else <repo>/build/guest. Idempotent: a rerun
# with unchanged inputs only prints the result.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-${GUEST_OUT:-$here/../build/guest}}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Disk layout (512-byte sectors): MBR, one FAT partition at 2048, and the last
# 1 MiB reserved for the guest's data test, outside any partition.
disk_mib=64
disk_sectors=$((disk_mib * 2048))
data_sector=$((disk_sectors - 2048))
part_start=2048
part_sectors=$((data_sector - part_start))
cmdline_base="console=ttyS0 panic=-1 loglevel=4 edd=off vmbond.datasector=$data_sector"

log() { echo "build.sh: $*" >&2; }

# --- host tools (install only what is missing; apt-get update only then) ---
pkgs="qemu-system-x86 qemu-utils busybox-static syslinux syslinux-common mtools dosfstools fdisk"
# shellcheck disable=SC2086
installed=$(dpkg-query -W -f='${Package} ${Status}\n' $pkgs 2>/dev/null | awk '/install ok installed/ {print $1}' || true)
missing=
for p in $pkgs; do
	grep -qx "$p" <<<"$installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
	log "installing:$missing"
	export DEBIAN_FRONTEND=noninteractive
	aptlog=$(mktemp)
	# shellcheck disable=SC2086
	if ! { apt-get update -qq && apt-get install -y -qq $missing; } >"$aptlog" 2>&1; then
		cat "$aptlog" >&2
		exit 1
	fi
	rm -f "$aptlog"
fi

# --- kernel .debs, cached in $out/debs ---
# APT::Sandbox::User=root: we run as root and download into a root-owned dir.
aptdl() { (cd "$out/debs" && apt-get -q=2 -o APT::Sandbox::User=root download "$@"); }
mkdir -p "$out/debs"
meta=$(ls "$out"/debs/linux-image-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$meta" ]; then
	apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq >/dev/null
	aptdl linux-image-cloud-amd64
	meta=$(ls "$out"/debs/linux-image-cloud-amd64_*.deb | sort -V | tail -n 1)
fi
# The meta package only Depends on the real, versioned kernel package.
kpkg=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*-cloud-amd64' | head -n 1)
kdeb=$(ls "$out"/debs/"${kpkg}"_*.deb 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$kdeb" ]; then
	aptdl "$kpkg"
	kdeb=$(ls "$out"/debs/"${kpkg}"_*.deb | sort -V | tail -n 1)
fi

write_env() {
	cat >"$out/guest.env" <<EOF
# Written by guest/build.sh; source it from a shell.
GUEST_DIR=$out
GUEST_DISK=$out/disk.img
GUEST_DISK_STAY=$out/disk-stay.img
GUEST_KERNEL=$out/vmlinuz
GUEST_INITRD=$out/initrd.gz
GUEST_CMDLINE_FILE=$out/cmdline
GUEST_CMDLINE='$(cat "$out/cmdline")'
GUEST_KERNEL_PKG=$(basename "$kdeb")
GUEST_DISK_BYTES=$((disk_sectors * 512))
GUEST_DISK_SECTORS=$disk_sectors
GUEST_DATA_SECTOR=$data_sector
EOF
	cat "$out/guest.env"
}

# --- skip everything if the inputs are unchanged since the last build ---
stamp=$(cat "$here/build.sh" "$here/init" <(echo "$kdeb") <(busybox 2>&1 | head -n 1) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ] &&
	[ -s "$out/disk.img" ] && [ -s "$out/disk-stay.img" ] && [ -s "$out/vmlinuz" ] &&
	[ -s "$out/initrd.gz" ] && [ -s "$out/cmdline" ]; then
	write_env
	exit 0
fi
rm -f "$out/.stamp"

work="$out/work"
rm -rf "$work"
mkdir -p "$work/kernel" "$work/root"
dpkg -x "$kdeb" "$work/kernel"

# --- kernel and virtio modules ---
cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz"
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
for m in virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev virtio_blk; do
	f=$(find "$work/kernel/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" | head -n 1)
	[ -n "$f" ] || { log "module $m not found in $kpkg"; exit 1; }
	case "$f" in
	*.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
	*) cp "$f" "$root/lib/modules/$m.ko" ;;
	esac
done

# --- initramfs: static busybox + our /init ---
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$here/init" "$root/init"
(cd "$root" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) | gzip -9n >"$out/initrd.gz"
echo "$cmdline_base" >"$out/cmdline"

# --- FAT boot partition with SYSLINUX, kernel, initramfs ---
syslinux_cfg() { # $1 = default label
	cat <<EOF
DEFAULT $1
PROMPT 0
TIMEOUT 0
LABEL run
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND $cmdline_base
LABEL stay
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND $cmdline_base vmbond.stay=1
EOF
}
part="$work/part.img"
mkfs.vfat -C "$part" $((part_sectors / 2)) >/dev/null
syslinux_cfg run >"$work/syslinux.cfg"
mcopy -i "$part" "$out/vmlinuz" "$out/initrd.gz" "$work/syslinux.cfg" ::/
syslinux --install "$part"

# $1 = image, $2 = partition image. The MBR code comes from syslinux, so the
# VM boots only what is on the disk (no operator-supplied kernel/cmdline).
make_disk() {
	rm -f "$1"
	truncate -s $((disk_sectors * 512)) "$1"
	echo "start=$part_start, size=$part_sectors, type=c, bootable" | sfdisk -q "$1" >/dev/null
	dd if="$2" of="$1" bs=512 seek=$part_start conv=notrunc,sparse status=none
	dd if=/usr/lib/syslinux/mbr/mbr.bin of="$1" bs=440 count=1 conv=notrunc status=none
}
make_disk "$work/disk.img" "$part"
# Same partition, but SYSLINUX defaults to the "stay" label.
syslinux_cfg stay >"$work/syslinux.cfg"
mcopy -o -i "$part" "$work/syslinux.cfg" ::/syslinux.cfg
make_disk "$work/disk-stay.img" "$part"
mv "$work/disk.img" "$work/disk-stay.img" "$out/"

rm -rf "$work"
echo "$stamp" >"$out/.stamp"
log "built guest in $out"
write_env
