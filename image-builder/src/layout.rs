//! The GPT layout of a node's disk: pure arithmetic and the `sfdisk` script, no I/O.
//!
//! ```text
//! 1 MiB gap | esp 256 MiB | root-a | root-b | seed 16 MiB | data 256 MiB | 1 MiB (backup GPT)
//! ```
//! The data partition is last so that the node can grow it to fill a larger disk on first boot.

use sha2::{Digest, Sha256};

pub const SECTOR: u64 = 512;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;
/// Partitions start on 1 MiB boundaries; the first one leaves room for the primary GPT.
pub const ALIGN: u64 = MIB;
pub const ESP_SIZE: u64 = 256 * MIB;
pub const SEED_SIZE: u64 = 16 * MIB;
pub const DATA_SIZE: u64 = 256 * MIB;
/// A root slot is never smaller than this, so that every build (and every update) gets the
/// same slot size as long as the root filesystem stays below ~800 MiB.
pub const MIN_ROOT_SLOT: u64 = GIB;

/// GPT partition type GUIDs (UEFI spec; Discoverable Partitions Specification).
pub const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
pub const TYPE_LINUX_DATA: &str = "0FC63DAF-8483-4772-8E3D-693D477DE4E4";

/// Partition labels, in table order. The kernel command line and the supervisor find
/// partitions by these names (`root=PARTLABEL=root-a`).
pub const LABEL_ESP: &str = "esp";
pub const LABEL_ROOT_A: &str = "root-a";
pub const LABEL_ROOT_B: &str = "root-b";
pub const LABEL_SEED: &str = "seed";
pub const LABEL_DATA: &str = "data";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub label: &'static str,
    pub type_guid: &'static str,
    pub uuid: String,
    /// Byte offset from the start of the disk (multiple of `ALIGN`).
    pub offset: u64,
    pub size: u64,
}

impl Partition {
    pub fn start_lba(&self) -> u64 {
        self.offset / SECTOR
    }
    pub fn size_lba(&self) -> u64 {
        self.size / SECTOR
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    pub disk_guid: String,
    pub partitions: Vec<Partition>,
    /// Total size of the image file.
    pub disk_size: u64,
}

/// Size of one root slot for a root filesystem of `root_fs_size` bytes: 25 % headroom for
/// later updates, rounded up to whole MiB, at least `MIN_ROOT_SLOT`.
pub fn root_slot_size(root_fs_size: u64) -> u64 {
    let with_headroom = root_fs_size + root_fs_size / 4;
    round_up(with_headroom, MIB).max(MIN_ROOT_SLOT)
}

pub fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

impl DiskLayout {
    /// The layout of `node`'s disk in cluster `cluster`. GUIDs are derived from the two names,
    /// so the same cluster always yields the same partition table.
    pub fn new(cluster: &str, node: &str, root_slot: u64) -> DiskLayout {
        let spec: [(&'static str, &'static str, u64); 5] = [
            (LABEL_ESP, TYPE_ESP, ESP_SIZE),
            (LABEL_ROOT_A, TYPE_ROOT_X86_64, root_slot),
            (LABEL_ROOT_B, TYPE_ROOT_X86_64, root_slot),
            (LABEL_SEED, TYPE_LINUX_DATA, SEED_SIZE),
            (LABEL_DATA, TYPE_LINUX_DATA, DATA_SIZE),
        ];
        let mut offset = ALIGN;
        let mut partitions = Vec::with_capacity(spec.len());
        for (label, type_guid, size) in spec {
            let size = round_up(size, ALIGN);
            partitions.push(Partition {
                label,
                type_guid,
                uuid: derived_uuid(&[cluster, node, "partition", label]),
                offset,
                size,
            });
            offset += size;
        }
        DiskLayout {
            disk_guid: derived_uuid(&[cluster, node, "disk"]),
            partitions,
            // The backup GPT needs 33 sectors at the end; keep the 1 MiB alignment.
            disk_size: offset + ALIGN,
        }
    }

    /// The partition labelled `label`, if the layout has one (every layout has the five
    /// `LABEL_*` partitions).
    pub fn partition(&self, label: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.label == label)
    }

