//! Runs the real builder against the built-in default cluster, twice, and inspects the result
//! with the same tools an operator would use: sfdisk, mtools, debugfs, qemu-img, openssl.
//!
//! Needs root (or an already cached base) and the host tools; as root the builder installs
//! missing ones. It fails, never skips, when something is missing.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use api::files::{
    CA_CERT, DB_CERT, DB_KEY, NODE_CERT, NODE_KEY, PARTITION_SEED, SEED_CLUSTER_CONFIG,
    SEED_TLS_DIR,
};
use api::settings::{Secret, TlsChoice, SEED_SETTINGS};
use cluster_config::settings::SeedSettings;
use image_builder::pki::Credentials;

const BUILDER: &str = env!("CARGO_BIN_EXE_image-builder");

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is the tool installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn build(out: &Path, appliance: &Path) -> serde_json::Value {
    build_with(out, appliance, &[]).0
}

/// Any executable stands in for the appliance here (in `dir`); the lead's test script uses the
/// real one.
fn stand_in_appliance(dir: &Path) -> PathBuf {
    let appliance = dir.join("appliance");
    std::fs::copy("/bin/true", &appliance).unwrap();
    appliance
}

/// The `image-builder build` command into `out`, with extra arguments.
fn build_command(out: &Path, appliance: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BUILDER);
    cmd.args(["build", "--out"])
        .arg(out)
        .arg("--appliance-bin")
        .arg(appliance)
        .args(args);
    cmd
}

/// `image-builder build` with extra arguments: the manifest and the build's stderr.
fn build_with(out: &Path, appliance: &Path, args: &[&str]) -> (serde_json::Value, String) {
    let result = build_command(out, appliance, args)
        .output()
        .expect("run image-builder");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "image-builder build failed ({}):\n{stderr}",
        result.status
    );
    assert!(
        stderr.contains("sha256"),
        "no summary table on stderr:\n{stderr}"
    );
    let text = std::fs::read_to_string(out.join("manifest.json")).expect("manifest.json");
    (
        serde_json::from_str(&text).expect("manifest.json is JSON"),
        stderr.into_owned(),
    )
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// The image's version file and keyring, checked against the manifest; returns the keyring.
fn check_version_and_keyring(root: &Path, manifest: &serde_json::Value, version: &str) -> String {
    let version_file = api::files::IMAGE_VERSION_FILE;
    assert_eq!(
        debugfs(root, 0, &format!("cat {version_file}")),
        format!("{version}\n")
    );
    assert_eq!(manifest["version"], version);
    let keyring = debugfs(
        root,
        0,
        &format!("cat {}", api::files::IMAGE_UPDATE_KEYRING),
    );
    for file in [version_file, api::files::IMAGE_UPDATE_KEYRING] {
        let stat = debugfs(root, 0, &format!("stat {file}"));
        assert!(stat.contains("Mode:  0644"), "{file}: {stat}");
        assert!(
            stat.contains("User:     0   Group:     0"),
            "{file}: {stat}"
        );
    }
    assert_eq!(
        manifest["update_keyring_sha256"].as_str(),
        Some(sha256_hex(keyring.as_bytes()).as_str())
    );
    let keys = update::keys::parse_keyring(&keyring).unwrap();
    assert!(!keys.is_empty(), "{keyring}");
    keyring
}

/// The kinds of a manifest's artifacts, in its order.
fn kinds(manifest: &serde_json::Value) -> Vec<&str> {
    manifest["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect()
}

fn artifact<'a>(manifest: &'a serde_json::Value, file: &str) -> &'a serde_json::Value {
    manifest["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .find(|a| a["file"] == file)
        .unwrap_or_else(|| panic!("{file} missing from the manifest: {manifest:#}"))
}

#[derive(Debug, PartialEq)]
struct Partition {
    name: String,
    offset: u64,
    size: u64,
}

fn partitions(img: &Path) -> Vec<Partition> {
    let json: serde_json::Value =
        serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(img))).unwrap();
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "gpt");
    let sector = table["sectorsize"].as_u64().unwrap();
    table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Partition {
            name: p["name"].as_str().unwrap().to_string(),
            offset: p["start"].as_u64().unwrap() * sector,
            size: p["size"].as_u64().unwrap() * sector,
        })
        .collect()
}

