//! Installs into a slot that is a temporary file, an ESP that is a temporary directory and EFI
//! variables in another: the good case, then every rejection with what it must leave alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::boot::{
    entry_file_name, loader_conf, loader_entry, EfiVars, Esp, Slot, LOADER_CONF,
    LOADER_ENTRY_ONESHOT,
};
use crate::install::{install, Installed, Phase, Progress, Target};
use crate::tests::{build, data, key, member, policy, trusted, Spec, MIB};
use crate::{Compression, Error, PayloadName, Policy, Version, MANIFEST_MEMBER};

const DEVICE_SIZE: usize = 6 * MIB;
const OLD_KERNEL_B: &[u8] = b"old kernel of slot b";
const OLD_INITRD_B: &[u8] = b"old initrd of slot b";

/// The new version's payloads: a stored rootfs of 3.5 chunks (so a flipped byte is a chunk
/// mismatch, not a zstd error), a compressed kernel of two chunks, a stored initrd.
fn spec() -> Spec {
    Spec {
        version: "1.2.0",
        payloads: vec![
            (PayloadName::Rootfs, Compression::None, data(7 * MIB / 2, 1)),
            (PayloadName::Kernel, Compression::Zstd, data(MIB + 300, 2)),
            (PayloadName::Initrd, Compression::None, data(300_000, 3)),
        ],
    }
}

fn payload(name: PayloadName) -> &'static [u8] {
    static PAYLOADS: OnceLock<Spec> = OnceLock::new();
    let spec = PAYLOADS.get_or_init(spec);
    &spec.payloads.iter().find(|p| p.0 == name).unwrap().2
}

/// The good bundle, signed with key 1.
fn good() -> &'static [u8] {
    static GOOD: OnceLock<Vec<u8>> = OnceLock::new();
    GOOD.get_or_init(|| build(&spec(), &key(1)))
}

/// A node running slot a (1.0.0, the default), with slot b's old kernel and initrd on the ESP.
struct Node {
    _dir: tempfile::TempDir,
    device: PathBuf,
    old_device: Vec<u8>,
    esp: Esp,
    vars: EfiVars,
    vars_dir: PathBuf,
}

