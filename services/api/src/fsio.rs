//! Writing files that matter, the one way every Tandem crate does it: whole or not at all, with
//! their final mode (and owner) from before their first byte, so a key is never readable by
//! anyone else, not even for a moment.
//!
//! Both functions create the file they write anew (`create_new`): a file or a link already at
//! that name is never written through, and nobody who opened an earlier file there sees the new
//! bytes. Errors are `std::io::Error`s of the kind the system gave (`AlreadyExists` stays
//! `AlreadyExists`); callers wrap them in their own error type, naming the path.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The mode bits a file can have (permissions, setuid, setgid, sticky).
const MODE_BITS: u32 = 0o7777;

/// Replaces `path` atomically: readers see the old file or the new one, never half of one.
///
/// The bytes go into a temporary file beside `path` (`.<name>.tmp`: one a crash left behind, or
/// a link planted there, is removed first), created with `mode` (the umask, which may have
/// narrowed a public mode, undone on the descriptor) and given to `owner` (uid, gid) before its
/// first byte, synced, then renamed over `path`; the directory is synced, so the rename outlives
/// a power cut. On failure the temporary file is removed and `path` is left as it was. An error
/// names the step and the file that failed.
///
/// Concurrent writers of one path must take turns (they share the temporary name).
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let (dir, tmp) = temporary_beside(path)?;
    remove_if_present(&tmp).map_err(|e| at("removing", &tmp, e))?;
    write_new(&tmp, bytes, mode, owner).map_err(|(step, e)| at(step, &tmp, e))?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(at(&format!("renaming {} to", tmp.display()), path, e));
    }
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| at("syncing", &dir, e))
}

/// Creates `path` holding a secret: mode 0600 from its creation, synced. Fails with
/// `AlreadyExists` if anything is at `path` (so of two processes creating one secret, exactly
/// one succeeds and the other reads the winner's). A file this call created and could not fill
/// is removed.
pub fn create_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_new(path, bytes, 0o600, None).map_err(|(_, e)| e)
}

/// Removes the file at `path`; nothing there is no error.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `.<name>.tmp` beside `path`, and the directory both are in.
fn temporary_beside(path: &Path) -> io::Result<(PathBuf, PathBuf)> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file name", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(".tmp");
    let tmp = dir.join(tmp);
    Ok((dir, tmp))
}

/// Creates `path` (`create_new`) with `mode` and `owner`, writes and syncs it; on failure after
/// creating it, removes it. The error comes with the step that failed.
fn write_new(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), (&'static str, io::Error)> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| ("creating", e))?;
    let filled = fill(&mut f, bytes, mode, owner);
    if filled.is_err() {
        let _ = fs::remove_file(path);
    }
    filled
}

fn fill(
    f: &mut fs::File,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), (&'static str, io::Error)> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&*f, Some(uid), Some(gid)).map_err(|e| ("chown", e))?;
    }
    // After the chown, which may clear setuid and setgid bits. The umask only ever removes bits,
    // so this never makes a file more open than `mode`.
    let created = f.metadata().map_err(|e| ("stat", e))?.permissions().mode();
    if created & MODE_BITS != mode & MODE_BITS {
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ("chmod", e))?;
    }
    f.write_all(bytes).map_err(|e| ("writing", e))?;
    f.sync_all().map_err(|e| ("syncing", e))
}

