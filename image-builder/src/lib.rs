//! `image-builder build`: a validated `cluster.toml` in, one bootable UEFI disk image per node
//! out (raw + qcow2), optionally a generic image that becomes any node at first boot, plus the
//! shared root filesystem image and a manifest.
//!
//! Everything is made from files by host tools (mmdebstrap, mkfs.ext4 -d, mkfs.vfat + mtools,
//! sfdisk, qemu-img): no mounts, no loop devices. The pure parts (layout, loader entries,
//! cache keys, sfdisk script) live in their own modules and are tested without any of them.

pub mod base;
pub mod bundle;
pub mod cmd;
pub mod disk;
pub mod esp;
pub mod host;
pub mod layout;
pub mod pki;
pub mod rootimg;
pub mod seed;
pub mod signing;
pub mod users;

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use api::files::{IMAGE_UPDATE_KEYRING, IMAGE_VERSION_FILE};
use api::settings::TlsChoice;
use cluster_config::Cluster;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Timestamp of every file in the images unless SOURCE_DATE_EPOCH says otherwise
/// (2024-01-01T00:00:00Z).
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_704_067_200;
/// `rootfs/` of this checkout (package list, strip rules, hooks, overlay).
pub const DEFAULT_ROOTFS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../rootfs");
/// The builder's own version: the default image version (`build --version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{step}: {}: {source}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{step}: `{cmd}` failed ({status}); its last output:\n{tail}")]
    Command {
        step: &'static str,
        cmd: String,
        status: String,
        tail: String,
    },
    #[error("{step}: cannot run `{cmd}`: {source}")]
    Spawn {
        step: &'static str,
        cmd: String,
        source: std::io::Error,
    },
    #[error("host tools missing (Debian packages: {packages}); install them with:\n    {command}")]
    MissingTools { packages: String, command: String },
    #[error("image-builder must run as root (mmdebstrap --mode=root, and root-owned files in the images); run it with sudo")]
    NotRoot,
    #[error("{0}")]
    Config(#[from] cluster_config::ConfigErrors),
    #[error("appliance binary {} not found; build it with `cargo build --release -p appliance` or pass --appliance-bin PATH", path.display())]
    ApplianceMissing { path: PathBuf },
    #[error("{}:{line}: {message}", path.display())]
    Input {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("base root filesystem: {0}")]
    Base(String),
    #[error("certificates: {0}")]
    Pki(String),
    #[error("{} ({size} bytes) does not fit partition {partition} ({capacity} bytes)", what.display())]
    TooBig {
        what: PathBuf,
        size: u64,
        partition: String,
        capacity: u64,
    },
    #[error(transparent)]
    Bundle(#[from] update::Error),
    #[error("disk image: the layout has no partition labelled {label:?} (it has esp, root-a, root-b, seed, data)")]
    NoPartition { label: String },
    /// A seed's settings (`settings.toml`), the served certificate or the generic image's
    /// setup address; the message names which.
    #[error("{0}")]
    Settings(String),
}

impl Error {
    pub fn io(step: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            step,
            path: path.to_owned(),
            source,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// `None`: the built-in default cluster.
    pub config: Option<PathBuf>,
    pub out_dir: PathBuf,
    pub appliance_bin: PathBuf,
    pub cache_dir: PathBuf,
    pub rootfs_dir: PathBuf,
    pub source_date_epoch: u64,
    /// The image's release, written to `IMAGE_VERSION_FILE` (dotted numbers, checked with
    /// `update::Version::parse`).
    pub version: String,
    /// The update signing key pair's directory (made if it holds none; see [`signing`]).
    pub update_key_dir: PathBuf,
    /// Keyring files whose keys the image trusts besides the signing key's (rotation).
    pub trust_keys: Vec<PathBuf>,
    /// Trees copied over the root filesystem after the overlay, in order.
    pub extra_trees: Vec<PathBuf>,
    /// Only `root.ext4` and `manifest.json`: no CA, seeds or node disks (for bundles).
    pub root_only: bool,
    /// The certificate the nodes serve (`--tls-cert`, `--tls-key`); `None`: self-signed.
    pub tls: Option<TlsFiles>,
    /// Also build `generic.img` and `generic.qcow2` (`--generic`).
    pub generic: Option<GenericImage>,
}

/// A certificate chain and its key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// The generic image: the node images' disk with a seed that leaves the node and its
/// settings to the first-boot wizard.
#[derive(Debug, Clone, Default)]
pub struct GenericImage {
    /// Where the wizard listens (`--setup-address`); `None`:
    /// [`seed::default_setup_address`].
    pub setup_address: Option<Ipv4Addr>,
}

/// `--cache-dir`, else `$TANDEM_CACHE`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("TANDEM_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("tandem")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/tandem")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/tandem"))
}

/// The `appliance` binary next to this executable (same cargo target directory).
pub fn default_appliance_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("appliance")))
        .unwrap_or_else(|| PathBuf::from("appliance"))
}

