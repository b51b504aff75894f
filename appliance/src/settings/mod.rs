//! The node's settings at run time: the seed's `settings.toml`, the store on the data
//! partition, what a node boots with ([`resolve`]), and the settings service
//! (`appliance settings`, [`service`]) that the wizards and the admin page talk to. The schema
//! and its validation are `cluster_config::settings`; the socket protocol is `api::settings`.

mod service;
mod store;

use std::path::Path;

use anyhow::Context as _;
use cluster_config::settings::{Fresh, SeedSettings, Settings};
use cluster_config::Cluster;

pub use service::{main, SettingsArgs};
pub use store::{Origin, Store};

/// The seed's settings (`settings.toml` in `seed_dir`), checked against the cluster. A seed
/// without the file asks everything.
pub fn read_seed(seed_dir: &Path, cluster: &Cluster) -> anyhow::Result<SeedSettings> {
    let path = seed_dir.join(api::settings::SEED_SETTINGS);
    let origin = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SeedSettings::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {origin}")),
    };
    let seed = SeedSettings::from_toml(&text, &origin).map_err(|e| anyhow::anyhow!("{e}"))?;
    seed.check(cluster, &origin, now_unix())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(seed)
}

/// The settings this boot runs with: the stored ones; else, when the seed alone is complete,
/// the seed's, stored now (so later changes have one place to go); else `None`: the wizard
/// must ask.
pub fn resolve(
    store: &mut Store,
    cluster: &Cluster,
    seed: &SeedSettings,
) -> anyhow::Result<Option<(u64, Settings)>> {
    if let Some(current) = store.current()? {
        return Ok(Some(current));
    }
    if !cluster_config::settings::seed_is_complete(seed) {
        return Ok(None);
    }
    let answers = api::settings::Answers::default();
    let (settings, _) =
        cluster_config::settings::setup(cluster, seed, &answers, now_unix(), &fresh()?).map_err(
            |errors| {
                let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
                anyhow::anyhow!("the seed's settings: {}", lines.join("; "))
            },
        )?;
    let revision = store.save(&settings, Origin::Seed, now_unix())?;
    tracing::info!(node = %settings.node, revision, "settings taken from the seed");
    Ok(Some((revision, settings)))
}

/// Random bytes for a setup or change.
pub fn fresh() -> anyhow::Result<Fresh> {
    let mut fresh = Fresh {
        salt: [0; 16],
        cluster_secret: [0; 32],
        metrics_token: [0; 32],
    };
    for buf in [
        &mut fresh.salt[..],
        &mut fresh.cluster_secret[..],
        &mut fresh.metrics_token[..],
    ] {
        getrandom::fill(buf).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
    }
    Ok(fresh)
}

/// A developer machine's seed (`appliance run`): the node and secret it was started with, the
/// cluster's webhook, the balancer's own certificate, and an admin password and metrics token
/// made once in the state directory (`admin-password`, `metrics-token`, 0600), so a local
/// cluster has a login like an image.
pub fn dev_seed(
    cluster: &Cluster,
    node: &str,
    state_dir: &Path,
    secret: &[u8; api::secret::SECRET_LEN],
) -> anyhow::Result<SeedSettings> {
    let password = read_or_make(&state_dir.join(DEV_ADMIN_PASSWORD), || {
        cluster_config::settings::generate_password(cluster, |buf| {
            getrandom::fill(buf).map_err(|e| anyhow::anyhow!("random: {e}"))
        })
    })?;
    let token = read_or_make(&state_dir.join(DEV_METRICS_TOKEN), || {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random: {e}"))?;
        Ok(hex::encode(bytes))
    })?;
    let salt = fresh()?.salt;
    let hash = cluster_config::settings::hash_password(&password, &salt)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(SeedSettings {
        node: Some(node.to_string()),
        cluster_secret: Some(api::settings::Secret::new(
            api::secret::format_secret(secret).trim(),
        )),
        admin_password_hash: Some(hash),
        metrics_token: Some(api::settings::Secret::new(token)),
        tls: Some(api::settings::TlsChoice::SelfSigned),
        webhook: Some(
            cluster
                .alerts
                .webhook
                .as_ref()
                .map(|w| w.as_str().to_string())
                .unwrap_or_default(),
        ),
        setup_address: None,
    })
}

/// A developer machine's admin password, in its state directory (0600).
pub const DEV_ADMIN_PASSWORD: &str = "admin-password";
/// A developer machine's metrics token, in its state directory (0600).
pub const DEV_METRICS_TOKEN: &str = "metrics-token";

fn read_or_make(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => return Ok(text.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let value = make()?;
    api::fsio::create_private(path, format!("{value}\n").as_bytes())
        .with_context(|| format!("creating {}", path.display()))?;
    tracing::info!(path = %path.display(), "made a development credential");
    Ok(value)
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
