//! Writing a bundle: each payload is read once, hashed per chunk and compressed into an
//! anonymous temporary file (the manifest, which comes first, needs every hash); then the
//! manifest, its signature and the payloads go out as one tar stream.

use std::fs::File;
use std::io::{self, Read, Seek as _, SeekFrom, Write};
use std::path::Path;

use ed25519_dalek::{Signer as _, SigningKey};
use sha2::{Digest as _, Sha256};

use crate::{
    Compression, Error, Manifest, PayloadInfo, PayloadName, Version, CHUNK_SIZE, COMPATIBLE,
    FORMAT_VERSION, MANIFEST_MEMBER, PRODUCT, SIGNATURE_MEMBER,
};

/// zstd level: 19 takes minutes for a root filesystem on two cores; 9 is most of the gain.
const ZSTD_LEVEL: i32 = 9;

/// What the bundle says about itself.
#[derive(Debug, Clone)]
pub struct PackMeta {
    /// Dotted decimal numbers, checked by [`Version::parse`].
    pub version: String,
    /// Seconds since the Unix epoch.
    pub build_time: u64,
}

/// One payload to pack.
pub struct PayloadInput<'a> {
    pub name: PayloadName,
    pub compression: Compression,
    /// The uncompressed bytes.
    pub reader: &'a mut dyn Read,
}

/// Writes a bundle of `payloads` (in that order) to `out`, signed with `key`, for
/// [`PRODUCT`]/[`COMPATIBLE`]. Temporary compressed payloads live in `tmp_dir` (anonymous
/// files, gone when this returns). `progress` is called with the uncompressed bytes read so
/// far. Returns the manifest written.
pub fn pack<W: Write>(
    out: W,
    key: &SigningKey,
    meta: &PackMeta,
    payloads: Vec<PayloadInput<'_>>,
    tmp_dir: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest, Error> {
    Version::parse(&meta.version)?;
    let mut infos = Vec::new();
    let mut stored = Vec::new();
    let mut done = 0u64;
    for input in payloads {
        let mut tmp = tempfile::tempfile_in(tmp_dir)
            .map_err(|e| Error::io(format!("temporary file in {}", tmp_dir.display()), e))?;
        let info = store(input, &mut tmp, &mut |n| {
            done += n;
            progress(done);
        })?;
        infos.push(info);
        stored.push(tmp);
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        product: PRODUCT.to_string(),
        compatible: COMPATIBLE.to_string(),
        version: meta.version.clone(),
        build_time: meta.build_time,
        payloads: infos,
    };
    let mut manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Manifest(format!("cannot serialise: {e}")))?;
    manifest_bytes.push(b'\n');
    let signature = key.sign(&manifest_bytes).to_bytes();

    let mut tar = tar::Builder::new(out);
    let write_err = |what: &str, e: io::Error| Error::io(format!("writing bundle: {what}"), e);
    append(
        &mut tar,
        MANIFEST_MEMBER,
        manifest_bytes.len() as u64,
        &manifest_bytes[..],
        meta,
    )
    .map_err(|e| write_err(MANIFEST_MEMBER, e))?;
    append(
        &mut tar,
        SIGNATURE_MEMBER,
        signature.len() as u64,
        &signature[..],
        meta,
    )
    .map_err(|e| write_err(SIGNATURE_MEMBER, e))?;
    for (info, mut file) in manifest.payloads.iter().zip(stored) {
        let name = info.name.as_str();
        let size = file
            .seek(SeekFrom::End(0))
            .and_then(|size| file.seek(SeekFrom::Start(0)).map(|_| size))
            .map_err(|e| write_err(name, e))?;
        append(&mut tar, name, size, file, meta).map_err(|e| write_err(name, e))?;
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| write_err("end of archive", e))?;
    Ok(manifest)
}

fn append<W: Write, R: Read>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    data: R,
    meta: &PackMeta,
) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_mode(0o644);
    header.set_mtime(meta.build_time);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    tar.append_data(&mut header, name, data)
}

/// Reads `input` once: hashes each chunk and the whole, writes the stored form to `tmp`.
fn store(
    input: PayloadInput<'_>,
    tmp: &mut File,
    progress: &mut dyn FnMut(u64),
) -> Result<PayloadInfo, Error> {
    let name = input.name;
    let read_err = |e| Error::io(format!("reading payload {name}"), e);
    let write_err = |e| Error::io(format!("storing payload {name}"), e);
    let (size, sha256, chunks) = match input.compression {
        Compression::Zstd => {
            let mut enc =
                zstd::stream::write::Encoder::new(&mut *tmp, ZSTD_LEVEL).map_err(write_err)?;
            // The chunk hashes check the content; zstd's own checksum would only duplicate them.
            enc.include_checksum(false).map_err(write_err)?;
            let hashed = hash_copy(input.reader, &mut enc, progress, read_err, write_err)?;
            enc.finish().map_err(write_err)?;
            hashed
        }
        Compression::None => hash_copy(input.reader, tmp, progress, read_err, write_err)?,
    };
    tmp.flush().map_err(write_err)?;
    Ok(PayloadInfo {
        name,
        size,
        sha256,
        compression: input.compression,
        chunk_size: CHUNK_SIZE,
        chunks,
    })
}

/// Copies `r` to `w` in chunks: (size, whole sha256, chunk sha256s).
fn hash_copy(
    r: &mut dyn Read,
    w: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
    read_err: impl Fn(io::Error) -> Error,
    write_err: impl Fn(io::Error) -> Error,
) -> Result<(u64, String, Vec<String>), Error> {
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    loop {
        let n = read_full(r, &mut buf).map_err(&read_err)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        whole.update(chunk);
        chunks.push(hex::encode(Sha256::digest(chunk)));
        w.write_all(chunk).map_err(&write_err)?;
        size += n as u64;
        progress(n as u64);
        if n < buf.len() {
            break;
        }
    }
    Ok((size, hex::encode(whole.finalize()), chunks))
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
pub(crate) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
