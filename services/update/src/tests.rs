//! The bundle format end to end: packed in memory, damaged on purpose, read back.

use std::io::Read;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::*;

pub(crate) const MIB: usize = 1 << 20;

pub(crate) fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Compressible but not trivial: text-like lines with a counter.
pub(crate) fn data(len: usize, salt: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("{salt} line {i} {}\n", i.wrapping_mul(2654435761) % 9973).as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

pub(crate) struct Spec {
    pub(crate) version: &'static str,
    pub(crate) payloads: Vec<(PayloadName, Compression, Vec<u8>)>,
}

fn standard() -> Spec {
    Spec {
        version: "1.2.0",
        payloads: vec![
            // 2.5 chunks, compressed.
            (PayloadName::Rootfs, Compression::Zstd, data(5 * MIB / 2, 1)),
            // Exactly two chunks, stored.
            (PayloadName::Kernel, Compression::None, data(2 * MIB, 2)),
            // Empty: no chunk at all.
            (PayloadName::Initrd, Compression::Zstd, Vec::new()),
        ],
    }
}

pub(crate) fn build(spec: &Spec, key: &SigningKey) -> Vec<u8> {
    let mut readers: Vec<&[u8]> = spec.payloads.iter().map(|p| &p.2[..]).collect();
    let inputs = spec
        .payloads
        .iter()
        .zip(readers.iter_mut())
        .map(|(p, r)| PayloadInput {
            name: p.0,
            compression: p.1,
            reader: r,
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let mut last = 0;
    pack(
        &mut out,
        key,
        &PackMeta {
            version: spec.version.into(),
            build_time: 1_704_067_200,
        },
        inputs,
        tmp.path(),
        &mut |n| last = n,
    )
    .unwrap();
    let total: usize = spec.payloads.iter().map(|p| p.2.len()).sum();
    assert_eq!(last, total as u64, "progress reports every byte");
    out
}

pub(crate) fn policy<'k>(
    trusted: &'k [VerifyingKey],
    running: Option<&'k Version>,
    force: bool,
) -> Policy<'k> {
    Policy {
        trusted,
        product: PRODUCT,
        compatible: COMPATIBLE,
        running,
        known_bad: &[],
        force,
    }
}

type Payloads = Vec<(PayloadName, Vec<u8>)>;

/// Reads a bundle the way an installer does; on error, also what was handed out before it.
fn read(bytes: &[u8], policy: &Policy<'_>) -> Result<(Manifest, Payloads), (Error, Payloads)> {
    let mut got = Vec::new();
    let mut source = Source::new(bytes);
    let mut bundle = Bundle::open(&mut source, policy).map_err(|e| (e, Vec::new()))?;
    loop {
        let next = bundle.next_payload();
        let mut payload = match next {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => return Err((e, got)),
        };
        let name = payload.info().name;
        let mut buf = Vec::new();
        // Small reads, as a writer into a slot would do, so a failing chunk is seen mid-way.
        let mut block = [0u8; 64 * 1024];
        let result = loop {
            match payload.read(&mut block) {
                Ok(0) => break Ok(()),
                Ok(n) => buf.extend_from_slice(&block[..n]),
                Err(e) => break Err(Error::from_io("reading", e)),
            }
        };
        got.push((name, buf));
        if let Err(e) = result {
            return Err((e, got));
        }
    }
    match bundle.finish() {
        Ok(m) => Ok((m, got)),
        Err(e) => Err((e, got)),
    }
}

pub(crate) fn trusted(k: &SigningKey) -> Vec<VerifyingKey> {
    vec![k.verifying_key()]
}

/// (data offset, size) of each tar member, in order.
pub(crate) fn members(bytes: &[u8]) -> Vec<(String, u64, u64)> {
    let mut archive = tar::Archive::new(bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().display().to_string(),
                e.raw_file_position(),
                e.header().size().unwrap(),
            )
        })
        .collect()
}

pub(crate) fn member(bytes: &[u8], name: &str) -> (usize, usize) {
    let m = members(bytes);
    let (_, off, size) = m.iter().find(|m| m.0 == name).unwrap();
    (*off as usize, *size as usize)
}

