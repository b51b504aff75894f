//! The first-boot wizard, the login page and the settings page: their forms parsed into the
//! settings service's requests, and their HTML (pure; plain server-rendered pages like the
//! status page, every value escaped through `api::text`).
//!
//! Every field's input has `name` = `id` = its key ([`Field::key`]) and its error a
//! `<p class="error" id="error-KEY">`; a secret field ([`Field::is_secret`]) is never written
//! back into a form.

use std::fmt::Write as _;

use api::settings::{Answers, Change, Field, FieldError, Secret, Status, TlsChoice};

use crate::auth::CSRF_FIELD;

/// The login form's password field (not a setting: the login is not a [`Field`]).
pub(crate) const PASSWORD_FIELD: &str = "password";
/// The settings page's TLS choice that leaves the certificate as it is.
const KEEP: &str = "keep";
const SELF_SIGNED: &str = "self-signed";
const UPLOAD: &str = "upload";

/// An `application/x-www-form-urlencoded` body; the first value of a repeated key counts.
#[derive(Default)]
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    pub(crate) fn parse(body: &[u8]) -> Form {
        Form(form_urlencoded::parse(body).into_owned().collect())
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, `None` when absent or blank.
    fn filled(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.trim().is_empty())
    }
}

// Fields carry secrets: their values must never reach a log.
impl std::fmt::Debug for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.0.iter().map(|(k, _)| k.as_str()).collect();
        write!(f, "Form{keys:?}")
    }
}

/// A browser sends a textarea's lines ended by CRLF; PEM is read line by line either way, but
/// what is stored is what a file would hold.
fn pem_text(text: &str) -> String {
    text.replace("\r\n", "\n")
}

fn tls_choice(form: &Form) -> Option<TlsChoice> {
    match form.get(Field::Tls.key())? {
        SELF_SIGNED => Some(TlsChoice::SelfSigned),
        UPLOAD => Some(TlsChoice::Upload {
            certificate: pem_text(form.get(Field::TlsCertificate.key()).unwrap_or("")),
            key: Secret::new(pem_text(form.get(Field::TlsKey.key()).unwrap_or(""))),
        }),
        _ => None,
    }
}

/// The wizard's form as the settings service's request: the setup code and the answers to
/// the `asked` fields (answers to anything else are not sent; the seed holds those).
pub(crate) fn setup_answers(form: &Form, asked: &[Field]) -> (Secret, Answers) {
    let text = |f: Field| {
        asked
            .contains(&f)
            .then(|| form.get(f.key()).map(|v| v.trim().to_string()))
            .flatten()
    };
    let secret = |f: Field| {
        asked
            .contains(&f)
            .then(|| form.get(f.key()).map(Secret::new))
            .flatten()
    };
    let code = form.get(Field::SetupCode.key()).unwrap_or("").trim();
    let answers = Answers {
        node: text(Field::Node),
        admin_password: secret(Field::AdminPassword),
        admin_password_confirm: secret(Field::AdminPasswordConfirm),
        cluster_secret: secret(Field::ClusterSecret),
        tls: asked
            .contains(&Field::Tls)
            .then(|| tls_choice(form))
            .flatten(),
        webhook: text(Field::Webhook),
    };
    (Secret::new(code), answers)
}

/// The settings page's form as a change: a password only when one of the password fields is
/// filled, the certificate unless "keep", the webhook only when it differs from `webhook`
/// (the current one). `None`: nothing to change.
pub(crate) fn settings_change(form: &Form, webhook: Option<&str>) -> Option<Change> {
    let secret = |f: Field| form.filled(f.key()).map(Secret::new);
    let new_password = [Field::AdminPassword, Field::AdminPasswordConfirm]
        .iter()
        .any(|f| form.filled(f.key()).is_some());
    let change = Change {
        current_password: secret(Field::CurrentPassword),
        admin_password: new_password
            .then(|| Secret::new(form.get(Field::AdminPassword.key()).unwrap_or(""))),
        admin_password_confirm: new_password
            .then(|| Secret::new(form.get(Field::AdminPasswordConfirm.key()).unwrap_or(""))),
        tls: tls_choice(form),
        webhook: form
            .get(Field::Webhook.key())
            .map(|w| w.trim().to_string())
            .filter(|w| w != webhook.unwrap_or("")),
    };
    let nothing =
        change.admin_password.is_none() && change.tls.is_none() && change.webhook.is_none();
    (!nothing).then_some(change)
}

