//! systemd-boot's side of the A/B scheme: the ESP's texts (loader entries, `loader.conf`), the
//! mounted ESP's files ([`Esp`]) and the boot loader's EFI variables ([`EfiVars`]).
//!
//! The ESP holds, per slot, `tandem/<slot>/vmlinuz` and `initrd.img` and one loader entry,
//! `loader/entries/appliance-<slot>[+LEFT[-DONE]].conf`. A new entry carries a boot counter
//! (`+3`, [`BOOT_TRIES`]) that systemd-boot decrements on every boot of it; [`Esp::bless`] drops
//! the counter and makes the slot `loader.conf`'s default. Until then the old slot stays the
//! default, and the new one is tried through the one-shot variable ([`EfiVars::set_oneshot`]).
//!
//! Every file is written whole or not at all (temporary name, fsync, rename, fsync of the
//! directory): a temporary entry's name does not end in `.conf`, so systemd-boot never reads a
//! half-written one.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Boot attempts for a new entry before systemd-boot counts it as bad (automatic boot
/// assessment).
pub const BOOT_TRIES: u32 = 3;
/// The serial console every slot's kernel logs to.
pub const SERIAL_CONSOLE: &str = "console=ttyS0,115200";
/// A slot's kernel, in its [`slot_dir`].
pub const KERNEL_FILE: &str = "vmlinuz";
/// A slot's initrd, in its [`slot_dir`].
pub const INITRD_FILE: &str = "initrd.img";
/// The loader configuration, relative to the ESP's root.
pub const LOADER_CONF: &str = "loader/loader.conf";
/// The loader entries' directory, relative to the ESP's root.
pub const ENTRIES_DIR: &str = "loader/entries";
/// Prefix of every Tandem loader entry.
const ENTRY_PREFIX: &str = "appliance-";

/// One of the two root filesystem slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// `root-a`: the slot a new image boots.
    A,
    /// `root-b`.
    B,
}

impl Slot {
    /// Both slots.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// `a` or `b`, as in file names and on the kernel command line (`tandem.slot=`).
    pub fn as_char(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }

    /// The slot that is not this one.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The GPT partition label of the slot's root filesystem.
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "root-a",
            Slot::B => "root-b",
        }
    }

    fn from_char(c: char) -> Option<Slot> {
        match c {
            'a' => Some(Slot::A),
            'b' => Some(Slot::B),
            _ => None,
        }
    }
}

impl FromStr for Slot {
    type Err = Error;