/// `$SOURCE_DATE_EPOCH` if set and numeric, else `DEFAULT_SOURCE_DATE_EPOCH`.
pub fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_SOURCE_DATE_EPOCH)
}

/// Progress on stderr: `[N/M] what`, then the step's time and the total.
pub struct Progress {
    start: Instant,
    step_start: Instant,
    n: usize,
    total: usize,
    what: String,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        let now = Instant::now();
        Progress {
            start: now,
            step_start: now,
            n: 0,
            total,
            what: String::new(),
        }
    }

    pub fn step(&mut self, what: impl Into<String>) {
        self.finish();
        self.n += 1;
        self.what = what.into();
        self.step_start = Instant::now();
        eprintln!("[{:>2}/{}] {} ...", self.n, self.total, self.what);
    }

    pub fn note(&self, line: &str) {
        eprintln!("        {line}");
    }

    pub fn finish(&mut self) {
        if !self.what.is_empty() {
            eprintln!(
                "[{:>2}/{}] {}: done in {:.1} s (total {:.1} s)",
                self.n,
                self.total,
                self.what,
                self.step_start.elapsed().as_secs_f64(),
                self.start.elapsed().as_secs_f64()
            );
            self.what.clear();
        }
    }

    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub file: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Apparent size in bytes.
    pub size: u64,
    /// Bytes allocated on the build host (sparse files).
    pub disk_usage: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub builder_version: &'static str,
    /// The image's release (its `IMAGE_VERSION_FILE`); `bundle` installs it as this version.
    pub version: String,
    pub cluster: String,
    pub nodes: Vec<String>,
    pub source_date_epoch: u64,
    pub base_cache_key: String,
    pub kernel_version: String,
    pub root_fs_size: u64,
    pub root_slot_size: u64,
    /// The cluster CA (and secret) the seeds were made from: peers' client certificates and
    /// the operator's tools are signed by it.
    /// `None` for a `--root-only` build, which makes no seeds.
    pub ca_dir: Option<PathBuf>,
    /// The update signing key pair the image trusts (`bundle --key` defaults to its private
    /// key).
    pub update_key_dir: PathBuf,
    /// sha256 of the image's `IMAGE_UPDATE_KEYRING`.
    pub update_keyring_sha256: String,
    /// Whether only the root filesystem image was built (`--root-only`).
    pub root_only: bool,
    /// Where the generic image's setup wizard listens; absent without `--generic`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_address: Option<Ipv4Addr>,
    pub artifacts: Vec<Artifact>,
}

pub struct BuildReport {
    pub manifest: Manifest,
    pub base_built: bool,
    pub seconds: f64,
    /// The cluster's admin port (where a generic image's wizard listens).
    pub admin_port: u16,
}