fn esc(s: &str) -> String {
    api::text::html_escape(s)
}

/// The errors of one field, joined.
fn error_of(errors: &[FieldError], field: Field) -> Option<String> {
    let messages: Vec<&str> = errors
        .iter()
        .filter(|e| e.field == field)
        .map(|e| e.message.as_str())
        .collect();
    (!messages.is_empty()).then(|| messages.join("; "))
}

/// A page around `body`; with a CSRF token, the logged-in navigation (status, settings, log
/// out).
fn page(title: &str, csrf: Option<&str>, body: &str, script: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{} — Tandem</title>\n<style>{}{FORM_STYLE}</style></head>\n<body>\n",
        esc(title),
        crate::page::STYLE
    );
    if let Some(csrf) = csrf {
        s.push_str(&nav(csrf));
    }
    s.push_str(body);
    if !script.is_empty() {
        let _ = writeln!(s, "<script>{script}</script>");
    }
    s.push_str("</body></html>\n");
    s
}

/// The navigation of every logged-in page; logging out is a POST with the session's token.
pub(crate) fn nav(csrf: &str) -> String {
    format!(
        "<nav id=\"nav\"><a href=\"/\">status</a> · <a href=\"/settings\">settings</a> · \
         <form class=\"inline\" method=\"post\" action=\"/logout\">\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{}\">\
         <button type=\"submit\" id=\"logout\">log out</button></form></nav>\n",
        esc(csrf)
    )
}

/// The TLS radio buttons offered.
#[derive(Clone, Copy)]
enum TlsOptions {
    /// The wizard: self-signed or upload.
    Setup,
    /// The settings page: keep, self-signed or upload.
    Change,
}

/// One field: label, input, help, error.
fn field_html(
    s: &mut String,
    field: Field,
    value: Option<&str>,
    error: Option<&str>,
    nodes: &[String],
    tls: TlsOptions,
) {
    let key = field.key();
    let value = if field.is_secret() {
        ""
    } else {
        value.unwrap_or("")
    };
    let _ = write!(s, "<div class=\"field\" id=\"field-{key}\">");
    if field != Field::Tls {
        let _ = write!(s, "<label for=\"{key}\">{}</label>", esc(field.label()));
    }
    match field {
        Field::Node => {
            let _ = write!(
                s,
                "<select name=\"{key}\" id=\"{key}\" required><option value=\"\">— choose —</option>"
            );
            for node in nodes {
                let selected = if node == value { " selected" } else { "" };
                let _ = write!(s, "<option value=\"{0}\"{selected}>{0}</option>", esc(node));
            }
            // What the browser sent is shown back as it was, even when it names no node.
            if !value.is_empty() && !nodes.iter().any(|n| n == value) {
                let _ = write!(s, "<option value=\"{0}\" selected>{0}</option>", esc(value));
            }
            s.push_str("</select>");
        }
        Field::Tls => {
            let _ = write!(s, "<fieldset><legend>{}</legend>", esc(field.label()));
            let (choices, default): (&[(&str, &str)], &str) = match tls {
                TlsOptions::Setup => (
                    &[
                        (SELF_SIGNED, "self-signed (browsers warn)"),
                        (UPLOAD, "upload a certificate and its key"),
                    ],
                    SELF_SIGNED,
                ),
                TlsOptions::Change => (
                    &[
                        (KEEP, "keep the current one"),
                        (SELF_SIGNED, "self-signed (browsers warn)"),
                        (UPLOAD, "upload a certificate and its key"),
                    ],
                    KEEP,
                ),
            };
            let chosen = if choices.iter().any(|(v, _)| *v == value) {
                value
            } else {
                default
            };
            for (choice, text) in choices {
                let checked = if *choice == chosen { " checked" } else { "" };
                let _ = write!(
                    s,
                    "<label class=\"choice\"><input type=\"radio\" name=\"{key}\" id=\"{key}-{choice}\" \
                     value=\"{choice}\"{checked}> {text}</label>"
                );
            }
            s.push_str("</fieldset>");
        }
        Field::TlsCertificate | Field::TlsKey => {
            let _ = write!(
                s,
                "<textarea name=\"{key}\" id=\"{key}\" rows=\"6\" cols=\"66\" spellcheck=\"false\" \
                 autocomplete=\"off\">{}</textarea>\
                 <input type=\"file\" id=\"{key}-file\" data-fill=\"{key}\" \
                 accept=\".pem,.crt,.cer,.key,text/plain\">",
                esc(value)
            );
        }
        Field::AdminPassword
        | Field::AdminPasswordConfirm
        | Field::CurrentPassword
        | Field::ClusterSecret => {
            let complete = match field {
                Field::CurrentPassword => "current-password",
                Field::ClusterSecret => "off",
                _ => "new-password",
            };
            let _ = write!(
                s,
                "<input type=\"password\" name=\"{key}\" id=\"{key}\" autocomplete=\"{complete}\">"
            );
        }
        Field::SetupCode | Field::Webhook => {
            let mode = match field {
                Field::Webhook => "url",
                _ => "text",
            };
            let _ = write!(
                s,
                "<input type=\"text\" name=\"{key}\" id=\"{key}\" value=\"{}\" inputmode=\"{mode}\" \
                 autocomplete=\"off\" spellcheck=\"false\">",
                esc(value)
            );
        }
    }
    if !field.help().is_empty() {
        let _ = write!(s, "<small>{}</small>", esc(field.help()));
    }
    if let Some(error) = error {
        let _ = write!(
            s,
            "<p class=\"error\" id=\"error-{key}\">{}</p>",
            esc(error)
        );
    }
    s.push_str("</div>\n");
}

