//! Signed updates on a booted two-node cluster, in the order a user meets them: bundles that
//! must be refused (nothing written to the inactive slot), power cuts in the middle of writing
//! one (the node always boots its old slot, and installs afterwards), a rolling upgrade of the
//! cluster under a client loop on the floating IP, the old slot booted once by hand, and a
//! version that boots but never becomes healthy (rolled back by itself, remembered, refused).
//!
//! The bundles come from `scripts/build-test-bundles` (`target/images/bundles/`): `v2.bundle`
//! is the images' tree as version 0.2.0, `v3-bad.bundle` is 0.3.0 with an nginx that never
//! listens. The refused ones are made here from them and from the build's signing key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qemu::{Cluster, ProbeOptions};
use serde_json::Value;

use crate::support::*;

/// One install under TCG: a 620 MiB root filesystem decompressed, hashed and written.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// The trial a healthy new slot gets in these tests, counted from its boot (the default is
/// 300 s): room for a boot under TCG on a loaded CI machine.
const TRIAL_SECS: u64 = 240;
/// The trial of the version that never becomes healthy: it runs out.
const BAD_TRIAL_SECS: u64 = 120;
/// From the upload of a bundle with `reboot=1` to the node blessed on the new slot.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(900);
/// The bundle's `format` the fakes claim (the real one, so only what each fake breaks counts).
const FORMAT: u64 = 1;

fn err(what: impl Into<String>) -> qemu::Error {
    qemu::Error::Http(what.into())
}

fn bundles() -> PathBuf {
    let dir = images(&cluster_config()).join("bundles");
    for b in ["v2.bundle", "v3-bad.bundle"] {
        assert!(
            dir.join(b).is_file(),
            "the update tests need {}: build it with `scripts/build-test-bundles`",
            dir.join(b).display()
        );
    }
    dir
}

fn admin(config: &cluster_config::Cluster, node: &str, path: &str) -> String {
    let n = config.node(node).expect("node of the default cluster");
    format!("https://{}:{}{path}", n.address, config.ports.admin)
}

/// The node's `update` status from `/api/status` (logged in).
fn update_status(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
) -> qemu::Result<Value> {
    let v = Admin::of(cluster, config, node)?.get_json("/api/status")?;
    Ok(v["update"].clone())
}

/// Waits until the node's update status satisfies `ok`; returns it.
pub(crate) fn wait_update(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> qemu::Result<Value> {
    wait_update_every(
        cluster,
        config,
        node,
        what,
        timeout,
        Duration::from_secs(2),
        ok,
    )
}

/// [`wait_update`], asking every `interval`.
fn wait_update_every(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    what: &str,
    timeout: Duration,
    interval: Duration,
    ok: impl Fn(&Value) -> bool,
) -> qemu::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match update_status(cluster, config, node) {
            Ok(v) if ok(&v) => return Ok(v),
            Ok(v) => v.to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(err(format!(
                "{node}: {what} not within {timeout:?}; last: {last}"
            )));
        }
        std::thread::sleep(interval);
    }
}

/// Where in an install the power is cut: fractions (below 1) of the bundle's payload bytes
/// verified (the root filesystem is the first ~97 %, then kernel and initrd), from
/// `TANDEM_POWER_CUTS` (comma-separated) or three by default.
fn power_cuts() -> Vec<f64> {
    match std::env::var("TANDEM_POWER_CUTS") {
        Ok(list) => list
            .split(',')
            .map(|f| {
                let f: f64 = f
                    .trim()
                    .parse()
                    .expect("TANDEM_POWER_CUTS: numbers such as 0.1,0.5");
                assert!(
                    (0.0..1.0).contains(&f),
                    "TANDEM_POWER_CUTS: {f} is not below 1"
                );
                f
            })
            .collect(),
        Err(_) => vec![0.15, 0.5, 0.9],
    }
}

pub(crate) fn running(v: &Value, version: &str, slot: &str) -> bool {
    v["version"] == version && v["booted_slot"] == slot && v["boot"]["state"] == "blessed"
}

