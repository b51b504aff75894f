//! The node's settings: what a node may still need at its first boot (answered by the seed or
//! by the first-boot wizard), and the settings service's socket protocol.
//!
//! The validation lives in `cluster_config::settings` (one schema for every front end); this
//! module holds only the plain data the front ends and the service exchange, so every crate
//! that talks to the service (the admin server, the serial-console wizard, `appliance
//! settings`) shares one definition.
//!
//! **Socket** ([`SOCKET_FILE`] in the node's run directory, 0660, the control group: the admin
//! server): a client sends one JSON line, a [`Request`], and reads one JSON line back, a
//! [`Response`]. The service (`appliance settings`, root) is the only writer of the settings
//! store ([`SETTINGS_DB_FILE`] in [`SETTINGS_DIR`], root's, 0700): every setup or change is
//! one SQLite transaction.

use std::fmt;
use std::io::Read as _;

use serde::{Deserialize, Serialize};

use crate::files::FileName;

/// The settings service's socket, in the node's run directory.
pub const SOCKET_FILE: &str = "settings.sock";
/// The settings store's directory in the node's state directory (root's, 0700: it holds the
/// cluster secret and the served TLS key).
pub const SETTINGS_DIR: FileName = FileName::new("settings");
/// The settings store (SQLite, WAL), inside [`SETTINGS_DIR`].
pub const SETTINGS_DB_FILE: FileName = FileName::new("settings.db");
/// The settings the image-builder puts in the seed (TOML, `cluster_config::settings::SeedSettings`).
/// A setting it holds is never asked; one it lacks is asked by the wizard.
pub const SEED_SETTINGS: FileName = FileName::new("settings.toml");
/// The one-time setup code of this boot's wizard (root's, 0600, in the run directory): made
/// by `appliance init` when the wizard starts and printed on the serial console; the settings
/// service refuses a setup without it.
pub const SETUP_CODE_FILE: FileName = FileName::new("setup-code");
/// What a user types for "make a new one" (the cluster secret).
pub const GENERATE: &str = "generate";

/// One question of the wizard (or one setting of the settings page). The snake-case name is the
/// form field's name and the key in the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The one-time code printed on the serial console (web wizard only).
    SetupCode,
    /// Which node of the cluster this machine is (generic images only).
    Node,
    /// The admin password.
    AdminPassword,
    /// The admin password again.
    AdminPasswordConfirm,
    /// The current admin password (changing it later).
    CurrentPassword,
    /// The cluster secret (64 hex digits, the same on every node) or [`GENERATE`].
    ClusterSecret,
    /// The served certificate: self-signed or uploaded.
    Tls,
    /// The uploaded certificate chain (PEM).
    TlsCertificate,
    /// The uploaded certificate's key (PEM).
    TlsKey,
    /// The alert webhook URL (empty: none).
    Webhook,
}

impl Field {
    /// Every field, in the order a form shows them.
    pub const ALL: [Field; 10] = [
        Field::SetupCode,
        Field::Node,
        Field::AdminPassword,
        Field::AdminPasswordConfirm,
        Field::CurrentPassword,
        Field::ClusterSecret,
        Field::Tls,
        Field::TlsCertificate,
        Field::TlsKey,
        Field::Webhook,
    ];

    /// The form field's name (snake case, as in the seed and the JSON).
    pub fn key(self) -> &'static str {
        match self {
            Field::SetupCode => "setup_code",
            Field::Node => "node",
            Field::AdminPassword => "admin_password",
            Field::AdminPasswordConfirm => "admin_password_confirm",
            Field::CurrentPassword => "current_password",
            Field::ClusterSecret => "cluster_secret",
            Field::Tls => "tls",
            Field::TlsCertificate => "tls_certificate",
            Field::TlsKey => "tls_key",
            Field::Webhook => "webhook",
        }
    }

    /// The field a form key names.
    pub fn from_key(key: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.key() == key)
    }

    /// What a form or the console calls it.
    pub fn label(self) -> &'static str {
        match self {
            Field::SetupCode => "Setup code",
            Field::Node => "This machine is node",
            Field::AdminPassword => "Admin password",
            Field::AdminPasswordConfirm => "Admin password (again)",
            Field::CurrentPassword => "Current admin password",
            Field::ClusterSecret => "Cluster secret",
            Field::Tls => "HTTPS certificate",
            Field::TlsCertificate => "Certificate chain (PEM)",
            Field::TlsKey => "Private key (PEM)",
            Field::Webhook => "Alert webhook URL",
        }
    }

    /// One line of help under the field.
    pub fn help(self) -> &'static str {
        match self {
            Field::SetupCode => "printed on the node's serial console",
            Field::Node => "the name of this machine in the cluster description",
            Field::AdminPassword => "at least 12 characters, mixing letters, digits or symbols",
            Field::AdminPasswordConfirm => "",
            Field::CurrentPassword => "",
            Field::ClusterSecret => {
                "the same 64 hex digits on every node; `generate` on the first node only"
            }
            Field::Tls => "`self-signed`, or upload the public name's certificate and key",
            Field::TlsCertificate => "leaf first, then intermediates",
            Field::TlsKey => "PKCS#8, PKCS#1 or SEC1; must match the certificate",
            Field::Webhook => "http:// or https://; empty for none",
        }
    }

    /// The field holds a secret: never echoed back into a form, never logged.
    pub fn is_secret(self) -> bool {
        matches!(
            self,
            Field::SetupCode
                | Field::AdminPassword
                | Field::AdminPasswordConfirm
                | Field::CurrentPassword
                | Field::ClusterSecret
                | Field::TlsKey
        )
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// A secret typed by a user or generated: serialized as the plain string (it travels only over
/// the root/control-group socket), but its `Debug` shows nothing, so it cannot reach a log.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// The served HTTPS certificate, as a user answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TlsChoice {
    /// The balancer's own self-signed certificate.
    SelfSigned,
    /// An uploaded chain and its key (PEM).
    Upload { certificate: String, key: Secret },
}