fn expect_err(bytes: &[u8], policy: &Policy<'_>, message: &str) -> (Error, Payloads) {
    match read(bytes, policy) {
        Ok(_) => panic!("accepted, expected: {message}"),
        Err((e, got)) => {
            assert_eq!(e.to_string(), message);
            (e, got)
        }
    }
}

#[test]
fn good_bundle_round_trips() {
    let k = key(1);
    let spec = standard();
    let bytes = build(&spec, &k);
    let names: Vec<String> = members(&bytes).into_iter().map(|m| m.0).collect();
    assert_eq!(
        names,
        [
            "manifest.json",
            "manifest.sig",
            "rootfs",
            "kernel",
            "initrd"
        ]
    );
    let (manifest, got) = read(&bytes, &policy(&trusted(&k), None, false)).unwrap();
    assert_eq!(manifest.version, "1.2.0");
    assert_eq!(manifest.product, "tandem");
    assert_eq!(manifest.compatible, "tandem-x86_64-efi");
    assert_eq!(manifest.payloads[0].chunks.len(), 3);
    assert_eq!(manifest.payloads[1].chunks.len(), 2);
    assert_eq!(manifest.payloads[2].chunks.len(), 0);
    assert_eq!(got.len(), 3);
    for ((name, _, want), (got_name, got)) in spec.payloads.iter().zip(&got) {
        assert_eq!(name, got_name);
        assert!(want == got, "payload {name} differs");
    }
    // Compression did something for the rootfs.
    let (_, stored) = member(&bytes, "rootfs");
    assert!(
        stored < spec.payloads[0].2.len() / 2,
        "rootfs stored as {stored} bytes"
    );
}

#[test]
fn flipped_byte_in_a_stored_payload_is_caught_by_its_chunk_hash() {
    let k = key(1);
    let spec = standard();
    let mut bytes = build(&spec, &k);
    let (off, _) = member(&bytes, "kernel");
    bytes[off + MIB + 10] ^= 0x01;
    let (_, got) = expect_err(
        &bytes,
        &policy(&trusted(&k), None, false),
        "payload kernel chunk 1: sha256 mismatch",
    );
    // The rootfs came out whole; of the kernel, exactly the good chunk 0 and not a byte of 1.
    assert!(got[0].1 == spec.payloads[0].2);
    assert_eq!(got[1].1.len(), MIB);
    assert!(got[1].1 == spec.payloads[1].2[..MIB]);
}

#[test]
fn flipped_byte_in_compressed_data_never_yields_wrong_bytes() {
    let k = key(1);
    let spec = standard();
    let good = build(&spec, &k);
    let (off, size) = member(&good, "rootfs");
    for at in [0, 7, size / 3, size / 2, size - 5, size - 1] {
        let mut bytes = good.clone();
        bytes[off + at] ^= 0x40;
        let (e, got) = read(&bytes, &policy(&trusted(&k), None, false))
            .err()
            .unwrap_or_else(|| panic!("flip at {at} of {size} accepted"));
        assert!(
            matches!(
                e,
                Error::ChunkMismatch { .. } | Error::Corrupt { .. } | Error::PayloadSize { .. }
            ),
            "flip at {at}: {e}"
        );
        assert!(e.to_string().starts_with("payload rootfs"), "{e}");
        // Whatever was handed out is the true prefix, in whole chunks.
        let out = got.first().map(|g| &g.1[..]).unwrap_or(&[]);
        assert_eq!(out.len() % MIB, 0, "flip at {at}: partial chunk handed out");
        assert!(
            out == &spec.payloads[0].2[..out.len()],
            "flip at {at}: wrong bytes out"
        );
    }
}

