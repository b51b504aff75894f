//! Reading a bundle: the signature and the manifest's claims are checked before a payload byte
//! is read; each payload then comes out one verified chunk at a time.

use std::io::{self, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::pack::read_full;
use crate::{
    Compression, Error, Manifest, PayloadInfo, Version, MANIFEST_MEMBER, MAX_MANIFEST_BYTES,
    SIGNATURE_MEMBER,
};

/// What a bundle must satisfy to be opened here.
#[derive(Debug, Clone)]
pub struct Policy<'k> {
    /// Every key a bundle may be signed with (the built-in keyring).
    pub trusted: &'k [VerifyingKey],
    /// [`crate::PRODUCT`].
    pub product: &'k str,
    /// [`crate::COMPATIBLE`].
    pub compatible: &'k str,
    /// The version running now; `None` when there is none to compare with.
    pub running: Option<&'k Version>,
    /// Versions that failed on this node before (installed, booted, never became healthy),
    /// as recorded on the data partition; compared numerically (`1.2` is `1.2.0`).
    pub known_bad: &'k [String],
    /// Accept a version older than or equal to the running one, or a known-bad one.
    pub force: bool,
}

impl Policy<'_> {
    /// Checks a signed manifest's claims: product, compatible string, version (not known to be
    /// bad, newer than the running one).
    pub fn check(&self, manifest: &Manifest) -> Result<(), Error> {
        if manifest.product != self.product {
            return Err(Error::WrongProduct {
                found: manifest.product.clone(),
                expected: self.product.to_string(),
            });
        }
        if manifest.compatible != self.compatible {
            return Err(Error::Incompatible {
                found: manifest.compatible.clone(),
                expected: self.compatible.to_string(),
            });
        }
        let version = Version::parse(&manifest.version)?;
        if !self.force
            && self.known_bad.iter().any(|bad| {
                *bad == manifest.version || Version::parse(bad).is_ok_and(|b| b == version)
            })
        {
            return Err(Error::KnownBad {
                version: manifest.version.clone(),
            });
        }
        if let Some(running) = self.running {
            if !self.force && version <= *running {
                return Err(Error::NotNewer {
                    bundle: version.to_string(),
                    running: running.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks `signature` over `bytes` against every trusted key.
    fn verify_signature(&self, bytes: &[u8], signature: &[u8]) -> Result<(), Error> {
        if self.trusted.is_empty() {
            return Err(Error::NoTrustedKeys);
        }
        let signature = Signature::from_slice(signature).map_err(|_| Error::BadSignature)?;
        if self
            .trusted
            .iter()
            .any(|key| key.verify_strict(bytes, &signature).is_ok())
        {
            Ok(())
        } else {
            Err(Error::BadSignature)
        }
    }
}

/// A reader that remembers whether the stream under the tar archive ended: an archive or a
/// payload that stops early after that is a truncated bundle, not a corrupt one.
struct Tracked<R> {
    inner: R,
    ended: Arc<AtomicBool>,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ended.store(true, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// The byte stream of a bundle (a file, stdin, an HTTP body), ready for [`Bundle::open`].
pub struct Source<R: Read> {
    archive: tar::Archive<Tracked<R>>,
    ended: Arc<AtomicBool>,
}

impl<R: Read> Source<R> {
    /// Wraps `reader`; nothing is read yet.
    pub fn new(reader: R) -> Source<R> {
        let ended = Arc::new(AtomicBool::new(false));
        Source {
            archive: tar::Archive::new(Tracked {
                inner: reader,
                ended: ended.clone(),
            }),
            ended,
        }
    }
}

/// An opened bundle whose signature and manifest have been checked.
pub struct Bundle<'a, R: Read> {
    entries: tar::Entries<'a, Tracked<R>>,
    ended: Arc<AtomicBool>,
    manifest: Manifest,
    /// Payloads handed out.
    next: usize,
    /// Payloads read to their end and verified whole.
    finished: usize,
}

impl<'a, R: Read> Bundle<'a, R> {
    /// Reads `manifest.json` and `manifest.sig`, verifies the signature with `policy`'s keys,
    /// then parses the manifest and checks it against `policy`. No payload byte is read.
    pub fn open(source: &'a mut Source<R>, policy: &Policy<'_>) -> Result<Bundle<'a, R>, Error> {
        let ended = source.ended.clone();
        let mut entries = source
            .archive
            .entries()
            .map_err(|e| Error::io("reading the bundle", e))?;
        let manifest_bytes = read_small_member(&mut entries, &ended, 0, MANIFEST_MEMBER)?;
        let signature = read_small_member(&mut entries, &ended, 1, SIGNATURE_MEMBER)?;
        policy.verify_signature(&manifest_bytes, &signature)?;
        let manifest = Manifest::parse(&manifest_bytes)?;
        policy.check(&manifest)?;
        Ok(Bundle {
            entries,
            ended,
            manifest,
            next: 0,
            finished: 0,
        })
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The next payload in manifest order, or `None` after the last. The previous payload must
    /// have been read to its end (its reader returned 0), so no unverified tail is skipped.
    pub fn next_payload(&mut self) -> Result<Option<Payload<'_>>, Error> {
        if self.finished < self.next {
            return Err(Error::PayloadNotFinished {
                payload: self.manifest.payloads[self.next - 1].name.to_string(),
            });
        }
        let Some(info) = self.manifest.payloads.get(self.next) else {
            return Ok(None);
        };
        let label = format!("payload {}", info.name);
        let entry = next_member(
            &mut self.entries,
            &self.ended,
            self.next + 2,
            info.name.as_str(),
            &label,
        )?;
        self.next += 1;
        let stored: Box<dyn Read + '_> = match info.compression {
            Compression::None => Box::new(entry),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(BufReader::new(entry))
                    .map_err(|e| Error::io(format!("starting zstd for {label}"), e))?,
            ),
        };
        Ok(Some(Payload {
            info,
            stored,
            ended: self.ended.clone(),
            buf: Vec::new(),
            pos: 0,
            produced: 0,
            chunk: 0,
            whole: Sha256::new(),
            finished: &mut self.finished,
            state: State::Reading,
        }))
    }

    /// Ends the bundle: every payload was read and verified, and nothing follows the last.
    pub fn finish(mut self) -> Result<Manifest, Error> {
        if let Some(p) = self.manifest.payloads.get(self.finished) {
            return Err(Error::PayloadNotFinished {
                payload: p.name.to_string(),
            });
        }
        let index = self.manifest.payloads.len() + 2;
        match self.entries.next() {
            None => Ok(self.manifest),
            Some(Ok(entry)) => Err(Error::UnexpectedMember {
                index,
                expected: "the end of the bundle".into(),
                found: member_name(&entry),
            }),
            Some(Err(e)) if self.ended.load(Ordering::Relaxed) => {
                let _ = e;
                Err(Error::Truncated("the end of the bundle".into()))
            }
            Some(Err(e)) => Err(Error::io("reading the end of the bundle", e)),
        }
    }
}

fn member_name<R: Read>(entry: &tar::Entry<'_, R>) -> String {
    entry
        .path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "a member with an unreadable name".into())
}

/// The next tar member, which must be the regular file `name` (`label` in errors).
fn next_member<'a, R: Read>(
    entries: &mut tar::Entries<'a, Tracked<R>>,
    ended: &AtomicBool,
    index: usize,
    name: &str,
    label: &str,
) -> Result<tar::Entry<'a, Tracked<R>>, Error> {
    match entries.next() {
        None if ended.load(Ordering::Relaxed) => Err(Error::Truncated(label.to_string())),
        None => Err(Error::UnexpectedMember {
            index,
            expected: name.to_string(),
            found: "the end of the archive".into(),
        }),
        Some(Err(_)) if ended.load(Ordering::Relaxed) => Err(Error::Truncated(label.to_string())),
        Some(Err(e)) => Err(Error::io(format!("reading the tar header of {label}"), e)),
        Some(Ok(entry)) => {
            let found = member_name(&entry);
            if found != name || entry.header().entry_type() != tar::EntryType::Regular {
                return Err(Error::UnexpectedMember {
                    index,
                    expected: name.to_string(),
                    found,
                });
            }
            Ok(entry)
        }
    }
}

