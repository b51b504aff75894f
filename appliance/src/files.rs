//! Writing files that matter (through [`api::fsio`]: atomically, with their final mode and owner
//! from the first byte, errors naming the file); directories with a mode; the boot counter. A
//! leaf: it imports nothing else of this crate.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Context as _;
use nix::unistd::{Gid, Uid, User};

/// Atomic replace with the file's final mode from its first byte ([`api::fsio::write_atomic`]:
/// a temporary file created anew beside `path`, never written through; synced, renamed, the
/// directory synced).
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
    let owner = owner.map(|(uid, gid)| (uid.as_raw(), gid.as_raw()));
    api::fsio::write_atomic(path, contents, mode, owner)
        .with_context(|| format!("writing {}", path.display()))
}

/// A new file holding a secret, mode 0600 from its creation, synced; fails (`AlreadyExists`)
/// if `path` exists.
pub use api::fsio::create_private;

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

/// Binds a service's Unix socket at `path` (a stale one removed first), 0660, given to `group`
/// when named (the clients' group), and calls `handle` on a thread of its own for each
/// connection, for ever. `what` names the service in the log.
pub fn serve_unix_socket(
    path: &Path,
    group: Option<&str>,
    what: &'static str,
    handle: impl Fn(std::os::unix::net::UnixStream) + Send + Sync + Clone + 'static,
) -> anyhow::Result<()> {
    let _ = fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    if let Some(name) = group {
        let gid = nix::unistd::Group::from_name(name)?
            .with_context(|| format!("no group {name}"))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    tracing::info!(socket = %path.display(), "{what} listening");
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("{what}: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let handle = handle.clone();
        let _ = std::thread::Builder::new()
            .name(format!("{what} client"))
            .spawn(move || handle(conn));
    }
    Ok(())
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
    fn files_get_their_owner_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let me = (nix::unistd::getuid(), nix::unistd::getgid());
        let path = dir.path().join("key");
        write_file_owned(&path, b"k", 0o600, Some(me)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (me.0.as_raw(), me.1.as_raw()));
        assert_eq!(meta.mode() & 0o7777, 0o600);
        let missing = dir.path().join("no-such-dir").join("f");
        let e = format!("{:#}", write_file(&missing, "x", 0o644).unwrap_err());
        assert!(
            e.starts_with(&format!("writing {}", missing.display())),
            "{e}"
        );
        assert!(
            format!("{:#}", user_ids("no-such-user-here").unwrap_err()).contains("does not exist")
        );
    }
}