/// Errors on fields the form does not show (and the service's own failure), above the form.
fn other_errors(s: &mut String, shown: &[Field], errors: &[FieldError], general: Option<&str>) {
    if let Some(message) = general {
        let _ = writeln!(s, "<p class=\"error\" id=\"error\">{}</p>", esc(message));
    }
    let mut seen = Vec::new();
    for e in errors {
        if !shown.contains(&e.field) && !seen.contains(&e.field) {
            seen.push(e.field);
            let _ = writeln!(
                s,
                "<p class=\"error\" id=\"error-{}\">{}: {}</p>",
                e.field.key(),
                esc(e.field.label()),
                esc(&error_of(errors, e.field).unwrap_or_default())
            );
        }
    }
}

/// The wizard as the page shows it.
pub(crate) struct SetupView<'a> {
    pub(crate) cluster: &'a str,
    /// The choices for [`Field::Node`].
    pub(crate) nodes: &'a [String],
    /// What the settings service asks; the setup code is added in front.
    pub(crate) asked: &'a [Field],
    /// What the browser sent last (its non-secret values are shown back).
    pub(crate) form: &'a Form,
    pub(crate) errors: &'a [FieldError],
    /// Why nothing could be done (the settings service failed or is not there).
    pub(crate) general: Option<&'a str>,
}

/// The setup code first, then what is asked, once each.
pub(crate) fn wizard_fields(asked: &[Field]) -> Vec<Field> {
    let mut fields = vec![Field::SetupCode];
    fields.extend(asked.iter().filter(|f| **f != Field::SetupCode));
    fields
}

pub(crate) fn render_setup(v: &SetupView<'_>) -> String {
    let fields = wizard_fields(v.asked);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<h1>Tandem · first-boot setup · cluster <b>{}</b></h1>\n\
         <p>This machine is not configured yet. The setup code is on its serial console, next \
         to this page's certificate fingerprint.</p>",
        esc(v.cluster)
    );
    other_errors(&mut s, &fields, v.errors, v.general);
    s.push_str("<form id=\"setup-form\" method=\"post\" action=\"/setup\" autocomplete=\"off\">\n");
    for &field in &fields {
        field_html(
            &mut s,
            field,
            v.form.get(field.key()),
            error_of(v.errors, field).as_deref(),
            v.nodes,
            TlsOptions::Setup,
        );
    }
    s.push_str("<button type=\"submit\" id=\"submit\">Set up this node</button>\n</form>\n");
    page(
        &format!("setup — {}", v.cluster),
        None,
        &s,
        if fields.contains(&Field::TlsCertificate) {
            FILL_SCRIPT
        } else {
            ""
        },
    )
}

