//! A disk's seed partition: `cluster.toml`, `settings.toml` (`SeedSettings`, the node's
//! settings) and the TLS files the cluster CA issued.
//!
//! A node image's seed is complete: its node, the cluster secret, the admin password's hash,
//! the metrics token, the served certificate and the webhook, so the node boots straight into
//! service. The generic image's seed leaves all of them but where its wizard listens to the
//! first-boot wizard, and carries every node's TLS files (`tls/<node>/`) so that it can become
//! any node. The settings are made by pure functions; only `write_*` touch files.

use std::net::Ipv4Addr;
use std::path::Path;

use api::files::{
    CA_CERT, DB_CERT, DB_KEY, NODE_CERT, NODE_KEY, SEED_CLUSTER_CONFIG, SEED_TLS_DIR,
};
use api::settings::{Secret, TlsChoice, SEED_SETTINGS};
use cluster_config::settings::SeedSettings;
use cluster_config::Cluster;

use crate::pki::{self, Ca, Credentials};
use crate::Error;

const STEP: &str = "seed";

/// The generic image's name (`generic.img`, `generic.qcow2`); no node may have it.
pub const GENERIC: &str = "generic";

/// The served certificate and key a build was given (`--tls-cert`, `--tls-key`), read and
/// checked with `cluster_config::settings::check_tls` as a node would at `now_unix`; every
/// problem named with its file.
pub fn load_tls(certificate: &Path, key: &Path, now_unix: i64) -> Result<TlsChoice, Error> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| Error::io("served certificate", path, e))
    };
    let (cert_pem, key_pem) = (read(certificate)?, read(key)?);
    cluster_config::settings::check_tls(&cert_pem, &key_pem, now_unix).map_err(|errors| {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| {
                let path = match e.field {
                    api::settings::Field::TlsKey => key,
                    _ => certificate,
                };
                format!("{}: {}", path.display(), e.message)
            })
            .collect();
        Error::Settings(format!(
            "the served certificate is refused:\n{}",
            lines.join("\n")
        ))
    })?;
    Ok(TlsChoice::Upload {
        certificate: cert_pem,
        key: Secret::new(key_pem),
    })
}

/// A node image's settings: complete, so no wizard runs. `salt` is the password hash's (16
/// random bytes).
pub fn node_settings(
    cluster: &Cluster,
    node: &str,
    cluster_secret: &str,
    credentials: &Credentials,
    tls: &TlsChoice,
    salt: &[u8; 16],
) -> Result<SeedSettings, Error> {
    let hash = cluster_config::settings::hash_password(credentials.admin_password.expose(), salt)
        .map_err(Error::Settings)?;
    Ok(SeedSettings {
        node: Some(node.to_string()),
        cluster_secret: Some(Secret::new(cluster_secret.trim())),
        admin_password_hash: Some(hash),
        metrics_token: Some(credentials.metrics_token.clone()),
        tls: Some(tls.clone()),
        webhook: Some(
            cluster
                .alerts
                .webhook
                .as_ref()
                .map(|url| url.as_str().to_string())
                .unwrap_or_default(),
        ),
        setup_address: None,
    })
}

/// The generic image's settings: only where its wizard listens (`setup_address`, by default
/// [`default_setup_address`]); everything else is asked, and the metrics token is made at
/// setup. [`settings_toml`] refuses an address outside the subnet, a node's or the floating
/// IP; this refuses what it leaves to the builder (see [`check_setup_address`]).
pub fn generic_settings(
    cluster: &Cluster,
    setup_address: Option<Ipv4Addr>,
) -> Result<SeedSettings, Error> {
    let Some(address) = setup_address.or_else(|| default_setup_address(cluster)) else {
        return Err(Error::Settings(format!(
            "{GENERIC_ORIGIN}: the subnet {} has no host address to spare for the setup \
             wizard; pass --setup-address",
            cluster.subnet
        )));
    };
    check_setup_address(cluster, address).map_err(|message| {
        Error::Settings(format!(
            "{GENERIC_ORIGIN}: setup_address: {address} is {message}"
        ))
    })?;
    Ok(SeedSettings {
        setup_address: Some(address),
        ..SeedSettings::default()
    })
}

/// How errors name the generic image's settings.
pub const GENERIC_ORIGIN: &str = "generic image";

/// The subnet's last host address (10.88.0.254 in 10.88.0.0/24): the one users leave free
/// most often. `None` for a /31 or /32, which have no host address to spare.
pub fn default_setup_address(cluster: &Cluster) -> Option<Ipv4Addr> {
    (cluster.subnet.prefix <= 30).then(|| Ipv4Addr::from(u32::from(cluster.subnet.broadcast()) - 1))
}

