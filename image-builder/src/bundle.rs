//! `image-builder keygen` and `image-builder bundle`: a signing key pair, and a signed update
//! bundle made from the outputs of an earlier `image-builder build` (its `manifest.json` names
//! the root filesystem image and the base the kernel and initrd come from). Nothing is rebuilt.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;

use crate::{human, Error};

/// The `kind` of the root filesystem image in the build's manifest.
const ROOT_KIND: &str = "root-ext4";
/// The build's manifest, in its output directory.
const BUILD_MANIFEST: &str = "manifest.json";

/// The parts of the build's `manifest.json` a bundle needs (the file has more).
#[derive(Debug, Deserialize)]
struct BuildManifest {
    cluster: String,
    /// Absent in manifests written before images carried a version.
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    update_key_dir: Option<PathBuf>,
    source_date_epoch: u64,
    base_cache_key: String,
    kernel_version: String,
    artifacts: Vec<BuildArtifact>,
}

#[derive(Debug, Deserialize)]
struct BuildArtifact {
    file: String,
    kind: String,
    sha256: String,
}

/// The files of one build that go into a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleInputs {
    pub cluster: String,
    pub rootfs: PathBuf,
    /// sha256 of the root filesystem image when it was built.
    pub rootfs_sha256: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The build's SOURCE_DATE_EPOCH.
    pub build_time: u64,
    /// The image's version (what `bundle` installs it as unless told otherwise), if recorded.
    pub version: Option<String>,
    /// The key pair the build's images trust, if recorded (`bundle --key` defaults to its
    /// private key).
    pub update_key_dir: Option<PathBuf>,
}

/// Finds the root filesystem image, kernel and initrd of the build in `images_dir` (the base
/// it used is looked up in `cache_dir`), checking each exists.
pub fn locate(images_dir: &Path, cache_dir: &Path) -> Result<BundleInputs, Error> {
    const STEP: &str = "bundle inputs";
    let path = images_dir.join(BUILD_MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(STEP, &path, e))?;
    let m: BuildManifest = serde_json::from_str(&text).map_err(|e| Error::Input {
        path: path.clone(),
        line: e.line(),
        message: format!("not an image-builder build manifest: {e}"),
    })?;
    let root = m
        .artifacts
        .iter()
        .find(|a| a.kind == ROOT_KIND)
        .ok_or_else(|| Error::Input {
            path: path.clone(),
            line: 0,
            message: format!("no artifact of kind {ROOT_KIND:?}"),
        })?;
    let base = crate::base::Base {
        key: m.base_cache_key.clone(),
        root: cache_dir.join(format!("base-{}/rootfs", m.base_cache_key)),
        kernel_version: m.kernel_version.clone(),
        built: false,
    };
    let inputs = BundleInputs {
        cluster: m.cluster,
        rootfs: images_dir.join(&root.file),
        rootfs_sha256: root.sha256.clone(),
        kernel: base.kernel(),
        initrd: base.initrd(),
        build_time: m.source_date_epoch,
        version: m.version,
        update_key_dir: m.update_key_dir,
    };
    for file in [&inputs.rootfs, &inputs.kernel, &inputs.initrd] {
        std::fs::metadata(file).map_err(|e| Error::io(STEP, file, e))?;
    }
    Ok(inputs)
}

/// Writes `dir/bundle-signing.key` (0600) and `dir/bundle-signing.pub`; returns both paths.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
    let key = update::keys::generate()?;
    Ok(update::keys::write_pair(dir, &key)?)
}