#[test]
fn stored_chunk_mismatch_in_a_later_chunk_of_a_compressed_payload() {
    // A one-byte change the compressor cannot notice: build the bundle from other data but
    // keep the manifest of the original (re-signed), so only the chunk hash can tell.
    let k = key(1);
    let spec = standard();
    let mut other = standard();
    other.payloads[0].2[2 * MIB + 100] ^= 0x01;
    let good = build(&spec, &k);
    let bad = build(&other, &k);
    let (m_off, m_size) = member(&good, MANIFEST_MEMBER);
    let manifest = good[m_off..m_off + m_size].to_vec();
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, MANIFEST_MEMBER, &manifest);
    add(&mut b, SIGNATURE_MEMBER, &k.sign(&manifest).to_bytes());
    for name in ["rootfs", "kernel", "initrd"] {
        let (off, size) = member(&bad, name);
        add(&mut b, name, &bad[off..off + size]);
    }
    let bytes = b.into_inner().unwrap();
    let (_, got) = expect_err(
        &bytes,
        &policy(&trusted(&k), None, false),
        "payload rootfs chunk 2: sha256 mismatch",
    );
    assert_eq!(got[0].1.len(), 2 * MIB);
}

fn add(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, name, data).unwrap();
}

#[test]
fn flipped_byte_in_the_manifest_or_signature_fails_the_signature() {
    let k = key(1);
    let good = build(&standard(), &k);
    for member_name in [MANIFEST_MEMBER, SIGNATURE_MEMBER] {
        let (off, size) = member(&good, member_name);
        for at in [0, size / 2, size - 1] {
            let mut bytes = good.clone();
            bytes[off + at] ^= 0x01;
            let (_, got) = expect_err(
                &bytes,
                &policy(&trusted(&k), None, false),
                "signature does not verify with any trusted key",
            );
            assert!(got.is_empty());
        }
    }
}

#[test]
fn unknown_key_is_refused_and_a_second_trusted_key_verifies() {
    let (old, new, stranger) = (key(1), key(2), key(3));
    let ring = vec![old.verifying_key(), new.verifying_key()];
    for signer in [&old, &new] {
        let bytes = build(&standard(), signer);
        read(&bytes, &policy(&ring, None, false)).unwrap();
    }
    let bytes = build(&standard(), &stranger);
    expect_err(
        &bytes,
        &policy(&ring, None, false),
        "signature does not verify with any trusted key",
    );
    expect_err(
        &bytes,
        &policy(&[], None, false),
        "no trusted keys: the keyring is empty",
    );
}

#[test]
fn truncated_bundles_are_named_as_such() {
    let k = key(1);
    let good = build(&standard(), &k);
    let (m_off, m_size) = member(&good, MANIFEST_MEMBER);
    let (s_off, _) = member(&good, SIGNATURE_MEMBER);
    let (r_off, r_size) = member(&good, "rootfs");
    let (k_off, k_size) = member(&good, "kernel");
    let (i_off, _) = member(&good, "initrd");
    let cases = [
        (100, "bundle truncated in manifest.json"),
        (m_off + m_size / 2, "bundle truncated in manifest.json"),
        (s_off + 10, "bundle truncated in manifest.sig"),
        (r_off - 512, "bundle truncated in payload rootfs"),
        (r_off - 300, "bundle truncated in payload rootfs"),
        (r_off + 10, "bundle truncated in payload rootfs"),
        (r_off + r_size / 2, "bundle truncated in payload rootfs"),
        (r_off + r_size - 1, "bundle truncated in payload rootfs"),
        (k_off - 512, "bundle truncated in payload kernel"),
        (k_off + MIB, "bundle truncated in payload kernel"),
        (k_off + k_size - 1, "bundle truncated in payload kernel"),
        (i_off - 512, "bundle truncated in payload initrd"),
    ];
    for (cut, message) in cases {
        let r = read(&good[..cut], &policy(&trusted(&k), None, false));
        match r {
            Ok(_) => panic!("cut at {cut} accepted"),
            Err((e, _)) => assert_eq!(e.to_string(), message, "cut at {cut}"),
        }
    }
    // An empty stream, too.
    let r = read(&[], &policy(&trusted(&k), None, false));
    assert_eq!(
        r.err().unwrap().0.to_string(),
        "bundle truncated in manifest.json"
    );
}