/// Reads a whole small member (the manifest or its signature), bounded by
/// [`MAX_MANIFEST_BYTES`].
fn read_small_member<R: Read>(
    entries: &mut tar::Entries<'_, Tracked<R>>,
    ended: &AtomicBool,
    index: usize,
    name: &str,
) -> Result<Vec<u8>, Error> {
    let entry = next_member(entries, ended, index, name, name)?;
    let size = entry.header().size().map_err(|e| Error::io(name, e))?;
    if size > MAX_MANIFEST_BYTES {
        return Err(Error::Manifest(format!(
            "{name} is {size} bytes, more than the {MAX_MANIFEST_BYTES} allowed"
        )));
    }
    let mut bytes = Vec::new();
    entry
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {name}"), e))?;
    if (bytes.len() as u64) < size {
        return Err(Error::Truncated(name.to_string()));
    }
    Ok(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Done,
    Failed,
}

/// One payload's uncompressed bytes, handed out only after the chunk they belong to matched
/// its hash. Read it to its end (0): the last read checks the size and the whole payload's
/// hash. Errors are `io::Error`s carrying an [`Error`]; [`Error::from_io`] takes it back out.
pub struct Payload<'b> {
    info: &'b PayloadInfo,
    stored: Box<dyn Read + 'b>,
    ended: Arc<AtomicBool>,
    /// The current verified chunk and how much of it was handed out.
    buf: Vec<u8>,
    pos: usize,
    produced: u64,
    chunk: u64,
    whole: Sha256,
    finished: &'b mut usize,
    state: State,
}