/// Builds every artifact into `opts.out_dir`.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, Error> {
    update::Version::parse(&opts.version)?;
    for tree in &opts.extra_trees {
        if !tree.is_dir() {
            return Err(Error::io(
                "extra tree",
                tree,
                std::io::Error::other("not a directory"),
            ));
        }
    }
    let (config_text, cluster, ca_dir) = match &opts.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| cluster_config::ConfigErrors::io(path, e))?;
            let cluster = Cluster::from_toml(&text, &path.display().to_string())?;
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let ca_dir = dir.join(format!("{}-ca", cluster.name));
            (text, cluster, ca_dir)
        }
        None => {
            let cluster = Cluster::default_cluster();
            let ca_dir = opts.cache_dir.join(format!("{}-ca", cluster.name));
            (
                cluster_config::DEFAULT_CLUSTER_TOML.to_string(),
                cluster,
                ca_dir,
            )
        }
    };
    // Everything the seeds take from the options is checked before anything is built.
    let now = now_unix();
    let tls = match &opts.tls {
        Some(files) => seed::load_tls(&files.certificate, &files.key, now)?,
        None => TlsChoice::SelfSigned,
    };
    let generic = match &opts.generic {
        Some(generic) => Some(generic_seed(&cluster, generic)?),
        None => None,
    };
    if !host::is_root() {
        return Err(Error::NotRoot);
    }
    if !opts.appliance_bin.is_file() {
        return Err(Error::ApplianceMissing {
            path: opts.appliance_bin.clone(),
        });
    }
    let out = &opts.out_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io("output", out, e))?;
    // Node disks hold the node's key and the cluster secret: the directory is the owner's only.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("output", out, e))?;
    }
    // Everything is made in `.work` (left over only by a build that was killed) and moved into
    // `out` once complete, so a failed or interrupted build leaves the last good one as it was;
    // the work directory goes however the build ends, a full disk's partial images with it.
    let work = out.join(".work");
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| Error::io("output", &work, e))?;
    }
    let staged = work.join("out");
    std::fs::create_dir_all(&staged).map_err(|e| Error::io("output", &staged, e))?;
    let _work_cleanup = RemoveOnDrop(&work);
    let epoch = opts.source_date_epoch;

    let disks = cluster.nodes.len() + usize::from(generic.is_some());
    let steps = if opts.root_only { 6 } else { 7 + 4 * disks };
    let mut p = Progress::new(steps);
    p.step("host tools");
    for pkg in host::ensure_tools(|l| p.note(l))? {
        p.note(&format!("installed {pkg}"));
    }

    p.step("base root filesystem");
    let inputs = base::BaseInputs::load(&opts.rootfs_dir)?;
    let key = inputs.cache_key();
    let cached = opts.cache_dir.join(format!("base-{key}/rootfs")).is_dir();
    p.note(&format!(
        "key {key}: {}",
        if cached {
            "cached"
        } else {
            "not cached, running mmdebstrap (about a minute or two)"
        }
    ));
    let base = base::ensure(&inputs, &opts.cache_dir, |l| {
        p.note(&format!("mmdebstrap: {l}"))
    })?;
    p.note(&format!(
        "{} (kernel {})",
        base.root.display(),
        base.kernel_version
    ));

    p.step(format!(
        "update signing key ({})",
        opts.update_key_dir.display()
    ));
    let (own_key, created) = signing::load_or_create_key(&opts.update_key_dir)?;
    if created {
        tracing::info!(dir = %opts.update_key_dir.display(), "made a new update signing key");
        p.note(&format!(
            "made a new update signing key pair in {} (images built from now on trust it; \
             keep the directory: bundles for these images must be signed with it)",
            opts.update_key_dir.display()
        ));
    } else {
        p.note("reusing the existing key pair");
    }
    let keyring = signing::keyring_text(&own_key, &opts.trust_keys)?;
    p.note(&format!(
        "the image trusts {} key(s)",
        keyring.lines().count()
    ));
    let version_line = format!("{}\n", opts.version);

    p.step("staging the root tree");
    let staging = work.join("root");
    rootimg::stage(
        &rootimg::RootInputs {
            base_root: &base.root,
            overlay: &opts.rootfs_dir.join("overlay"),
            appliance: &opts.appliance_bin,
            extra_trees: &opts.extra_trees,
            files: &[
                (IMAGE_VERSION_FILE, version_line.as_bytes()),
                (IMAGE_UPDATE_KEYRING, keyring.as_bytes()),
            ],
        },
        &staging,
    )?;
    let accounts = users::load(&opts.rootfs_dir)?;
    users::add_to_root(
        &staging,
        &accounts,
        &opts.rootfs_dir.join(users::USERS_FILE),
    )?;

    p.step("root.ext4 (mkfs.ext4 -d, timestamps normalised)");
    let root_img = staged.join("root.ext4");
    let (root_fs_size, root_tree) = rootimg::build(&staging, &root_img, epoch)?;
    std::fs::remove_dir_all(&staging).map_err(|e| Error::io("output", &staging, e))?;
    let root_slot = layout::root_slot_size(root_fs_size);
    p.note(&format!(
        "{} of files in a {} filesystem, {} slots",
        human(root_tree),
        human(root_fs_size),
        human(root_slot)
    ));

    let mut artifacts_to_hash: Vec<(PathBuf, &'static str, Option<String>)> =
        vec![(root_img.clone(), "root-ext4", None)];
    if !opts.root_only {
        build_node_disks(
            opts,
            &mut p,
            &NodeInputs {
                cluster: &cluster,
                config_text: &config_text,
                ca_dir: &ca_dir,
                base: &base,
                root_img: &root_img,
                root_slot,
                work: &work,
                staged: &staged,
                tls: &tls,
                generic: generic.as_ref().map(|(_, text)| text.as_str()),
                now,
            },
            &mut artifacts_to_hash,
        )?;
    }

    p.step("sha256 of every artifact; into place with manifest.json");
    let artifacts = hash_artifacts(&artifacts_to_hash)?;
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let manifest = Manifest {
        builder_version: VERSION,
        version: opts.version.clone(),
        cluster: cluster.name.clone(),
        nodes: cluster.nodes.iter().map(|n| n.name.clone()).collect(),
        source_date_epoch: epoch,
        base_cache_key: base.key.clone(),
        kernel_version: base.kernel_version.clone(),
        root_fs_size,
        root_slot_size: root_slot,
        ca_dir: (!opts.root_only).then(|| absolute(&ca_dir)),
        update_key_dir: absolute(&opts.update_key_dir),
        update_keyring_sha256: hex::encode(Sha256::digest(keyring.as_bytes())),
        root_only: opts.root_only,
        setup_address: generic
            .as_ref()
            .filter(|_| !opts.root_only)
            .and_then(|(settings, _)| settings.setup_address),
        artifacts,
    };
    install(out, &staged, &manifest)?;
    p.finish();
    Ok(BuildReport {
        manifest,
        base_built: base.built,
        seconds: p.elapsed(),
        admin_port: cluster.ports.admin,
    })
}