/// What the done page says.
pub(crate) struct DoneView<'a> {
    pub(crate) cluster: &'a str,
    /// This machine's node, and where its admin port will be.
    pub(crate) node: Option<(&'a str, String)>,
    /// The cluster secret the user asked to generate: shown once.
    pub(crate) generated: Option<&'a Secret>,
    /// A node that was configured before this request: nothing was applied now.
    pub(crate) already: bool,
}

pub(crate) fn render_done(v: &DoneView<'_>) -> String {
    let mut s = String::from("<div id=\"setup-done\">\n");
    let _ = writeln!(
        s,
        "<h1>Tandem · cluster <b>{}</b> · {}</h1>",
        esc(v.cluster),
        if v.already {
            "already set up"
        } else {
            "setup done"
        }
    );
    match &v.node {
        Some((node, url)) => {
            let _ = writeln!(
                s,
                "<p>This machine is node <b id=\"node\">{}</b>. It now restarts its services on its \
                 own address: the admin page will be at <a href=\"{1}\">{1}</a> (log in with the \
                 admin password).</p>",
                esc(node),
                esc(url)
            );
        }
        None => s.push_str(
            "<p>The node now restarts its services on its own address; log in there with the \
             admin password.</p>\n",
        ),
    }
    if let Some(secret) = v.generated {
        let _ = writeln!(
            s,
            "<p>The new cluster secret, shown only this once: give it to the other nodes' \
             setup.</p>\n<pre id=\"generated-secret\">{}</pre>",
            esc(secret.expose())
        );
    }
    s.push_str("</div>\n");
    page(&format!("setup done — {}", v.cluster), None, &s, "")
}

/// A page saying the wizard cannot be shown yet (the settings service does not answer).
pub(crate) fn render_waiting(cluster: &str, message: &str) -> String {
    let body = format!(
        "<h1>Tandem · first-boot setup · cluster <b>{}</b></h1>\n\
         <p class=\"error\" id=\"error\">{}</p>\n<p>This page reloads in a few seconds.</p>\n",
        esc(cluster),
        esc(message)
    );
    page(
        "setup",
        None,
        &body,
        "setTimeout(function(){location.reload();},3000);",
    )
}

/// The login page; `error` on the password field.
pub(crate) fn render_login(cluster: &str, node: &str, csrf: &str, error: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<h1>Tandem · cluster <b>{}</b> · node <b>{}</b></h1>\n\
         <form id=\"login-form\" method=\"post\" action=\"/login\">\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{}\">\
         <div class=\"field\"><label for=\"{PASSWORD_FIELD}\">Admin password</label>\
         <input type=\"password\" name=\"{PASSWORD_FIELD}\" id=\"{PASSWORD_FIELD}\" \
         autocomplete=\"current-password\" autofocus required>",
        esc(cluster),
        esc(node),
        esc(csrf)
    );
    if let Some(error) = error {
        let _ = write!(
            s,
            "<p class=\"error\" id=\"error-{PASSWORD_FIELD}\">{}</p>",
            esc(error)
        );
    }
    s.push_str("</div><button type=\"submit\" id=\"submit\">Log in</button></form>\n");
    page(&format!("log in — {node}"), None, &s, "")
}

/// The settings page as shown.
pub(crate) struct SettingsView<'a> {
    pub(crate) cluster: &'a str,
    pub(crate) node: &'a str,
    pub(crate) csrf: &'a str,
    /// The settings as the service reports them (`None`: it does not answer).
    pub(crate) status: Option<&'a Status>,
    /// What the browser sent last, when the page answers a post.
    pub(crate) form: Option<&'a Form>,
    pub(crate) errors: &'a [FieldError],
    /// A line above the form: what happened.
    pub(crate) notice: Option<&'a str>,
    pub(crate) general: Option<&'a str>,
    pub(crate) now_unix: i64,
}

