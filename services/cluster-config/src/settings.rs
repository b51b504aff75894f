//! The node's settings: one typed schema for what a node may still need at its first boot, and
//! the validation every front end shares (the web wizard, the serial-console wizard, the seed,
//! the admin page's later changes).
//!
//! Each setting is either in the seed ([`SeedSettings`], written by the image-builder) or
//! asked ([`asked`]). [`setup`] turns the seed and a user's [`Answers`] into complete
//! [`Settings`] or reports every wrong answer at once, each on its [`Field`]; [`change`] does
//! the same for a later change. Pure: the clock and the random bytes are arguments.

use std::time::Duration;

pub use api::settings::{Answers, CertificateInfo, Change, Field, FieldError, Secret, TlsChoice};
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use x509_cert::der::Decode as _;

use crate::{Cluster, ConfigError, ConfigErrors, WebhookUrl};

/// The stored settings' format version (migrated forward when it changes).
pub const SETTINGS_VERSION: u32 = 1;
/// The shortest admin password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;
/// From this length on, a password may be a passphrase of one character class.
pub const PASSPHRASE_LEN: usize = 20;
/// The longest admin password accepted (argon2 hashes anything, but a form is not a file).
pub const MAX_PASSWORD_LEN: usize = 1024;
/// The longest certificate chain or key accepted, in bytes.
pub const MAX_PEM_LEN: usize = 256 * 1024;
/// What the seed says for the balancer's own certificate.
const SELF_SIGNED: &str = "self-signed";

/// The settings in the seed: whatever the image-builder (or a user automating a fleet) knew.
/// Everything is optional: a missing setting is asked by the wizard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSettings {
    /// Which node of the cluster this machine is (absent on a generic image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The cluster secret: 64 hex digits (the same on every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_secret: Option<Secret>,
    /// The admin password's argon2id hash (PHC string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_password_hash: Option<String>,
    /// The bearer token `/metrics` takes (64 hex digits); made at setup when absent, never asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<Secret>,
    /// `self-signed`, or `{ mode = "upload", certificate = "PEM", key = "PEM" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsChoice>,
    /// The alert webhook; `""` for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Where a generic image's wizard listens before it knows which node it is (an address of
    /// the cluster's subnet that no node and not the floating IP uses). Not a setting: the
    /// node's own address replaces it after setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_address: Option<std::net::Ipv4Addr>,
}

/// A node's complete settings: what the settings store holds (as JSON) once setup is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// [`SETTINGS_VERSION`].
    pub version: u32,
    pub node: String,
    /// argon2id, PHC string.
    pub admin_password_hash: String,
    /// 64 hex digits.
    pub metrics_token: Secret,
    /// 64 hex digits (`api::secret`'s format).
    pub cluster_secret: Secret,
    pub tls: TlsChoice,
    pub webhook: Option<String>,
}

impl Settings {
    /// The cluster secret's bytes (checked when the settings were made).
    pub fn secret(&self) -> Result<[u8; api::secret::SECRET_LEN], String> {
        api::secret::parse_secret(self.cluster_secret.expose())
    }

    /// The webhook, parsed.
    pub fn webhook_url(&self) -> Option<WebhookUrl> {
        self.webhook
            .as_deref()
            .and_then(|url| WebhookUrl::parse(url).ok())
    }

    /// The uploaded certificate chain and key, `None` when self-signed.
    pub fn uploaded_tls(&self) -> Option<(&str, &str)> {
        match &self.tls {
            TlsChoice::SelfSigned => None,
            TlsChoice::Upload { certificate, key } => Some((certificate, key.expose())),
        }
    }