/// The generic image's settings and their `settings.toml`, checked (before any build step).
fn generic_seed(
    cluster: &Cluster,
    generic: &GenericImage,
) -> Result<(cluster_config::settings::SeedSettings, String), Error> {
    if let Some(node) = cluster.node(seed::GENERIC) {
        return Err(Error::Settings(format!(
            "--generic: the cluster has a node named {:?}, whose image would be {}.img too",
            node.name,
            seed::GENERIC
        )));
    }
    let settings = seed::generic_settings(cluster, generic.setup_address)?;
    let text = seed::settings_toml(cluster, &settings, seed::GENERIC_ORIGIN, 0)?;
    Ok((settings, text))
}

/// Seconds since the Unix epoch (an uploaded certificate is checked against it).
fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What every node's disk is made from, besides the build options.
struct NodeInputs<'a> {
    cluster: &'a Cluster,
    config_text: &'a str,
    ca_dir: &'a Path,
    base: &'a base::Base,
    root_img: &'a Path,
    root_slot: u64,
    work: &'a Path,
    /// Where the finished artifacts wait until the whole build is done.
    staged: &'a Path,
    /// The certificate every node serves.
    tls: &'a TlsChoice,
    /// The generic image's `settings.toml`, when one is built.
    generic: Option<&'a str>,
    now: i64,
}