/// What the settings page offers to change, in order.
const SETTINGS_FIELDS: [Field; 7] = [
    Field::CurrentPassword,
    Field::AdminPassword,
    Field::AdminPasswordConfirm,
    Field::Tls,
    Field::TlsCertificate,
    Field::TlsKey,
    Field::Webhook,
];

pub(crate) fn render_settings(v: &SettingsView<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<h1>Tandem · cluster <b>{}</b> · node <b>{}</b> · settings</h1>",
        esc(v.cluster),
        esc(v.node)
    );
    if let Some(notice) = v.notice {
        let _ = writeln!(s, "<p class=\"notice\" id=\"notice\">{}</p>", esc(notice));
    }
    other_errors(&mut s, &SETTINGS_FIELDS, v.errors, v.general);
    if let Some(status) = v.status {
        s.push_str("<h2>Now</h2>\n<table id=\"current\">\n");
        let certificate = match &status.certificate {
            None => "self-signed".to_string(),
            Some(c) => {
                let days = (c.not_after - v.now_unix).div_euclid(86_400);
                let expiry = match days {
                    d if d < 0 => "EXPIRED".to_string(),
                    d => format!("expires in {d} days"),
                };
                format!("{} ({expiry}); SHA-256 {}", c.names.join(", "), c.sha256)
            }
        };
        let _ = writeln!(
            s,
            "<tr><th>HTTPS certificate</th><td id=\"current-certificate\">{}</td></tr>\n\
             <tr><th>alert webhook</th><td id=\"current-webhook\">{}</td></tr>\n\
             <tr><th>settings revision</th><td>{}</td></tr>\n</table>",
            esc(&certificate),
            esc(status.webhook.as_deref().unwrap_or("none")),
            status.revision
        );
    }
    let current_webhook = v.status.and_then(|st| st.webhook.as_deref());
    let _ = writeln!(
        s,
        "<h2>Change</h2>\n<form id=\"settings-form\" method=\"post\" action=\"/settings\" \
         autocomplete=\"off\"><input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{}\">\n\
         <p>Leave the password fields empty to keep the password.</p>",
        esc(v.csrf)
    );
    for field in SETTINGS_FIELDS {
        let value = match (v.form, field) {
            (Some(form), _) => form.get(field.key()),
            (None, Field::Webhook) => current_webhook,
            (None, _) => None,
        };
        field_html(
            &mut s,
            field,
            value,
            error_of(v.errors, field).as_deref(),
            &[],
            TlsOptions::Change,
        );
    }
    s.push_str("<button type=\"submit\" id=\"submit\">Save</button>\n</form>\n");
    page(
        &format!("settings — {}", v.node),
        Some(v.csrf),
        &s,
        FILL_SCRIPT,
    )
}

/// Fills a PEM textarea from the file its picker chose (the form itself stays urlencoded).
const FILL_SCRIPT: &str = r#"
document.querySelectorAll('input[data-fill]').forEach(function(p){p.onchange=function(){var f=p.files[0];if(!f)return;
f.text().then(function(t){document.getElementById(p.dataset.fill).value=t;var u=document.getElementById('tls-upload');if(u)u.checked=true;});};});
"#;

const FORM_STYLE: &str = "nav{margin-bottom:1em}form.inline{display:inline}\
.field{margin:.8em 0}.field label{display:block;font-weight:bold}.field small{display:block;color:#555}\
label.choice{display:block;font-weight:normal}fieldset{border:none;padding:0;margin:0}\
legend{font-weight:bold;padding:0}input[type=text],input[type=password],select{min-width:24em}\
textarea{font-family:monospace;display:block}p.error{color:#b00020;font-weight:bold}\
p.notice{color:#176b1d;font-weight:bold}pre{background:#f3f3f3;padding:.5em}";

#[cfg(test)]
mod tests {
    use super::*;

