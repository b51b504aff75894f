//! Reading a VM's disk from the host while QEMU runs: `qemu-io -r -U` opens the image read-only
//! without QEMU's image lock (QEMU holds the write lock) and dumps the bytes. It sees what the
//! guest wrote and flushed; writes still in QEMU's caches (qcow2 metadata of newly allocated
//! clusters) may not be visible until the guest flushes.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};
use crate::machine::image_format;
use crate::netns::run_checked;
use crate::tools;

/// The most [`read_image`] reads at once: the dump is text, about 5 bytes per byte read.
pub const MAX_READ: u64 = 64 << 20;
/// Bytes per line of `qemu-io`'s `read -v` dump.
const DUMP_LINE: u64 = 16;

/// Reads `len` bytes at `offset` of the disk image `image` (qcow2 by its `.qcow2` extension,
/// else raw; a qcow2 overlay reads through to its backing file), even while a QEMU has it open.
pub fn read_image(image: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if len > MAX_READ {
        return Err(Error::io(
            "reading the disk",
            image,
            std::io::Error::other(format!("{len} bytes asked for, at most {MAX_READ} at once")),
        ));
    }
    let qemu_io = tools::find(tools::QEMU_IO)?;
    let out = run_checked(
        Command::new(qemu_io)
            .args(["-r", "-U", "-f", image_format(image), "-c"])
            .arg(format!("read -v {offset} {len}"))
            .arg(image),
    )?;
    parse_dump(&String::from_utf8_lossy(&out.stdout), offset, len).map_err(|why| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Error::io(
            "reading the disk with qemu-io",
            image,
            std::io::Error::other(format!("{why}; stderr: {}", stderr.trim())),
        )
    })
}