/// `curl -T FILE -X POST` to the admin port from the client, logged in (`auth`:
/// [`Admin::curl_auth`]): (HTTP status, body).
fn upload_argv(
    config: &cluster_config::Cluster,
    node: &str,
    file: &Path,
    query: &str,
    auth: &[String],
) -> Vec<String> {
    [
        "curl",
        "-sSk",
        "--max-time",
        "900",
        "-X",
        "POST",
        "-H",
        "Expect:",
        "-H",
        "Content-Type: application/octet-stream",
    ]
    .iter()
    .map(|s| s.to_string())
    // The session and CSRF options go before `-T`, whose argument is the file.
    .chain(auth.iter().cloned())
    .chain([
        "-T".into(),
        file.display().to_string(),
        "-w".into(),
        "\n%{http_code}".into(),
        admin(config, node, &format!("/api/update/install?{query}")),
    ])
    .collect()
}

fn upload(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    file: &Path,
    query: &str,
) -> qemu::Result<(u16, String)> {
    let auth = Admin::of(cluster, config, node)?.curl_auth()?;
    let argv = upload_argv(config, node, file, query, &auth);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = cluster.run(&argv)?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let code: u16 = code.trim().parse().unwrap_or(0);
    Ok((code, body.to_string()))
}

/// An upload running in the background (for the power cuts).
fn upload_in_background(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    file: &Path,
) -> qemu::Result<Child> {
    let auth = Admin::of(cluster, config, node)?.curl_auth()?;
    let argv = upload_argv(config, node, file, "", &auth);
    Command::new("ip")
        .args(["netns", "exec", cluster.netns().name()])
        .args(&argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| err(format!("starting curl: {e}")))
}

/// The first MiB of `node`'s slot `label` as its disk holds it now.
fn slot_head(cluster: &Cluster, node: &str, label: &str) -> qemu::Result<Vec<u8>> {
    let image = images(&cluster_config()).join(format!("{node}.img"));
    let extent = image_builder::disk::partition_extent(&image, label)
        .map_err(|e| err(format!("{}: {e}", image.display())))?;
    cluster.vm(node)?.read_disk(extent.offset, 1 << 20)
}

/// A bundle of a manifest and its signature only: what the installer must refuse before it
/// reads a payload (an unknown key, another product, an older version).
fn fake_bundle(path: &Path, key: &ed25519_dalek::SigningKey, product: &str, version: &str) {
    use ed25519_dalek::Signer as _;
    let manifest = serde_json::json!({
        "format": FORMAT,
        "product": product,
        "compatible": update::COMPATIBLE,
        "version": version,
        "build_time": 1_704_067_200u64,
        "payloads": [],
    })
    .to_string();
    let signature = key.sign(manifest.as_bytes()).to_bytes();
    let file = std::fs::File::create(path).unwrap();
    let mut tar = tar::Builder::new(file);
    for (name, data) in [
        (update::MANIFEST_MEMBER, manifest.as_bytes()),
        (update::SIGNATURE_MEMBER, &signature[..]),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, data).unwrap();
    }
    tar.finish().unwrap();
}

/// `v2.bundle` with one byte flipped at `at`, or cut at `at` (`truncate`).
fn damaged(src: &Path, dst: &Path, at: u64, truncate: bool) {
    let mut bytes = std::fs::read(src).unwrap();
    if truncate {
        bytes.truncate(at as usize);
    } else {
        bytes[at as usize] ^= 0x40;
    }
    std::fs::write(dst, bytes).unwrap();
}

/// The key the images trust (the build's), from the build's manifest.
fn trusted_key() -> ed25519_dalek::SigningKey {
    let images = images(&cluster_config());
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(images.join("manifest.json")).unwrap())
            .unwrap();
    let dir = PathBuf::from(
        m["update_key_dir"]
            .as_str()
            .expect("update_key_dir in manifest.json"),
    );
    update::keys::read_private(&dir.join("bundle-signing.key")).unwrap()
}

