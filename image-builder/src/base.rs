//! The base root filesystem: Debian bookworm by `mmdebstrap --variant=minbase` with the
//! packages of `rootfs/packages.txt`, stripped by `rootfs/strip.txt` (dpkg path filters) and
//! the hooks in `rootfs/hooks/`. Cached under a key that hashes every input, published with an
//! atomic rename so an interrupted build never leaves a half cache.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cmd::Cmd;
use crate::Error;

/// Bump when the way the base is made changes in a way the hashed inputs do not show.
pub const BASE_FORMAT_VERSION: u32 = 1;
pub const SUITE: &str = "bookworm";
pub const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

const STEP: &str = "base root filesystem";

/// The inputs of a base, read from the `rootfs/` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseInputs {
    pub packages: Vec<String>,
    pub filters: Vec<PathFilter>,
    /// Directory of the hook scripts (not hashed: only their names and texts are).
    pub hooks_dir: PathBuf,
    /// Every file of `hooks/`: (name, text), sorted by name.
    pub hooks: Vec<(String, String)>,
}

/// mmdebstrap's customize hook: strips, runs depmod, checks the initrd's drivers.
pub const CUSTOMIZE_HOOK: &str = "customize.sh";
/// Installed as an initramfs-tools hook before the kernel package, so that its first initrd
/// already has every disk driver.
pub const INITRAMFS_HOOK: &str = "initramfs-modules.sh";

/// One dpkg path filter of `strip.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathFilter {
    Exclude(String),
    Include(String),
}

impl PathFilter {
    fn dpkg_option(&self) -> String {
        match self {
            PathFilter::Exclude(g) => format!("path-exclude={g}"),
            PathFilter::Include(g) => format!("path-include={g}"),
        }
    }
}

/// Non-empty, non-comment lines, trimmed, with their 1-based line numbers.
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
}

pub fn parse_packages(text: &str, origin: &Path) -> Result<Vec<String>, Error> {
    let mut pkgs = Vec::new();
    for (n, line) in content_lines(text) {
        let valid = line
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        if !valid || line.contains(char::is_whitespace) {
            return Err(Error::Input {
                path: origin.to_owned(),
                line: n,
                message: format!("`{line}` is not a Debian package name (one per line)"),
            });
        }
        pkgs.push(line.to_string());
    }
    Ok(pkgs)
}

pub fn parse_filters(text: &str, origin: &Path) -> Result<Vec<PathFilter>, Error> {
    let mut filters = Vec::new();
    for (n, line) in content_lines(text) {
        let bad = |m: &str| Error::Input {
            path: origin.to_owned(),
            line: n,
            message: m.to_string(),
        };
        let (kind, glob) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad("expected `exclude GLOB` or `include GLOB`"))?;
        let glob = glob.trim();
        if !glob.starts_with('/') || glob.contains(char::is_whitespace) {
            return Err(bad("the glob must be one absolute path pattern"));
        }
        filters.push(match kind {
            "exclude" => PathFilter::Exclude(glob.to_string()),
            "include" => PathFilter::Include(glob.to_string()),
            _ => return Err(bad("expected `exclude GLOB` or `include GLOB`")),
        });
        // Debian bookworm still ships kernel modules under /lib; later releases use /usr/lib.
        if let Some(rest) = glob.strip_prefix("/lib/") {
            let usr = format!("/usr/lib/{rest}");
            filters.push(match kind {
                "exclude" => PathFilter::Exclude(usr),
                _ => PathFilter::Include(usr),
            });
        }
    }
    Ok(filters)
}