    /// Reads stored settings (JSON), refusing another format version.
    pub fn from_json(text: &str) -> Result<Settings, String> {
        let settings: Settings =
            serde_json::from_str(text).map_err(|e| format!("unreadable settings: {e}"))?;
        if settings.version != SETTINGS_VERSION {
            return Err(format!(
                "settings format {} is not {SETTINGS_VERSION}, the one this version reads",
                settings.version
            ));
        }
        Ok(settings)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The random bytes a setup or change may need, made by the caller.
#[derive(Clone)]
pub struct Fresh {
    /// The password hash's salt.
    pub salt: [u8; 16],
    /// A cluster secret for "generate".
    pub cluster_secret: [u8; 32],
    /// The metrics token, when the seed has none.
    pub metrics_token: [u8; 32],
}

impl SeedSettings {
    /// Parses a seed's `settings.toml`; every problem at once, as `origin:line: key: message`.
    pub fn from_toml(text: &str, origin: &str) -> Result<SeedSettings, ConfigErrors> {
        let seed: SeedSettings = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            ConfigErrors(vec![ConfigError {
                origin: origin.to_string(),
                line,
                column: None,
                key: String::new(),
                message: e.message().to_string(),
            }])
        })?;
        Ok(seed)
    }

    /// The seed as TOML (what the image-builder writes).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks the values the seed holds against the cluster (a wrong seed is the builder's
    /// or the user's error, reported at boot with the seed's file and key).
    pub fn check(
        &self,
        cluster: &Cluster,
        origin: &str,
        now_unix: i64,
    ) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut bad = |field: Field, message: String| {
            errors.push(ConfigError {
                origin: origin.to_string(),
                line: None,
                column: None,
                key: field.key().to_string(),
                message,
            })
        };
        if let Some(node) = &self.node {
            if let Err(m) = check_node(cluster, node) {
                bad(Field::Node, m);
            }
        }
        if let Some(secret) = &self.cluster_secret {
            if let Err(m) = api::secret::parse_secret(secret.expose()) {
                bad(Field::ClusterSecret, m);
            }
        }
        if let Some(hash) = &self.admin_password_hash {
            if let Err(m) = check_hash(hash) {
                bad(Field::AdminPassword, m);
            }
        }
        let token_error = self
            .metrics_token
            .as_ref()
            .and_then(|token| check_token(token.expose()).err());
        if let Some(TlsChoice::Upload { certificate, key }) = &self.tls {
            for e in check_tls(certificate, key.expose(), now_unix)
                .err()
                .unwrap_or_default()
            {
                bad(e.field, e.message);
            }
        }
        if let Some(url) = &self.webhook {
            if let Err(m) = check_webhook(url) {
                bad(Field::Webhook, m);
            }
        }
        if let Some(address) = self.setup_address {
            let used = cluster.nodes.iter().find(|n| n.address == address);
            let message = if !cluster.subnet.contains(address) {
                Some(format!(
                    "{address} is outside the cluster's subnet {}",
                    cluster.subnet
                ))
            } else if let Some(node) = used {
                Some(format!("{address} is node {}'s address", node.name))
            } else if address == cluster.floating_ip {
                Some(format!("{address} is the floating IP"))
            } else if Some(address) == cluster.gateway {
                Some(format!("{address} is the gateway"))
            } else if address == cluster.subnet.network() || address == cluster.subnet.broadcast() {
                Some(format!(
                    "{address} is the subnet's network or broadcast address"
                ))
            } else {
                None
            };
            if let Some(message) = message {
                errors.push(ConfigError {
                    origin: origin.to_string(),
                    line: None,
                    column: None,
                    key: "setup_address".into(),
                    message,
                });
            }
        }
        if let Some(message) = token_error {
            errors.push(ConfigError {
                origin: origin.to_string(),
                line: None,
                column: None,
                key: "metrics_token".into(),
                message,
            });
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(ConfigErrors(errors)),
        }
    }
}

/// What the wizard must ask: every setting the seed lacks, in form order. The web wizard adds
/// [`Field::SetupCode`] in front.
pub fn asked(seed: &SeedSettings) -> Vec<Field> {
    let mut fields = Vec::new();
    if seed.node.is_none() {
        fields.push(Field::Node);
    }
    if seed.admin_password_hash.is_none() {
        fields.extend([Field::AdminPassword, Field::AdminPasswordConfirm]);
    }
    if seed.cluster_secret.is_none() {
        fields.push(Field::ClusterSecret);
    }
    if seed.tls.is_none() {
        fields.extend([Field::Tls, Field::TlsCertificate, Field::TlsKey]);
    }
    if seed.webhook.is_none() {
        fields.push(Field::Webhook);
    }
    fields
}