#[test]
fn product_compatible_and_version_are_checked_after_the_signature() {
    let k = key(1);
    let t = trusted(&k);
    let bytes = build(&standard(), &k);
    let mut p = policy(&t, None, false);
    p.product = "other";
    expect_err(&bytes, &p, "bundle is for product tandem, this is other");
    let mut p = policy(&t, None, false);
    p.compatible = "tandem-aarch64-efi";
    expect_err(
        &bytes,
        &p,
        "bundle is for tandem-x86_64-efi, this system is tandem-aarch64-efi",
    );
    let check = |running: &str, force: bool, expected: Option<&str>| {
        let running = Version::parse(running).unwrap();
        let r = read(&bytes, &policy(&t, Some(&running), force));
        match expected {
            None => assert!(r.is_ok(), "running {running}, force {force}: {:?}", r.err()),
            Some(m) => assert_eq!(r.err().unwrap().0.to_string(), m),
        }
    };
    // The bundle is 1.2.0.
    check("1.1.9", false, None);
    check(
        "1.2",
        false,
        Some("version 1.2.0 is not newer than the running 1.2 (use --force)"),
    );
    check(
        "1.2.0",
        false,
        Some("version 1.2.0 is not newer than the running 1.2.0 (use --force)"),
    );
    check(
        "1.10.0",
        false,
        Some("version 1.2.0 is not newer than the running 1.10.0 (use --force)"),
    );
    check("1.2.0", true, None);
    check("1.10.0", true, None);
}

/// A bundle whose manifest is `manifest` (signed with `k`) and whose members follow as given.
fn crafted(k: &SigningKey, manifest: &[u8], members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, MANIFEST_MEMBER, manifest);
    add(&mut b, SIGNATURE_MEMBER, &k.sign(manifest).to_bytes());
    for (name, data) in members {
        add(&mut b, name, data);
    }
    b.into_inner().unwrap()
}

#[test]
fn unsupported_format_and_bad_manifests_are_named() {
    let k = key(1);
    let t = trusted(&k);
    let p = policy(&t, None, false);
    let m = br#"{"format":2,"product":"tandem","whatever":true}"#;
    expect_err(
        &crafted(&k, m, &[]),
        &p,
        "unsupported bundle format version 2 (this build reads version 1)",
    );
    let m = br#"{"format":1,"product":"tandem","compatible":"tandem-x86_64-efi","version":"1","build_time":0,"payloads":[],"extra":1}"#;
    let (e, _) = read(&crafted(&k, m, &[]), &p).err().unwrap();
    assert!(e.to_string().contains("unknown field `extra`"), "{e}");
    let m = br#"{"format":1,"product":"tandem","compatible":"tandem-x86_64-efi","version":"1","build_time":0,"payloads":[{"name":"kernel","size":3000000,"sha256":"00","compression":"none","chunk_size":1048576,"chunks":[]}]}"#;
    expect_err(
        &crafted(&k, m, &[]),
        &p,
        "manifest: payload kernel: 0 chunk hashes for 3000000 bytes in chunks of 1048576 (expected 3)",
    );
}

#[test]
fn members_out_of_order_or_unexpected_are_refused() {
    let k = key(1);
    let t = trusted(&k);
    let p = policy(&t, None, false);
    let good = build(&standard(), &k);
    let (m_off, m_size) = member(&good, MANIFEST_MEMBER);
    let manifest = &good[m_off..m_off + m_size];
    let body = |name: &str| {
        let (off, size) = member(&good, name);
        good[off..off + size].to_vec()
    };
    let (rootfs, kernel, initrd) = (body("rootfs"), body("kernel"), body("initrd"));

    // Signature first.
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, SIGNATURE_MEMBER, &k.sign(manifest).to_bytes());
    add(&mut b, MANIFEST_MEMBER, manifest);
    expect_err(
        &b.into_inner().unwrap(),
        &p,
        "bundle member 0: expected manifest.json, found manifest.sig",
    );
    // Payloads swapped.
    let bytes = crafted(&k, manifest, &[("kernel", &kernel), ("rootfs", &rootfs)]);
    expect_err(&bytes, &p, "bundle member 2: expected rootfs, found kernel");
    // Something after the last payload.
    let bytes = crafted(
        &k,
        manifest,
        &[
            ("rootfs", &rootfs),
            ("kernel", &kernel),
            ("initrd", &initrd),
            ("extra", b"x"),
        ],
    );
    expect_err(
        &bytes,
        &p,
        "bundle member 5: expected the end of the bundle, found extra",
    );
    // A payload missing from a well-ended archive.
    let bytes = crafted(&k, manifest, &[("rootfs", &rootfs), ("kernel", &kernel)]);
    expect_err(
        &bytes,
        &p,
        "bundle member 4: expected initrd, found the end of the archive",
    );
    // A stored payload longer than the manifest says.
    let mut longer = kernel.clone();
    longer.push(b'!');
    let bytes = crafted(
        &k,
        manifest,
        &[
            ("rootfs", &rootfs),
            ("kernel", &longer),
            ("initrd", &initrd),
        ],
    );
    expect_err(
        &bytes,
        &p,
        "payload kernel: 2097153 bytes, the manifest says 2097152",
    );
}