impl BaseInputs {
    pub fn load(rootfs_dir: &Path) -> Result<BaseInputs, Error> {
        let read = |name: &str| -> Result<(PathBuf, String), Error> {
            let p = rootfs_dir.join(name);
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(STEP, &p, e))?;
            Ok((p, text))
        };
        let (pp, packages) = read("packages.txt")?;
        let (sp, strip) = read("strip.txt")?;
        let hooks_dir = rootfs_dir.join("hooks");
        let mut hooks = Vec::new();
        for e in std::fs::read_dir(&hooks_dir).map_err(|e| Error::io(STEP, &hooks_dir, e))? {
            let e = e.map_err(|e| Error::io(STEP, &hooks_dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let (_, text) = read(&format!("hooks/{name}"))?;
            hooks.push((name, text));
        }
        hooks.sort();
        for required in [CUSTOMIZE_HOOK, INITRAMFS_HOOK] {
            if !hooks.iter().any(|(n, _)| n == required) {
                let p = hooks_dir.join(required);
                return Err(Error::io(STEP, &p, std::io::ErrorKind::NotFound.into()));
            }
        }
        Ok(BaseInputs {
            packages: parse_packages(&packages, &pp)?,
            filters: parse_filters(&strip, &sp)?,
            hooks_dir,
            hooks,
        })
    }

    /// mmdebstrap's arguments, without the target directory.
    pub fn mmdebstrap_args(&self) -> Vec<String> {
        let mut args = vec![
            "--mode=root".to_string(),
            "--variant=minbase".to_string(),
            "--format=directory".to_string(),
            format!("--include={}", self.packages.join(",")),
        ];
        args.extend(
            self.filters
                .iter()
                .map(|f| format!("--dpkgopt={}", f.dpkg_option())),
        );
        let hook = |name: &str| shell_quote(&self.hooks_dir.join(name).to_string_lossy());
        args.push(format!(
            "--essential-hook=mkdir -p \"$1/etc/initramfs-tools/hooks\" && install -m 0755 {} \"$1/etc/initramfs-tools/hooks/tandem\"",
            hook(INITRAMFS_HOOK)
        ));
        args.push(format!(
            "--customize-hook=sh {} \"$1\"",
            hook(CUSTOMIZE_HOOK)
        ));
        args.push(SUITE.to_string());
        args
    }

    /// The cache key: a sha256 over everything that decides the base's content. The hooks'
    /// location is not part of it, their names and texts are.
    pub fn cache_key(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |name: &str, value: &str| {
            h.update(name.as_bytes());
            h.update([0]);
            h.update((value.len() as u64).to_le_bytes());
            h.update(value.as_bytes());
        };
        field("version", &BASE_FORMAT_VERSION.to_string());
        for a in self.mmdebstrap_args() {
            if !a.contains("-hook=") {
                field("arg", &a);
            }
        }
        for m in MIRRORS {
            field("mirror", m);
        }
        for (name, text) in &self.hooks {
            field("hook", name);
            field("hook-text", text);
        }
        hex::encode(&h.finalize()[..12])
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A base root filesystem, ready in the cache.
#[derive(Debug, Clone)]
pub struct Base {
    pub key: String,
    pub root: PathBuf,
    pub kernel_version: String,
    /// Whether this build made it (false: it came from the cache).
    pub built: bool,
}

impl Base {
    pub fn kernel(&self) -> PathBuf {
        self.root
            .join(format!("boot/vmlinuz-{}", self.kernel_version))
    }
    pub fn initrd(&self) -> PathBuf {
        self.root
            .join(format!("boot/initrd.img-{}", self.kernel_version))
    }
}

/// Returns the cached base for `inputs`, building it first if needed.
pub fn ensure(
    inputs: &BaseInputs,
    cache_dir: &Path,
    mut on_line: impl FnMut(&str),
) -> Result<Base, Error> {
    let key = inputs.cache_key();
    let final_dir = cache_dir.join(format!("base-{key}"));
    if final_dir.join("rootfs").is_dir() {
        let root = final_dir.join("rootfs");
        let kernel_version = kernel_version(&root)?;
        return Ok(Base {
            key,
            root,
            kernel_version,
            built: false,
        });
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(STEP, cache_dir, e))?;
    remove_stale_temporaries(cache_dir);
    let tmp = cache_dir.join(format!(".tmp-base-{key}-{}", std::process::id()));
    remove_unmounted(&tmp)?;
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(STEP, &tmp, e))?;
    let result = (|| {
        let rootfs = tmp.join("rootfs");
        let mut cmd = Cmd::new(STEP, "mmdebstrap")
            .args(inputs.mmdebstrap_args())
            .arg(&rootfs);
        cmd = cmd.args(MIRRORS);
        cmd.run_streaming(|line| {
            // mmdebstrap's own progress is "I: ...", warnings "W:", errors "E:"; the many
            // apt/dpkg lines in between only appear on failure (in the error's tail).
            // Our hooks' own messages start with "tandem: ".
            if ["I: ", "W: ", "E: ", "tandem: "]
                .iter()
                .any(|p| line.starts_with(p))
            {
                on_line(line);
            }
        })?;
        let inputs_txt = format!(
            "tandem base {key}\nmmdebstrap {} <target> {}\n",
            inputs.mmdebstrap_args().join(" "),
            MIRRORS.join(" | "),
        );
        let p = tmp.join("inputs.txt");
        std::fs::write(&p, inputs_txt).map_err(|e| Error::io(STEP, &p, e))?;
        kernel_version(&rootfs)
    })();
    let kernel_version = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = remove_unmounted(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&tmp, &final_dir) {
        // Another build published the same key first: use theirs.
        let _ = remove_unmounted(&tmp);
        if !final_dir.join("rootfs").is_dir() {
            return Err(Error::io(STEP, &final_dir, e));
        }
    }
    Ok(Base {
        key,
        root: final_dir.join("rootfs"),
        kernel_version,
        built: true,
    })
}

/// Temporaries of builds whose process is gone.
fn remove_stale_temporaries(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".tmp-base-") else {
            continue;
        };
        let pid = rest.rsplit('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            tracing::info!(path = %e.path().display(), "removing an interrupted build's base");
            if let Err(err) = remove_unmounted(&e.path()) {
                tracing::warn!("{err}");
            }
        }
    }
}

