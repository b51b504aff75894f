//! The update signing key kept on the build machine (like the cluster CA: a private directory in
//! the cache, `<cache>/tandem-update-key/`, made on the first build) and the keyring of trusted
//! public keys that every image carries at `api::files::IMAGE_UPDATE_KEYRING`.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use update::keys::{PRIVATE_KEY_FILE, PUBLIC_KEY_FILE};

use crate::Error;

/// The key directory's name in the cache (`--update-key-dir` overrides it).
pub const UPDATE_KEY_DIR: &str = "tandem-update-key";
/// Mode of the key directory: the private key in it signs what every node installs.
const KEY_DIR_MODE: u32 = 0o700;

/// `cache_dir`/[`UPDATE_KEY_DIR`].
pub fn default_key_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(UPDATE_KEY_DIR)
}

/// The private key file in a key directory (what `bundle --key` defaults to).
pub fn private_key_path(dir: &Path) -> PathBuf {
    dir.join(PRIVATE_KEY_FILE)
}

/// Loads the key pair in `dir`, or makes one there (directory 0700, private key 0600) if the
/// directory holds neither half. Returns the public key's keyring line and whether the pair was
/// made by this call. A public key file that is not the private key's half is refused.
pub fn load_or_create_key(dir: &Path) -> Result<(String, bool), Error> {
    let private = dir.join(PRIVATE_KEY_FILE);
    let public = dir.join(PUBLIC_KEY_FILE);
    if private.exists() || public.exists() {
        let key = update::keys::read_private(&private)?;
        if public.exists() {
            let ring = update::keys::read_keyring(&public)?;
            if ring != [key.verifying_key()] {
                return Err(Error::Input {
                    path: public,
                    line: 1,
                    message: format!(
                        "is not the public half of {} (delete both to make a new key; images \
                         built with the old one then trust only bundles signed by it)",
                        private.display()
                    ),
                });
            }
        }
        return Ok((update::keys::public_key_text(&key.verifying_key()), false));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(KEY_DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io("update signing key", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(KEY_DIR_MODE))
        .map_err(|e| Error::io("update signing key", dir, e))?;
    let key = update::keys::generate()?;
    update::keys::write_pair(dir, &key)?;
    Ok((update::keys::public_key_text(&key.verifying_key()), true))
}

/// The image's keyring text: `own` (a keyring line from [`load_or_create_key`]) and every key of
/// the keyring files in `trusted` (for rotation), each once, sorted, one per line.
pub fn keyring_text(own: &str, trusted: &[PathBuf]) -> Result<String, Error> {
    let mut lines = vec![own.to_string()];
    for file in trusted {
        for key in update::keys::read_keyring(file)? {
            lines.push(update::keys::public_key_text(&key));
        }
    }
    lines.sort();
    lines.dedup();
    Ok(lines.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_key_is_made_once_private_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let keys = default_key_dir(dir.path());
        let (public, created) = load_or_create_key(&keys).unwrap();
        assert!(created);
        let key = update::keys::read_private(&private_key_path(&keys)).unwrap();
        assert_eq!(public, update::keys::public_key_text(&key.verifying_key()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&keys), 0o700);
        assert_eq!(mode(&private_key_path(&keys)), 0o600);
        let (again, created) = load_or_create_key(&keys).unwrap();
        assert!(!created);
        assert_eq!(again, public);
        assert_eq!(
            update::keys::read_private(&private_key_path(&keys))
                .unwrap()
                .to_bytes(),
            key.to_bytes()
        );

        // A public key that is another key's is refused, naming the file.
        let other = update::keys::generate().unwrap();
        std::fs::write(
            keys.join(PUBLIC_KEY_FILE),
            update::keys::public_key_text(&other.verifying_key()),
        )
        .unwrap();
        let e = load_or_create_key(&keys).err().unwrap().to_string();
        assert!(
            e.contains("bundle-signing.pub:1: is not the public half"),
            "{e}"
        );
        // A public key without its private half is no key pair.
        std::fs::remove_file(private_key_path(&keys)).unwrap();
        let e = load_or_create_key(&keys).err().unwrap().to_string();
        assert!(e.contains("bundle-signing.key"), "{e}");
    }

    #[test]
    fn keyring_merges_rotation_keys_sorted_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let line =
            |_| update::keys::public_key_text(&update::keys::generate().unwrap().verifying_key());
        let [own, a, b]: [String; 3] = [(); 3].map(line);
        let ring1 = dir.path().join("ring1.pub");
        // Comments, blank lines, the builder's own key and a key twice.
        std::fs::write(&ring1, format!("# next key\n{a}\n{own}{a}")).unwrap();
        let ring2 = dir.path().join("ring2.pub");
        std::fs::write(&ring2, &b).unwrap();
        let text = keyring_text(&own, &[ring1.clone(), ring2]).unwrap();
        let mut expected = [own.clone(), a, b];
        expected.sort();
        assert_eq!(text, expected.concat());
        assert_eq!(
            update::keys::parse_keyring(&text).unwrap().len(),
            3,
            "{text}"
        );
        assert_eq!(keyring_text(&own, &[]).unwrap(), own);

        std::fs::write(&ring1, "not a key\n").unwrap();
        let e = keyring_text(&own, &[ring1]).unwrap_err().to_string();
        assert!(e.contains("ring1.pub:1: expected 64 hex digits"), "{e}");
    }
}