    /// Input for `sfdisk` that creates exactly this table.
    pub fn sfdisk_script(&self) -> String {
        let mut s = format!(
            "label: gpt\nlabel-id: {}\nunit: sectors\nsector-size: {SECTOR}\nfirst-lba: {}\nlast-lba: {}\n\n",
            self.disk_guid,
            ALIGN / SECTOR,
            // Everything up to the backup GPT (33 sectors) is usable.
            self.disk_size / SECTOR - 34,
        );
        for p in &self.partitions {
            s.push_str(&format!(
                "start={}, size={}, type={}, uuid={}, name=\"{}\"\n",
                p.start_lba(),
                p.size_lba(),
                p.type_guid,
                p.uuid,
                p.label
            ));
        }
        s
    }
}

/// A UUID (RFC 9562 version 8, "custom") derived from a sha256 of the given parts, so that
/// GUIDs and filesystem UUIDs are stable across builds of the same cluster.
pub fn derived_uuid(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(b"tandem-uuid-v1");
    for p in parts {
        h.update([0u8]);
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // RFC variant
    let h = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A FAT volume id (32 bits, hex) derived like `derived_uuid`.
pub fn derived_fat_volume_id(parts: &[&str]) -> String {
    derived_uuid(parts)[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_size_has_headroom_and_a_floor() {
        let check = |fs: u64, expected: u64| assert_eq!(root_slot_size(fs), expected, "fs={fs}");
        check(0, GIB);
        check(500 * MIB, GIB);
        check(819 * MIB, GIB); // 1023.75 MiB -> 1024
        check(820 * MIB, 1025 * MIB);
        check(1600 * MIB, 2000 * MIB);
        check(1600 * MIB + 1, 2001 * MIB);
    }

    #[test]
    fn layout_offsets_are_contiguous_aligned_and_data_is_last() {
        let l = DiskLayout::new("tandem", "server1", GIB);
        let got: Vec<(&str, u64, u64)> = l
            .partitions
            .iter()
            .map(|p| (p.label, p.offset / MIB, p.size / MIB))
            .collect();
        assert_eq!(
            got,
            [
                ("esp", 1, 256),
                ("root-a", 257, 1024),
                ("root-b", 1281, 1024),
                ("seed", 2305, 16),
                ("data", 2321, 256)
            ]
        );
        assert_eq!(l.disk_size, 2578 * MIB);
        assert_eq!(l.partition("seed").unwrap().start_lba(), 2305 * 2048);
        for p in &l.partitions {
            assert_eq!(p.offset % ALIGN, 0);
        }
    }

    #[test]
    fn guids_are_stable_distinct_and_well_formed() {
        let a = DiskLayout::new("tandem", "server1", GIB);
        let b = DiskLayout::new("tandem", "server2", GIB);
        assert_eq!(a, DiskLayout::new("tandem", "server1", GIB));
        // Existing disks carry these GUIDs: the derivation must never change.
        assert_eq!(a.disk_guid, "9C7E7A37-DB34-8B5F-BFF6-6306D8D8D3CD");
        assert_eq!(
            derived_fat_volume_id(&["tandem", "server1", "disk"]),
            "9C7E7A37"
        );
        assert_ne!(a.disk_guid, b.disk_guid);
        let mut all: Vec<&str> = a
            .partitions
            .iter()
            .chain(&b.partitions)
            .map(|p| p.uuid.as_str())
            .collect();
        all.push(&a.disk_guid);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 11);
        let u = &a.disk_guid;
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8", "version nibble of {u}");
        assert!(
            matches!(&u[19..20], "8" | "9" | "A" | "B"),
            "variant of {u}"
        );
        assert_eq!(derived_fat_volume_id(&["x"]).len(), 8);
    }

    #[test]
    fn sfdisk_script_text() {
        let l = DiskLayout::new("tandem", "server1", GIB);
        let s = l.sfdisk_script();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "label: gpt");
        assert_eq!(lines[1], format!("label-id: {}", l.disk_guid));
        assert_eq!(lines[4], "first-lba: 2048");
        assert_eq!(lines[5], format!("last-lba: {}", 2578 * 2048 - 34));
        assert_eq!(
            lines[7],
            format!(
                "start=2048, size=524288, type={TYPE_ESP}, uuid={}, name=\"esp\"",
                l.partitions[0].uuid
            )
        );
        assert!(
            lines[8].starts_with("start=526336, size=2097152, type=4F68BCE3-"),
            "{}",
            lines[8]
        );
        assert!(lines[11].ends_with("name=\"data\""), "{}", lines[11]);
        assert_eq!(lines.len(), 12);
    }
}