/// Packs `inputs` into the bundle `out`, signed with the private key file `key`, as `version`.
/// The bundle is written beside `out` and renamed into place once complete; progress goes to
/// stderr. Fails, leaving nothing at `out`, if the root filesystem image changed since it was
/// built.
pub fn write(
    inputs: &BundleInputs,
    key: &Path,
    version: &str,
    out: &Path,
) -> Result<update::Manifest, Error> {
    const STEP: &str = "bundle";
    let key = update::keys::read_private(key)?;
    let open = |p: &Path| {
        File::open(p)
            .map(BufReader::new)
            .map_err(|e| Error::io(STEP, p, e))
    };
    let (mut rootfs, mut kernel, mut initrd) = (
        open(&inputs.rootfs)?,
        open(&inputs.kernel)?,
        open(&inputs.initrd)?,
    );
    let total: u64 = [&inputs.rootfs, &inputs.kernel, &inputs.initrd]
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let partial = dir.join(format!(
        ".{}.partial",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bundle".into())
    ));
    let file = File::create(&partial).map_err(|e| Error::io(STEP, &partial, e))?;
    let mut meter = Meter::new(total);
    let payloads = vec![
        payload(update::PayloadName::Rootfs, &mut rootfs),
        payload(update::PayloadName::Kernel, &mut kernel),
        payload(update::PayloadName::Initrd, &mut initrd),
    ];
    let meta = update::PackMeta {
        version: version.to_string(),
        build_time: inputs.build_time,
    };
    let result = update::pack(
        BufWriter::new(&file),
        &key,
        &meta,
        payloads,
        &dir,
        &mut |n| meter.update(n),
    )
    .map_err(Error::from)
    .and_then(|manifest| {
        let root = manifest.payload(update::PayloadName::Rootfs);
        if root.map(|p| p.sha256.as_str()) != Some(inputs.rootfs_sha256.as_str()) {
            return Err(Error::Input {
                path: inputs.rootfs.clone(),
                line: 0,
                message: "changed since it was built (sha256 differs from the build's manifest.json); rebuild the images".into(),
            });
        }
        file.sync_all().map_err(|e| Error::io(STEP, &partial, e))?;
        std::fs::rename(&partial, out).map_err(|e| Error::io(STEP, out, e))?;
        Ok(manifest)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    meter.done();
    result
}

/// What [`verify`] checked.
#[derive(Debug)]
pub struct Verified {
    pub manifest: update::Manifest,
    /// Uncompressed payload bytes read and checked.
    pub bytes: u64,
}

/// Reads the bundle `path` as an installer would (signature against the keyring file
/// `keyring`, product, compatible string, newer than `running` unless `force`, every chunk),
/// discarding the payloads.
pub fn verify(
    path: &Path,
    keyring: &Path,
    running: Option<&str>,
    force: bool,
) -> Result<Verified, Error> {
    let trusted = update::keys::read_keyring(keyring)?;
    let running = running.map(update::Version::parse).transpose()?;
    let policy = update::Policy {
        trusted: &trusted,
        product: update::PRODUCT,
        compatible: update::COMPATIBLE,
        running: running.as_ref(),
        known_bad: &[],
        force,
    };
    let file = File::open(path).map_err(|e| Error::io("verify", path, e))?;
    let mut source = update::Source::new(BufReader::with_capacity(1 << 20, file));
    let mut bundle = update::Bundle::open(&mut source, &policy)?;
    let mut bytes = 0;
    while let Some(mut p) = bundle.next_payload()? {
        bytes += std::io::copy(&mut p, &mut std::io::sink())
            .map_err(|e| update::Error::from_io("reading the bundle", e))?;
    }
    let manifest = bundle.finish()?;
    Ok(Verified { manifest, bytes })
}

fn payload<'a>(name: update::PayloadName, r: &'a mut dyn Read) -> update::PayloadInput<'a> {
    update::PayloadInput {
        name,
        compression: update::Compression::Zstd,
        reader: r,
    }
}

/// Bytes done, of the total, and the rate, on stderr every 2 seconds.
struct Meter {
    start: Instant,
    last: Instant,
    total: u64,
    done: u64,
}

impl Meter {
    fn new(total: u64) -> Meter {
        let now = Instant::now();
        Meter {
            start: now,
            last: now,
            total,
            done: 0,
        }
    }