/// `debugfs -R CMD` on an ext4 filesystem at `offset` bytes into `img`.
fn debugfs(img: &Path, offset: u64, request: &str) -> String {
    run(Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(format!("{}?offset={offset}", img.display())))
}

/// The seed partition's offset in `img`.
fn seed_offset(img: &Path) -> u64 {
    partitions(img)
        .into_iter()
        .find(|p| p.name == PARTITION_SEED)
        .unwrap()
        .offset
}

/// The names in directory `dir` of the ext4 filesystem at `offset` of `img`, without `.` and
/// `..`, sorted.
fn ls(img: &Path, offset: u64, dir: &str) -> Vec<String> {
    // `ls -p`: one `/inode/mode/uid/gid/name/size/` line per entry.
    let mut names: Vec<String> = debugfs(img, offset, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != ".." && n != "lost+found")
        .collect();
    names.sort();
    names
}

/// The seed's `settings.toml` of `img`, parsed; it must be 0600.
fn seed_settings(img: &Path) -> SeedSettings {
    let seed = seed_offset(img);
    let stat = debugfs(img, seed, &format!("stat /{SEED_SETTINGS}"));
    assert!(stat.contains("Mode:  0600"), "{SEED_SETTINGS}: {stat}");
    let text = debugfs(img, seed, &format!("cat /{SEED_SETTINGS}"));
    SeedSettings::from_toml(&text, &format!("{}: {SEED_SETTINGS}", img.display())).unwrap()
}