/// The cluster CA and credentials, then each node's seed, ESP, raw disk and qcow2, then the
/// generic image's (added to `artifacts`).
fn build_node_disks(
    opts: &BuildOptions,
    p: &mut Progress,
    inputs: &NodeInputs<'_>,
    artifacts_to_hash: &mut Vec<(PathBuf, &'static str, Option<String>)>,
) -> Result<(), Error> {
    let NodeInputs {
        cluster,
        config_text,
        ca_dir,
        work,
        tls,
        generic,
        now,
        ..
    } = *inputs;
    p.step(format!("cluster CA and credentials ({})", ca_dir.display()));
    let (ca, created) = pki::load_or_create_ca(ca_dir, &cluster.name)?;
    p.note(if created {
        "created a new CA"
    } else {
        "reusing the existing CA"
    });
    let secret = pki::load_or_create_secret(ca_dir)?;
    let (credentials, created) = pki::Credentials::load_or_create(ca_dir, cluster)?;
    let password_file = pki::Credentials::admin_password_path(ca_dir);
    p.note(&format!(
        "{} admin password in {}",
        if created { "made a new" } else { "reusing the" },
        password_file.display()
    ));

    for node in &cluster.nodes {
        let name = &node.name;
        let node_work = work.join(name);
        p.step(format!("{name}: certificate, seed and data partitions"));
        let salt = pki::random_bytes::<16>()
            .map_err(|e| Error::io("seed", Path::new("/dev/urandom"), e))?;
        let settings = seed::node_settings(cluster, name, &secret, &credentials, tls, &salt)?;
        let origin = format!("{} of {name}", api::settings::SEED_SETTINGS);
        let text = seed::settings_toml(cluster, &settings, &origin, now)?;
        let seed_dir = node_work.join("seed");
        seed::write_node(&seed_dir, config_text, &text, &ca, cluster, node)?;
        build_disk(opts, p, inputs, name, &seed_dir)?;
        artifacts_to_hash.push((
            inputs.staged.join(format!("{name}.img")),
            "disk-raw",
            Some(name.clone()),
        ));
        artifacts_to_hash.push((
            inputs.staged.join(format!("{name}.qcow2")),
            "disk-qcow2",
            Some(name.clone()),
        ));
    }
    if let Some(text) = generic {
        let name = seed::GENERIC;
        p.step(format!(
            "{name}: every node's certificates, seed and data partitions"
        ));
        let seed_dir = work.join(name).join("seed");
        seed::write_generic(&seed_dir, config_text, text, &ca, cluster)?;
        build_disk(opts, p, inputs, name, &seed_dir)?;
        artifacts_to_hash.push((
            inputs.staged.join(format!("{name}.img")),
            "generic-raw",
            None,
        ));
        artifacts_to_hash.push((
            inputs.staged.join(format!("{name}.qcow2")),
            "generic-qcow2",
            None,
        ));
    }
    Ok(())
}

/// `name`'s disk from its seed tree (in `work/name/seed`, a progress step already begun): the
/// seed and data partitions, the ESP, `name.img` and `name.qcow2`; the work directory is
/// removed.
fn build_disk(
    opts: &BuildOptions,
    p: &mut Progress,
    inputs: &NodeInputs<'_>,
    name: &str,
    seed_dir: &Path,
) -> Result<(), Error> {
    let NodeInputs {
        cluster,
        base,
        root_img,
        root_slot,
        work,
        staged: out,
        ..
    } = *inputs;
    let node_work = work.join(name);
    let seed_img = node_work.join("seed.ext4");
    let uuid_base = format!("{}/{}", cluster.name, name);
    let seed_uuid = format!("{uuid_base}/seed");
    let seed_fs = rootimg::Ext4 {
        step: "seed",
        label: "seed",
        uuid_name: &seed_uuid,
        size: layout::SEED_SIZE,
        journal: false,
        epoch: opts.source_date_epoch,
    };
    seed_fs.make(Some(seed_dir), &seed_img)?;
    // No filesystem on the data partition, only the marker that says none was ever made:
    // the node creates it on first boot, at the disk's final size, and formats nothing that
    // lacks the marker (a damaged filesystem is not an empty one).
    let data_img = node_work.join("data.marker");
    pki::write_file(&data_img, api::storage::UNINITIALISED_MARKER, 0o600)?;

    p.step(format!("{name}: ESP (systemd-boot, kernel, initrd)"));
    let esp_img = node_work.join("esp.vfat");
    esp::build(
        &esp_img,
        &base.kernel(),
        &base.initrd(),
        &esp::volume_id(&cluster.name, name),
        &opts.version,
    )?;

    p.step(format!("{name}: {name}.img (GPT + partitions)"));
    let disk_layout = layout::DiskLayout::new(&cluster.name, name, root_slot);
    let raw = out.join(format!("{name}.img"));
    disk::assemble(
        &raw,
        &disk_layout,
        &[
            (layout::LABEL_ESP, &esp_img),
            (layout::LABEL_ROOT_A, root_img),
            (layout::LABEL_SEED, &seed_img),
            (layout::LABEL_DATA, &data_img),
        ],
    )?;
    std::fs::remove_dir_all(&node_work).map_err(|e| Error::io("output", &node_work, e))?;

    p.step(format!("{name}: {name}.qcow2"));
    disk::to_qcow2(&raw, &out.join(format!("{name}.qcow2")))
}

/// The build's manifest, beside its artifacts.
const MANIFEST_FILE: &str = "manifest.json";

/// Removes a directory tree when dropped: the build's work directory, however the build ends.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "could not remove the build's work directory");
            }
        }
    }
}