/// The seed alone is complete: no wizard (the default cluster's images).
pub fn seed_is_complete(seed: &SeedSettings) -> bool {
    asked(seed).is_empty()
}

/// First-boot setup: the seed's settings, and for everything it lacks the user's answer,
/// each checked. Answers to settings the seed holds are ignored. Returns the settings and,
/// when the user asked for a new cluster secret, that secret (to show once).
pub fn setup(
    cluster: &Cluster,
    seed: &SeedSettings,
    answers: &Answers,
    now_unix: i64,
    fresh: &Fresh,
) -> Result<(Settings, Option<Secret>), Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut err = |field, message: String| errors.push(FieldError { field, message });

    let node = match (&seed.node, answers.node.as_deref().map(str::trim)) {
        (Some(node), _) => Some(node.clone()),
        (None, None | Some("")) => {
            err(
                Field::Node,
                format!("required: one of {}", node_names(cluster)),
            );
            None
        }
        (None, Some(node)) => match check_node(cluster, node) {
            Ok(()) => Some(node.to_string()),
            Err(m) => {
                err(Field::Node, m);
                None
            }
        },
    };

    let password_hash = match &seed.admin_password_hash {
        Some(hash) => Some(hash.clone()),
        None => match new_password(
            cluster,
            answers.admin_password.as_ref(),
            answers.admin_password_confirm.as_ref(),
            &fresh.salt,
        ) {
            Ok(hash) => Some(hash),
            Err(e) => {
                errors.extend(e);
                None
            }
        },
    };
    let mut err = |field, message: String| errors.push(FieldError { field, message });

    let mut generated = None;
    let secret = match (&seed.cluster_secret, &answers.cluster_secret) {
        (Some(secret), _) => Some(secret.clone()),
        (None, None) => {
            err(
                Field::ClusterSecret,
                format!(
                    "required: the other nodes' secret, or `{}` on the first node",
                    api::settings::GENERATE
                ),
            );
            None
        }
        (None, Some(answer)) => {
            let text = answer.expose().trim();
            if text.eq_ignore_ascii_case(api::settings::GENERATE) {
                let secret = Secret::new(api::secret::format_secret(&fresh.cluster_secret).trim());
                generated = Some(secret.clone());
                Some(secret)
            } else {
                match api::secret::parse_secret(text) {
                    Ok(bytes) => Some(Secret::new(api::secret::format_secret(&bytes).trim())),
                    Err(m) => {
                        err(
                            Field::ClusterSecret,
                            format!("{m}, or `{}`", api::settings::GENERATE),
                        );
                        None
                    }
                }
            }
        }
    };

    let tls = match (&seed.tls, &answers.tls) {
        (Some(tls), _) => Some(tls.clone()),
        (None, None) => {
            err(
                Field::Tls,
                format!("required: `{SELF_SIGNED}` or a certificate and its key"),
            );
            None
        }
        (None, Some(choice)) => match check_choice(choice, now_unix) {
            Ok(tls) => Some(tls),
            Err(e) => {
                errors.extend(e);
                None
            }
        },
    };
    let mut err = |field, message: String| errors.push(FieldError { field, message });

    let webhook = match (&seed.webhook, &answers.webhook) {
        (Some(url), _) => Some(non_empty(url)),
        (None, None) => {
            err(Field::Webhook, "required: a URL, or empty for none".into());
            None
        }
        (None, Some(url)) => match check_webhook(url) {
            Ok(()) => Some(non_empty(url)),
            Err(m) => {
                err(Field::Webhook, m);
                None
            }
        },
    };

    let metrics_token = seed
        .metrics_token
        .clone()
        .unwrap_or_else(|| Secret::new(hex::encode(fresh.metrics_token)));

    match (node, password_hash, secret, tls, webhook) {
        (Some(node), Some(admin_password_hash), Some(cluster_secret), Some(tls), Some(webhook))
            if errors.is_empty() =>
        {
            Ok((
                Settings {
                    version: SETTINGS_VERSION,
                    node,
                    admin_password_hash,
                    metrics_token,
                    cluster_secret,
                    tls,
                    webhook,
                },
                generated,
            ))
        }
        _ => Err(errors),
    }
}