/// Removes a (partial) chroot, unless something is still mounted inside it: mmdebstrap bind
/// mounts the host's /dev there while it runs, and a recursive delete would go right through.
fn remove_unmounted(dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = format!("{}/", dir.display());
    if let Some(m) = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .find(|m| m.starts_with(&prefix))
    {
        return Err(Error::Base(format!(
            "{} still has {m} mounted (an interrupted mmdebstrap?); unmount it, then delete the directory",
            dir.display()
        )));
    }
    std::fs::remove_dir_all(dir).map_err(|e| Error::io(STEP, dir, e))
}

/// The one kernel version installed in `root` (from `/boot/vmlinuz-*`).
fn kernel_version(root: &Path) -> Result<String, Error> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .map_err(|e| Error::io(STEP, &boot, e))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(String::from)
        })
        .collect();
    versions.sort();
    match versions.as_slice() {
        [v] if boot.join(format!("initrd.img-{v}")).is_file() => Ok(v.clone()),
        [v] => Err(Error::Base(format!(
            "{} has no initrd.img-{v}",
            boot.display()
        ))),
        _ => Err(Error::Base(format!(
            "{} must hold exactly one kernel, found {versions:?}",
            boot.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> BaseInputs {
        BaseInputs {
            packages: vec!["nginx-light".into(), "mariadb-server".into()],
            filters: vec![PathFilter::Exclude("/usr/share/doc/*".into())],
            hooks_dir: "/src/rootfs/hooks".into(),
            hooks: vec![
                (CUSTOMIZE_HOOK.into(), "#!/bin/sh\n".into()),
                (INITRAMFS_HOOK.into(), "x\n".into()),
            ],
        }
    }

    #[test]
    fn package_list_parsing() {
        let p = Path::new("packages.txt");
        assert_eq!(
            parse_packages("# c\n\nnginx-light\n  kmod # why\nlibc++1\n", p).unwrap(),
            ["nginx-light", "kmod", "libc++1"]
        );
        let e = parse_packages("ok\nnot ok\n", p).unwrap_err().to_string();
        assert!(
            e.contains("packages.txt:2") && e.contains("`not ok`"),
            "{e}"
        );
        assert!(parse_packages("Upper\n", p).is_err());
    }

    #[test]
    fn strip_rules_parsing() {
        let p = Path::new("strip.txt");
        let f = parse_filters(
            "exclude /usr/share/doc/*\ninclude /lib/modules/*/x/*  # keep\n",
            p,
        )
        .unwrap();
        assert_eq!(
            f,
            [
                PathFilter::Exclude("/usr/share/doc/*".into()),
                PathFilter::Include("/lib/modules/*/x/*".into()),
                PathFilter::Include("/usr/lib/modules/*/x/*".into()),
            ]
        );
        for bad in ["drop /x", "exclude relative/*", "exclude"] {
            let e = parse_filters(bad, p).unwrap_err().to_string();
            assert!(e.contains("strip.txt:1"), "{bad}: {e}");
        }
    }

    #[test]
    fn mmdebstrap_arguments() {
        let a = inputs().mmdebstrap_args();
        assert_eq!(
            a[..4],
            [
                "--mode=root",
                "--variant=minbase",
                "--format=directory",
                "--include=nginx-light,mariadb-server"
            ]
        );
        assert_eq!(a[4], "--dpkgopt=path-exclude=/usr/share/doc/*");
        assert_eq!(
            a[5],
            "--essential-hook=mkdir -p \"$1/etc/initramfs-tools/hooks\" && install -m 0755 \
             '/src/rootfs/hooks/initramfs-modules.sh' \"$1/etc/initramfs-tools/hooks/tandem\""
        );
        assert_eq!(
            a[6],
            "--customize-hook=sh '/src/rootfs/hooks/customize.sh' \"$1\""
        );
        assert_eq!(a[7], "bookworm");
    }

    #[test]
    fn cache_key_follows_every_input_but_not_the_checkout_location() {
        let base = inputs().cache_key();
        assert_eq!(base.len(), 24);
        assert_eq!(base, inputs().cache_key());
        let mut moved = inputs();
        moved.hooks_dir = "/elsewhere/hooks".into();
        assert_eq!(moved.cache_key(), base);

        let variants: [fn(&mut BaseInputs); 5] = [
            |i| i.packages.push("curl".into()),
            |i| i.packages.reverse(),
            |i| {
                i.filters
                    .push(PathFilter::Include("/usr/share/doc/x".into()))
            },
            |i| i.hooks[0].1.push_str("true\n"),
            |i| i.hooks[1].0.push('x'),
        ];
        let mut keys = vec![base];
        for change in variants {
            let mut i = inputs();
            change(&mut i);
            keys.push(i.cache_key());
        }
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "every change gives a new key");
    }
}