/// `e` of the same kind, its message naming `step` and `path`.
fn at(step: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{step} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & MODE_BITS
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
    fn a_file_is_replaced_whole_with_its_mode_and_no_temporary_left() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db-primary");
        write_atomic(&file, b"server1\n", 0o644, None).unwrap();
        // A reader holding the previous file open never sees the new content.
        let mut held = fs::File::open(&file).unwrap();
        write_atomic(&file, b"server2\n", 0o644, None).unwrap();
        let mut seen = String::new();
        held.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "server1\n");
        assert_eq!(fs::read(&file).unwrap(), b"server2\n");
        assert_eq!(mode(&file), 0o644);
        assert_eq!(names(dir.path()), ["db-primary"], "no temporary file left");
        // A public mode the umask narrows (022 takes 0o666 to 0o644) is restored.
        let shared = dir.path().join("shared");
        write_atomic(&shared, b"x", 0o666, None).unwrap();
        assert_eq!(mode(&shared), 0o666);
        // A bare name is beside the current directory's files (its directory is synced as ".").
        let (d, tmp) = temporary_beside(Path::new("status.json")).unwrap();
        assert_eq!((d, tmp), (".".into(), "./.status.json.tmp".into()));
        let e = write_atomic(Path::new("/"), b"", 0o644, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }

    #[test]
    fn secrets_go_into_new_files_of_their_final_mode_never_through_a_planted_one() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("admin.key");
        let tmp = dir.path().join(".admin.key.tmp");
        // A temporary left by a crash, held open by someone who could read it then.
        fs::write(&tmp, "").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        let mut held = fs::File::open(&tmp).unwrap();
        write_atomic(&key, b"secret", 0o600, None).unwrap();
        let mut seen = String::new();
        held.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "", "the secret went into a file others could read");
        assert_eq!(mode(&key), 0o600);
        // A link planted as the temporary: replaced, not written through.
        let outside = dir.path().join("outside");
        fs::write(&outside, "").unwrap();
        std::os::unix::fs::symlink(&outside, &tmp).unwrap();
        write_atomic(&key, b"secret 2", 0o600, None).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "");
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret 2");
        assert!(fs::symlink_metadata(&key).unwrap().is_file());
        // A link planted at the target itself: replaced, not written through.
        let cert = dir.path().join("node.crt");
        std::os::unix::fs::symlink(&outside, &cert).unwrap();
        write_atomic(&cert, b"cert", 0o644, None).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "");
        assert!(fs::symlink_metadata(&cert).unwrap().is_file());
        assert_eq!(mode(&cert), 0o644);
    }

    #[test]
    fn an_owned_file_belongs_to_its_owner_from_its_first_byte() {
        let dir = tempfile::tempdir().unwrap();
        let me = fs::metadata(dir.path()).unwrap();
        let path = dir.path().join("key");
        if me.uid() == 0 {
            // Root gives files away: the owner is set, the mode kept.
            write_atomic(&path, b"k", 0o600, Some((4321, 4322))).unwrap();
            let meta = fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid(), mode(&path)), (4321, 4322, 0o600));
        } else {
            // Anyone else cannot: nothing is written, no temporary is left.
            let e = write_atomic(&path, b"k", 0o600, Some((me.uid() + 1, me.gid()))).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert!(e.to_string().contains("chown"), "{e}");
            assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        }
        // Its own owner always works.
        let mine = dir.path().join("mine");
        write_atomic(&mine, b"m", 0o640, Some((me.uid(), me.gid()))).unwrap();
        let meta = fs::metadata(&mine).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), mode(&mine)),
            (me.uid(), me.gid(), 0o640)
        );
    }

    #[test]
    fn a_failed_rename_leaves_the_target_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // A directory at the target cannot be replaced by a file.
        let target = dir.path().join("taken");
        fs::create_dir(&target).unwrap();
        let e = write_atomic(&target, b"x", 0o644, None).unwrap_err();
        assert!(e.to_string().contains("renaming"), "{e}");
        assert!(e.to_string().contains(".taken.tmp"), "{e}");
        assert!(target.is_dir());
        assert_eq!(names(dir.path()), ["taken"]);
    }

    #[test]
    fn a_private_file_is_new_and_only_its_owners() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("cluster.secret");
        create_private(&private, b"s").unwrap();
        assert_eq!(mode(&private), 0o600);
        assert_eq!(fs::read(&private).unwrap(), b"s");
        // The second of two creators fails, and the first one's secret stays.
        let again = create_private(&private, b"t").unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&private).unwrap(), b"s");
        // A link planted there is not followed.
        let outside = dir.path().join("outside");
        let link = dir.path().join("link.secret");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let e = create_private(&link, b"s").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(!outside.exists());
    }
}