    /// A map of the form's non-secret values for a test's view.
    fn form_of(pairs: &[(&str, &str)]) -> Form {
        Form(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Which fields an HTML text has inputs for, by id (tests).
    fn ids(html: &str) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for part in html.split("id=\"").skip(1) {
            if let Some((id, _)) = part.split_once('"') {
                *out.entry(id.to_string()).or_insert(0) += 1;
            }
        }
        out
    }

    const ALL_ASKED: [Field; 8] = [
        Field::Node,
        Field::AdminPassword,
        Field::AdminPasswordConfirm,
        Field::ClusterSecret,
        Field::Tls,
        Field::TlsCertificate,
        Field::TlsKey,
        Field::Webhook,
    ];

    #[test]
    fn the_wizard_form_becomes_the_setup_request() {
        let form = Form::parse(
            b"setup_code=+1234-5678-9012+&node=server2+&admin_password=pw+1&admin_password_confirm=pw+1\
              &cluster_secret=generate&tls=upload&tls_certificate=C%0D%0AD&tls_key=K%0D%0A\
              &webhook=&unknown=1&node=server3",
        );
        let (code, answers) = setup_answers(&form, &ALL_ASKED);
        assert_eq!(code.expose(), "1234-5678-9012");
        assert_eq!(
            answers,
            Answers {
                node: Some("server2".into()),
                admin_password: Some(Secret::new("pw 1")),
                admin_password_confirm: Some(Secret::new("pw 1")),
                cluster_secret: Some(Secret::new("generate")),
                tls: Some(TlsChoice::Upload {
                    certificate: "C\nD".into(),
                    key: Secret::new("K\n"),
                }),
                webhook: Some(String::new()),
            }
        );
        assert!(!format!("{form:?}").contains("pw"), "{form:?}");
        // Only what is asked is sent; a missing or unknown TLS choice is no answer.
        let (_, answers) = setup_answers(&form, &[Field::Node, Field::Tls]);
        assert_eq!(answers.node.as_deref(), Some("server2"));
        assert!(answers.admin_password.is_none() && answers.webhook.is_none());
        let cases: [(&[u8], Option<TlsChoice>); 3] = [
            (b"tls=self-signed&tls_key=K", Some(TlsChoice::SelfSigned)),
            (b"tls=bogus", None),
            (
                b"tls=upload",
                Some(TlsChoice::Upload {
                    certificate: String::new(),
                    key: Secret::default(),
                }),
            ),
        ];
        for (body, tls) in cases {
            let (code, answers) = setup_answers(&Form::parse(body), &ALL_ASKED);
            assert_eq!(answers.tls, tls, "{}", String::from_utf8_lossy(body));
            assert_eq!(code.expose(), "");
            assert!(answers.node.is_none());
        }
    }

    #[test]
    fn the_settings_form_becomes_a_change_of_what_differs() {
        let hook = Some("https://hooks.example.test/a");
        let cases: [(&[u8], Option<Change>); 6] = [
            (
                b"csrf=x&tls=keep&webhook=https%3A%2F%2Fhooks.example.test%2Fa",
                None,
            ),
            (
                b"csrf=x&current_password=old&tls=keep&webhook=https://hooks.example.test/a",
                None,
            ),
            (
                b"current_password=old&admin_password=new&admin_password_confirm=&tls=keep",
                Some(Change {
                    current_password: Some(Secret::new("old")),
                    admin_password: Some(Secret::new("new")),
                    admin_password_confirm: Some(Secret::new("")),
                    ..Change::default()
                }),
            ),
            (
                b"tls=self-signed&webhook=+https://hooks.example.test/a+",
                Some(Change {
                    tls: Some(TlsChoice::SelfSigned),
                    ..Change::default()
                }),
            ),
            (
                b"tls=keep&webhook=",
                Some(Change {
                    webhook: Some(String::new()),
                    ..Change::default()
                }),
            ),
            (
                b"tls=upload&tls_certificate=C&tls_key=K",
                Some(Change {
                    tls: Some(TlsChoice::Upload {
                        certificate: "C".into(),
                        key: Secret::new("K"),
                    }),
                    ..Change::default()
                }),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                settings_change(&Form::parse(body), hook),
                expected,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // No webhook now: an empty field changes nothing, a URL sets it.
        assert_eq!(settings_change(&Form::parse(b"webhook="), None), None);
        assert_eq!(
            settings_change(&Form::parse(b"webhook=https://h.test/"), None).and_then(|c| c.webhook),
            Some("https://h.test/".into())
        );
    }

    #[test]
    fn the_wizard_shows_each_asked_field_once_with_its_error_and_no_secret() {
        let nodes = vec!["server1".to_string(), "server2".to_string()];
        let form = form_of(&[
            ("setup_code", "1111-2222-3333"),
            ("node", "<evil>"),
            ("admin_password", "hunter2hunter2"),
            ("cluster_secret", "deadbeef"),
            ("tls", "upload"),
            ("tls_certificate", "-----BEGIN CERTIFICATE-----\n<x>"),
            ("tls_key", "-----BEGIN PRIVATE KEY-----"),
            ("webhook", "https://h.test/\"x"),
        ]);
        let errors = vec![
            FieldError {
                field: Field::Node,
                message: "unknown node `<evil>`".into(),
            },
            FieldError {
                field: Field::TlsKey,
                message: "does not match".into(),
            },
            FieldError {
                field: Field::TlsKey,
                message: "and more".into(),
            },
            FieldError {
                field: Field::SetupCode,
                message: "wrong setup code".into(),
            },
        ];
        let html = render_setup(&SetupView {
            cluster: "default",
            nodes: &nodes,
            asked: &ALL_ASKED,
            form: &form,
            errors: &errors,
            general: None,
        });
        let ids = ids(&html);
        for key in [
            "setup-form",
            "setup_code",
            "node",
            "admin_password",
            "admin_password_confirm",
            "cluster_secret",
            "tls-self-signed",
            "tls-upload",
            "tls_certificate",
            "tls_key",
            "webhook",
            "submit",
            "error-node",
            "error-tls_key",
            "error-setup_code",
        ] {
            assert_eq!(ids.get(key), Some(&1), "{key} in {html}");
        }
        assert!(!ids.contains_key("error-webhook") && !ids.contains_key("current_password"));
        // The setup code comes first; the node list keeps the (escaped) value sent.
        assert!(html.find("id=\"setup_code\"") < html.find("id=\"node\""));
        assert!(html.contains("<option value=\"server2\">server2</option>"));
        assert!(html.contains("<option value=\"&lt;evil&gt;\" selected>&lt;evil&gt;</option>"));
        assert!(html.contains("id=\"error-node\">unknown node `&lt;evil&gt;`</p>"));
        assert!(html.contains("id=\"error-tls_key\">does not match; and more</p>"));
        assert!(html.contains("value=\"upload\" checked"));
        assert!(
            html.contains("&lt;x&gt;</textarea>"),
            "the certificate is kept"
        );
        assert!(html.contains("value=\"https://h.test/&quot;x\""));
        for secret in ["1111-2222", "hunter2", "deadbeef", "PRIVATE KEY"] {
            assert!(!html.contains(secret), "{secret} echoed: {html}");
        }
        // Nothing sent yet: self-signed is the default, no error shown; a service failure is.
        let html = render_setup(&SetupView {
            cluster: "c",
            nodes: &nodes,
            asked: &[Field::Tls, Field::TlsCertificate, Field::TlsKey],
            form: &Form::default(),
            errors: &[],
            general: Some("the settings service is not running"),
        });
        assert!(html.contains("value=\"self-signed\" checked"));
        assert!(!html.contains("id=\"node\""));
        assert_eq!(html.matches("class=\"error\"").count(), 1, "{html}");
        assert!(html.contains("id=\"error\">the settings service is not running"));
        // An error on a field not shown still has its place.
        let html = render_setup(&SetupView {
            cluster: "c",
            nodes: &nodes,
            asked: &[Field::Webhook],
            form: &Form::default(),
            errors: &[FieldError {
                field: Field::Node,
                message: "m".into(),
            }],
            general: None,
        });
        assert!(
            html.contains("id=\"error-node\">This machine is node: m</p>"),
            "{html}"
        );
        assert!(
            !html.contains("<script>"),
            "no file pickers without certificate fields"
        );
    }

    #[test]
    fn done_login_and_settings_pages() {
        let secret = Secret::new("ab".repeat(32));
        let html = render_done(&DoneView {
            cluster: "c",
            node: Some(("server1", "https://10.88.0.11:9443/login".into())),
            generated: Some(&secret),
            already: false,
        });
        assert!(html.contains("id=\"setup-done\""));
        assert!(html.contains(&format!(
            "<pre id=\"generated-secret\">{}</pre>",
            "ab".repeat(32)
        )));
        assert!(html.contains("<b id=\"node\">server1</b>"));
        assert!(html.contains("href=\"https://10.88.0.11:9443/login\""));
        let html = render_done(&DoneView {
            cluster: "c",
            node: None,
            generated: None,
            already: true,
        });
        assert!(html.contains("already set up") && !html.contains("generated-secret"));

        let html = render_login("c", "n<1>", "tok", Some("wrong password"));
        let found = ids(&html);
        for key in ["login-form", "password", "error-password", "submit"] {
            assert_eq!(found.get(key), Some(&1), "{key}");
        }
        assert!(html.contains("name=\"csrf\" value=\"tok\""));
        assert!(html.contains("n&lt;1&gt;") && !html.contains("id=\"nav\""));
        assert!(!render_login("c", "n", "tok", None).contains("error-password"));

        let status = Status {
            configured: true,
            revision: 3,
            cluster: "c".into(),
            node: Some("server1".into()),
            nodes: Vec::new(),
            asked: Vec::new(),
            certificate: Some(api::settings::CertificateInfo {
                names: vec!["www.example.test".into()],
                not_after: 10 * 86_400,
                sha256: "AA:BB".into(),
            }),
            webhook: Some("https://h.test/x".into()),
            metrics_token: Some(Secret::new("t0ken")),
        };
        let html = render_settings(&SettingsView {
            cluster: "c",
            node: "server1",
            csrf: "tok",
            status: Some(&status),
            form: None,
            errors: &[],
            notice: Some("Saved."),
            general: None,
            now_unix: 86_400 / 2,
        });
        let found = ids(&html);
        for key in [
            "nav",
            "logout",
            "settings-form",
            "current_password",
            "admin_password",
            "admin_password_confirm",
            "tls-keep",
            "tls-self-signed",
            "tls-upload",
            "tls_certificate",
            "tls_key",
            "webhook",
            "submit",
            "notice",
        ] {
            assert_eq!(found.get(key), Some(&1), "{key} in {html}");
        }
        assert_eq!(html.matches("name=\"csrf\" value=\"tok\"").count(), 2);
        assert!(html.contains("www.example.test (expires in 9 days); SHA-256 AA:BB"));
        assert!(
            html.contains("value=\"https://h.test/x\""),
            "the webhook is prefilled"
        );
        assert!(html.contains("value=\"keep\" checked"));
        assert!(
            !html.contains("t0ken"),
            "the metrics token stays off the page"
        );
        // Re-shown after a refused change: the form's values, the errors, no secrets.
        let form = form_of(&[
            ("current_password", "old-secret-pw"),
            ("admin_password", "weak"),
            ("tls", "self-signed"),
            ("webhook", "ftp://x"),
        ]);
        let html = render_settings(&SettingsView {
            form: Some(&form),
            errors: &[FieldError {
                field: Field::AdminPassword,
                message: "too short".into(),
            }],
            notice: None,
            status: None,
            ..SettingsView {
                cluster: "c",
                node: "server1",
                csrf: "tok",
                status: None,
                form: None,
                errors: &[],
                notice: None,
                general: Some("x"),
                now_unix: 0,
            }
        });
        assert!(html.contains("id=\"error-admin_password\">too short</p>"));
        assert!(
            html.contains("value=\"ftp://x\"") && html.contains("value=\"self-signed\" checked")
        );
        assert!(!html.contains("old-secret-pw") && !html.contains("weak\""));
    }
}
