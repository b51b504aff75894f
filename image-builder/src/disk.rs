//! Assembling a node's disk: the GPT by `sfdisk` on a file, then each partition image copied
//! in at its offset, skipping zero blocks so that the result stays sparse.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::cmd::Cmd;
use crate::layout::DiskLayout;
use crate::Error;

const STEP: &str = "disk image";
const BLOCK: usize = 4096;

/// Creates `out` (sparse, `layout.disk_size` bytes) with the partition table and the given
/// partition images (label, image file). Partitions without an image stay zero.
pub fn assemble(out: &Path, layout: &DiskLayout, images: &[(&str, &Path)]) -> Result<(), Error> {
    let images = images
        .iter()
        .map(|&(label, image)| {
            let part = layout.partition(label).ok_or_else(|| Error::NoPartition {
                label: label.to_string(),
            })?;
            Ok((label, image, part))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let f = create_private(out).map_err(|e| Error::io(STEP, out, e))?;
    f.set_len(layout.disk_size)
        .map_err(|e| Error::io(STEP, out, e))?;
    drop(f);
    Cmd::new(STEP, "sfdisk")
        .args([
            "--quiet",
            "--no-reread",
            "--no-tell-kernel",
            "--wipe",
            "always",
        ])
        .arg(out)
        .stdin(layout.sfdisk_script())
        .run_quiet()?;
    let mut disk = std::fs::OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(|e| Error::io(STEP, out, e))?;
    for (label, image, part) in images {
        let len = std::fs::metadata(image)
            .map_err(|e| Error::io(STEP, image, e))?
            .len();
        if len > part.size {
            return Err(Error::TooBig {
                what: image.to_path_buf(),
                size: len,
                partition: label.to_string(),
                capacity: part.size,
            });
        }
        copy_sparse(image, &mut disk, part.offset).map_err(|e| Error::io(STEP, image, e))?;
    }
    disk.sync_all().map_err(|e| Error::io(STEP, out, e))
}

/// A new, empty file readable by its owner only: a node's disk holds its private key and the
/// cluster secret. Created with that mode (never chmodded after), replacing an older one.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    api::fsio::remove_if_present(path)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Copies `src` into `dst` at `offset`, seeking over all-zero blocks (`dd conv=sparse,notrunc`).
fn copy_sparse(src: &Path, dst: &mut File, offset: u64) -> std::io::Result<()> {
    let mut input = File::open(src)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = offset;
    loop {
        let n = read_full(&mut input, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        for chunk in buf[..n].chunks(BLOCK) {
            if chunk.iter().any(|&b| b != 0) {
                dst.seek(SeekFrom::Start(pos))?;
                dst.write_all(chunk)?;
            }
            pos += chunk.len() as u64;
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where a partition lies in a disk image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the start of the disk.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
}

/// The partition named `name` (its GPT partition name, e.g. `root-b`) in the raw disk image
/// `image` (a node's `.img`), as `sfdisk --json` reads the table.
pub fn partition_extent(image: &Path, name: &str) -> Result<Extent, Error> {
    const STEP: &str = "partition table";
    let json = Cmd::new(STEP, "sfdisk").arg("--json").arg(image).output()?;
    parse_sfdisk_json(&json, name).map_err(|message| Error::Input {
        path: image.to_path_buf(),
        line: 0,
        message,
    })
}

/// [`partition_extent`]'s pure part: `sfdisk --json` output in, the named partition out.
fn parse_sfdisk_json(json: &str, name: &str) -> Result<Extent, String> {
    #[derive(serde::Deserialize)]
    struct Dump {
        partitiontable: Table,
    }
    #[derive(serde::Deserialize)]
    struct Table {
        label: String,
        sectorsize: Option<u64>,
        #[serde(default)]
        partitions: Vec<Part>,
    }
    #[derive(serde::Deserialize)]
    struct Part {
        start: u64,
        size: u64,
        name: Option<String>,
    }
    let dump: Dump = serde_json::from_str(json)
        .map_err(|e| format!("unexpected `sfdisk --json` output: {e}"))?;
    let table = dump.partitiontable;
    if table.label != "gpt" {
        return Err(format!("a {} partition table, not GPT", table.label));
    }
    let sector = table.sectorsize.unwrap_or(crate::layout::SECTOR);
    let names: Vec<&str> = table
        .partitions
        .iter()
        .filter_map(|p| p.name.as_deref())
        .collect();
    table
        .partitions
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| Extent {
            offset: p.start * sector,
            size: p.size * sector,
        })
        .ok_or_else(|| format!("no partition named {name:?} (it has {})", names.join(", ")))
}

pub fn to_qcow2(raw: &Path, qcow2: &Path) -> Result<(), Error> {
    // qemu-img writes into an existing file without changing its mode.
    create_private(qcow2).map_err(|e| Error::io("qcow2", qcow2, e))?;
    Cmd::new("qcow2", "qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .run_quiet()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn an_unknown_partition_is_named_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.img");
        let layout = DiskLayout::new("tandem", "server1", crate::layout::GIB);
        let e = assemble(&out, &layout, &[("swap", Path::new("/dev/null"))]).unwrap_err();
        assert!(
            e.to_string().contains("no partition labelled \"swap\""),
            "{e}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn partition_extents_come_from_the_real_table() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.img");
        let layout = DiskLayout::new("tandem", "server1", crate::layout::GIB);
        assemble(&out, &layout, &[]).unwrap();
        for p in &layout.partitions {
            assert_eq!(
                partition_extent(&out, p.label).unwrap(),
                Extent {
                    offset: p.offset,
                    size: p.size
                },
                "{}",
                p.label
            );
        }
        let e = partition_extent(&out, "swap").unwrap_err().to_string();
        assert!(
            e.ends_with(
                "disk.img:0: no partition named \"swap\" (it has esp, root-a, root-b, seed, data)"
            ),
            "{e}"
        );
        let e = parse_sfdisk_json(r#"{"partitiontable":{"label":"dos","partitions":[]}}"#, "x")
            .unwrap_err();
        assert_eq!(e, "a dos partition table, not GPT");
    }

    #[test]
    fn sparse_copy_writes_data_at_offset_and_leaves_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut data = vec![0u8; 4 << 20];
        data[0] = 1;
        data[(3 << 20) + 5] = 7;
        std::fs::write(&src, &data).unwrap();
        let dst_path = dir.path().join("dst");
        let mut dst = File::create(&dst_path).unwrap();
        dst.set_len(16 << 20).unwrap();
        copy_sparse(&src, &mut dst, 8 << 20).unwrap();
        drop(dst);
        let out = std::fs::read(&dst_path).unwrap();
        assert_eq!(out.len(), 16 << 20);
        assert_eq!(&out[8 << 20..12 << 20], &data[..]);
        assert!(out[..8 << 20].iter().all(|&b| b == 0));
        // Two 4 KiB blocks of data, the rest holes.
        assert!(std::fs::metadata(&dst_path).unwrap().blocks() * 512 <= 64 * 1024);
    }
}