/// A later change from the admin page: a new password needs the current one; a certificate
/// and a webhook are checked like at setup. Unchanged settings stay as they are.
pub fn change(
    cluster: &Cluster,
    current: &Settings,
    change: &Change,
    now_unix: i64,
    fresh: &Fresh,
) -> Result<Settings, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut next = current.clone();
    if change.admin_password.is_some() || change.admin_password_confirm.is_some() {
        let current_ok = change
            .current_password
            .as_ref()
            .is_some_and(|p| verify_password(&current.admin_password_hash, p.expose()));
        if !current_ok {
            errors.push(FieldError {
                field: Field::CurrentPassword,
                message: "does not match the current admin password".into(),
            });
        }
        match new_password(
            cluster,
            change.admin_password.as_ref(),
            change.admin_password_confirm.as_ref(),
            &fresh.salt,
        ) {
            Ok(hash) => next.admin_password_hash = hash,
            Err(e) => errors.extend(e),
        }
    }
    if let Some(choice) = &change.tls {
        match check_choice(choice, now_unix) {
            Ok(tls) => next.tls = tls,
            Err(e) => errors.extend(e),
        }
    }
    if let Some(url) = &change.webhook {
        match check_webhook(url) {
            Ok(()) => next.webhook = non_empty(url),
            Err(m) => errors.push(FieldError {
                field: Field::Webhook,
                message: m,
            }),
        }
    }
    match errors.is_empty() {
        true => Ok(next),
        false => Err(errors),
    }
}

fn non_empty(url: &str) -> Option<String> {
    Some(url.trim())
        .filter(|u| !u.is_empty())
        .map(str::to_string)
}

fn node_names(cluster: &Cluster) -> String {
    cluster
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_node(cluster: &Cluster, node: &str) -> Result<(), String> {
    match cluster.node(node) {
        Some(_) => Ok(()),
        None => Err(format!(
            "unknown node `{node}`: the cluster `{}` has {}",
            cluster.name,
            node_names(cluster)
        )),
    }
}

fn check_token(token: &str) -> Result<(), String> {
    match token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()) {
        true => Ok(()),
        false => Err("expected 64 hex digits".into()),
    }
}

fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC password hash: {e}"))?;
    match parsed.algorithm.as_str() {
        "argon2id" => Ok(()),
        other => Err(format!("the password hash is {other}, expected argon2id")),
    }
}

fn check_webhook(url: &str) -> Result<(), String> {
    match url.trim() {
        "" => Ok(()),
        url => WebhookUrl::parse(url).map(|_| ()),
    }
}