#[test]
fn builds_bootable_reproducible_images_for_the_default_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let appliance = stand_in_appliance(tmp.path());

    let out1 = tmp.path().join("out1");
    let manifest = build(&out1, &appliance);
    assert_eq!(manifest["cluster"], "tandem");
    for file in [
        "root.ext4",
        "server1.img",
        "server1.qcow2",
        "server2.img",
        "server2.qcow2",
    ] {
        let a = artifact(&manifest, file);
        let size = std::fs::metadata(out1.join(file)).unwrap().len();
        assert_eq!(a["size"].as_u64(), Some(size), "{file}");
        assert_eq!(a["sha256"].as_str().map(str::len), Some(64), "{file}");
    }
    // Node disks carry the node key and the cluster secret: owner only, in an owner-only dir.
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&out1), 0o700);
    for file in [
        "server1.img",
        "server1.qcow2",
        "server2.img",
        "server2.qcow2",
    ] {
        assert_eq!(mode(&out1.join(file)), 0o600, "{file}");
    }

    // GPT: five partitions, data last.
    let img = out1.join("server1.img");
    let parts = partitions(&img);
    let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["esp", "root-a", "root-b", "seed", "data"]);
    let offset = |name: &str| parts.iter().find(|p| p.name == name).unwrap().offset;

    // ESP: systemd-boot, loader.conf and slot A's entry with boot counting.
    let esp = format!("{}@@{}", img.display(), offset("esp"));
    let entries = run(Command::new("mdir")
        .args(["-b", "-i", &esp, "::/loader/entries"])
        .env("MTOOLS_SKIP_CHECK", "1"));
    assert!(
        entries.contains("appliance-a+3.conf"),
        "loader entries: {entries}"
    );
    let entry = run(Command::new("mtype")
        .args(["-i", &esp, "::/loader/entries/appliance-a+3.conf"])
        .env("MTOOLS_SKIP_CHECK", "1"));
    assert!(
        entry.contains("linux /tandem/a/vmlinuz\n")
            && entry.contains("initrd /tandem/a/initrd.img\n"),
        "{entry}"
    );
    assert!(
        entry.contains(
            "options root=PARTLABEL=root-a ro rootwait console=ttyS0,115200 panic=10 tandem.slot=a"
        ),
        "{entry}"
    );
    let loader = run(Command::new("mtype")
        .args(["-i", &esp, "::/loader/loader.conf"])
        .env("MTOOLS_SKIP_CHECK", "1"));
    assert!(loader.contains("default appliance-a*\n"), "{loader}");
    let boot = run(Command::new("mdir")
        .args(["-b", "-i", &esp, "::/EFI/BOOT", "::/tandem/a"])
        .env("MTOOLS_SKIP_CHECK", "1"));
    for f in ["BOOTX64.EFI", "vmlinuz", "initrd.img"] {
        assert!(boot.contains(f), "{f} missing from the ESP: {boot}");
    }

    // Seed: complete settings (node, the kept secret, password hash and metrics token), the
    // exact config, a certificate from the cluster CA, a private key.
    let ca_dir = PathBuf::from(manifest["ca_dir"].as_str().unwrap());
    let credentials = Credentials::load(&ca_dir).unwrap();
    let secret = std::fs::read_to_string(ca_dir.join(api::secret::SECRET_FILE)).unwrap();
    for node in ["server1", "server2"] {
        let img = out1.join(format!("{node}.img"));
        let seed = seed_offset(&img);
        assert_eq!(
            ls(&img, seed, "/"),
            [
                SEED_CLUSTER_CONFIG.as_str(),
                SEED_SETTINGS.as_str(),
                SEED_TLS_DIR.as_str()
            ]
        );
        let settings = seed_settings(&img);
        assert!(
            cluster_config::settings::seed_is_complete(&settings),
            "{settings:?}"
        );
        assert_eq!(settings.node.as_deref(), Some(node));
        assert_eq!(settings.cluster_secret, Some(Secret::new(secret.trim())));
        assert!(cluster_config::settings::verify_password(
            settings.admin_password_hash.as_deref().unwrap(),
            credentials.admin_password.expose()
        ));
        assert_eq!(
            settings.metrics_token,
            Some(credentials.metrics_token.clone())
        );
        assert_eq!(settings.tls, Some(TlsChoice::SelfSigned));
        assert_eq!(settings.webhook.as_deref(), Some(""));
        assert_eq!(settings.setup_address, None);
        assert_eq!(
            debugfs(&img, seed, &format!("cat /{SEED_CLUSTER_CONFIG}")),
            cluster_config::DEFAULT_CLUSTER_TOML
        );
        for key in [NODE_KEY, DB_KEY] {
            let stat = debugfs(&img, seed, &format!("stat /{SEED_TLS_DIR}/{key}"));
            assert!(stat.contains("Mode:  0600"), "{key} must be 0600: {stat}");
        }
        let dir = tmp.path().join(format!("tls-{node}"));
        std::fs::create_dir(&dir).unwrap();
        for f in [CA_CERT, NODE_CERT, DB_CERT] {
            let text = debugfs(&img, seed, &format!("cat /{SEED_TLS_DIR}/{f}"));
            std::fs::write(dir.join(f), text).unwrap();
        }
        // MariaDB's certificate serves only: its key (copied for `mysql`) is no client identity.
        let usage = run(Command::new("openssl")
            .args(["x509", "-noout", "-ext", "extendedKeyUsage", "-in"])
            .arg(dir.join(DB_CERT)));
        assert!(
            usage.contains("TLS Web Server Authentication")
                && !usage.contains("Client Authentication"),
            "{usage}"
        );
        let verify = run(Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.join(CA_CERT))
            .arg(dir.join(NODE_CERT)));
        assert!(verify.contains(": OK"), "{verify}");
        let text = run(Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(dir.join(NODE_CERT)));
        // The node's names and address, never the cluster's public domain.
        let address = cluster_config::Cluster::default_cluster()
            .node(node)
            .unwrap()
            .address;
        let sans: Vec<&str> = text
            .lines()
            .skip(1)
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .collect();
        assert_eq!(
            sans,
            [
                format!("DNS:{node}"),
                format!("DNS:{node}.tandem.test"),
                format!("IP Address:{address}")
            ],
            "{text}"
        );
    }

    // Root filesystem: the builder's version by default, the cache's update key trusted.
    let root = out1.join("root.ext4");
    let keyring = check_version_and_keyring(&root, &manifest, image_builder::VERSION);
    let key_dir = Path::new(manifest["update_key_dir"].as_str().unwrap());
    assert_eq!(
        key_dir,
        image_builder::signing::default_key_dir(&image_builder::default_cache_dir())
    );
    assert_eq!(
        keyring,
        std::fs::read_to_string(key_dir.join(update::keys::PUBLIC_KEY_FILE)).unwrap()
    );
    assert_eq!(manifest["root_only"], false);
    assert!(manifest["ca_dir"].is_string(), "{manifest:#}");
    // Root filesystem: init is the appliance.
    let init = debugfs(&root, 0, "stat /sbin/init");
    assert!(
        init.contains("Type: symlink") && init.contains("Fast link dest: \"/usr/sbin/appliance\""),
        "{init}"
    );
    let appliance_stat = debugfs(&root, 0, "stat /usr/sbin/appliance");
    assert!(appliance_stat.contains("Mode:  0755"), "{appliance_stat}");
    // Tandem's users and groups (rootfs/users.txt), with their fixed ids.
    let passwd = debugfs(&root, 0, "cat /etc/passwd");
    for user in [
        "tandem-balancer:x:961:961:",
        "tandem-app:x:962:962:",
        "tandem-admin:x:963:963:",
    ] {
        assert!(passwd.contains(user), "no {user} in /etc/passwd:\n{passwd}");
    }
    let group = debugfs(&root, 0, "cat /etc/group");
    assert!(
        group.contains("\ntandem-control:x:960:tandem-admin\n"),
        "{group}"
    );
    assert!(debugfs(&root, 0, "cat /etc/shadow").contains("\ntandem-admin:!:"));
    // No setuid or setgid bit is left: these are the ones Debian's base comes with.
    for path in [
        "/usr/bin/su",
        "/usr/bin/passwd",
        "/usr/bin/mount",
        "/usr/bin/umount",
        "/usr/bin/newgrp",
        "/usr/bin/gpasswd",
        "/usr/bin/chfn",
        "/usr/bin/chsh",
        "/usr/bin/chage",
        "/usr/bin/expiry",
        "/usr/sbin/unix_chkpwd",
        "/usr/lib/mysql/plugin/auth_pam_tool_dir/auth_pam_tool",
        "/var/mail",
    ] {
        let stat = debugfs(&root, 0, &format!("stat {path}"));
        let mode = stat
            .split("Mode:")
            .nth(1)
            .and_then(|m| m.split_whitespace().next())
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or_else(|| panic!("no mode for {path}: {stat}"));
        assert_eq!(mode & 0o6000, 0, "{path} keeps mode {mode:o}");
    }
    // The data partition has no filesystem, only the marker of one never initialised (the node
    // formats it on first boot, and nothing without the marker).
    let mut head = vec![0u8; 4096];
    {
        use std::io::{Read as _, Seek as _};
        let mut f = std::fs::File::open(&img).unwrap();
        f.seek(std::io::SeekFrom::Start(offset("data"))).unwrap();
        f.read_exact(&mut head).unwrap();
    }
    assert!(
        api::storage::is_uninitialised(&head),
        "data partition head: {:?}",
        &head[..64]
    );
    assert!(
        head[1080..1082] != [0x53, 0xEF],
        "the data partition must carry no ext4"
    );

    // The qcow2 is the raw image converted.
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(out1.join("server1.qcow2"))))
    .unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(std::fs::metadata(&img).unwrap().len())
    );

    // Same inputs, same root image: byte for byte. This time with the generic image too. The
    // first build's disks go first: two builds at once would need about 4 GiB of scratch space.
    std::fs::remove_dir_all(&out1).unwrap();
    let out2 = tmp.path().join("out2");
    let (manifest2, stderr) = build_with(&out2, &appliance, &["--generic"]);
    check_generic_image(&out2, &manifest2, &stderr, &credentials);
    let (a, b) = (
        &artifact(&manifest, "root.ext4")["sha256"],
        &artifact(&manifest2, "root.ext4")["sha256"],
    );
    assert_eq!(
        a, b,
        "two builds from the same inputs gave different root.ext4"
    );
    assert_eq!(
        Some(
            image_builder::sha256_file(&out2.join("root.ext4"))
                .unwrap()
                .as_str()
        ),
        b.as_str()
    );
}

