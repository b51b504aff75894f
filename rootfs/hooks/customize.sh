#!/bin/sh
# mmdebstrap --customize-hook for the Tandem base root filesystem; $1 is the new root.
# Runs after every package is installed. Changing this file changes the base cache key.
set -eu
root="$1"

# MariaDB's postinst initialised a datadir; the real one lives on the data partition.
rm -rf "$root"/var/lib/mysql/* "$root"/var/lib/mysql/.[!.]*

# Caches, logs and backups an appliance never reads (apt lists/archives: mmdebstrap cleans).
rm -rf "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
	"$root"/var/cache/ldconfig/aux-cache "$root"/var/log/*.log \
	"$root"/var/log/apt/* "$root"/var/cache/man/*

# Directories left empty by the dpkg path filters (strip.txt), then a fresh module index.
find "$root"/usr/lib/modules "$root"/usr/share -depth -type d -empty -delete
for dir in "$root"/usr/lib/modules/*; do
	chroot "$root" depmod -a "$(basename "$dir")"
done

# The initrd must be able to reach a root on virtio, SCSI, NVMe or SATA disks: every driver
# the kernel has is either built in or in the initrd (hooks/initramfs-modules.sh). The cloud
# kernel has no AHCI at all; a kernel built for bare metal has.
for kver in $(ls "$root"/usr/lib/modules); do
	list=$(chroot "$root" lsinitramfs "/boot/initrd.img-$kver")
	for pair in virtio_blk:VIRTIO_BLK virtio_pci:VIRTIO_PCI virtio_scsi:SCSI_VIRTIO \
		nvme:BLK_DEV_NVME ext4:EXT4_FS ahci:SATA_AHCI sd_mod:BLK_DEV_SD; do
		mod=${pair%%:*} opt=${pair##*:}
		config=$(grep "^CONFIG_$opt=" "$root/boot/config-$kver" || true)
		case "$config" in
		*=y) continue ;;
		*=m) echo "$list" | grep -q "/$mod.ko" && continue ;;
		*) echo "tandem: kernel $kver has no $mod driver (CONFIG_$opt unset)"; continue ;;
		esac
		echo "tandem: the initrd of $kver lacks $mod.ko (CONFIG_$opt=m)" >&2
		exit 1
	done
done