/// Checks a new password and its confirmation, then hashes it (argon2id).
fn new_password(
    cluster: &Cluster,
    password: Option<&Secret>,
    confirm: Option<&Secret>,
    salt: &[u8; 16],
) -> Result<String, Vec<FieldError>> {
    let mut errors = Vec::new();
    let password = password.map(Secret::expose).unwrap_or("");
    if let Err(m) = check_password_strength(cluster, password) {
        errors.push(FieldError {
            field: Field::AdminPassword,
            message: m,
        });
    } else if confirm.map(Secret::expose) != Some(password) {
        errors.push(FieldError {
            field: Field::AdminPasswordConfirm,
            message: "does not match the password".into(),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    hash_password(password, salt).map_err(|m| {
        vec![FieldError {
            field: Field::AdminPassword,
            message: m,
        }]
    })
}

/// Why a password is too weak, if it is.
pub fn check_password_strength(cluster: &Cluster, password: &str) -> Result<(), String> {
    let chars = password.chars().count();
    if password.is_empty() {
        return Err("required".into());
    }
    if chars < MIN_PASSWORD_LEN {
        return Err(format!(
            "too short: {chars} characters, at least {MIN_PASSWORD_LEN}"
        ));
    }
    if chars > MAX_PASSWORD_LEN {
        return Err(format!("too long: at most {MAX_PASSWORD_LEN} characters"));
    }
    let classes = [
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ]
    .into_iter()
    .filter(|&b| b)
    .count();
    if classes < 2 && chars < PASSPHRASE_LEN {
        return Err(format!(
            "too weak: mix letters with digits or symbols, or use at least {PASSPHRASE_LEN} characters"
        ));
    }
    let distinct = {
        let mut c: Vec<char> = password.to_lowercase().chars().collect();
        c.sort_unstable();
        c.dedup();
        c.len()
    };
    if distinct < 6 {
        return Err("too weak: too many repeated characters".into());
    }
    let lower = password.to_lowercase();
    for word in ["password", "tandem", "admin", "qwerty", "123456"]
        .into_iter()
        .chain([cluster.name.as_str()])
    {
        if !word.is_empty() && lower.contains(&word.to_lowercase()) && chars < PASSPHRASE_LEN {
            return Err(format!("too weak: it contains `{word}`"));
        }
    }
    Ok(())
}

/// How long a generated admin password is (a passphrase length: any characters pass).
pub const GENERATED_PASSWORD_LEN: usize = PASSPHRASE_LEN;
/// What a generated admin password is made of: letters and digits without the ones easily
/// misread (0/O/o, 1/l/I).
pub const GENERATED_PASSWORD_ALPHABET: &[u8] =
    b"23456789abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ";

/// A new admin password of [`GENERATED_PASSWORD_LEN`] characters of
/// [`GENERATED_PASSWORD_ALPHABET`], every character equally likely, one that
/// [`check_password_strength`] takes (a random one fails only by a freak of repeats).
/// `random` fills a buffer with random bytes (the caller's source).
pub fn generate_password<E>(
    cluster: &Cluster,
    mut random: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<String, E> {
    let alphabet = GENERATED_PASSWORD_ALPHABET;
    // Bytes at or above the largest multiple of the alphabet's size are dropped.
    let limit = 256 - 256 % alphabet.len();
    loop {
        let mut password = String::with_capacity(GENERATED_PASSWORD_LEN);
        while password.len() < GENERATED_PASSWORD_LEN {
            let mut bytes = [0u8; 64];
            random(&mut bytes)?;
            for b in bytes.map(usize::from) {
                if b < limit && password.len() < GENERATED_PASSWORD_LEN {
                    password.push(char::from(alphabet[b % alphabet.len()]));
                }
            }
        }
        if check_password_strength(cluster, &password).is_ok() {
            return Ok(password);
        }
    }
}

/// The argon2id hash (PHC string, the crate's default parameters: 19 MiB, 2 passes) of
/// `password` with `salt`.
pub fn hash_password(password: &str, salt: &[u8; 16]) -> Result<String, String> {
    let salt = SaltString::encode_b64(salt).map_err(|e| format!("salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// `password` matches the PHC `hash` (constant-time comparison inside argon2).
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

fn check_choice(choice: &TlsChoice, now_unix: i64) -> Result<TlsChoice, Vec<FieldError>> {
    match choice {
        TlsChoice::SelfSigned => Ok(TlsChoice::SelfSigned),
        TlsChoice::Upload { certificate, key } => {
            check_tls(certificate, key.expose(), now_unix)?;
            Ok(choice.clone())
        }
    }
}

/// Checks an uploaded certificate chain and key: both PEM, the chain's first certificate a
/// certificate valid now, the key one rustls can sign with and the leaf's public key. Every
/// problem on its field.
pub fn check_tls(
    certificate: &str,
    key: &str,
    now_unix: i64,
) -> Result<CertificateInfo, Vec<FieldError>> {
    let mut errors = Vec::new();
    let cert_err = |message: String| FieldError {
        field: Field::TlsCertificate,
        message,
    };
    let key_err = |message: String| FieldError {
        field: Field::TlsKey,
        message,
    };
    let chain = parse_chain(certificate).map_err(cert_err);
    let key_der = parse_key(key).map_err(key_err);
    let (chain, key_der) = match (chain, key_der) {
        (Ok(chain), Ok(key)) => (chain, key),
        (chain, key) => {
            errors.extend(chain.err());
            errors.extend(key.err());
            return Err(errors);
        }
    };
    let info = match leaf_info(&chain[0]) {
        Ok(info) => info,
        Err(m) => return Err(vec![cert_err(m)]),
    };
    let (not_before, not_after) = validity(&chain[0]).map_err(|m| vec![cert_err(m)])?;
    if now_unix < not_before {
        errors.push(cert_err(format!(
            "not valid yet: valid from {}",
            format_time(not_before)
        )));
    }
    if now_unix > not_after {
        errors.push(cert_err(format!("expired on {}", format_time(not_after))));
    }
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain, key_der, &provider) {
        Ok(certified) => match certified.keys_match() {
            Ok(()) => {}
            Err(_) => errors.push(key_err(
                "cannot tell whether this key belongs to the certificate".into(),
            )),
        },
        Err(rustls::Error::InconsistentKeys(_)) => errors.push(key_err(
            "does not match the certificate (their public keys differ)".into(),
        )),
        Err(e) => errors.push(key_err(format!("not a usable private key: {e}"))),
    }
    match errors.is_empty() {
        true => Ok(info),
        false => Err(errors),
    }
}

/// What the admin page shows about a certificate chain (its leaf), if it parses.
pub fn certificate_info(certificate: &str) -> Option<CertificateInfo> {
    let chain = parse_chain(certificate).ok()?;
    leaf_info(&chain[0]).ok()
}

fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if pem.trim().is_empty() {
        return Err("required: the certificate chain, PEM".into());
    }
    if pem.len() > MAX_PEM_LEN {
        return Err(format!("too long: at most {MAX_PEM_LEN} bytes"));
    }
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("not PEM: expected -----BEGIN CERTIFICATE-----".into());
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))?;
    if chain.is_empty() {
        return Err("not PEM: no certificate in it".into());
    }
    for (i, der) in chain.iter().enumerate() {
        x509_cert::Certificate::from_der(der).map_err(|e| {
            format!(
                "certificate {} of the chain is not a certificate: {e}",
                i + 1
            )
        })?;
    }
    Ok(chain)
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    if pem.trim().is_empty() {
        return Err("required: the certificate's private key, PEM".into());
    }
    if pem.len() > MAX_PEM_LEN {
        return Err(format!("too long: at most {MAX_PEM_LEN} bytes"));
    }
    if !pem.contains("-----BEGIN ") || !pem.contains("PRIVATE KEY-----") {
        return Err("not PEM: expected -----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY)".into());
    }
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("malformed PEM: {e}"))
}

fn leaf_info(der: &CertificateDer<'_>) -> Result<CertificateInfo, String> {
    use sha2::Digest as _;
    let cert =
        x509_cert::Certificate::from_der(der).map_err(|e| format!("not a certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some((_, san))) = cert
        .tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::SubjectAltName>()
    {
        for name in san.0 {
            match name {
                x509_cert::ext::pkix::name::GeneralName::DnsName(dns) => {
                    names.push(dns.to_string())
                }
                x509_cert::ext::pkix::name::GeneralName::IpAddress(ip) => {
                    let b = ip.as_bytes();
                    if let Ok(v4) = <[u8; 4]>::try_from(b) {
                        names.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(b) {
                        names.push(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let not_after = cert.tbs_certificate().validity().not_after;
    let digest = sha2::Sha256::digest(der.as_ref());
    Ok(CertificateInfo {
        names,
        not_after: not_after.to_unix_duration().as_secs() as i64,
        sha256: fingerprint(&digest),
    })
}

/// A SHA-256 digest as colon-separated upper-case hex pairs (how browsers show it).
pub fn fingerprint(digest: &[u8]) -> String {
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn validity(der: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let cert =
        x509_cert::Certificate::from_der(der).map_err(|e| format!("not a certificate: {e}"))?;
    let v = cert.tbs_certificate().validity();
    Ok((
        v.not_before.to_unix_duration().as_secs() as i64,
        v.not_after.to_unix_duration().as_secs() as i64,
    ))
}

fn format_time(unix: i64) -> String {
    match x509_cert::der::DateTime::from_unix_duration(Duration::from_secs(unix.max(0) as u64)) {
        Ok(t) => t.to_string(),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

#[cfg(test)]
mod tests;
