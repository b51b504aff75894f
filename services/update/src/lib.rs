//! Signed update bundles and their install into the inactive A/B slot.
//!
//! A bundle is one tar stream holding `manifest.json`, `manifest.sig` (ed25519 over the
//! manifest's exact bytes), then the payloads (root filesystem, kernel, initrd) in manifest
//! order, each zstd-compressed or stored.
//!
//! The manifest carries, per payload, the sha256 of every uncompressed chunk (1 MiB) besides the
//! whole payload's: [`Bundle`] checks the signature against the trusted keys and the manifest
//! against the running system before it reads a payload byte, then hands a payload out only one
//! checked chunk at a time, so an installer never writes a byte that is not signed.
//!
//! [`install()`] writes a verified bundle into a slot (root filesystem into its partition,
//! kernel and initrd onto the ESP, a boot entry with boot counting, the one-shot boot);
//! [`boot`] is systemd-boot's side of the scheme (slots, loader entries, `loader.conf`,
//! blessing, EFI variables). [`pack`] writes bundles (`image-builder bundle`); [`keys`] reads
//! and writes key files.

pub mod boot;
mod error;
mod install;
pub mod keys;
mod manifest;
mod pack;
mod verify;

#[cfg(test)]
mod tests;

pub use boot::{EfiVars, Esp, Slot};
pub use error::Error;
pub use install::{install, Installed, Phase, Progress, Target, MAX_BOOT_FILES_BYTES};
pub use manifest::{Compression, Manifest, PayloadInfo, PayloadName, Version};
pub use pack::{pack, PackMeta, PayloadInput};
pub use verify::{Bundle, Payload, Policy, Source};

/// The bundle format this code writes and reads (the manifest's `format`).
pub const FORMAT_VERSION: u32 = 1;
/// The product every Tandem bundle is for.
pub const PRODUCT: &str = "tandem";
/// The hardware and boot flavour the images are built for (x86-64, UEFI with systemd-boot).
pub const COMPATIBLE: &str = "tandem-x86_64-efi";
/// Uncompressed bytes per hashed chunk.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// The first tar member.
pub const MANIFEST_MEMBER: &str = "manifest.json";
/// The second tar member: the 64-byte ed25519 signature over the manifest's bytes.
pub const SIGNATURE_MEMBER: &str = "manifest.sig";
/// A manifest larger than this is refused before it is read whole (a 4 GiB root filesystem
/// needs about 280 KB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// The nice value of a thread doing bulk update work ([`lower_thread_priority`]).
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`], for good: verifying and
/// writing a bundle (hundreds of MiB through zstd and SHA-256) is bulk work that must not take
/// the CPU from the services the node serves with. Call it on a thread of its own (an
/// unprivileged thread cannot raise its priority again). A failure is only logged.
pub fn lower_thread_priority() {
    // SAFETY: setpriority(2) takes plain integers and touches no memory of ours; on Linux,
    // PRIO_PROCESS with who = 0 is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE) };
    if rc != 0 {
        tracing::warn!(
            "lowering the update thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