#[test]
fn a_payload_must_be_read_to_its_end_before_the_next() {
    let k = key(1);
    let bytes = build(&standard(), &k);
    let t = trusted(&k);
    let mut source = Source::new(&bytes[..]);
    let mut bundle = Bundle::open(&mut source, &policy(&t, None, false)).unwrap();
    assert_eq!(bundle.manifest().payloads.len(), 3);
    let mut first = bundle.next_payload().unwrap().unwrap();
    let mut some = [0u8; 10];
    first.read_exact(&mut some).unwrap();
    // Dropped half-read (the borrow checker keeps it from living past the next call).
    drop(first);
    let e = bundle.next_payload().err().unwrap();
    assert_eq!(
        e.to_string(),
        "payload rootfs was not read to its end before the next one was asked for"
    );
    let e = bundle.finish().err().unwrap();
    assert!(
        e.to_string().starts_with("payload rootfs was not read"),
        "{e}"
    );
}

mod damage {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// A small bundle (three payloads, one spanning two chunks) and its payloads.
    fn small() -> &'static (Vec<u8>, Vec<Vec<u8>>) {
        static SMALL: OnceLock<(Vec<u8>, Vec<Vec<u8>>)> = OnceLock::new();
        SMALL.get_or_init(|| {
            let spec = Spec {
                version: "2.0.0",
                payloads: vec![
                    (PayloadName::Rootfs, Compression::Zstd, data(MIB + 5000, 3)),
                    (PayloadName::Kernel, Compression::None, data(3000, 4)),
                    (PayloadName::Initrd, Compression::Zstd, data(2000, 5)),
                ],
            };
            let bytes = build(&spec, &key(1));
            (bytes, spec.payloads.into_iter().map(|p| p.2).collect())
        })
    }

    /// Whatever came out is a true prefix of the payloads; if the read succeeded, all of them.
    fn check_outcome(result: Result<(Manifest, Payloads), (Error, Payloads)>, what: &str) {
        let originals = &small().1;
        match result {
            Ok((_, got)) => {
                assert_eq!(
                    got.len(),
                    originals.len(),
                    "{what}: accepted with payloads missing"
                );
                for (g, o) in got.iter().zip(originals) {
                    assert!(g.1 == *o, "{what}: accepted with payload {} changed", g.0);
                }
            }
            Err((_, got)) => {
                for (g, o) in got.iter().zip(originals) {
                    assert!(
                        o.starts_with(&g.1),
                        "{what}: bytes of payload {} handed out that are not the original's",
                        g.0
                    );
                }
            }
        }
    }

    proptest! {

        #[test]
        fn any_flipped_byte_is_refused_or_harmless(at in 0usize..usize::MAX, bit in 0u8..8) {
            let (good, _) = small();
            let k = key(1);
            let t = trusted(&k);
            let at = at % good.len();
            let mut bytes = good.clone();
            bytes[at] ^= 1 << bit;
            check_outcome(read(&bytes, &policy(&t, None, false)), &format!("flip at {at}"));
        }

        #[test]
        fn any_truncation_is_refused_or_harmless(cut in 0usize..usize::MAX) {
            let (good, _) = small();
            let k = key(1);
            let t = trusted(&k);
            let cut = cut % good.len();
            check_outcome(read(&good[..cut], &policy(&t, None, false)), &format!("cut at {cut}"));
        }

        #[test]
        fn manifest_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Manifest::parse(&bytes);
        }
    }
}