    /// `a` or `b`.
    fn from_str(s: &str) -> Result<Slot, Error> {
        match s {
            "a" => Ok(Slot::A),
            "b" => Ok(Slot::B),
            _ => Err(Error::UnknownSlot(s.to_string())),
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// `loader/loader.conf`: no menu, `default`'s entry (whatever its boot counter), no editing of
/// the command line.
pub fn loader_conf(default: Slot) -> String {
    format!("timeout 0\ndefault {}\neditor no\n", entry_pattern(default))
}

/// The glob that matches a slot's entry id with or without its boot counter: `appliance-b*`.
/// systemd-boot matches `default` in `loader.conf` and the `LoaderEntry*` variables as globs.
pub fn entry_pattern(slot: Slot) -> String {
    format!("{ENTRY_PREFIX}{slot}*")
}

/// File name of a slot's loader entry: `appliance-b+3.conf` with `tries`, the blessed
/// `appliance-b.conf` without.
pub fn entry_file_name(slot: Slot, tries: Option<u32>) -> String {
    match tries {
        Some(n) => format!("{ENTRY_PREFIX}{slot}+{n}.conf"),
        None => format!("{ENTRY_PREFIX}{slot}.conf"),
    }
}

/// ESP directory holding a slot's kernel and initrd: `tandem/b`.
pub fn slot_dir(slot: Slot) -> String {
    format!("tandem/{slot}")
}

/// The kernel command line for a slot, `extra` (trimmed, if any) appended.
pub fn kernel_options(slot: Slot, extra: &str) -> String {
    let mut options = format!(
        "root=PARTLABEL={} ro rootwait {SERIAL_CONSOLE} panic=10 tandem.slot={slot}",
        slot.label()
    );
    let extra = extra.trim();
    if !extra.is_empty() {
        options.push(' ');
        options.push_str(extra);
    }
    options
}

/// Text of a slot's loader entry (Boot Loader Specification type #1).
pub fn loader_entry(slot: Slot, version: &str, extra_options: &str) -> String {
    let dir = slot_dir(slot);
    format!(
        "title Tandem appliance (slot {slot})\nversion {version}\nlinux /{dir}/{KERNEL_FILE}\ninitrd /{dir}/{INITRD_FILE}\noptions {}\n",
        kernel_options(slot, extra_options)
    )
}

/// Extra kernel options go on the entry's `options` line: no control characters (a newline
/// would start another key).
pub(crate) fn check_extra_options(extra: &str) -> Result<(), Error> {
    if extra.chars().any(char::is_control) {
        return Err(Error::Boot(format!(
            "extra kernel options {extra:?}: control characters are not allowed"
        )));
    }
    Ok(())
}

/// An entry's boot counter (`+LEFT-DONE`): tries left, and tries made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub left: u32,
    pub done: u32,
}

/// The slot and boot counter of a Tandem entry's file name (or systemd-boot entry id):
/// `appliance-b.conf` (blessed), `appliance-b+3.conf`, `appliance-b+2-1.conf`. Anything else
/// is `None`.
pub fn parse_entry_name(name: &str) -> Option<(Slot, Option<Counter>)> {
    let rest = name.strip_prefix(ENTRY_PREFIX)?.strip_suffix(".conf")?;
    let mut chars = rest.chars();
    let slot = Slot::from_char(chars.next()?)?;
    let rest = chars.as_str();
    if rest.is_empty() {
        return Some((slot, None));
    }
    let counter = rest.strip_prefix('+')?;
    let (left, done) = match counter.split_once('-') {
        Some((left, done)) => (number(left)?, number(done)?),
        None => (number(counter)?, 0),
    };
    Some((slot, Some(Counter { left, done })))
}

fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The slot a `default` value or entry glob names: `appliance-b*`, `appliance-b.conf`,
/// `appliance-b+3.conf`. `appliance-*` names none.
fn pattern_slot(pattern: &str) -> Option<Slot> {
    let rest = pattern.strip_prefix(ENTRY_PREFIX)?;
    let mut chars = rest.chars();
    let slot = Slot::from_char(chars.next()?)?;
    match chars.as_str().chars().next() {
        None | Some('*' | '.' | '+') => Some(slot),
        Some(_) => None,
    }
}

/// One Tandem loader entry on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFile {
    pub slot: Slot,
    /// In `loader/entries/`.
    pub file_name: String,
    /// `None` once blessed.
    pub counter: Option<Counter>,
    /// The entry's `version` line, if it has one.
    pub version: Option<String>,
}

/// A mounted EFI system partition.
#[derive(Debug, Clone)]
pub struct Esp {
    root: PathBuf,
}

impl Esp {
    /// The ESP mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Esp {
        Esp { root: root.into() }
    }

