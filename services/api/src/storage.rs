//! The data partition: how the image marks it as never initialised, and how a node that could
//! not use it says so.
//!
//! `image-builder` leaves the data partition without a filesystem and writes
//! [`UNINITIALISED_MARKER`] at its first byte. `appliance init` creates the filesystem only
//! when it finds that marker (then erases it); a partition without a readable filesystem and
//! without the marker is a damaged one, and is never formatted: the node boots degraded and
//! writes a [`Degraded`] record to [`DEGRADED_FILE`] in its runtime directory, which the
//! status page and `/api/status` show.

use serde::{Deserialize, Serialize};

/// At offset 0 of a data partition that no node has used yet. ext4 leaves its first 1024
/// bytes alone, so the marker never overlaps a filesystem's superblock; init erases it once the
/// filesystem exists.
pub const UNINITIALISED_MARKER: &[u8; 32] = b"TANDEM-DATA-UNINITIALISED-v1\n\0\0\0";

/// Whether `head` (the partition's first bytes) carries [`UNINITIALISED_MARKER`].
pub fn is_uninitialised(head: &[u8]) -> bool {
    head.starts_with(UNINITIALISED_MARKER)
}

/// The node's [`Degraded`] records, a JSON list in its runtime directory. Absent on a healthy
/// node.
pub const DEGRADED_FILE: &str = "degraded.json";

/// Something that keeps a node from running as it should, for people: the status page shows
/// it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Degraded {
    /// What is affected, as a short name (`data-partition`, `state-db`): the subject of the
    /// log monitor's alert and of the supervisor's `failed` event.
    pub subject: String,
    /// One line: what is wrong (e.g. "data partition /dev/vda5: no readable filesystem").
    pub reason: String,
    /// What an operator can do about it.
    pub hint: String,
    /// The services that stay stopped because of it (may be none).
    pub stopped: Vec<String>,
    /// Unix time in milliseconds when the node noticed.
    pub since_ms: u64,
}

impl Degraded {
    /// Every record in `run_dir`; empty when the node is not degraded (or the file cannot be
    /// parsed, which only a newer writer could cause).
    pub fn read_all(run_dir: &std::path::Path) -> Vec<Degraded> {
        std::fs::read_to_string(run_dir.join(DEGRADED_FILE))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// Adds this record to the list in `run_dir` (temporary file, then rename). Only the
    /// supervisor's side of a node writes it, before and while it starts services.
    pub fn append(&self, run_dir: &std::path::Path) -> std::io::Result<()> {
        let mut all = Degraded::read_all(run_dir);
        all.push(self.clone());
        let path = run_dir.join(DEGRADED_FILE);
        let text = serde_json::to_string_pretty(&all).map_err(std::io::Error::other)?;
        crate::fsio::write_atomic(&path, text.as_bytes(), 0o644, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_fits_before_the_ext4_superblock_and_is_recognised_only_whole() {
        assert!(UNINITIALISED_MARKER.len() <= 1024);
        let mut head = vec![0u8; 4096];
        assert!(!is_uninitialised(&head));
        head[..UNINITIALISED_MARKER.len()].copy_from_slice(UNINITIALISED_MARKER);
        assert!(is_uninitialised(&head));
        head[3] ^= 1;
        assert!(!is_uninitialised(&head));
        assert!(!is_uninitialised(&UNINITIALISED_MARKER[..10]));
    }

    #[test]
    fn degraded_records_accumulate_in_their_file() {
        let dir = std::env::temp_dir().join(format!("api-degraded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Degraded::read_all(&dir), []);
        let data = Degraded {
            subject: "data-partition".into(),
            reason: "data partition /dev/vda5: no readable filesystem".into(),
            hint: "e2fsck -b 32768 -B 4096 /dev/vda5".into(),
            stopped: vec!["mariadb".into()],
            since_ms: 1,
        };
        let db = Degraded {
            subject: "state-db".into(),
            reason: "state.db was corrupt".into(),
            hint: String::new(),
            stopped: Vec::new(),
            since_ms: 2,
        };
        data.append(&dir).unwrap();
        db.append(&dir).unwrap();
        assert_eq!(Degraded::read_all(&dir), [data, db]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
