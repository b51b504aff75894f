#!/bin/sh
# initramfs-tools hook, installed as /etc/initramfs-tools/hooks/tandem before the kernel is:
# the drivers a Tandem root disk may sit behind (QEMU virtio, NVMe, SATA/SCSI), whatever
# MODULES= says. Loaded at boot by udev's coldplug. Changing this file changes the base cache key.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in
prereqs) prereqs; exit 0 ;;
esac
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk virtio_scsi nvme ahci sd_mod ext4