    /// Where it is mounted.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entries_dir(&self) -> PathBuf {
        self.root.join(ENTRIES_DIR)
    }

    /// Every Tandem loader entry, by file name. Other files are ignored.
    pub fn entries(&self) -> Result<Vec<EntryFile>, Error> {
        let dir = self.entries_dir();
        let listing =
            fs::read_dir(&dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut entries = Vec::new();
        for item in listing {
            let item = item.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let Some(name) = item.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Some((slot, counter)) = parse_entry_name(&name) else {
                continue;
            };
            let path = dir.join(&name);
            let text = fs::read_to_string(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let version = text.lines().find_map(|line| {
                let (key, value) = line.trim().split_once(char::is_whitespace)?;
                (key == "version").then(|| value.trim().to_string())
            });
            entries.push(EntryFile {
                slot,
                file_name: name,
                counter,
                version,
            });
        }
        entries.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        Ok(entries)
    }

    /// The slot's entry (the first by name, should a crash have left two).
    pub fn entry(&self, slot: Slot) -> Result<Option<EntryFile>, Error> {
        Ok(self.entries()?.into_iter().find(|e| e.slot == slot))
    }

    /// Removes every entry file of `slot` (and a temporary one a crash left), then syncs the
    /// directory: from then on the slot is not bootable. Returns the names removed.
    pub fn remove_entry(&self, slot: Slot) -> Result<Vec<String>, Error> {
        let dir = self.entries_dir();
        let mut names: Vec<String> = self
            .entries()?
            .into_iter()
            .filter(|e| e.slot == slot)
            .map(|e| e.file_name)
            .collect();
        let tmp = temporary_entry_name(slot);
        if dir.join(&tmp).exists() {
            names.push(tmp);
        }
        for name in &names {
            let path = dir.join(name);
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        }
        sync_dir(&dir)?;
        if !names.is_empty() {
            tracing::info!(%slot, removed = ?names, "removed the slot's boot entry");
        }
        Ok(names)
    }

    /// Writes the slot's `vmlinuz` and `initrd.img`, each whole (temporary file, fsync, rename,
    /// fsync of the directory). The old file of each name is removed first, to leave the ESP
    /// room for the new one: call this only once the slot's entry is gone.
    pub fn write_slot_files(&self, slot: Slot, kernel: &[u8], initrd: &[u8]) -> Result<(), Error> {
        let dir = self.root.join(slot_dir(slot));
        if !dir.is_dir() {
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        for (name, bytes) in [(KERNEL_FILE, kernel), (INITRD_FILE, initrd)] {
            let path = dir.join(name);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("removing {}", path.display()), e))
                }
                _ => {}
            }
            replace_file(&dir, &format!("{name}.tmp"), name, bytes)?;
        }
        Ok(())
    }

    /// Writes the slot's entry with a fresh boot counter, `appliance-<slot>+3.conf`, whole
    /// (through a temporary name that does not end in `.conf`), then removes any other entry
    /// of the slot. Returns the file name written.
    pub fn write_entry(
        &self,
        slot: Slot,
        version: &str,
        extra_options: &str,
    ) -> Result<String, Error> {
        check_extra_options(extra_options)?;
        let dir = self.entries_dir();
        let name = entry_file_name(slot, Some(BOOT_TRIES));
        replace_file(
            &dir,
            &temporary_entry_name(slot),
            &name,
            loader_entry(slot, version, extra_options).as_bytes(),
        )?;
        let stale: Vec<String> = self
            .entries()?
            .into_iter()
            .filter(|e| e.slot == slot && e.file_name != name)
            .map(|e| e.file_name)
            .collect();
        for old in &stale {
            let path = dir.join(old);
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        }
        if !stale.is_empty() {
            sync_dir(&dir)?;
        }
        tracing::info!(%slot, version, entry = %name, "wrote the slot's boot entry");
        Ok(name)
    }

    /// Keeps `slot`: renames its counted entry to `appliance-<slot>.conf` (ending the
    /// counting), then makes it `loader.conf`'s default. Returns the counted name it renamed,
    /// `None` if the entry was blessed already. `loader.conf` is rewritten whenever it names
    /// another default, so a second call completes a first one cut short.
    pub fn bless(&self, slot: Slot) -> Result<Option<String>, Error> {
        let entry = self.entry(slot)?.ok_or_else(|| {
            Error::Boot(format!(
                "no loader entry for slot {slot} in {}",
                self.entries_dir().display()
            ))
        })?;
        let renamed = if entry.counter.is_some() {
            let dir = self.entries_dir();
            let from = dir.join(&entry.file_name);
            let to = dir.join(entry_file_name(slot, None));
            fs::rename(&from, &to).map_err(|e| {
                Error::io(
                    format!("renaming {} to {}", from.display(), to.display()),
                    e,
                )
            })?;
            sync_dir(&dir)?;
            Some(entry.file_name)
        } else {
            None
        };
        if self.default_slot()? != Some(slot) {
            let path = self.root.join(LOADER_CONF);
            let dir = path.parent().unwrap_or(&self.root);
            replace_file(
                dir,
                "loader.conf.tmp",
                "loader.conf",
                loader_conf(slot).as_bytes(),
            )?;
        }
        tracing::info!(%slot, renamed = ?renamed, "blessed the slot: it is the default boot entry");
        Ok(renamed)
    }

    /// The slot `loader.conf`'s `default` names; `None` when there is no `loader.conf`, no
    /// `default`, or one that names no slot (`appliance-*`).
    pub fn default_slot(&self) -> Result<Option<Slot>, Error> {
        let path = self.root.join(LOADER_CONF);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        Ok(text.lines().find_map(|line| {
            let (key, value) = line.trim().split_once(char::is_whitespace)?;
            (key == "default").then(|| pattern_slot(value.trim()))?
        }))
    }
}

