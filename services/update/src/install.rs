//! Installing a bundle into the inactive slot. The order of the steps is the safety argument:
//!
//! 1. [`Bundle::open`] checks the signature, then the product, compatible string, version and
//!    known-bad list; the manifest must carry a rootfs, a kernel and an initrd. On failure
//!    nothing has been touched.
//! 2. The target must not be `loader.conf`'s default slot (the fallback while a new slot is on
//!    trial), the extra kernel options must be one line, and the rootfs payload must fit the
//!    device (size by seeking to its end; a block device is opened exclusively, so a mounted
//!    one is refused). Refused before anything is touched.
//! 3. The target slot's boot entry is removed and the directory synced: from here on a
//!    half-written slot is never bootable. (An old entry of the target slot thus goes once the
//!    signature checked, even if the payloads then fail: intended, the slot's contents are
//!    about to be overwritten.)
//! 4. The payloads are read in bundle order. The rootfs goes into the device chunk by chunk
//!    (only verified chunks come out of a [`crate::Payload`], so only verified bytes are
//!    written), except its first [`CHUNK_SIZE`] bytes (the ext4 superblock), which are held in
//!    memory; the kernel and initrd are held in memory too. Then [`Bundle::finish`].
//! 5. Only then: the device is synced, the held first chunk written, the device synced again
//!    (so on disk, too, a new superblock means a complete filesystem); the slot's kernel and
//!    initrd are written ([`Esp::write_slot_files`]), then its entry with a fresh boot counter
//!    ([`Esp::write_entry`], `+3`), then the one-shot variable (`appliance-<slot>*`) when there
//!    are EFI variables. `loader.conf` is untouched: the old slot stays the default until
//!    [`Esp::bless`].
//!
//! So a flipped byte, a truncation or an unknown key never changes the slot's first MiB (no
//! filesystem is ever found there half-written) and never creates an entry; a power cut at any
//! moment leaves either no entry for the slot or a complete one pointing at complete files.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek as _, SeekFrom};
use std::os::unix::fs::{FileExt as _, FileTypeExt as _, OpenOptionsExt as _};
use std::path::PathBuf;

use crate::boot::{entry_pattern, EfiVars, Esp, Slot};
use crate::pack::read_full;
use crate::{Bundle, Error, Manifest, PayloadName, Policy, Source, CHUNK_SIZE};

/// The kernel and initrd are held in memory until the bundle is verified, and both slots'
/// pairs must fit the ESP (256 MiB) with room for a temporary copy: a bundle whose two are
/// larger together is refused before anything is touched.
pub const MAX_BOOT_FILES_BYTES: u64 = 96 << 20;

/// Where to install.
#[derive(Debug)]
pub struct Target<'a> {
    /// The inactive slot.
    pub slot: Slot,
    /// The slot's block device (a regular file in tests).
    pub device: PathBuf,
    /// The mounted ESP.
    pub esp: &'a Esp,
    /// systemd-boot's variables, for the one-shot boot of the new slot; `None` leaves the
    /// choice to the caller.
    pub efivars: Option<&'a EfiVars>,
    /// Kernel options appended to the slot's own (see [`crate::boot::kernel_options`]).
    pub extra_options: String,
}

/// What an install is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading and verifying a payload (the rootfs is written as its chunks verify).
    Payload(PayloadName),
    /// Every payload verified: writing the first chunk, syncing, writing the boot files.
    Commit,
    /// Installed.
    Done,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Payload(name) => f.write_str(name.as_str()),
            Phase::Commit => f.write_str("commit"),
            Phase::Done => f.write_str("done"),
        }
    }
}

/// Progress of an install, reported at least once per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    /// Payload bytes verified so far.
    pub done: u64,
    /// The sum of the payloads' sizes in the manifest.
    pub total: u64,
}

/// A finished install.
#[derive(Debug, Clone)]
pub struct Installed {
    /// The verified manifest.
    pub manifest: Manifest,
    pub slot: Slot,
    /// The loader entry's file name (`appliance-b+3.conf`).
    pub entry: String,
    /// Payload bytes verified and written (the sum of the payloads' sizes).
    pub bytes: u64,
}

