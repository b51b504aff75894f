//! Runs the real builder against the built-in default cluster, twice, and inspects the result
//! with the same tools an operator would use: sfdisk, mtools, debugfs, qemu-img, openssl.
//!
//! Needs root (or an already cached base) and the host tools; as root the builder installs
//! missing ones. It fails, never skips, when something is missing.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

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
    let result = Command::new(BUILDER)
        .args(["build", "--out"])
        .arg(out)
        .arg("--appliance-bin")
        .arg(appliance)
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
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

fn artifact<'a>(manifest: &'a serde_json::Value, file: &str) -> &'a serde_json::Value {
    manifest["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .find(|a| a["file"] == file)
        .unwrap_or_else(|| panic!("{file} missing from the manifest: {manifest:#}"))
}

struct Partition {
    name: String,
    offset: u64,
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

#[test]
fn builds_bootable_reproducible_images_for_the_default_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    // Any executable stands in for the appliance here; the lead's test script uses the real one.
    let appliance: PathBuf = tmp.path().join("appliance");
    std::fs::copy("/bin/true", &appliance).unwrap();

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
    assert!(loader.contains("default appliance-*"), "{loader}");
    let boot = run(Command::new("mdir")
        .args(["-b", "-i", &esp, "::/EFI/BOOT", "::/tandem/a"])
        .env("MTOOLS_SKIP_CHECK", "1"));
    for f in ["BOOTX64.EFI", "vmlinuz", "initrd.img"] {
        assert!(boot.contains(f), "{f} missing from the ESP: {boot}");
    }

    // Seed: node name, the exact config, a certificate from the cluster CA, a private key.
    for node in ["server1", "server2"] {
        let img = out1.join(format!("{node}.img"));
        let seed = partitions(&img)
            .into_iter()
            .find(|p| p.name == "seed")
            .unwrap()
            .offset;
        assert_eq!(debugfs(&img, seed, "cat /node"), format!("{node}\n"));
        assert_eq!(
            debugfs(&img, seed, "cat /cluster.toml"),
            cluster_config::DEFAULT_CLUSTER_TOML
        );
        for key in ["node.key", "db.key"] {
            let stat = debugfs(&img, seed, &format!("stat /tls/{key}"));
            assert!(stat.contains("Mode:  0600"), "{key} must be 0600: {stat}");
        }
        let dir = tmp.path().join(format!("tls-{node}"));
        std::fs::create_dir(&dir).unwrap();
        for f in ["ca.crt", "node.crt", "db.crt"] {
            std::fs::write(dir.join(f), debugfs(&img, seed, &format!("cat /tls/{f}"))).unwrap();
        }
        // MariaDB's certificate serves only: its key (copied for `mysql`) is no client identity.
        let usage = run(Command::new("openssl")
            .args(["x509", "-noout", "-ext", "extendedKeyUsage", "-in"])
            .arg(dir.join("db.crt")));
        assert!(
            usage.contains("TLS Web Server Authentication")
                && !usage.contains("Client Authentication"),
            "{usage}"
        );
        let verify = run(Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.join("ca.crt"))
            .arg(dir.join("node.crt")));
        assert!(verify.contains(": OK"), "{verify}");
        let text = run(Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(dir.join("node.crt")));
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

    // Root filesystem: init is the appliance.
    let root = out1.join("root.ext4");
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

    // Same inputs, same root image: byte for byte.
    let out2 = tmp.path().join("out2");
    let manifest2 = build(&out2, &appliance);
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