/// A slot's temporary entry name: not ending in `.conf`, so systemd-boot never reads it.
fn temporary_entry_name(slot: Slot) -> String {
    format!(".{ENTRY_PREFIX}{slot}.tmp")
}

/// Writes `dir/tmp` (fsync), renames it to `dir/name`, fsyncs `dir`.
fn replace_file(dir: &Path, tmp: &str, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let tmp_path = dir.join(tmp);
    let path = dir.join(name);
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp_path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp_path);
        return Err(Error::io(format!("writing {}", tmp_path.display()), e));
    }
    if let Err(e) = fs::rename(&tmp_path, &path) {
        let _ = fs::remove_file(&tmp_path);
        return Err(Error::io(
            format!("renaming {} to {}", tmp_path.display(), path.display()),
            e,
        ));
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
}

/// systemd-boot's vendor GUID for its `Loader*` variables.
pub const LOADER_VENDOR_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// Where the kernel shows EFI variables (efivarfs).
pub const EFIVARS_DIR: &str = "/sys/firmware/efi/efivars";
/// NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS.
pub const EFI_VARIABLE_ATTRIBUTES: u32 = 0x0000_0007;
/// The entry systemd-boot boots next, once (it removes the variable when it reads it).
pub const LOADER_ENTRY_ONESHOT: &str = "LoaderEntryOneShot";
/// The default entry, overriding `loader.conf`'s.
pub const LOADER_ENTRY_DEFAULT: &str = "LoaderEntryDefault";
/// The entry systemd-boot booted this time (set by systemd-boot).
pub const LOADER_ENTRY_SELECTED: &str = "LoaderEntrySelected";

/// systemd-boot's loader variables in an efivarfs directory: files named `<Name>-<guid>`
/// holding the 4-byte little-endian attributes and then the value as UTF-16LE with a
/// terminating NUL.
#[derive(Debug, Clone)]
pub struct EfiVars {
    dir: PathBuf,
}

impl Default for EfiVars {
    /// [`EFIVARS_DIR`].
    fn default() -> EfiVars {
        EfiVars::new(EFIVARS_DIR)
    }
}