fn node_with(device_size: usize, extra_files: &[(&str, &[u8])]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("root-b.img");
    let old_device = data(device_size, 9);
    fs::write(&device, &old_device).unwrap();
    let esp_dir = dir.path().join("esp");
    let files: Vec<(String, Vec<u8>)> = [
        (LOADER_CONF.to_string(), loader_conf(Slot::A).into_bytes()),
        (
            format!("loader/entries/{}", entry_file_name(Slot::A, None)),
            loader_entry(Slot::A, "1.0.0", "").into_bytes(),
        ),
        ("tandem/a/vmlinuz".into(), b"kernel of slot a".to_vec()),
        ("tandem/a/initrd.img".into(), b"initrd of slot a".to_vec()),
        ("tandem/b/vmlinuz".into(), OLD_KERNEL_B.to_vec()),
        ("tandem/b/initrd.img".into(), OLD_INITRD_B.to_vec()),
    ]
    .into_iter()
    .chain(extra_files.iter().map(|(n, b)| (n.to_string(), b.to_vec())))
    .collect();
    for (name, bytes) in files {
        let p = esp_dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
    let vars_dir = dir.path().join("efivars");
    fs::create_dir(&vars_dir).unwrap();
    Node {
        device,
        old_device,
        esp: Esp::new(esp_dir),
        vars: EfiVars::new(&vars_dir),
        vars_dir,
        _dir: dir,
    }
}

fn node() -> Node {
    node_with(DEVICE_SIZE, &[])
}

fn run(
    node: &Node,
    bytes: &[u8],
    policy: &Policy<'_>,
) -> (Result<Installed, Error>, Vec<Progress>) {
    let target = Target {
        slot: Slot::B,
        device: node.device.clone(),
        esp: &node.esp,
        efivars: Some(&node.vars),
        extra_options: "quiet".into(),
    };
    let mut seen = Vec::new();
    let result = install(bytes, policy, &target, &mut |p| seen.push(*p));
    (result, seen)
}

fn esp_file(node: &Node, name: &str) -> Vec<u8> {
    fs::read(node.esp.root().join(name)).unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// What every rejection leaves: the first MiB, no entry for slot b, its old files, slot a's
/// entry, loader.conf, no one-shot variable.
fn assert_untouched(node: &Node, what: &str) {
    let device = fs::read(&node.device).unwrap();
    assert_eq!(device.len(), node.old_device.len(), "{what}: device size");
    assert!(
        device[..MIB] == node.old_device[..MIB],
        "{what}: the slot's first MiB changed"
    );
    assert_eq!(
        node.esp.entry(Slot::B).unwrap(),
        None,
        "{what}: entry for b"
    );
    assert_eq!(
        names(&node.esp.root().join("loader/entries")),
        ["appliance-a.conf"],
        "{what}: entries"
    );
    assert_eq!(esp_file(node, "tandem/b/vmlinuz"), OLD_KERNEL_B, "{what}");
    assert_eq!(
        esp_file(node, "tandem/b/initrd.img"),
        OLD_INITRD_B,
        "{what}"
    );
    assert_eq!(
        names(&node.esp.root().join("tandem/b")),
        ["initrd.img", "vmlinuz"]
    );
    assert_eq!(esp_file(node, LOADER_CONF), loader_conf(Slot::A).as_bytes());
    assert_eq!(node.vars.get(LOADER_ENTRY_ONESHOT).unwrap(), None, "{what}");
    assert!(names(&node.vars_dir).is_empty(), "{what}: EFI variables");
}

#[test]
fn good_install_writes_the_slot_then_its_entry_then_the_oneshot() {
    let node = node();
    let k = key(1);
    let t = trusted(&k);
    let running = Version::parse("1.0.0").unwrap();
    let (result, seen) = run(&node, good(), &policy(&t, Some(&running), false));
    let installed = result.unwrap();
    let rootfs = payload(PayloadName::Rootfs);
    let total = (rootfs.len()
        + payload(PayloadName::Kernel).len()
        + payload(PayloadName::Initrd).len()) as u64;
    assert_eq!(installed.slot, Slot::B);
    assert_eq!(installed.entry, "appliance-b+3.conf");
    assert_eq!(installed.bytes, total);
    assert_eq!(installed.manifest.version, "1.2.0");

    // The rootfs, then the device's old bytes past it.
    let device = fs::read(&node.device).unwrap();
    assert!(
        device[..rootfs.len()] == *rootfs,
        "device differs from rootfs"
    );
    assert!(device[rootfs.len()..] == node.old_device[rootfs.len()..]);

    assert_eq!(
        esp_file(&node, "tandem/b/vmlinuz"),
        payload(PayloadName::Kernel)
    );
    assert_eq!(
        esp_file(&node, "tandem/b/initrd.img"),
        payload(PayloadName::Initrd)
    );
    assert_eq!(
        String::from_utf8(esp_file(&node, "loader/entries/appliance-b+3.conf")).unwrap(),
        "title Tandem appliance (slot b)\n\
         version 1.2.0\n\
         linux /tandem/b/vmlinuz\n\
         initrd /tandem/b/initrd.img\n\
         options root=PARTLABEL=root-b ro rootwait console=ttyS0,115200 panic=10 tandem.slot=b quiet\n"
    );
    assert_eq!(
        names(&node.esp.root().join("loader/entries")),
        ["appliance-a.conf", "appliance-b+3.conf"]
    );
    assert_eq!(
        names(&node.esp.root().join("tandem/b")),
        ["initrd.img", "vmlinuz"]
    );
    // The old slot stays the default.
    assert_eq!(
        esp_file(&node, LOADER_CONF),
        loader_conf(Slot::A).as_bytes()
    );
    // "appliance-b*" in UTF-16LE with its NUL, after the attributes.
    let mut oneshot = vec![0x07, 0, 0, 0];
    for c in b"appliance-b*" {
        oneshot.extend_from_slice(&[*c, 0]);
    }
    oneshot.extend_from_slice(&[0, 0]);
    assert_eq!(
        fs::read(
            node.vars_dir
                .join("LoaderEntryOneShot-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")
        )
        .unwrap(),
        oneshot
    );
    assert_eq!(names(&node.vars_dir).len(), 1);

    // Progress: from 0 to the total, never backwards, at least once per chunk (4 + 2 + 1).
    assert!(seen.iter().all(|p| p.total == total));
    assert_eq!(
        seen.first().map(|p| (p.phase, p.done)),
        Some((Phase::Payload(PayloadName::Rootfs), 0))
    );
    assert_eq!(
        seen.last().map(|p| (p.phase, p.done)),
        Some((Phase::Done, total))
    );
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
    let rootfs_reports = seen
        .iter()
        .filter(|p| p.phase == Phase::Payload(PayloadName::Rootfs) && p.done > 0)
        .count();
    assert!(rootfs_reports >= 4, "{rootfs_reports} rootfs reports");
    assert!(seen.len() >= 7 + 2, "{} reports", seen.len());
    assert_eq!(Phase::Payload(PayloadName::Kernel).to_string(), "kernel");

    // Once the new slot proved healthy: blessed, and the default.
    assert_eq!(
        node.esp.bless(Slot::B).unwrap().as_deref(),
        Some("appliance-b+3.conf")
    );
    assert_eq!(
        names(&node.esp.root().join("loader/entries")),
        ["appliance-a.conf", "appliance-b.conf"]
    );
    assert_eq!(
        String::from_utf8(esp_file(&node, LOADER_CONF)).unwrap(),
        "timeout 0\ndefault appliance-b*\neditor no\n"
    );
    // Slot b is now the fallback: installing over it again is refused, untouched.
    let before = fs::read(&node.device).unwrap();
    let (result, _) = run(&node, good(), &policy(&t, None, true));
    assert_eq!(
        result.unwrap_err().to_string(),
        "slot b holds the default boot entry (the fallback): installing over it would leave \
         no known-good entry; boot and bless the other slot first"
    );
    assert!(fs::read(&node.device).unwrap() == before);
    assert!(node.esp.entry(Slot::B).unwrap().is_some());
}

#[test]
fn without_efi_variables_no_oneshot_is_set() {
    let node = node();
    let k = key(1);
    let t = trusted(&k);
    let target = Target {
        slot: Slot::B,
        device: node.device.clone(),
        esp: &node.esp,
        efivars: None,
        extra_options: String::new(),
    };
    let installed = install(good(), &policy(&t, None, false), &target, &mut |_| {}).unwrap();
    assert_eq!(installed.entry, "appliance-b+3.conf");
    assert!(names(&node.vars_dir).is_empty());
    let entry = node.esp.entry(Slot::B).unwrap().unwrap();
    assert_eq!(entry.version.as_deref(), Some("1.2.0"));
}

fn flipped(at: usize) -> Vec<u8> {
    let mut bytes = good().to_vec();
    bytes[at] ^= 0x01;
    bytes
}

#[test]
fn every_rejection_leaves_the_slot_unbootable_and_its_first_mib_unchanged() {
    let k = key(1);
    let t = trusted(&k);
    let good = good();
    let (m_off, m_size) = member(good, MANIFEST_MEMBER);
    let (r_off, r_size) = member(good, "rootfs");
    let (k_off, k_size) = member(good, "kernel");
    let (i_off, i_size) = member(good, "initrd");
    let stranger = build(&spec(), &key(3));
    let newer = Version::parse("2.0").unwrap();
    let bad_list = ["1.2".to_string()];
    let base = policy(&t, None, false);
    let other_product = Policy {
        product: "other",
        ..base.clone()
    };
    let other_compatible = Policy {
        compatible: "tandem-aarch64-efi",
        ..base.clone()
    };
    let downgrade = policy(&t, Some(&newer), false);
    let known_bad = Policy {
        known_bad: &bad_list,
        ..base.clone()
    };
    let signature = "signature does not verify with any trusted key";
    let cases: Vec<(&str, Vec<u8>, &Policy<'_>, &str)> = vec![
        (
            "flipped byte in the manifest",
            flipped(m_off + m_size / 2),
            &base,
            signature,
        ),
        (
            "flipped first byte of the manifest",
            flipped(m_off),
            &base,
            signature,
        ),
        (
            "flipped byte in rootfs chunk 2",
            flipped(r_off + 2 * MIB + 100),
            &base,
            "payload rootfs chunk 2: sha256 mismatch",
        ),
        (
            "flipped byte in rootfs chunk 0",
            flipped(r_off + 5),
            &base,
            "payload rootfs chunk 0: sha256 mismatch",
        ),
        (
            "flipped byte in the initrd",
            flipped(i_off + i_size / 2),
            &base,
            "payload initrd chunk 0: sha256 mismatch",
        ),
        ("unknown key", stranger, &base, signature),
        (
            "truncated in the manifest",
            good[..m_off + 10].to_vec(),
            &base,
            "bundle truncated in manifest.json",
        ),
        (
            "truncated in the rootfs",
            good[..r_off + r_size / 2].to_vec(),
            &base,
            "bundle truncated in payload rootfs",
        ),
        (
            "truncated at the end of the rootfs",
            good[..r_off + r_size - 1].to_vec(),
            &base,
            "bundle truncated in payload rootfs",
        ),
        (
            "truncated in the kernel",
            good[..k_off + k_size / 2].to_vec(),
            &base,
            "bundle truncated in payload kernel",
        ),
        (
            "truncated in the initrd",
            good[..i_off + i_size - 1].to_vec(),
            &base,
            "bundle truncated in payload initrd",
        ),
        (
            "another product",
            good.to_vec(),
            &other_product,
            "bundle is for product tandem, this is other",
        ),
        (
            "another compatible string",
            good.to_vec(),
            &other_compatible,
            "bundle is for tandem-x86_64-efi, this system is tandem-aarch64-efi",
        ),
        (
            "a downgrade",
            good.to_vec(),
            &downgrade,
            "version 1.2.0 is not newer than the running 2.0 (use --force)",
        ),
        (
            "a known-bad version",
            good.to_vec(),
            &known_bad,
            "version 1.2.0 failed on this node before (it did not become healthy): use \
             --force to install it again",
        ),
    ];
    for (what, bytes, policy, message) in cases {
        let node = node();
        let (result, _) = run(&node, &bytes, policy);
        match result {
            Ok(_) => panic!("{what}: installed"),
            Err(e) => assert_eq!(e.to_string(), message, "{what}"),
        }
        assert_untouched(&node, what);
        if what == "flipped byte in rootfs chunk 2" {
            // Chunk 1 verified and was written; not a byte of chunk 2.
            let device = fs::read(&node.device).unwrap();
            let rootfs = payload(PayloadName::Rootfs);
            assert!(device[MIB..2 * MIB] == rootfs[MIB..2 * MIB]);
            assert!(device[2 * MIB..] == node.old_device[2 * MIB..]);
        }
    }
}

#[test]
fn force_installs_a_known_bad_version_and_a_downgrade() {
    let k = key(1);
    let t = trusted(&k);
    let bad_list = ["1.2.0".to_string()];
    let newer = Version::parse("3").unwrap();
    let forced = Policy {
        known_bad: &bad_list,
        ..policy(&t, Some(&newer), true)
    };
    let node = node();
    run(&node, good(), &forced).0.unwrap();
    assert!(node.esp.entry(Slot::B).unwrap().is_some());
}

#[test]
fn an_old_entry_of_the_target_slot_goes_once_the_signature_checked() {
    let k = key(1);
    let t = trusted(&k);
    let old_entry = loader_entry(Slot::B, "1.1.0", "");
    let files: [(&str, &[u8]); 1] = [("loader/entries/appliance-b+0-3.conf", old_entry.as_bytes())];
    let (m_off, _) = member(good(), MANIFEST_MEMBER);
    let (r_off, _) = member(good(), "rootfs");

    // A bad signature: nothing touched, not even the old entry.
    let node = node_with(DEVICE_SIZE, &files);
    let (result, _) = run(&node, &flipped(m_off + 3), &policy(&t, None, false));
    assert!(matches!(result, Err(Error::BadSignature)));
    assert_eq!(
        esp_file(&node, "loader/entries/appliance-b+0-3.conf"),
        old_entry.as_bytes()
    );

    // A good signature over a damaged payload: the old entry is gone (intended: the slot's
    // contents were about to be replaced), and nothing else was made.
    let node = node_with(DEVICE_SIZE, &files);
    let (result, _) = run(
        &node,
        &flipped(r_off + 3 * MIB + 7),
        &policy(&t, None, false),
    );
    assert_eq!(
        result.unwrap_err().to_string(),
        "payload rootfs chunk 3: sha256 mismatch"
    );
    assert_untouched(&node, "old entry, damaged payload");
}

#[test]
fn a_rootfs_bigger_than_the_device_is_refused_before_anything_is_touched() {
    let k = key(1);
    let t = trusted(&k);
    let old_entry = loader_entry(Slot::B, "1.1.0", "");
    let files: [(&str, &[u8]); 1] = [("loader/entries/appliance-b.conf", old_entry.as_bytes())];
    let node = node_with(3 * MIB, &files);
    let (result, seen) = run(&node, good(), &policy(&t, None, false));
    assert_eq!(
        result.unwrap_err().to_string(),
        format!(
            "payload rootfs is {} bytes, more than the {} bytes of {}",
            7 * MIB / 2,
            3 * MIB,
            node.device.display()
        )
    );
    assert!(seen.is_empty());
    assert!(fs::read(&node.device).unwrap() == node.old_device);
    assert_eq!(
        esp_file(&node, "loader/entries/appliance-b.conf"),
        old_entry.as_bytes()
    );
    assert_eq!(esp_file(&node, "tandem/b/vmlinuz"), OLD_KERNEL_B);
}

#[test]
fn a_missing_device_is_named() {
    let k = key(1);
    let t = trusted(&k);
    let mut node = node();
    node.device = node.device.with_file_name("nowhere");
    let (result, _) = run(&node, good(), &policy(&t, None, false));
    let e = result.unwrap_err().to_string();
    assert!(
        e.starts_with("slot b device ") && e.contains("nowhere"),
        "{e}"
    );
    assert!(node.esp.entry(Slot::B).unwrap().is_none());
}

#[test]
fn extra_options_that_would_break_the_entry_are_refused_before_anything_is_touched() {
    let k = key(1);
    let t = trusted(&k);
    let node = node();
    let target = Target {
        slot: Slot::B,
        device: node.device.clone(),
        esp: &node.esp,
        efivars: Some(&node.vars),
        extra_options: "quiet\ninitrd /x".into(),
    };
    let e = install(good(), &policy(&t, None, false), &target, &mut |_| {}).unwrap_err();
    assert!(e.to_string().starts_with("extra kernel options"), "{e}");
    assert_untouched(&node, "extra options");
}

#[test]
fn a_bundle_without_a_kernel_is_refused_before_anything_is_touched() {
    let k = key(1);
    let t = trusted(&k);
    let mut partial = spec();
    partial.payloads.retain(|p| p.0 != PayloadName::Kernel);
    let bytes = build(&partial, &k);
    let node = node();
    let (result, seen) = run(&node, &bytes, &policy(&t, None, false));
    assert_eq!(
        result.unwrap_err().to_string(),
        "manifest: no kernel payload: an install needs rootfs, kernel and initrd"
    );
    assert!(seen.is_empty());
    assert_untouched(&node, "no kernel");
}
