#!/bin/sh
# mmdebstrap --customize-hook for the Tandem base root filesystem; $1 is the new root.
# Runs after every package is installed. Changing this file changes the base cache key.
set -eu
root="$1"

# MariaDB's postinst initialised a datadir; the real one lives on the data partition.
rm -rf "$root"/var/lib/mysql/* "$root"/var/lib/mysql/.[!.]*

# The first boot's datadir, made here once instead of by mariadb-install-db at every first
# boot (17 s under emulation): the same options as db::install_argv (root by Unix socket only,
# no test database), no my.cnf. `appliance db-init` unpacks it beside the data partition's
# datadir and renames it into place (db::datadir). Entries are relative, owned by whoever
# unpacks them.
template=/usr/lib/tandem/mariadb-datadir.tar.zst
mkdir -p "$root/usr/lib/tandem" "$root/tmp/tandem-datadir"
chroot "$root" chown mysql:mysql /tmp/tandem-datadir
chroot "$root" mariadb-install-db --no-defaults --datadir=/tmp/tandem-datadir/data \
	--user=mysql --auth-root-authentication-method=socket --skip-test-db >/dev/null
test -e "$root/tmp/tandem-datadir/data/mysql/global_priv.MAI"
chroot "$root" sh -c "tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 \
	-C /tmp/tandem-datadir/data -cf - . | zstd -q -19 -o $template"
rm -rf "$root/tmp/tandem-datadir"

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

# What the appliance never runs, removed last (the steps above still use some of it). Each
# line names what it was for; rootfs/README.md lists what went and what it saved.
# - MariaDB's client tools, storage-engine utilities and bootstrap helpers: Tandem talks SQL
#   through its own driver, MariaDB runs as `mariadbd` under the supervisor, and the datadir
#   comes from the template above (mariadb-server depends on mariadb-client: the package
#   stays installed, its programs go).
for tool in aria_chk aria_dump_log aria_ftdump aria_pack aria_read_log \
	myisamchk myisamlog myisampack myisam_ftdump \
	mariadb mariadb-access mariadb-admin mariadb-binlog mariadb-check mariadb-conv \
	mariadb-dump mariadb-dumpslow mariadb-find-rows mariadb-fix-extensions mariadb-hotcopy \
	mariadb-import mariadb-install-db mariadb-plugin mariadb-secure-installation \
	mariadb-setpermission mariadb-show mariadb-slap mariadb-tzinfo-to-sql mariadb-upgrade \
	mariadb-waitpid mariadbd-multi mariadbd-safe mariadbd-safe-helper mariadb-report \
	mariadb-convert-table-format mariadb-embedded innochecksum my_print_defaults \
	mysql_embedded perror replace resolve_stack_dump resolveip msql2mysql mytop \
	mariadb-analyze mariadb-optimize mariadb-repair mariadbcheck mariadb-service-convert \
	galera_new_cluster galera_recovery wsrep_sst_backup wsrep_sst_common \
	wsrep_sst_mariabackup wsrep_sst_mysqldump wsrep_sst_rsync wsrep_sst_rsync_wan; do
	rm -f "$root/usr/bin/$tool"
done
# Every mysql* name left is a link to one of them.
chroot "$root" find /usr/bin -xtype l -delete
# Galera (clustering Tandem does with replication) and the SQL scripts only
# mariadb-install-db and mariadb-upgrade read.
rm -f "$root"/usr/lib/libgalera_smm.so "$root"/usr/lib/galera/libgalera_smm.so \
	"$root"/usr/share/mysql/*.sql "$root"/usr/share/mariadb/*.sql
# udev's hardware database: the initrd is already built, and after it `appliance init` loads
# drivers by modalias itself; nothing reads device descriptions.
rm -rf "$root"/usr/lib/udev/hwdb.bin "$root"/usr/lib/udev/hwdb.d "$root"/etc/udev/hwdb.bin
# KVM: the appliance runs no virtual machines.
rm -rf "$root"/usr/lib/modules/*/kernel/arch/x86/kvm
for dir in "$root"/usr/lib/modules/*; do
	chroot "$root" depmod -a "$(basename "$dir")"
done
# Perl (debconf's, dpkg's maintainer scripts'): nothing the appliance runs is Perl, and no
# package is installed on a running node. libperl stays: keepalived links it (through
# net-snmp) and loads it, though it never runs Perl.
rm -rf "$root"/usr/bin/perl "$root"/usr/bin/perl5.* "$root"/usr/share/perl \
	"$root"/usr/share/perl5 "$root"/usr/lib/x86_64-linux-gnu/perl \
	"$root"/usr/lib/x86_64-linux-gnu/perl-base "$root"/usr/lib/x86_64-linux-gnu/perl5

# Every program the appliance runs still finds every library it links.
for program in /usr/sbin/mariadbd /usr/sbin/nginx /usr/sbin/keepalived /usr/sbin/nft \
	/usr/bin/ip /usr/sbin/modprobe /usr/sbin/mkfs.ext4 /usr/sbin/e2fsck /usr/sbin/resize2fs \
	/usr/sbin/sfdisk /usr/bin/partx /usr/bin/mount /usr/bin/umount /usr/bin/curl; do
	chroot "$root" test -x "$program" || { echo "tandem: $program is missing" >&2; exit 1; }
	if chroot "$root" ldd "$program" | grep "not found" >&2; then
		echo "tandem: $program lacks a library (above)" >&2
		exit 1
	fi
done
