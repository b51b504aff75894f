//! Writing files that matter: atomically (temporary file, fsync, rename), with their final mode
//! and owner from the first byte; directories with a mode; the boot counter. A leaf: it
//! imports nothing else of this crate.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::Context as _;
use nix::unistd::{Gid, Uid, User};

/// Atomic replace: temp file in the same directory, fsync, rename, fsync the directory.
///
/// The temporary file is created anew with its final mode (`create_new`: one a crash left
/// behind, or a link planted there, is removed, never written through): a secret is never
/// readable by others, not even before the rename, and is never chmodded. The umask may narrow
/// a public mode; such a file gets its bits back before its first byte.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    write_file_owned(path, contents.as_bytes(), mode, None)
}

/// [`write_file`], the file given to `owner` (uid, gid) before its first byte is written.
pub fn write_file_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(Uid, Gid)>,
) -> anyhow::Result<()> {
    let dir = path.parent().context("file path without a directory")?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    if mode & 0o077 != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(&f, Some(uid), Some(gid))
            .with_context(|| format!("chown {uid}:{gid} {}", tmp.display()))?;
    }
    f.write_all(contents)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// A new file holding a secret, mode 0600 from its creation, synced; fails (`AlreadyExists`)
/// if `path` exists.
pub fn create_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Creates `path` (and its parents) and sets its mode.
pub fn make_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// The uid and primary gid of `user`; the error says the user is missing.
pub fn user_ids(user: &str) -> anyhow::Result<(Uid, Gid)> {
    let u = User::from_name(user)
        .with_context(|| format!("looking up user {user}"))?
        .with_context(|| {
            format!("user {user} does not exist (is its Debian package installed?)")
        })?;
    Ok((u.uid, u.gid))
}

/// Gives `path` to `user` and its primary group.
pub fn chown_to(path: &Path, user: &str) -> anyhow::Result<()> {
    let (uid, gid) = user_ids(user)?;
    nix::unistd::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {user} {}", path.display()))
}

/// Gives `path` to `user`'s primary group (the owner stays).
pub fn chgrp_to(path: &Path, user: &str) -> anyhow::Result<()> {
    let (_, gid) = user_ids(user)?;
    nix::unistd::chown(path, None, Some(gid))
        .with_context(|| format!("chgrp {user} {}", path.display()))
}

/// Increments and returns the boot counter kept in the state directory. Written to a temporary
/// file, synced and renamed, so a power cut leaves the old or the new count, never a torn one.
pub fn count_boot(state: &Path) -> anyhow::Result<u64> {
    let path = state.join(api::files::BOOT_COUNT);
    let previous = match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{}: not a number", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let boot = previous + 1;
    write_file(&path, &format!("{boot}\n"), 0o644)?;
    Ok(boot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn boot_counter_counts_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(count_boot(dir.path()).unwrap(), 1);
        assert_eq!(count_boot(dir.path()).unwrap(), 2);
        fs::write(dir.path().join(api::files::BOOT_COUNT), "garbage").unwrap();
        let err = count_boot(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("not a number"));
    }

    #[test]
    fn secrets_are_written_into_new_files_of_their_final_mode() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("admin.key");
        let tmp = dir.path().join(".admin.key.tmp");
        // A temporary left by a crash, held open by someone who could read it then.
        fs::write(&tmp, "").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        let mut held = fs::File::open(&tmp).unwrap();
        write_file(&key, "secret", 0o600).unwrap();
        let mut seen = String::new();
        std::io::Read::read_to_string(&mut held, &mut seen).unwrap();
        assert_eq!(seen, "", "the secret went into a file others could read");
        assert_eq!(fs::metadata(&key).unwrap().mode() & 0o7777, 0o600);
        // A link planted as the temporary: replaced, not written through.
        let outside = dir.path().join("outside");
        fs::write(&outside, "").unwrap();
        std::os::unix::fs::symlink(&outside, &tmp).unwrap();
        write_file(&key, "secret 2", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "");
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret 2");
        assert!(fs::symlink_metadata(&key).unwrap().is_file());
    }

    #[test]
    fn an_owned_file_belongs_to_its_owner_and_a_private_one_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let me = (nix::unistd::getuid(), nix::unistd::getgid());
        let path = dir.path().join("key");
        write_file_owned(&path, b"k", 0o600, Some(me)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (me.0.as_raw(), me.1.as_raw()));
        let private = dir.path().join("private");
        create_private(&private, b"s").unwrap();
        assert_eq!(fs::metadata(&private).unwrap().mode() & 0o777, 0o600);
        let again = create_private(&private, b"t").unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(
            format!("{:#}", user_ids("no-such-user-here").unwrap_err()).contains("does not exist")
        );
    }
}