#[test]
fn signed_updates_refuse_survive_power_cuts_roll_out_and_roll_back() {
    let _heavy = crate::support::heavy_scenario();
    let config = cluster_config();
    let bundles = bundles();
    let v2 = bundles.join("v2.bundle");
    let v3_bad = bundles.join("v3-bad.bundle");
    // A cluster upgrade keeps the bundle on the data partition: give it a real disk's room.
    let cluster = boot_cluster_with(1 << 30);
    let work = cluster.work_dir().to_path_buf();

    for node in ["server1", "server2"] {
        step(
            &cluster,
            &format!("{node} serves and runs 0.1.0 from slot a, blessed"),
            || {
                wait_page(&cluster, &config, node, None, BOOT_TIMEOUT)?;
                wait_update(
                    &cluster,
                    &config,
                    node,
                    "0.1.0 blessed on slot a",
                    SERIAL_TIMEOUT,
                    |v| running(v, "0.1.0", "a"),
                )
            },
        );
    }
    let empty_b = step(&cluster, "read server1's empty slot b", || {
        slot_head(&cluster, "server1", "root-b")
    });

    // --- Refused before any byte is written to the inactive slot.
    let v2_len = std::fs::metadata(&v2).unwrap().len();
    let refused: Vec<(&str, PathBuf, &str)> = {
        let flip_payload = work.join("flipped-payload.bundle");
        damaged(&v2, &flip_payload, v2_len / 2, false);
        let flip_manifest = work.join("flipped-manifest.bundle");
        // The manifest is the first member: its text starts after one 512-byte tar header.
        damaged(&v2, &flip_manifest, 512 + 40, false);
        let truncated = work.join("truncated.bundle");
        damaged(&v2, &truncated, v2_len * 2 / 3, true);
        let unknown = work.join("unknown-key.bundle");
        let stranger = update::keys::generate().unwrap();
        fake_bundle(&unknown, &stranger, update::PRODUCT, "9.0.0");
        let other_product = work.join("other-product.bundle");
        fake_bundle(&other_product, &trusted_key(), "toaster", "9.0.0");
        let downgrade = work.join("downgrade.bundle");
        fake_bundle(&downgrade, &trusted_key(), update::PRODUCT, "0.0.9");
        vec![
            (
                "a flipped byte in a payload",
                flip_payload,
                "payload rootfs",
            ),
            (
                "a flipped byte in the manifest",
                flip_manifest,
                "signature does not verify",
            ),
            (
                "a bundle signed by an unknown key",
                unknown,
                "signature does not verify",
            ),
            ("a truncated bundle", truncated, "truncated"),
            (
                "a bundle for another product",
                other_product,
                "product toaster",
            ),
            ("a downgrade", downgrade, "not newer than the running 0.1.0"),
        ]
    };
    for (what, file, message) in &refused {
        step(
            &cluster,
            &format!("server1 refuses {what}, slot b untouched"),
            || {
                let (code, body) = upload(&cluster, &config, "server1", file, "")?;
                if code != 422 || !body.contains(message) {
                    return Err(err(format!(
                        "answered {code} {body:?}, expected 422 naming {message:?}"
                    )));
                }
                eprintln!("    422 {}", body.trim());
                if slot_head(&cluster, "server1", "root-b")? != empty_b {
                    return Err(err("slot b's first MiB changed"));
                }
                let v = update_status(&cluster, &config, "server1")?;
                if !running(&v, "0.1.0", "a") || v["slots"][1]["state"] != "empty" {
                    return Err(err(format!("status after the refusal: {v}")));
                }
                Ok(())
            },
        );
    }

    // --- Power cut while the payloads are written, at three moments (more with
    // `TANDEM_POWER_CUTS`: `bench/update-power-cuts.sh`).
    let vm1 = cluster.vm("server1").unwrap();
    for fraction in power_cuts() {
        step(
            &cluster,
            &format!(
                "server1 killed at {:.0}% of writing a bundle boots 0.1.0 again",
                fraction * 100.0
            ),
            || {
                let mut curl = upload_in_background(&cluster, &config, "server1", &v2)?;
                let seen = wait_update_every(
                    &cluster,
                    &config,
                    "server1",
                    "the install under way",
                    INSTALL_TIMEOUT,
                    Duration::from_millis(200),
                    |v| {
                        let i = &v["install"];
                        let (done, total) = (
                            i["done"].as_f64().unwrap_or(0.0),
                            i["total"].as_f64().unwrap_or(0.0),
                        );
                        // Before the commit: the root filesystem, then kernel and initrd (held).
                        matches!(i["phase"].as_str(), Some("rootfs" | "kernel" | "initrd"))
                            && total > 0.0
                            && done / total >= fraction
                    },
                )?;
                eprintln!(
                    "    killing in phase {} at {}/{} bytes",
                    seen["install"]["phase"], seen["install"]["done"], seen["install"]["total"]
                );
                vm1.kill()?;
                let _ = curl.kill();
                let _ = curl.wait();
                vm1.start()?;
                wait_page(&cluster, &config, "server1", None, BOOT_TIMEOUT)?;
                let v = wait_update(
                    &cluster,
                    &config,
                    "server1",
                    "0.1.0 on slot a",
                    SERIAL_TIMEOUT,
                    |v| running(v, "0.1.0", "a"),
                )?;
                if v["slots"][1]["state"] != "empty" {
                    return Err(err(format!("slot b after the cut: {v}")));
                }
                if slot_head(&cluster, "server1", "root-b")? != empty_b {
                    return Err(err(
                        "slot b's first MiB was written before the bundle was whole",
                    ));
                }
                Ok(())
            },
        );
    }

    // --- Rolling upgrade of both nodes to 0.2.0 while a client keeps asking the floating IP.
    let note = format!("before the upgrade {}", qemu::unique_id());
    step(&cluster, "a note is written before the upgrade", || {
        crate::services::post_note(&cluster, &config, "server2", &note)
    });
    let boots_before: Vec<u64> = ["server1", "server2"]
        .iter()
        .map(|node| {
            step(
                &cluster,
                &format!("{node}'s boot count before the upgrade"),
                || wait_page(&cluster, &config, node, None, BOOT_TIMEOUT),
            )
        })
        .collect();
    let vip_url = format!(
        "https://{}:{}/node.html",
        config.floating_ip, config.ports.https
    );
    let probe = step(&cluster, "a client loop on the floating IP starts", || {
        // A patient client, as a browser is: a GET on a new connection every 100 ms, each
        // given 5 s (the failover tests' 1 s would count the emulator's stalls as failures).
        let mut options = ProbeOptions::new(vip_url.clone(), UPGRADE_TIMEOUT * 2);
        options.interval = Duration::from_millis(100);
        options.timeout = Duration::from_secs(5);
        cluster.start_probe(options)
    });
    let started = Instant::now();
    // The cluster upgrades itself once it has the bundle, rebooting each node in turn: that
    // load goes on between the steps that watch it, so the whole of it holds the host (no
    // other scenario's quiet step runs meanwhile).
    let upgrading = crate::support::hold_host(false);
    step(
        &cluster,
        "server2 takes the bundle for a cluster upgrade (202)",
        || {
            let auth = Admin::of(&cluster, &config, "server2")?.curl_auth()?;
            let mut argv = upload_argv(&config, "server2", &v2, "", &auth);
            let last = argv.len() - 1;
            argv[last] = admin(
                &config,
                "server2",
                &format!("/api/cluster/upgrade?trial_timeout={TRIAL_SECS}"),
            );
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = cluster.run(&argv)?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if !text.trim_end().ends_with("202") {
                return Err(err(format!("cluster upgrade answered {text:?}")));
            }
            Ok(())
        },
    );
    for node in ["server1", "server2"] {
        step(
            &cluster,
            &format!("{node} runs 0.2.0 from slot b, blessed"),
            || {
                wait_update(
                    &cluster,
                    &config,
                    node,
                    "0.2.0 blessed on slot b",
                    UPGRADE_TIMEOUT,
                    |v| running(v, "0.2.0", "b"),
                )
            },
        );
    }
    let upgrade_time = started.elapsed();
    drop(upgrading);
    let report = probe.stop();
    eprintln!(
        "    rolling upgrade: {:.0}s; client on the floating IP: {}",
        upgrade_time.as_secs_f64(),
        report.summary()
    );
    let long: Vec<_> = report
        .gaps
        .iter()
        .filter(|g| g.1 > Duration::from_secs(1))
        .collect();
    eprintln!("    gaps over 1 s (offset, length): {long:?}");
    step(
        &cluster,
        "the client loop saw no failed GET, the address's moves included",
        || {
            // Each node reboots on purpose, so it hands the address over (vip::handover_argvs):
            // the requests it has taken are answered from the address kept on `lo`, and a new
            // connection's SYN is dropped until the client sends it again, to the new holder.
            // Before the handover, a request in flight at a move was lost (a timeout or a
            // reset in 3 of 9 runs); `bench/vip-failover.sh` with REBOOT=1 measures it.
            if report.ok == 0 || report.failed > 0 {
                return Err(err(format!("probe: {}", report.summary())));
            }
            Ok(())
        },
    );
    step(
        &cluster,
        "the note (MariaDB) survived the upgrade on both nodes",
        || crate::services::wait_note_everywhere(&cluster, &config, &note),
    );
    for (node, before) in ["server1", "server2"].iter().zip(&boots_before) {
        step(
            &cluster,
            &format!("{node}'s data partition carried over: its boot count went on from {before}"),
            || {
                let now = wait_page(&cluster, &config, node, None, BOOT_TIMEOUT)?;
                if now <= *before {
                    return Err(err(format!(
                        "boot count {now} after the upgrade, {before} before"
                    )));
                }
                Ok(())
            },
        );
    }

    // --- The old slot still boots when chosen by hand, once.
    step(
        &cluster,
        "server1 boots slot a (0.1.0) once by hand, then 0.2.0 again",
        || {
            let r = Admin::of(&cluster, &config, "server1")?
                .post("/api/update/boot-once?slot=a&reboot=1", &[])?;
            if r.status != 200 {
                return Err(err(format!("boot-once answered {} {:?}", r.status, r.body)));
            }
            wait_update(
                &cluster,
                &config,
                "server1",
                "0.1.0 on slot a",
                BOOT_TIMEOUT,
                |v| running(v, "0.1.0", "a"),
            )?;
            vm1.reboot_ctrl_alt_del()?;
            wait_update(
                &cluster,
                &config,
                "server1",
                "0.2.0 on slot b",
                BOOT_TIMEOUT,
                |v| running(v, "0.2.0", "b"),
            )?;
            Ok(())
        },
    );

    // --- A version that boots but never becomes healthy.
    step(
        &cluster,
        "server1 installs 0.3.0 (nginx never ready) and reboots into it",
        || {
            let (code, body) = upload(
                &cluster,
                &config,
                "server1",
                &v3_bad,
                &format!("reboot=1&trial_timeout={BAD_TRIAL_SECS}"),
            )?;
            if code != 200 {
                return Err(err(format!("install answered {code} {body}")));
            }
            eprintln!("    installed: {}", body.trim());
            Ok(())
        },
    );
    step(
        &cluster,
        "server1 rolls back to 0.2.0 by itself and marks 0.3.0 bad",
        || {
            // Its trial fails (reboot), then it boots slot b again and records the failure.
            let v = wait_update(
                &cluster,
                &config,
                "server1",
                "0.2.0 with 0.3.0 marked bad",
                UPGRADE_TIMEOUT,
                |v| {
                    running(v, "0.2.0", "b")
                        && v["bad_versions"]
                            .as_array()
                            .is_some_and(|b| b.iter().any(|x| x == "0.3.0"))
                },
            )?;
            if v["slots"][1]["state"] != "failed" {
                return Err(err(format!("slot a after the rollback: {v}")));
            }
            Ok(())
        },
    );
    step(
        &cluster,
        "a second install of 0.3.0 is refused without force",
        || {
            let (code, body) = upload(&cluster, &config, "server1", &v3_bad, "")?;
            if code != 422 || !body.contains("failed on this node before") {
                return Err(err(format!("answered {code} {body:?}")));
            }
            Ok(())
        },
    );
    eprintln!(
        "==> bundle sizes: v2 {:.1} MiB, v3-bad {:.1} MiB; rolling upgrade of two nodes {:.0}s",
        v2_len as f64 / 1048576.0,
        std::fs::metadata(&v3_bad).unwrap().len() as f64 / 1048576.0,
        upgrade_time.as_secs_f64()
    );
}