impl EfiVars {
    /// The variables under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> EfiVars {
        EfiVars { dir: dir.into() }
    }

    /// The file of systemd-boot's variable `name`.
    pub fn path(&self, name: &str) -> Result<PathBuf, Error> {
        if name.is_empty() || name.contains('/') {
            return Err(Error::Boot(format!("{name:?} is not an EFI variable name")));
        }
        Ok(self.dir.join(format!("{name}-{LOADER_VENDOR_GUID}")))
    }

    /// Boots the entry matching `pattern` next, once ([`LOADER_ENTRY_ONESHOT`]).
    pub fn set_oneshot(&self, pattern: &str) -> Result<(), Error> {
        self.set(LOADER_ENTRY_ONESHOT, pattern)
    }

    /// Makes the entry matching `pattern` the default ([`LOADER_ENTRY_DEFAULT`]).
    pub fn set_default(&self, pattern: &str) -> Result<(), Error> {
        self.set(LOADER_ENTRY_DEFAULT, pattern)
    }

    /// What systemd-boot booted ([`LOADER_ENTRY_SELECTED`]): an entry id such as
    /// `appliance-b+2-1.conf`; [`parse_entry_name`] gives its slot.
    pub fn selected(&self) -> Result<Option<String>, Error> {
        self.get(LOADER_ENTRY_SELECTED)
    }

    /// Sets the string variable `name` to `value` with one write(2), as efivarfs requires. An
    /// existing variable's immutable flag (efivarfs sets it) is cleared first.
    pub fn set(&self, name: &str, value: &str) -> Result<(), Error> {
        let path = self.path(name)?;
        if fs::symlink_metadata(&path).is_ok() {
            clear_immutable(&path);
        }
        let bytes = encode_string(value);
        let what = || format!("writing EFI variable {}", path.display());
        // No O_TRUNC (as systemd does it): efivarfs replaces the variable with each write and
        // takes a zero size for a deleted one.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(|e| Error::io(what(), e))?;
        let n = f.write(&bytes).map_err(|e| Error::io(what(), e))?;
        if n != bytes.len() {
            return Err(Error::io(
                what(),
                io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("wrote {n} of {} bytes", bytes.len()),
                ),
            ));
        }
        // On efivarfs the size is now the variable's; only a plain file (tests) can hold the
        // tail of a longer old value.
        let len = f.metadata().map_err(|e| Error::io(what(), e))?.len();
        if len > n as u64 {
            f.set_len(n as u64).map_err(|e| Error::io(what(), e))?;
        }
        tracing::info!(variable = name, value, "set the EFI variable");
        Ok(())
    }

    /// The string variable `name`, `None` if it is not set.
    pub fn get(&self, name: &str) -> Result<Option<String>, Error> {
        let path = self.path(name)?;
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::io(
                    format!("reading EFI variable {}", path.display()),
                    e,
                ))
            }
        };
        decode_string(&bytes)
            .map(Some)
            .map_err(|why| Error::Boot(format!("EFI variable {}: {why}", path.display())))
    }

    /// Removes the variable `name` (clearing its immutable flag first); absent is fine.
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        let path = self.path(name)?;
        if fs::symlink_metadata(&path).is_err() {
            return Ok(());
        }
        clear_immutable(&path);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(
                format!("removing EFI variable {}", path.display()),
                e,
            )),
            _ => Ok(()),
        }
    }
}

/// efivarfs marks variables immutable; `chattr -i` lifts that. Where it cannot (not efivarfs,
/// no chattr) the write that follows reports the real error, if any.
fn clear_immutable(path: &Path) {
    match std::process::Command::new("chattr")
        .arg("-i")
        .arg(path)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => tracing::debug!(
            path = %path.display(),
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "chattr -i failed; writing anyway"
        ),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot run chattr; writing anyway")
        }
    }
}

/// A string variable's file content: attributes, UTF-16LE, terminating NUL.
pub(crate) fn encode_string(value: &str) -> Vec<u8> {
    let mut bytes = EFI_VARIABLE_ATTRIBUTES.to_le_bytes().to_vec();
    for unit in value.encode_utf16().chain(std::iter::once(0)) {
        bytes.extend_from_slice(&unit.to_le_bytes());
    }
    bytes
}