/// Installs the bundle read from `source` into `target` (see the module's documentation for
/// the order of the steps). `progress` is called at least once per chunk.
///
/// An error after the entry was written (setting the one-shot variable) leaves the slot
/// installed but not scheduled: the next boot is the default (old) slot's.
pub fn install<R: Read>(
    source: R,
    policy: &Policy<'_>,
    target: &Target<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Installed, Error> {
    let slot = target.slot;
    let device_name = target.device.display().to_string();

    // 1. Signature, then the manifest's claims.
    let mut source = Source::new(source);
    let mut bundle = Bundle::open(&mut source, policy)?;
    let manifest = bundle.manifest().clone();
    let size_of = |name: PayloadName| {
        manifest.payload(name).map(|p| p.size).ok_or_else(|| {
            Error::Manifest(format!(
                "no {name} payload: an install needs rootfs, kernel and initrd"
            ))
        })
    };
    let rootfs_size = size_of(PayloadName::Rootfs)?;
    let boot_files = size_of(PayloadName::Kernel)? + size_of(PayloadName::Initrd)?;
    if boot_files > MAX_BOOT_FILES_BYTES {
        return Err(Error::Manifest(format!(
            "kernel and initrd are {boot_files} bytes together, more than the \
             {MAX_BOOT_FILES_BYTES} an install takes"
        )));
    }
    let total: u64 = manifest.payloads.iter().map(|p| p.size).sum();

    // 2. The target is not the fallback, the rootfs fits, the entry can be written.
    crate::boot::check_extra_options(&target.extra_options)?;
    if target.esp.default_slot()? == Some(slot) {
        return Err(Error::TargetIsDefault { slot });
    }
    let mut device = open_device(target)?;
    let device_size = device
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(format!("measuring {device_name}"), e))?;
    if rootfs_size > device_size {
        return Err(Error::DeviceTooSmall {
            device: device_name,
            size: device_size,
            needed: rootfs_size,
        });
    }
    tracing::info!(
        version = %manifest.version, %slot, device = %device_name, total,
        "bundle signature and manifest verified; installing"
    );

    // 3. The slot is not bootable from here until its new entry is written.
    target.esp.remove_entry(slot)?;

    // 4. Every payload, verified chunk by chunk.
    let mut done = 0u64;
    let mut first_chunk = Vec::new();
    let mut kernel = Vec::new();
    let mut initrd = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    while let Some(mut payload) = bundle.next_payload()? {
        let name = payload.info().name;
        let phase = Phase::Payload(name);
        progress(&Progress { phase, done, total });
        let mut offset = 0u64;
        loop {
            let n = read_full(&mut payload, &mut buf)
                .map_err(|e| Error::from_io(&format!("reading payload {name}"), e))?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            match name {
                PayloadName::Rootfs if offset == 0 => first_chunk = chunk.to_vec(),
                PayloadName::Rootfs => device
                    .write_all_at(chunk, offset)
                    .map_err(|e| Error::io(format!("writing {device_name} at byte {offset}"), e))?,
                PayloadName::Kernel => kernel.extend_from_slice(chunk),
                PayloadName::Initrd => initrd.extend_from_slice(chunk),
            }
            offset += n as u64;
            done += n as u64;
            progress(&Progress { phase, done, total });
        }
    }
    let manifest = bundle.finish()?;

    // 5. Verified whole: make the slot a filesystem, then bootable, then the next boot.
    progress(&Progress {
        phase: Phase::Commit,
        done,
        total,
    });
    // Synced before and after the first chunk: on disk too, a new superblock means the rest
    // of the filesystem is there.
    device
        .sync_all()
        .and_then(|()| device.write_all_at(&first_chunk, 0))
        .and_then(|()| device.sync_all())
        .map_err(|e| Error::io(format!("writing and syncing {device_name}"), e))?;
    drop(device);
    target.esp.write_slot_files(slot, &kernel, &initrd)?;
    let entry = target
        .esp
        .write_entry(slot, &manifest.version, &target.extra_options)?;
    if let Some(vars) = target.efivars {
        vars.set_oneshot(&entry_pattern(slot))?;
    }
    progress(&Progress {
        phase: Phase::Done,
        done,
        total,
    });
    tracing::info!(version = %manifest.version, %slot, %entry, bytes = done, "installed");
    Ok(Installed {
        manifest,
        slot,
        entry,
        bytes: done,
    })
}

/// Opens the slot's device for writing, never creating or truncating it. A block device is
/// opened exclusively (`O_EXCL`): the kernel refuses one that is mounted or otherwise in use.
fn open_device(target: &Target<'_>) -> Result<File, Error> {
    let path = &target.device;
    let is_block = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("slot {} device {}", target.slot, path.display()), e))?
        .file_type()
        .is_block_device();
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if is_block {
        options.custom_flags(libc::O_EXCL);
    }
    options.open(path).map_err(|e| {
        Error::io(
            format!("opening slot {} device {}", target.slot, path.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests;