/// What a front end collected at first boot. `None`: not answered (fine when the seed holds
/// it, else "required").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Answers {
    pub node: Option<String>,
    pub admin_password: Option<Secret>,
    pub admin_password_confirm: Option<Secret>,
    /// 64 hex digits, or [`GENERATE`].
    pub cluster_secret: Option<Secret>,
    pub tls: Option<TlsChoice>,
    /// Empty: no webhook.
    pub webhook: Option<String>,
}

/// A change of the settings after setup (the admin page). `None`: unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Change {
    /// Required with a new password.
    pub current_password: Option<Secret>,
    pub admin_password: Option<Secret>,
    pub admin_password_confirm: Option<Secret>,
    pub tls: Option<TlsChoice>,
    /// Empty: remove the webhook.
    pub webhook: Option<String>,
}

/// One wrong answer: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldError {
    pub field: Field,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The request line a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// What the node has and what it still needs.
    Status,
    /// First-boot setup: validate every answer, then store the settings in one transaction and
    /// start the full node. Refused once the node is configured.
    Setup {
        setup_code: Secret,
        answers: Answers,
    },
    /// A later change (after setup).
    Change { change: Change },
    /// Check the admin password (a login).
    Login { password: Secret },
}

/// The one answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Status(Status),
    /// Stored. `cluster_secret` is the generated secret when the user asked for one: shown
    /// once, to be given to the other nodes' wizards.
    Applied {
        cluster_secret: Option<Secret>,
    },
    /// Nothing stored: what is wrong, per field.
    Invalid {
        errors: Vec<FieldError>,
    },
    /// A login that did not match.
    Denied,
    /// A login that matched.
    Ok,
    /// The service could not do it (the store failed); nothing was changed.
    Error {
        message: String,
    },
}

/// The node's settings as the service reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Setup is done: the wizard is gone, the admin port needs a login.
    pub configured: bool,
    /// How many setups and changes the store holds (0: nothing stored yet). A refused answer
    /// never changes it.
    pub revision: u64,
    /// The cluster's name.
    pub cluster: String,
    /// This node, once known.
    pub node: Option<String>,
    /// The cluster's node names (the choices for [`Field::Node`]).
    pub nodes: Vec<String>,
    /// What the wizard asks (what the seed left open), in form order.
    pub asked: Vec<Field>,
    /// The served certificate: `None` while self-signed.
    pub certificate: Option<CertificateInfo>,
    /// The alert webhook (its URL may hold a token: shown to a logged-in admin only).
    pub webhook: Option<String>,
    /// The bearer token `/metrics` takes (after setup).
    pub metrics_token: Option<Secret>,
}

/// What the admin page shows about an uploaded certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateInfo {
    /// The leaf's DNS names and addresses.
    pub names: Vec<String>,
    /// Its expiry, seconds since the Unix epoch.
    pub not_after: i64,
    /// SHA-256 of the leaf (hex, colon-separated pairs).
    pub sha256: String,
}

/// What a client shows when the service does not answer.
pub fn unreachable(socket: &std::path::Path, e: &std::io::Error) -> String {
    format!(
        "the settings service is not running (no answer on {}: {e})",
        socket.display()
    )
}

/// The one client: sends `request` to the service at `socket` and reads its answer. `timeout`
/// bounds the whole exchange (an argon2 check takes a second under emulation).
pub fn request(
    socket: &std::path::Path,
    request: &Request,
    timeout: std::time::Duration,
) -> Result<Response, String> {
    use std::io::{BufRead as _, Write as _};
    let stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| unreachable(socket, &e))?;
    let io = |e: std::io::Error| format!("asking the settings service: {e}");
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .take(MAX_LINE)
        .read_line(&mut answer)
        .map_err(io)?;
    if answer.is_empty() {
        return Err("the settings service closed without an answer".into());
    }
    serde_json::from_str(&answer)
        .map_err(|e| format!("unreadable answer from the settings service: {e}"))
}

/// The longest request or answer line (a certificate chain and key fit many times).
pub const MAX_LINE: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_by_key_and_secrets_stay_out_of_debug() {
        for f in Field::ALL {
            assert_eq!(Field::from_key(f.key()), Some(f));
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.key()));
        }
        assert_eq!(Field::from_key("nope"), None);
        let answers = Answers {
            admin_password: Some(Secret::new("hunter2hunter2")),
            tls: Some(TlsChoice::Upload {
                certificate: "CERT".into(),
                key: Secret::new("-----BEGIN PRIVATE KEY-----"),
            }),
            ..Answers::default()
        };
        let debug = format!("{answers:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("PRIVATE"),
            "{debug}"
        );
        let json = serde_json::to_string(&Request::Setup {
            setup_code: Secret::new("1234"),
            answers: answers.clone(),
        })
        .unwrap();
        let back: Request = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back,
            Request::Setup {
                setup_code: Secret::new("1234"),
                answers
            }
        );
        let tls: TlsChoice = serde_json::from_str(r#"{"mode":"self-signed"}"#).unwrap();
        assert_eq!(tls, TlsChoice::SelfSigned);
    }
}
