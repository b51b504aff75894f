//! Key files, in the one text form Tandem uses for both halves: lowercase hex.
//!
//! - A private key file holds the 32-byte ed25519 seed as 64 hex digits and a newline, mode
//!   0600 from its creation (`api::fsio::create_private`); it is never overwritten.
//! - A public key file (a keyring) holds one 32-byte public key per line as 64 hex digits;
//!   blank lines and lines starting with `#` are ignored. Every key in it is trusted, so a new
//!   signing key can be added to images before bundles are signed with it (rotation).

use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::Error;

/// File name of the private key `image-builder keygen` writes.
pub const PRIVATE_KEY_FILE: &str = "bundle-signing.key";
/// File name of the public key beside it (a keyring of one).
pub const PUBLIC_KEY_FILE: &str = "bundle-signing.pub";

/// A fresh signing key from the operating system's random source.
pub fn generate() -> Result<SigningKey, Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Key(format!("no random bytes: {e}")))?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    Ok(key)
}

/// The private key file's text.
pub fn private_key_text(key: &SigningKey) -> String {
    format!("{}\n", hex::encode(key.to_bytes()))
}

/// One keyring line for `key`.
pub fn public_key_text(key: &VerifyingKey) -> String {
    format!("{}\n", hex::encode(key.to_bytes()))
}

/// Writes `dir/`[`PRIVATE_KEY_FILE`] (0600) and `dir/`[`PUBLIC_KEY_FILE`] (0644); refuses to
/// replace an existing private key. Returns both paths.
pub fn write_pair(
    dir: &Path,
    key: &SigningKey,
) -> Result<(std::path::PathBuf, std::path::PathBuf), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let private = dir.join(PRIVATE_KEY_FILE);
    let public = dir.join(PUBLIC_KEY_FILE);
    api::fsio::create_private(&private, private_key_text(key).as_bytes())
        .map_err(|e| Error::io(format!("writing {}", private.display()), e))?;
    api::fsio::write_atomic(
        &public,
        public_key_text(&key.verifying_key()).as_bytes(),
        0o644,
        None,
    )
    .map_err(|e| Error::io(format!("writing {}", public.display()), e))?;
    Ok((private, public))
}

/// Reads a private key file.
pub fn read_private(path: &Path) -> Result<SigningKey, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    parse_private(&text).map_err(|why| Error::Key(format!("{}: {why}", path.display())))
}

/// Parses a private key file's text.
pub fn parse_private(text: &str) -> Result<SigningKey, String> {
    let seed = parse_hex32(text.trim())?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a keyring file.
pub fn read_keyring(path: &Path) -> Result<Vec<VerifyingKey>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    parse_keyring(&text).map_err(|why| Error::Key(format!("{}:{why}", path.display())))
}

/// Parses a keyring; an error is `line: message`.
pub fn parse_keyring(text: &str) -> Result<Vec<VerifyingKey>, String> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bytes = parse_hex32(line).map_err(|why| format!("{}: {why}", i + 1))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| format!("{}: not a valid ed25519 public key", i + 1))?;
        keys.push(key);
    }
    Ok(keys)
}

fn parse_hex32(s: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| {
        format!(
            "expected 64 hex digits (32 bytes), found {} characters",
            s.len()
        )
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn key_files_round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate().unwrap();
        let (private, public) = write_pair(dir.path(), &key).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_private(&private).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(read_keyring(&public).unwrap(), vec![key.verifying_key()]);
        // Never overwritten.
        assert!(write_pair(dir.path(), &generate().unwrap()).is_err());
        assert_eq!(read_private(&private).unwrap().to_bytes(), key.to_bytes());
    }

    #[test]
    fn keyring_lines() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        let text = format!(
            "# old key\n{}\n\n{}",
            public_key_text(&a.verifying_key()),
            public_key_text(&b.verifying_key())
        );
        assert_eq!(
            parse_keyring(&text).unwrap(),
            vec![a.verifying_key(), b.verifying_key()]
        );
        let err = parse_keyring("# x\nabcd\n").unwrap_err();
        assert!(err.starts_with("2: expected 64 hex digits"), "{err}");
        assert_ne!(a.to_bytes(), b.to_bytes());
    }
}