/// What `SeedSettings::check` leaves to the builder: the subnet's network and broadcast
/// addresses and the gateway are no host's to take either.
fn check_setup_address(cluster: &Cluster, address: Ipv4Addr) -> Result<(), String> {
    let subnet = &cluster.subnet;
    if subnet.prefix <= 30 && address == subnet.network() {
        return Err(format!("the network address of {subnet}"));
    }
    if subnet.prefix <= 30 && address == subnet.broadcast() {
        return Err(format!("the broadcast address of {subnet}"));
    }
    if cluster.gateway == Some(address) {
        return Err("the gateway".into());
    }
    Ok(())
}

/// `settings` as the seed's `settings.toml`, checked with `SeedSettings::check` against the
/// cluster as a node checks it at boot (`now_unix` for an uploaded certificate), and read
/// back to the same settings.
pub fn settings_toml(
    cluster: &Cluster,
    settings: &SeedSettings,
    origin: &str,
    now_unix: i64,
) -> Result<String, Error> {
    settings
        .check(cluster, origin, now_unix)
        .map_err(|e| Error::Settings(e.to_string()))?;
    let text = settings.to_toml();
    match SeedSettings::from_toml(&text, origin) {
        Ok(back) if back == *settings => Ok(text),
        Ok(_) => Err(Error::Settings(format!(
            "{origin}: the settings do not read back as written"
        ))),
        Err(e) => Err(Error::Settings(format!(
            "{origin}: the settings do not read back: {e}"
        ))),
    }
}

/// A node image's seed in `dir`: `cluster.toml`, `settings.toml` (0600: it holds the cluster
/// secret) and the node's TLS files in `tls/`.
pub fn write_node(
    dir: &Path,
    config_text: &str,
    settings_toml: &str,
    ca: &Ca,
    cluster: &Cluster,
    node: &cluster_config::Node,
) -> Result<(), Error> {
    write_common(dir, config_text, settings_toml)?;
    write_tls(&dir.join(SEED_TLS_DIR), ca, cluster, node)
}

/// The generic image's seed in `dir`: `cluster.toml`, `settings.toml` and every node's TLS
/// files in `tls/<node>/` (the node chosen at setup takes its own).
pub fn write_generic(
    dir: &Path,
    config_text: &str,
    settings_toml: &str,
    ca: &Ca,
    cluster: &Cluster,
) -> Result<(), Error> {
    write_common(dir, config_text, settings_toml)?;
    for node in &cluster.nodes {
        write_tls(&dir.join(SEED_TLS_DIR).join(&node.name), ca, cluster, node)?;
    }
    Ok(())
}

fn write_common(dir: &Path, config_text: &str, settings_toml: &str) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(STEP, dir, e))?;
    pki::write_file(
        &dir.join(SEED_CLUSTER_CONFIG),
        config_text.as_bytes(),
        0o644,
    )?;
    pki::write_file(&dir.join(SEED_SETTINGS), settings_toml.as_bytes(), 0o600)
}