/// The bytes of a `read -v OFFSET LEN` dump: lines `%08x:  hh hh … (16, fewer in the last)
/// ascii` counting from OFFSET, then
/// `read LEN/LEN bytes at offset OFFSET`. Every byte must be there, in order.
fn parse_dump(text: &str, offset: u64, len: u64) -> std::result::Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    let mut complete = false;
    for line in text.lines() {
        if line.starts_with("read ") {
            complete = line == format!("read {len}/{len} bytes at offset {offset}");
            continue;
        }
        let Some((addr, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        let at = offset + data.len() as u64;
        if addr != at {
            return Err(format!("dump line at {addr:#x}, expected {at:#x}"));
        }
        let want = (len - data.len() as u64).min(DUMP_LINE);
        let want = usize::try_from(want).map_err(|e| e.to_string())?;
        // The hex bytes come first; the ASCII column after them may look like hex too.
        let bytes = rest
            .split_whitespace()
            .take(want)
            .map(|h| u8::from_str_radix(h, 16).map_err(|_| format!("bad byte {h:?} at {addr:#x}")))
            .collect::<std::result::Result<Vec<u8>, String>>()?;
        if bytes.len() != want {
            return Err(format!("short dump line at {addr:#x}"));
        }
        data.extend(bytes);
    }
    if !complete || data.len() as u64 != len {
        return Err(format!(
            "read {} of {len} bytes at offset {offset}",
            data.len()
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    fn run(cmd: &mut Command) -> String {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (apt-get install qemu-utils)"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A 4 MiB raw base (0x11 in its first MiB) under a qcow2 overlay with 0x5a at 8 KiB.
    fn images(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let base = dir.join("base.img");
        let overlay = dir.join("node.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&base)
            .arg("4M"));
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x11 0 1M"])
            .arg(&base));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&overlay));
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 8192 4096"])
            .arg(&overlay));
        (base, overlay)
    }

    #[test]
    fn reads_through_the_overlay_at_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (base, overlay) = images(dir.path());
        let got = read_image(&overlay, 8190, 4100).unwrap();
        let mut expected = vec![0x11u8; 2];
        expected.extend([0x5a; 4096]);
        expected.extend([0x11; 2]);
        assert_eq!(got, expected);
        // The base is untouched, and read as raw.
        assert_eq!(read_image(&base, 8192, 3).unwrap(), [0x11; 3]);
        // Past the base's written part: zeros; a whole MiB (the e2e tests' check) in one read.
        let mib = read_image(&overlay, 1 << 20, 1 << 20).unwrap();
        assert!(mib.len() == 1 << 20 && mib.iter().all(|&b| b == 0));
        assert!(read_image(&overlay, 0, 0).unwrap().is_empty());
        // Past the end of the disk: an error naming the image.
        let e = read_image(&overlay, 4 << 20, 16).unwrap_err().to_string();
        assert!(e.contains("node.qcow2"), "{e}");
    }

    #[test]
    fn dump_parsing() {
        let text = "00001ffe:  11 11 5a 5a 5a 5a 5a 5a  ..ZZZZZZ\n\
                    read 8/8 bytes at offset 8190\n\
                    8 bytes, 1 ops; 00.00 sec (50.817 KiB/sec and 6504.5727 ops/sec)\n";
        assert_eq!(
            parse_dump(text, 8190, 8).unwrap(),
            [0x11, 0x11, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a]
        );
        // An ASCII column of hex-looking letters is not read as bytes.
        let text = "00000000:  61 61  aa\nread 2/2 bytes at offset 0\n";
        assert_eq!(parse_dump(text, 0, 2).unwrap(), b"aa");
        let e = parse_dump("read failed: Input/output error\n", 0, 2).unwrap_err();
        assert_eq!(e, "read 0 of 2 bytes at offset 0");
        let e = parse_dump("00000010:  61 61  aa\nread 2/2 bytes at offset 0\n", 0, 2);
        assert_eq!(e.unwrap_err(), "dump line at 0x10, expected 0x0");
    }

    /// What the e2e tests rely on: the host reads the disk of a running QEMU (which holds its
    /// write lock) and sees what the guest wrote once it is flushed. The "guest" here is QEMU's
    /// own block layer, driven over HMP's `qemu-io`; no firmware or OS runs (`-S`).
    #[test]
    fn sees_flushed_writes_of_a_running_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let (_, overlay) = images(dir.path());
        let qmp = dir.path().join("qmp.sock");
        let qemu = tools::find(tools::QEMU).unwrap();
        let mut child = Command::new(qemu)
            .args(["-nodefaults", "-display", "none", "-S", "-machine", "q35"])
            .args(["-accel", "tcg", "-drive"])
            .arg(format!(
                "if=none,id=disk0,format=qcow2,file={}",
                overlay.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=disk0", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let mut q = loop {
            match crate::qmp::Qmp::connect(&qmp, Duration::ZERO) {
                Ok(q) => break q,
                Err(e) if t0.elapsed() > Duration::from_secs(20) => {
                    let _ = child.kill();
                    panic!("QMP never answered: {e}");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut hmp = |line: &str| {
            q.execute(
                "human-monitor-command",
                Some(&serde_json::json!({ "command-line": line })),
            )
            .unwrap()
        };
        // QEMU holds the image: an ordinary open fails, which is why read_image needs -U.
        let locked = Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", "read 0 512"])
            .arg(&overlay)
            .output()
            .unwrap();
        let held = String::from_utf8_lossy(&locked.stderr).contains("lock");
        hmp("qemu-io disk0 \"write -P 0x77 65536 4096\"");
        hmp("qemu-io disk0 flush");
        let got = read_image(&overlay, 65536 - 1, 4098);
        let _ = child.kill();
        let _ = child.wait();
        assert!(held, "QEMU did not lock its disk; the test proves nothing");
        let got = got.unwrap();
        assert_eq!(got[0], 0x11);
        assert!(got[1..4097].iter().all(|&b| b == 0x77));
        assert_eq!(got[4097], 0x11);
    }
}