/// The string in a variable's file content (trailing NULs dropped).
pub(crate) fn decode_string(bytes: &[u8]) -> Result<String, String> {
    let Some(data) = bytes.get(4..) else {
        return Err(format!(
            "{} bytes, shorter than its attributes",
            bytes.len()
        ));
    };
    if data.len() % 2 != 0 {
        return Err(format!("{} bytes of data, not UTF-16", data.len()));
    }
    let mut units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    while units.last() == Some(&0) {
        units.pop();
    }
    String::from_utf16(&units).map_err(|_| "not valid UTF-16".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_texts() {
        assert_eq!(
            loader_conf(Slot::A),
            "timeout 0\ndefault appliance-a*\neditor no\n"
        );
        assert_eq!(
            loader_conf(Slot::B),
            "timeout 0\ndefault appliance-b*\neditor no\n"
        );
        assert_eq!(
            entry_file_name(Slot::A, Some(BOOT_TRIES)),
            "appliance-a+3.conf"
        );
        assert_eq!(entry_file_name(Slot::B, None), "appliance-b.conf");
        assert_eq!(
            loader_entry(Slot::A, "0.1.0", ""),
            "title Tandem appliance (slot a)\n\
             version 0.1.0\n\
             linux /tandem/a/vmlinuz\n\
             initrd /tandem/a/initrd.img\n\
             options root=PARTLABEL=root-a ro rootwait console=ttyS0,115200 panic=10 tandem.slot=a\n"
        );
        let b = loader_entry(Slot::B, "2", " quiet  ");
        assert!(
            b.contains("options root=PARTLABEL=root-b ro")
                && b.contains("/tandem/b/vmlinuz")
                && b.ends_with("tandem.slot=b quiet\n"),
            "{b}"
        );
    }

    #[test]
    fn slots() {
        assert_eq!("a".parse::<Slot>().unwrap(), Slot::A);
        assert_eq!("b".parse::<Slot>().unwrap(), Slot::B);
        let e = "c".parse::<Slot>().unwrap_err();
        assert_eq!(e.to_string(), "unknown slot \"c\" (expected a or b)");
        assert!("A".parse::<Slot>().is_err() && "".parse::<Slot>().is_err());
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.other(), Slot::A);
        assert_eq!(Slot::B.label(), "root-b");
        assert_eq!(Slot::A.to_string(), "a");
        assert_eq!(serde_json::to_string(&Slot::B).unwrap(), "\"b\"");
    }

    #[test]
    fn entry_names() {
        let check = |name: &str, expected: Option<(Slot, Option<(u32, u32)>)>| {
            let expected = expected.map(|(s, c)| (s, c.map(|(left, done)| Counter { left, done })));
            assert_eq!(parse_entry_name(name), expected, "{name}");
        };
        check("appliance-b.conf", Some((Slot::B, None)));
        check("appliance-a.conf", Some((Slot::A, None)));
        check("appliance-b+3.conf", Some((Slot::B, Some((3, 0)))));
        check("appliance-b+2-1.conf", Some((Slot::B, Some((2, 1)))));
        check("appliance-b+0-3.conf", Some((Slot::B, Some((0, 3)))));
        for bad in [
            "appliance-c.conf",
            "appliance-b",
            "appliance-b+.conf",
            "appliance-b+3-.conf",
            "appliance-b+-1.conf",
            "appliance-b+3-1-1.conf",
            "appliance-b+x.conf",
            "appliance-bb.conf",
            "appliance-b.conf.tmp",
            ".appliance-b.tmp",
            "appliance-.conf",
            "Appliance-b.conf",
            "other-b.conf",
            "appliance-b+99999999999.conf",
        ] {
            check(bad, None);
        }
        assert_eq!(pattern_slot("appliance-b*"), Some(Slot::B));
        assert_eq!(pattern_slot("appliance-a+3.conf"), Some(Slot::A));
        assert_eq!(pattern_slot("appliance-*"), None);
        assert_eq!(pattern_slot("appliance-ab*"), None);
    }

    fn esp_with(files: &[(&str, &str)]) -> (tempfile::TempDir, Esp) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(ENTRIES_DIR)).unwrap();
        for (name, text) in files {
            let p = dir.path().join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        let esp = Esp::new(dir.path());
        (dir, esp)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn entries_write_remove_and_bless() {
        let (dir, esp) = esp_with(&[
            (LOADER_CONF, &loader_conf(Slot::A)),
            (
                "loader/entries/appliance-a.conf",
                &loader_entry(Slot::A, "1.0.0", ""),
            ),
            ("loader/entries/other.conf", "title other\n"),
        ]);
        assert_eq!(esp.default_slot().unwrap(), Some(Slot::A));
        assert_eq!(esp.entry(Slot::B).unwrap(), None);
        let name = esp.write_entry(Slot::B, "1.1.0", "quiet").unwrap();
        assert_eq!(name, "appliance-b+3.conf");
        let entries_dir = dir.path().join(ENTRIES_DIR);
        assert_eq!(
            fs::read_to_string(entries_dir.join(&name)).unwrap(),
            loader_entry(Slot::B, "1.1.0", "quiet")
        );
        assert_eq!(
            esp.entries().unwrap(),
            vec![
                EntryFile {
                    slot: Slot::A,
                    file_name: "appliance-a.conf".into(),
                    counter: None,
                    version: Some("1.0.0".into()),
                },
                EntryFile {
                    slot: Slot::B,
                    file_name: "appliance-b+3.conf".into(),
                    counter: Some(Counter { left: 3, done: 0 }),
                    version: Some("1.1.0".into()),
                },
            ]
        );
        // systemd-boot counted one boot.
        fs::rename(
            entries_dir.join("appliance-b+3.conf"),
            entries_dir.join("appliance-b+2-1.conf"),
        )
        .unwrap();
        assert_eq!(
            esp.bless(Slot::B).unwrap().as_deref(),
            Some("appliance-b+2-1.conf")
        );
        assert_eq!(
            names(&entries_dir),
            ["appliance-a.conf", "appliance-b.conf", "other.conf"]
        );
        assert_eq!(
            fs::read_to_string(dir.path().join(LOADER_CONF)).unwrap(),
            "timeout 0\ndefault appliance-b*\neditor no\n"
        );
        assert_eq!(esp.default_slot().unwrap(), Some(Slot::B));
        assert_eq!(
            names(&dir.path().join("loader")),
            ["entries", "loader.conf"]
        );
        // Blessing again changes nothing.
        assert_eq!(esp.bless(Slot::B).unwrap(), None);
        // An already blessed entry whose loader.conf update was cut short is completed.
        fs::write(dir.path().join(LOADER_CONF), loader_conf(Slot::A)).unwrap();
        assert_eq!(esp.bless(Slot::B).unwrap(), None);
        assert_eq!(esp.default_slot().unwrap(), Some(Slot::B));

        // A new counted entry replaces the blessed one; removing takes every file of the slot.
        esp.write_entry(Slot::B, "1.2.0", "").unwrap();
        assert_eq!(
            names(&entries_dir),
            ["appliance-a.conf", "appliance-b+3.conf", "other.conf"]
        );
        fs::write(entries_dir.join(".appliance-b.tmp"), "half").unwrap();
        fs::write(entries_dir.join("appliance-b+0-3.conf"), "old").unwrap();
        let mut removed = esp.remove_entry(Slot::B).unwrap();
        removed.sort();
        assert_eq!(
            removed,
            [
                ".appliance-b.tmp",
                "appliance-b+0-3.conf",
                "appliance-b+3.conf"
            ]
        );
        assert_eq!(names(&entries_dir), ["appliance-a.conf", "other.conf"]);
        assert_eq!(esp.remove_entry(Slot::B).unwrap(), Vec::<String>::new());
        let e = esp
            .write_entry(Slot::B, "1", "quiet\ninitrd /evil")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "extra kernel options \"quiet\\ninitrd /evil\": control characters are not allowed"
        );
        assert_eq!(names(&entries_dir), ["appliance-a.conf", "other.conf"]);
        let e = esp.bless(Slot::B).unwrap_err().to_string();
        assert!(e.starts_with("no loader entry for slot b in "), "{e}");
    }

    #[test]
    fn default_slot_of_older_and_missing_loader_conf() {
        let (_dir, esp) = esp_with(&[]);
        assert_eq!(esp.default_slot().unwrap(), None);
        let (_dir, esp) = esp_with(&[(LOADER_CONF, "timeout 0\ndefault appliance-*\n")]);
        assert_eq!(esp.default_slot().unwrap(), None);
        let (_dir, esp) = esp_with(&[(LOADER_CONF, "  default\tappliance-b+3.conf \n")]);
        assert_eq!(esp.default_slot().unwrap(), Some(Slot::B));
    }

    #[test]
    fn slot_files_replace_the_old_ones() {
        let (dir, esp) = esp_with(&[("tandem/b/vmlinuz", "old kernel")]);
        esp.write_slot_files(Slot::B, b"new kernel", b"new initrd")
            .unwrap();
        let slot_dir = dir.path().join("tandem/b");
        assert_eq!(names(&slot_dir), ["initrd.img", "vmlinuz"]);
        assert_eq!(fs::read(slot_dir.join("vmlinuz")).unwrap(), b"new kernel");
        assert_eq!(
            fs::read(slot_dir.join("initrd.img")).unwrap(),
            b"new initrd"
        );
        // A slot directory that does not exist yet is made.
        esp.write_slot_files(Slot::A, b"k", b"").unwrap();
        assert_eq!(fs::read(dir.path().join("tandem/a/vmlinuz")).unwrap(), b"k");
    }

    #[test]
    fn efi_variables() {
        let dir = tempfile::tempdir().unwrap();
        let vars = EfiVars::new(dir.path());
        assert_eq!(vars.get(LOADER_ENTRY_ONESHOT).unwrap(), None);
        vars.set_oneshot("appliance-b*").unwrap();
        let file = dir
            .path()
            .join("LoaderEntryOneShot-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f");
        let mut expected = vec![7, 0, 0, 0];
        for c in "appliance-b*".bytes() {
            expected.extend_from_slice(&[c, 0]);
        }
        expected.extend_from_slice(&[0, 0]);
        assert_eq!(fs::read(&file).unwrap(), expected);
        assert_eq!(
            vars.get(LOADER_ENTRY_ONESHOT).unwrap().as_deref(),
            Some("appliance-b*")
        );
        // A shorter value replaces a longer one whole.
        vars.set_oneshot("x").unwrap();
        assert_eq!(fs::read(&file).unwrap(), [7, 0, 0, 0, b'x', 0, 0, 0]);
        vars.set_default("appliance-a*").unwrap();
        assert_eq!(
            vars.get(LOADER_ENTRY_DEFAULT).unwrap().as_deref(),
            Some("appliance-a*")
        );
        vars.remove(LOADER_ENTRY_ONESHOT).unwrap();
        vars.remove(LOADER_ENTRY_ONESHOT).unwrap();
        assert!(!file.exists());
        // What systemd-boot leaves for the booted entry.
        fs::write(
            dir.path()
                .join("LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"),
            encode_string("appliance-b+2-1.conf"),
        )
        .unwrap();
        let selected = vars.selected().unwrap().unwrap();
        assert_eq!(
            parse_entry_name(&selected),
            Some((Slot::B, Some(Counter { left: 2, done: 1 })))
        );
        assert!(decode_string(&[7, 0, 0]).is_err());
        assert!(decode_string(&[7, 0, 0, 0, b'x']).is_err());
        assert!(vars.set("a/b", "x").is_err());
    }
}