#[test]
fn root_only_builds_carry_version_keyring_and_extra_trees_and_make_bundles() {
    let tmp = tempfile::tempdir().unwrap();
    let appliance = stand_in_appliance(tmp.path());
    let keys = tmp.path().join("keys");
    // A rotation keyring: a new key, and the builder's own once it exists (no duplicate).
    let next = update::keys::generate().unwrap();
    let next_line = update::keys::public_key_text(&next.verifying_key());
    let ring = tmp.path().join("rotation.pub");
    std::fs::write(&ring, format!("# the next key\n{next_line}")).unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("usr/sbin")).unwrap();
    let nginx = tree.join("usr/sbin/nginx");
    std::fs::write(&nginx, "#!/bin/sh\nexec sleep infinity\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&nginx, std::fs::Permissions::from_mode(0o750)).unwrap();
    }
    let args = |version: &'static str| {
        vec![
            "--root-only",
            "--version",
            version,
            "--update-key-dir",
            keys.to_str().unwrap(),
            "--trust-key",
            ring.to_str().unwrap(),
            "--extra-tree",
            tree.to_str().unwrap(),
        ]
    };

    // A version that is not dotted numbers is refused before anything is built.
    let out = Command::new(BUILDER)
        .args(["build", "--root-only", "--version", "2.x", "--out"])
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("version \"2.x\": expected dotted decimal numbers"),
        "{stderr}"
    );
    assert!(!keys.exists(), "no key is made for a refused build");

    let out1 = tmp.path().join("v2");
    let (manifest, stderr) = build_with(&out1, &appliance, &args("0.2.0"));
    assert!(
        stderr.contains("made a new update signing key pair in"),
        "{stderr}"
    );
    let mut files: Vec<String> = std::fs::read_dir(&out1)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["manifest.json", "root.ext4"]);
    assert_eq!(manifest["root_only"], true);
    assert!(manifest["ca_dir"].is_null(), "{manifest:#}");
    assert_eq!(manifest["update_key_dir"].as_str(), keys.to_str());
    assert_eq!(kinds(&manifest), ["root-ext4"]);
    let root = out1.join("root.ext4");
    let keyring = check_version_and_keyring(&root, &manifest, "0.2.0");
    let own = std::fs::read_to_string(keys.join(update::keys::PUBLIC_KEY_FILE)).unwrap();
    let mut expected = [own.clone(), next_line.clone()];
    expected.sort();
    assert_eq!(keyring, expected.concat());
    // The extra tree replaced nginx, keeping its mode, owned by root.
    assert_eq!(
        debugfs(&root, 0, "cat /usr/sbin/nginx"),
        "#!/bin/sh\nexec sleep infinity\n"
    );
    let stat = debugfs(&root, 0, "stat /usr/sbin/nginx");
    assert!(stat.contains("Mode:  0750"), "{stat}");
    assert!(stat.contains("User:     0   Group:     0"), "{stat}");

    // Again, with the builder's own key in the rotation keyring too: the key is reused, the
    // keyring has no duplicate, and the root image is the same, byte for byte.
    std::fs::write(&ring, format!("{own}{next_line}")).unwrap();
    let out2 = tmp.path().join("v2-again");
    let (manifest2, stderr) = build_with(&out2, &appliance, &args("0.2.0"));
    assert!(stderr.contains("reusing the existing key pair"), "{stderr}");
    assert_eq!(
        manifest2["artifacts"][0]["sha256"],
        manifest["artifacts"][0]["sha256"]
    );

    // `bundle` takes the build's version and key pair unless told otherwise; the image's own
    // keyring verifies it.
    let bundle = tmp.path().join("v2.bundle");
    run(Command::new(BUILDER)
        .args(["bundle", "--images"])
        .arg(&out1)
        .arg("--out")
        .arg(&bundle));
    let keyring_file = tmp.path().join("image-keyring.pub");
    std::fs::write(&keyring_file, &keyring).unwrap();
    let verify = Command::new(BUILDER)
        .args(["verify-bundle", "--running", "0.1.0", "--keyring"])
        .arg(&keyring_file)
        .arg(&bundle)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{stderr}");
    assert!(stderr.contains("good: tandem 0.2.0"), "{stderr}");
}

