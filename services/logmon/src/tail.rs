//! Follows the current files of the log directory like `tail -F`: new lines of every
//! `<name>.log`, across rotations (the rest of the rotated file is read through the still open
//! descriptor before the new file) and truncations (read again from the start).

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::store::{parse_file_name, LOG_SUFFIX};

/// At most this much is read from one file per poll, so a burst cannot stall the monitor.
pub const MAX_READ_PER_POLL: u64 = 4 << 20;
/// A line without a newline longer than this is cut and handed on as it is.
pub const MAX_PARTIAL: usize = 64 * 1024;

/// One complete line of one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailLine {
    /// The log's name (file name without `.log`).
    pub log: String,
    pub line: String,
}

struct Follow {
    file: File,
    ino: u64,
    pos: u64,
    partial: Vec<u8>,
}

impl Follow {
    /// Opens `path` (inode `ino`), positioned at its start or its end.
    fn open(path: &Path, ino: u64, from_start: bool) -> io::Result<Follow> {
        let mut file = File::open(path)?;
        let pos = if from_start {
            0
        } else {
            file.seek(SeekFrom::End(0))?
        };
        Ok(Follow {
            file,
            ino,
            pos,
            partial: Vec::new(),
        })
    }
}

pub struct Tailer {
    dir: PathBuf,
    skip: Vec<String>,
    follows: BTreeMap<String, Follow>,
    /// Files found by the first scan are followed from their end, later ones from the start.
    scanned: bool,
}

impl Tailer {
    /// Follows the logs in `dir` except those named in `skip`. Existing content is not read
    /// when `from_end` (the monitor starts fresh), else it is.
    pub fn new(dir: &Path, skip: &[&str], from_end: bool) -> Tailer {
        Tailer {
            dir: dir.to_path_buf(),
            skip: skip.iter().map(|s| s.to_string()).collect(),
            follows: BTreeMap::new(),
            scanned: !from_end,
        }
    }

    /// Every complete line written since the last poll, file by file. A missing directory
    /// is not an error (nothing was written yet).
    pub fn poll(&mut self) -> io::Result<Vec<TailLine>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Nothing existed at the start: whatever appears later is read whole.
                self.scanned = true;
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| parse_file_name(n).is_some_and(|(_, g)| g == 0))
            .collect();
        names.sort();
        for name in names {
            let log = name.strip_suffix(LOG_SUFFIX).unwrap_or(&name).to_string();
            if self.skip.contains(&log) {
                continue;
            }
            let path = self.dir.join(&name);
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let from_start = self.scanned;
            let follow = match self.follows.entry(log.clone()) {
                Entry::Occupied(e) if e.get().ino == meta.ino() => {
                    let f = e.into_mut();
                    if meta.len() < f.pos {
                        // Truncated (the store's total cap): start over.
                        f.file.seek(SeekFrom::Start(0))?;
                        f.pos = 0;
                        f.partial.clear();
                    }
                    f
                }
                Entry::Occupied(mut e) => {
                    // Rotated: finish the old file first.
                    read_lines(e.get_mut(), &log, &mut out)?;
                    flush_partial(e.get_mut(), &log, &mut out);
                    e.insert(Follow::open(&path, meta.ino(), from_start)?);
                    e.into_mut()
                }
                Entry::Vacant(e) => e.insert(Follow::open(&path, meta.ino(), from_start)?),
            };
            read_lines(follow, &log, &mut out)?;
        }
        self.scanned = true;
        Ok(out)
    }
}

fn read_lines(f: &mut Follow, log: &str, out: &mut Vec<TailLine>) -> io::Result<()> {
    let mut buf = Vec::new();
    let n = (&mut f.file)
        .take(MAX_READ_PER_POLL)
        .read_to_end(&mut buf)?;
    f.pos += n as u64;
    let mut rest = &buf[..];
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        f.partial.extend_from_slice(&rest[..i]);
        emit(f, log, out);
        rest = &rest[i + 1..];
    }
    f.partial.extend_from_slice(rest);
    if f.partial.len() > MAX_PARTIAL {
        emit(f, log, out);
    }
    Ok(())
}

fn flush_partial(f: &mut Follow, log: &str, out: &mut Vec<TailLine>) {
    if !f.partial.is_empty() {
        emit(f, log, out);
    }
}

fn emit(f: &mut Follow, log: &str, out: &mut Vec<TailLine>) {
    let line = String::from_utf8_lossy(&f.partial).into_owned();
    f.partial.clear();
    out.push(TailLine {
        log: log.to_string(),
        line,
    });
}