/// Moves a finished build from `staged` into `out` (renames within one filesystem, no copies):
/// the old manifest goes first, as a directory without one holds no complete build; then each
/// artifact; then whatever the old manifest named that this build does not make (a generic
/// image built last time, not now); the new manifest last ([`api::fsio::write_atomic`]).
fn install(out: &Path, staged: &Path, manifest: &Manifest) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| Error::io("output", &path, e)
    };
    let manifest_path = out.join(MANIFEST_FILE);
    let old = old_artifacts(&manifest_path);
    api::fsio::remove_if_present(&manifest_path).map_err(io(&manifest_path))?;
    for a in &manifest.artifacts {
        let to = out.join(&a.file);
        std::fs::rename(staged.join(&a.file), &to).map_err(io(&to))?;
    }
    for file in old {
        if !manifest.artifacts.iter().any(|a| a.file == file) {
            let path = out.join(&file);
            api::fsio::remove_if_present(&path).map_err(io(&path))?;
        }
    }
    let json = serde_json::to_string_pretty(manifest)
        .map_err(|e| Error::io("manifest", &manifest_path, e.into()))?;
    api::fsio::write_atomic(&manifest_path, (json + "\n").as_bytes(), 0o644, None)
        .map_err(io(&manifest_path))
}

/// The artifact files an earlier build's manifest names: plain file names only, so a damaged
/// or hand-edited manifest cannot point the clean-up anywhere else. None if it is missing or
/// unreadable (then nothing is removed but what this build replaces).
fn old_artifacts(manifest: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(manifest) else {
        return Vec::new();
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    value["artifacts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["file"].as_str())
        .filter(|f| {
            let p = Path::new(f);
            *f != MANIFEST_FILE
                && p.components().count() == 1
                && matches!(p.components().next(), Some(std::path::Component::Normal(_)))
        })
        .map(str::to_owned)
        .collect()
}

fn hash_artifacts(
    files: &[(PathBuf, &'static str, Option<String>)],
) -> Result<Vec<Artifact>, Error> {
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|(path, kind, node)| {
                s.spawn(move || -> Result<Artifact, Error> {
                    let md = std::fs::metadata(path).map_err(|e| Error::io("manifest", path, e))?;
                    Ok(Artifact {
                        file: path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        kind,
                        node: node.clone(),
                        size: md.len(),
                        disk_usage: md.blocks() * 512,
                        sha256: sha256_file(path).map_err(|e| Error::io("manifest", path, e))?,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(files)
            .map(|(h, (path, _, _))| {
                h.join().map_err(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .copied()
                        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                        .unwrap_or("no message");
                    let e = std::io::Error::other(format!("hashing thread panicked: {what}"));
                    Error::io("manifest", path, e)
                })?
            })
            .collect()
    })
}

/// The file's sha256. Holes (most of a disk image: the empty slot, the data partition) are
/// hashed from a buffer of zeros instead of being read: the kernel would only fill pages
/// with zeros to copy them out, which took as long as the hashing.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use nix::unistd::{lseek, Whence};
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsFd;

    const BUF: usize = 1 << 20;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let zeros = vec![0u8; BUF];
    let mut pos: u64 = 0;
    while pos < len {
        // Where the next data starts (ENXIO: only a hole up to the end); a filesystem without
        // SEEK_DATA says the data starts here, and everything is read.
        let data = match lseek(f.as_fd(), pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(nix::errno::Errno::ENXIO) => len,
            Err(_) => pos,
        };
        let mut hole = data.min(len) - pos;
        while hole > 0 {
            let n = hole.min(BUF as u64) as usize;
            h.update(&zeros[..n]);
            hole -= n as u64;
        }
        pos = data.min(len);
        if pos >= len {
            break;
        }
        let end = match lseek(f.as_fd(), pos as i64, Whence::SeekHole) {
            Ok(off) => (off as u64).min(len),
            Err(_) => len,
        };
        f.seek(SeekFrom::Start(pos))?;
        while pos < end {
            let want = (end - pos).min(BUF as u64) as usize;
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                // The file shrank under us: hash what is there, as a plain read would.
                return Ok(hex::encode(h.finalize()));
            }
            h.update(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Sizes for people: `512.0 MiB`.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// The summary table printed at the end of a build.
pub fn summary_table(report: &BuildReport) -> String {
    let mut s = format!(
        "{:<16} {:>10} {:>10}  {}\n",
        "artifact", "size", "on disk", "sha256"
    );
    for a in &report.manifest.artifacts {
        s.push_str(&format!(
            "{:<16} {:>10} {:>10}  {}\n",
            a.file,
            human(a.size),
            human(a.disk_usage),
            a.sha256
        ));
    }
    s.push_str(&format!(
        "built in {:.1} s (base {}, key {}), kernel {}\n",
        report.seconds,
        if report.base_built {
            "built by mmdebstrap"
        } else {
            "from cache"
        },
        report.manifest.base_cache_key,
        report.manifest.kernel_version
    ));
    s.push_str(&format!(
        "image version {}, trusting the update keys in {} ({})\n",
        report.manifest.version,
        IMAGE_UPDATE_KEYRING,
        report.manifest.update_key_dir.display()
    ));
    if !report.manifest.root_only {
        s.push_str(
            "node disks (.img, .qcow2) hold the node's private key and the cluster secret: \
             mode 0600, in a directory of mode 0700\n",
        );
    }
    if let Some(address) = report.manifest.setup_address {
        s.push_str(&format!(
            "{generic}.img and {generic}.qcow2 hold every node's private key; on first boot \
             their setup wizard is at https://{address}:{port}/setup and on the serial console\n",
            generic = seed::GENERIC,
            port = report.admin_port,
        ));
    }
    if let Some(ca_dir) = &report.manifest.ca_dir {
        s.push_str(&format!(
            "the admin password of the node images is in {} (the metrics token beside it)\n",
            pki::Credentials::admin_password_path(ca_dir).display()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        let check = |b: u64, s: &str| assert_eq!(human(b), s);
        check(0, "0 B");
        check(1023, "1023 B");
        check(1024, "1.0 KiB");
        check(512 * 1024 * 1024, "512.0 MiB");
        check(2578 * 1024 * 1024, "2.5 GiB");
    }

    #[test]
    fn a_generic_image_is_refused_for_a_cluster_with_a_node_of_its_name() {
        let text = cluster_config::DEFAULT_CLUSTER_TOML.replace("\"server1\"", "\"generic\"");
        let cluster = Cluster::from_toml(&text, "c.toml").unwrap();
        let e = generic_seed(&cluster, &GenericImage::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--generic: the cluster has a node named \"generic\""),
            "{e}"
        );
        let (settings, text) =
            generic_seed(&Cluster::default_cluster(), &GenericImage::default()).unwrap();
        assert_eq!(settings.setup_address, Some(Ipv4Addr::new(10, 88, 0, 254)));
        assert_eq!(text, settings.to_toml());
    }

    #[test]
    fn file_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // A sparse file (holes at the start, between data and at the end) hashes like its
        // bytes read in full.
        use std::io::{Seek, SeekFrom, Write};
        let sparse = dir.path().join("sparse");
        let mut f = std::fs::File::create(&sparse).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&[7u8; 70_000]).unwrap();
        f.seek(SeekFrom::Start(9 << 20)).unwrap();
        f.write_all(b"x").unwrap();
        f.set_len(13 << 20).unwrap();
        drop(f);
        let bytes = std::fs::read(&sparse).unwrap();
        assert_eq!(
            sha256_file(&sparse).unwrap(),
            hex::encode(Sha256::digest(&bytes))
        );
        let empty = dir.path().join("empty");
        std::fs::File::create(&empty)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        assert_eq!(
            sha256_file(&empty).unwrap(),
            hex::encode(Sha256::digest(vec![0u8; 3 << 20]))
        );
    }
}