impl Payload<'_> {
    /// What the manifest says about this payload.
    pub fn info(&self) -> &PayloadInfo {
        self.info
    }

    fn name(&self) -> String {
        self.info.name.to_string()
    }

    fn truncated_or(&self, e: Error) -> Error {
        if self.ended.load(Ordering::Relaxed) {
            Error::Truncated(format!("payload {}", self.info.name))
        } else {
            e
        }
    }

    /// Loads and verifies the next chunk into `buf`, or, after the last, checks the end.
    fn load(&mut self) -> Result<(), Error> {
        let size = self.info.size;
        if self.produced == size {
            let mut extra = [0u8; 1];
            let n = read_full(&mut self.stored, &mut extra).map_err(|e| {
                self.truncated_or(Error::Corrupt {
                    payload: self.name(),
                    source: e,
                })
            })?;
            if n > 0 {
                return Err(Error::PayloadSize {
                    payload: self.name(),
                    found: size + 1,
                    expected: size,
                });
            }
            let digest = hex::encode(std::mem::take(&mut self.whole).finalize());
            if digest != self.info.sha256 {
                return Err(Error::PayloadMismatch {
                    payload: self.name(),
                });
            }
            self.state = State::Done;
            *self.finished += 1;
            self.buf.clear();
            self.pos = 0;
            return Ok(());
        }
        let want = (size - self.produced).min(self.info.chunk_size) as usize;
        self.buf.resize(want, 0);
        self.pos = 0;
        let n = read_full(&mut self.stored, &mut self.buf).map_err(|e| {
            self.truncated_or(Error::Corrupt {
                payload: self.name(),
                source: e,
            })
        })?;
        if n < want {
            return Err(self.truncated_or(Error::PayloadSize {
                payload: self.name(),
                found: self.produced + n as u64,
                expected: size,
            }));
        }
        let expected = self.info.chunks.get(self.chunk as usize);
        if expected.map(String::as_str) != Some(hex::encode(Sha256::digest(&self.buf)).as_str()) {
            return Err(Error::ChunkMismatch {
                payload: self.name(),
                chunk: self.chunk,
            });
        }
        self.whole.update(&self.buf);
        self.produced += n as u64;
        self.chunk += 1;
        Ok(())
    }
}

impl Read for Payload<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos == self.buf.len() {
            match self.state {
                State::Done => return Ok(0),
                State::Failed => {
                    return Err(io::Error::other(format!(
                        "payload {}: read after an error",
                        self.info.name
                    )))
                }
                State::Reading => {}
            }
            if let Err(e) = self.load() {
                self.state = State::Failed;
                self.buf.clear();
                self.pos = 0;
                return Err(io::Error::other(e));
            }
            if self.state == State::Done {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