/// `node`'s certificate and key, MariaDB's, and the CA certificate, in `tls`.
fn write_tls(
    tls: &Path,
    ca: &Ca,
    cluster: &Cluster,
    node: &cluster_config::Node,
) -> Result<(), Error> {
    std::fs::create_dir_all(tls).map_err(|e| Error::io(STEP, tls, e))?;
    let cert = pki::node_cert(ca, cluster, node)?;
    pki::write_file(&tls.join(CA_CERT), ca.cert_pem.as_bytes(), 0o644)?;
    pki::write_file(&tls.join(NODE_CERT), cert.cert_pem.as_bytes(), 0o644)?;
    pki::write_file(&tls.join(NODE_KEY), cert.key_pem.as_bytes(), 0o600)?;
    // MariaDB's own: its key is copied for `mysql`, and is no peer identity.
    let db_cert = pki::db_cert(ca, cluster, node)?;
    pki::write_file(&tls.join(DB_CERT), db_cert.cert_pem.as_bytes(), 0o644)?;
    pki::write_file(&tls.join(DB_KEY), db_cert.key_pem.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use api::settings::Field;
    use cluster_config::settings::{asked, seed_is_complete, verify_password};

    use super::*;

    /// The default cluster with a gateway and a webhook.
    fn cluster_with_gateway_and_webhook() -> Cluster {
        let text = cluster_config::DEFAULT_CLUSTER_TOML
            .replace(
                "floating_ip = \"10.88.0.10\"",
                "floating_ip = \"10.88.0.10\"\ngateway = \"10.88.0.1\"",
            )
            .replace(
                "[alerts]\n",
                "[alerts]\nwebhook = \"https://hooks.example/t/secret-token\"\n",
            );
        Cluster::from_toml(&text, "test.toml").unwrap()
    }

    fn credentials(dir: &Path, cluster: &Cluster) -> Credentials {
        Credentials::load_or_create(dir, cluster).unwrap().0
    }

    #[test]
    fn a_node_seed_is_complete_and_its_hash_verifies_the_kept_password() {
        let dir = tempfile::tempdir().unwrap();
        for cluster in [
            Cluster::default_cluster(),
            cluster_with_gateway_and_webhook(),
        ] {
            let creds = credentials(dir.path(), &cluster);
            let secret = api::secret::format_secret(&[7; 32]);
            let settings = node_settings(
                &cluster,
                "server2",
                &secret,
                &creds,
                &TlsChoice::SelfSigned,
                &[1; 16],
            )
            .unwrap();
            assert!(seed_is_complete(&settings), "{settings:?}");
            assert_eq!(settings.node.as_deref(), Some("server2"));
            assert_eq!(
                settings.cluster_secret.as_ref().map(Secret::expose),
                Some(secret.trim())
            );
            let hash = settings.admin_password_hash.as_deref().unwrap();
            assert!(hash.starts_with("$argon2id$"), "{hash}");
            assert!(verify_password(hash, creds.admin_password.expose()));
            assert!(!verify_password(hash, "another password 123"));
            assert_eq!(settings.metrics_token, Some(creds.metrics_token.clone()));
            assert_eq!(settings.tls, Some(TlsChoice::SelfSigned));
            assert_eq!(settings.setup_address, None);
            let webhook = cluster.alerts.webhook.as_ref().map(|u| u.as_str());
            assert_eq!(settings.webhook.as_deref(), Some(webhook.unwrap_or("")));

            // What the seed gets reads back to the same settings.
            let text = settings_toml(&cluster, &settings, "settings.toml", 0).unwrap();
            let back = SeedSettings::from_toml(&text, "settings.toml").unwrap();
            assert_eq!(back, settings);
            assert!(!text.contains(creds.admin_password.expose()), "{text}");
        }
    }

    #[test]
    fn a_wrong_node_seed_is_refused_with_the_checks_message() {
        let cluster = Cluster::default_cluster();
        let bad = SeedSettings {
            node: Some("server9".into()),
            cluster_secret: Some(Secret::new("abc")),
            ..SeedSettings::default()
        };
        let e = settings_toml(&cluster, &bad, "settings.toml of server9", 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("settings.toml of server9: node: unknown node `server9`"),
            "{e}"
        );
        assert!(e.contains("cluster_secret: expected 64 hex digits"), "{e}");
    }

    #[test]
    fn the_generic_seed_asks_everything_and_listens_on_the_subnets_last_address() {
        let cluster = Cluster::default_cluster();
        let settings = generic_settings(&cluster, None).unwrap();
        assert_eq!(
            settings,
            SeedSettings {
                setup_address: Some(Ipv4Addr::new(10, 88, 0, 254)),
                ..SeedSettings::default()
            }
        );
        assert_eq!(
            asked(&settings),
            [
                Field::Node,
                Field::AdminPassword,
                Field::AdminPasswordConfirm,
                Field::ClusterSecret,
                Field::Tls,
                Field::TlsCertificate,
                Field::TlsKey,
                Field::Webhook,
            ]
        );
        let text = settings_toml(&cluster, &settings, GENERIC_ORIGIN, 0).unwrap();
        assert_eq!(text.trim(), "setup_address = \"10.88.0.254\"");
        let chosen = Ipv4Addr::new(10, 88, 0, 200);
        let settings = generic_settings(&cluster, Some(chosen)).unwrap();
        assert_eq!(settings.setup_address, Some(chosen));
    }

    #[test]
    fn setup_addresses_no_wizard_can_use_are_refused() {
        let cluster = cluster_with_gateway_and_webhook();
        let check = |address: &str, expected: &str| {
            let address: Ipv4Addr = address.parse().unwrap();
            let e = generic_settings(&cluster, Some(address))
                .and_then(|s| settings_toml(&cluster, &s, GENERIC_ORIGIN, 0))
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                format!("generic image: setup_address: {address} is {expected}")
            );
        };
        check("10.88.0.11", "node server1's address");
        check("10.88.0.12", "node server2's address");
        check("10.88.0.10", "the floating IP");
        check("10.88.0.1", "the gateway");
        check("10.88.0.0", "the network address of 10.88.0.0/24");
        check("10.88.0.255", "the broadcast address of 10.88.0.0/24");
        check("192.168.1.254", "outside the cluster's subnet 10.88.0.0/24");
        // The default is the last host address, whatever the prefix.
        let small = Cluster::from_toml(
            &cluster_config::DEFAULT_CLUSTER_TOML
                .replace("10.88.0.0/24", "10.88.0.8/29")
                .replace("10.88.0.10", "10.88.0.9")
                .replace(
                    "admin_cidrs = [\"10.88.0.0/24\"]",
                    "admin_cidrs = [\"10.88.0.8/29\"]",
                ),
            "small.toml",
        )
        .unwrap();
        assert_eq!(
            default_setup_address(&small),
            Some(Ipv4Addr::new(10, 88, 0, 14))
        );
    }

    #[test]
    fn an_uploaded_certificate_is_checked_at_build_time_and_each_problem_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::default_cluster();
        let ca = pki::load_or_create_ca(&dir.path().join("ca"), "tandem")
            .unwrap()
            .0;
        let one = pki::node_cert(&ca, &cluster, cluster.node("server1").unwrap()).unwrap();
        let two = pki::node_cert(&ca, &cluster, cluster.node("server2").unwrap()).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (crt, key) = (
            file("one.crt", &one.cert_pem),
            file("one.key", &one.key_pem),
        );
        let now = super::super::now_unix();
        let tls = load_tls(&crt, &key, now).unwrap();
        assert_eq!(
            tls,
            TlsChoice::Upload {
                certificate: one.cert_pem.clone(),
                key: Secret::new(one.key_pem.clone()),
            }
        );
        // The upload goes into the seed and reads back.
        let settings = SeedSettings {
            tls: Some(tls),
            ..SeedSettings::default()
        };
        let text = settings_toml(&cluster, &settings, "settings.toml", now).unwrap();
        assert_eq!(SeedSettings::from_toml(&text, "s").unwrap(), settings);

        let other_key = file("two.key", &two.key_pem);
        let e = load_tls(&crt, &other_key, now).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{}: does not match the certificate",
                other_key.display()
            )),
            "{e}"
        );
        let not_pem = file("not.crt", "hello\n");
        let e = load_tls(&not_pem, &key, now).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{}: not PEM", not_pem.display())),
            "{e}"
        );
        // Checked against the clock: long after it expired.
        let e = load_tls(&crt, &key, 4_000_000_000).unwrap_err().to_string();
        assert!(e.contains(&format!("{}: expired on", crt.display())), "{e}");
        let missing = dir.path().join("missing.crt");
        let e = load_tls(&missing, &key, now).unwrap_err().to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
    }

    /// Relative paths and modes of the files below `dir`.
    fn tree(dir: &Path) -> Vec<(String, u32)> {
        use std::os::unix::fs::MetadataExt as _;
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(dir).unwrap().display().to_string();
                    files.push((rel, std::fs::metadata(&path).unwrap().mode() & 0o777));
                }
            }
        }
        files.sort();
        files
    }

    #[test]
    fn seeds_hold_settings_and_tls_files_and_no_old_node_or_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::default_cluster();
        let ca = pki::load_or_create_ca(&dir.path().join("ca"), "tandem")
            .unwrap()
            .0;
        let node_seed = dir.path().join("node");
        let server1 = cluster.node("server1").unwrap();
        write_node(&node_seed, "config", "settings", &ca, &cluster, server1).unwrap();
        let tls_files = |prefix: &str| {
            [
                ("ca.crt", 0o644),
                ("db.crt", 0o644),
                ("db.key", 0o600),
                ("node.crt", 0o644),
                ("node.key", 0o600),
            ]
            .map(|(f, mode)| (format!("{prefix}{f}"), mode))
        };
        let mut expected = vec![
            ("cluster.toml".to_string(), 0o644),
            ("settings.toml".to_string(), 0o600),
        ];
        expected.extend(tls_files("tls/"));
        assert_eq!(tree(&node_seed), expected);
        assert_eq!(
            std::fs::read_to_string(node_seed.join(SEED_SETTINGS)).unwrap(),
            "settings"
        );

        let generic_seed = dir.path().join("generic");
        write_generic(&generic_seed, "config", "settings", &ca, &cluster).unwrap();
        let mut expected = vec![
            ("cluster.toml".to_string(), 0o644),
            ("settings.toml".to_string(), 0o600),
        ];
        expected.extend(tls_files("tls/server1/"));
        expected.extend(tls_files("tls/server2/"));
        assert_eq!(tree(&generic_seed), expected);
        // Each node's directory holds that node's certificate.
        for node in ["server1", "server2"] {
            let pem =
                std::fs::read_to_string(generic_seed.join(format!("tls/{node}/node.crt"))).unwrap();
            let info = cluster_config::settings::certificate_info(&pem).unwrap();
            assert!(info.names.contains(&node.to_string()), "{:?}", info.names);
        }
    }
}