    fn update(&mut self, done: u64) {
        self.done = done;
        if self.last.elapsed().as_secs_f64() >= 2.0 {
            self.last = Instant::now();
            eprintln!("        packed {}", self.line());
        }
    }

    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        format!(
            "{} of {} in {secs:.1} s ({}/s)",
            human(self.done),
            human(self.total),
            human((self.done as f64 / secs) as u64)
        )
    }

    fn done(&self) {
        eprintln!("        packed {}", self.line());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake build: images/manifest.json naming root.ext4, and a cached base with a kernel
    /// and an initrd.
    fn fake_build(dir: &Path, root: &[u8]) -> (PathBuf, PathBuf) {
        let images = dir.join("images");
        let cache = dir.join("cache");
        let boot = cache.join("base-k1/rootfs/boot");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::write(images.join("root.ext4"), root).unwrap();
        std::fs::write(boot.join("vmlinuz-6.1.0-test"), vec![7u8; 300_000]).unwrap();
        std::fs::write(boot.join("initrd.img-6.1.0-test"), b"initrd").unwrap();
        let manifest = serde_json::json!({
            "builder_version": "0.1.0",
            "cluster": "tandem",
            "source_date_epoch": 1_704_067_200u64,
            "base_cache_key": "k1",
            "kernel_version": "6.1.0-test",
            "artifacts": [{
                "file": "root.ext4", "kind": "root-ext4", "size": root.len(),
                "disk_usage": 0, "sha256": crate::sha256_file(&images.join("root.ext4")).unwrap(),
            }],
        });
        std::fs::write(images.join("manifest.json"), manifest.to_string()).unwrap();
        (images, cache)
    }

    #[test]
    fn keygen_then_bundle_verifies_with_the_library() {
        let dir = tempfile::tempdir().unwrap();
        let root: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (images, cache) = fake_build(dir.path(), &root);
        let (private, public) = keygen(&dir.path().join("keys")).unwrap();
        let inputs = locate(&images, &cache).unwrap();
        assert_eq!(
            inputs.kernel,
            cache.join("base-k1/rootfs/boot/vmlinuz-6.1.0-test")
        );
        let out = dir.path().join("tandem-1.4.0.bundle");
        let written = write(&inputs, &private, "1.4.0", &out).unwrap();
        assert_eq!(written.version, "1.4.0");

        let trusted = update::keys::read_keyring(&public).unwrap();
        let running = update::Version::parse("1.3.9").unwrap();
        let policy = update::Policy {
            trusted: &trusted,
            product: update::PRODUCT,
            compatible: update::COMPATIBLE,
            running: Some(&running),
            known_bad: &[],
            force: false,
        };
        let mut source = update::Source::new(BufReader::new(File::open(&out).unwrap()));
        let mut bundle = update::Bundle::open(&mut source, &policy).unwrap();
        let mut got = Vec::new();
        while let Some(mut p) = bundle.next_payload().unwrap() {
            let mut buf = Vec::new();
            p.read_to_end(&mut buf).unwrap();
            got.push((p.info().name, buf));
        }
        let manifest = bundle.finish().unwrap();
        assert_eq!(manifest, written);
        let v = verify(&out, &public, Some("1.3.9"), false).unwrap();
        assert_eq!(v.bytes, 3_000_000 + 300_000 + 6);
        let e = verify(&out, &public, Some("1.4.0"), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "version 1.4.0 is not newer than the running 1.4.0 (use --force)"
        );
        verify(&out, &public, Some("1.4.0"), true).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got[0].1 == root);
        assert_eq!(got[1].1, vec![7u8; 300_000]);
        assert_eq!(got[2].1, b"initrd");
        // No partial file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
    }

    #[test]
    fn a_root_image_changed_since_the_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (images, cache) = fake_build(dir.path(), b"original");
        std::fs::write(images.join("root.ext4"), b"modified").unwrap();
        let (private, _) = keygen(&dir.path().join("keys")).unwrap();
        let inputs = locate(&images, &cache).unwrap();
        let out = dir.path().join("b.bundle");
        let e = write(&inputs, &private, "1.0.0", &out).unwrap_err();
        assert!(e.to_string().contains("changed since it was built"), "{e}");
        assert!(!out.exists());
        assert!(!dir.path().join(".b.bundle.partial").exists());
    }

    #[test]
    fn the_builds_version_and_key_dir_are_read_when_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (images, cache) = fake_build(dir.path(), b"root");
        // Manifests from before images carried a version still work.
        let old = locate(&images, &cache).unwrap();
        assert_eq!((old.version, old.update_key_dir), (None, None));
        let path = images.join(BUILD_MANIFEST);
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        m["version"] = "0.2.0".into();
        m["update_key_dir"] = "/k/tandem-update-key".into();
        std::fs::write(&path, m.to_string()).unwrap();
        let new = locate(&images, &cache).unwrap();
        assert_eq!(new.version.as_deref(), Some("0.2.0"));
        assert_eq!(
            new.update_key_dir.as_deref(),
            Some(Path::new("/k/tandem-update-key"))
        );
    }

    #[test]
    fn missing_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (images, cache) = fake_build(dir.path(), b"root");
        std::fs::remove_file(cache.join("base-k1/rootfs/boot/initrd.img-6.1.0-test")).unwrap();
        let e = locate(&images, &cache).unwrap_err().to_string();
        assert!(e.contains("initrd.img-6.1.0-test"), "{e}");
        let e = locate(&dir.path().join("nowhere"), &cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nowhere/manifest.json"), "{e}");
    }
}