/// `generic.img`: the node images' disk layout, with a seed that holds the config, every node's
/// TLS files in `tls/<node>/` and settings that leave everything to the wizard but its address.
fn check_generic_image(
    out: &Path,
    manifest: &serde_json::Value,
    stderr: &str,
    credentials: &Credentials,
) {
    for (file, kind) in [
        ("generic.img", "generic-raw"),
        ("generic.qcow2", "generic-qcow2"),
    ] {
        let a = artifact(manifest, file);
        assert_eq!(a["kind"], kind);
        assert!(a["node"].is_null(), "{a}");
        let md = std::fs::metadata(out.join(file)).unwrap();
        assert_eq!(a["size"].as_u64(), Some(md.len()), "{file}");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
            0o600,
            "{file} holds every node's key"
        );
    }
    assert_eq!(manifest["setup_address"], "10.88.0.254");
    let img = out.join("generic.img");
    // Same partitions, sizes and places as a node's disk.
    let node_parts = partitions(&out.join("server1.img"));
    assert_eq!(partitions(&img), node_parts);
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        std::fs::metadata(out.join("server1.img")).unwrap().len()
    );

    let settings = seed_settings(&img);
    assert_eq!(
        settings,
        SeedSettings {
            setup_address: Some(std::net::Ipv4Addr::new(10, 88, 0, 254)),
            ..SeedSettings::default()
        }
    );
    let seed = seed_offset(&img);
    assert_eq!(
        ls(&img, seed, "/"),
        [
            SEED_CLUSTER_CONFIG.as_str(),
            SEED_SETTINGS.as_str(),
            SEED_TLS_DIR.as_str()
        ]
    );
    assert_eq!(
        debugfs(&img, seed, &format!("cat /{SEED_CLUSTER_CONFIG}")),
        cluster_config::DEFAULT_CLUSTER_TOML
    );
    assert_eq!(
        ls(&img, seed, &format!("/{SEED_TLS_DIR}")),
        ["server1", "server2"]
    );
    for node in ["server1", "server2"] {
        let dir = format!("/{SEED_TLS_DIR}/{node}");
        let mut expected = [CA_CERT, DB_CERT, DB_KEY, NODE_CERT, NODE_KEY].map(|f| f.as_str());
        expected.sort();
        assert_eq!(ls(&img, seed, &dir), expected);
        for key in [NODE_KEY, DB_KEY] {
            let stat = debugfs(&img, seed, &format!("stat {dir}/{key}"));
            assert!(stat.contains("Mode:  0600"), "{dir}/{key}: {stat}");
        }
        let pem = debugfs(&img, seed, &format!("cat {dir}/{NODE_CERT}"));
        let info = cluster_config::settings::certificate_info(&pem).unwrap();
        assert!(info.names.contains(&node.to_string()), "{:?}", info.names);
    }
    // The build says where the password is, never the password.
    assert!(stderr.contains("generic: ESP"), "{stderr}");
    assert!(
        stderr.contains("setup wizard is at https://10.88.0.254:9443/setup"),
        "{stderr}"
    );
    let password_file =
        Credentials::admin_password_path(Path::new(manifest["ca_dir"].as_str().unwrap()));
    assert!(
        stderr.contains(&format!(
            "admin password of the node images is in {}",
            password_file.display()
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains(credentials.admin_password.expose()),
        "{stderr}"
    );
    assert!(
        !stderr.contains(credentials.metrics_token.expose()),
        "{stderr}"
    );
}

#[test]
fn wrong_seed_options_are_refused_before_anything_is_built() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let refused = |args: &[&str]| {
        let result = Command::new(BUILDER)
            .args(["build", "--out"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        assert!(!result.status.success(), "{args:?} was taken");
        assert!(!out.exists(), "{args:?}: the output directory was made");
        String::from_utf8_lossy(&result.stderr).into_owned()
    };
    for (address, why) in [
        ("10.88.0.11", "is node server1's address"),
        ("10.88.0.10", "is the floating IP"),
        ("10.88.0.255", "is the broadcast address of 10.88.0.0/24"),
        (
            "10.99.0.254",
            "is outside the cluster's subnet 10.88.0.0/24",
        ),
    ] {
        let stderr = refused(&["--generic", "--setup-address", address]);
        assert!(
            stderr.contains(&format!("generic image: setup_address: {address} {why}")),
            "{address}: {stderr}"
        );
    }
    let stderr = refused(&["--setup-address", "10.88.0.254"]);
    assert!(stderr.contains("--generic"), "{stderr}");
    let stderr = refused(&["--generic", "--setup-address", "10.88.0"]);
    assert!(stderr.contains("invalid value '10.88.0'"), "{stderr}");
    let stderr = refused(&["--tls-cert", "/etc/hostname"]);
    assert!(stderr.contains("--tls-key"), "{stderr}");
    let stderr = refused(&["--root-only", "--generic"]);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let not_pem = tmp.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let stderr = refused(&[
        "--tls-cert",
        not_pem.to_str().unwrap(),
        "--tls-key",
        not_pem.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains(&format!("{}: not PEM", not_pem.display())),
        "{stderr}"
    );
}

/// Free bytes on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks_available() as u64 * st.fragment_size() as u64
}

/// The build in `out` is exactly the one `manifest` describes: the same manifest.json, every
/// artifact of its size and sha256, and nothing else beside it but `also`.
fn assert_intact(out: &Path, manifest: &str, also: &[&str]) {
    assert_eq!(
        std::fs::read_to_string(out.join("manifest.json")).unwrap(),
        manifest,
        "manifest.json changed"
    );
    let m: serde_json::Value = serde_json::from_str(manifest).unwrap();
    let mut names = vec!["manifest.json".to_string()];
    for a in m["artifacts"].as_array().unwrap() {
        let file = a["file"].as_str().unwrap();
        let path = out.join(file);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            a["size"].as_u64().unwrap(),
            "{file}"
        );
        assert_eq!(
            image_builder::sha256_file(&path).unwrap(),
            a["sha256"].as_str().unwrap(),
            "{file} is not the file its manifest describes"
        );
        names.push(file.to_string());
    }
    names.extend(also.iter().map(|s| s.to_string()));
    names.sort();
    let mut found: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    found.sort();
    assert_eq!(found, names);
}

/// Unmounts the test's small filesystem however the test ends.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A rebuild killed half way, and one that fills the disk, leave the last good build as it was
/// (nothing half-written beside its manifest), and the full disk's partial images are gone; a
/// later build replaces it whole, old artifacts it does not make included.
#[test]
fn a_killed_or_full_disk_rebuild_leaves_the_last_build_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let appliance = stand_in_appliance(tmp.path());
    // A disk that holds one build and the work of the next, not two whole builds.
    let disk = tmp.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2000m", "tandem-test"])
        .arg(&disk));
    let _unmount = Unmount(disk.clone());
    let out = disk.join("out");

    build(&out, &appliance);
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    let free_after_first = free_bytes(&disk);

    // Killed once its new root.ext4 is made, while it makes the first node's disk.
    let mut child = build_command(&out, &appliance, &["--version", "0.9.0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("server1: ESP") {
            child.kill().unwrap();
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the build ended before the kill:\n{seen}"
    );
    assert!(
        seen.lines()
            .any(|l| l.contains("] root.ext4 (") && l.contains(": done in")),
        "the kill came before the new root.ext4 was made:\n{seen}"
    );
    assert_intact(&out, &manifest, &[".work"]);

    // The next build clears the killed one's work, then runs out of space: it says so, naming
    // the file, and takes its partial images with it.
    let result = build_command(&out, &appliance, &["--version", "0.9.0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "two builds fit:\n{stderr}");
    assert!(
        stderr.contains("No space left on device") && stderr.contains(&*disk.to_string_lossy()),
        "{stderr}"
    );
    assert_intact(&out, &manifest, &[]);
    assert!(
        free_bytes(&disk) >= free_after_first - (1 << 20),
        "the failed build left {} bytes behind",
        free_after_first - free_bytes(&disk)
    );

    // A root-only build replaces the whole build: the node disks it does not make go too.
    let (root_only, _) = build_with(&out, &appliance, &["--root-only", "--version", "0.9.0"]);
    assert_eq!(root_only["root_only"], true);
    assert_intact(
        &out,
        &std::fs::read_to_string(out.join("manifest.json")).unwrap(),
        &[],
    );
    assert_eq!(kinds(&root_only), ["root-ext4"]);
}
