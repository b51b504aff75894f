//! The wizard (setup mode) and the login (full mode) over real HTTPS, against a fake settings
//! service that validates with `cluster_config::settings` (see `http_tests`).

use std::net::SocketAddr;
use std::sync::Arc;

use cluster_config::settings::SeedSettings;
use cluster_config::Cluster;

use crate::http_tests::{
    client, configured, fake_settings, full_server, generate, metrics_token, Answer, Browser,
    FakeSettings, PASSWORD, SETUP_CODE,
};

const MIB: u64 = 1 << 20;
/// The password the wizard's tests choose.
const NEW_PASSWORD: &str = "Another-good-pass-42";

/// A certificate for `name` and its key (PEM), valid now.
fn pair(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A wizard (`--setup`) on 127.0.0.1 with its own certificate, and the fake settings service
/// of a node whose seed is `seed`.
struct SetupServer {
    addr: SocketAddr,
    settings: Arc<FakeSettings>,
    _root: tempfile::TempDir,
}

fn setup_server(seed: SeedSettings) -> SetupServer {
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let (cert, key) = pair("setup.tandem.test");
    std::fs::write(tls.join(api::files::NODE_CERT), cert).unwrap();
    std::fs::write(tls.join(api::files::NODE_KEY), key).unwrap();
    let socket = root.path().join(api::settings::SOCKET_FILE);
    let settings = fake_settings(&socket, seed, None);
    let tls = crate::plain_server_config(
        &tls.join(api::files::NODE_CERT),
        &tls.join(api::files::NODE_KEY),
    )
    .unwrap();
    let wizard = crate::wizard::Wizard::new(Cluster::default_cluster(), socket);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = crate::wizard::serve_setup(listener, tls, wizard).await;
        });
    });
    SetupServer {
        addr,
        settings,
        _root: root,
    }
}

/// Good answers to every question of an empty seed.
fn good_answers(certificate: &str, key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("setup_code", SETUP_CODE.into()),
        ("node", "server2".into()),
        ("admin_password", NEW_PASSWORD.into()),
        ("admin_password_confirm", NEW_PASSWORD.into()),
        ("cluster_secret", "generate".into()),
        ("tls", "upload".into()),
        ("tls_certificate", certificate.into()),
        ("tls_key", key.into()),
        ("webhook", "https://hooks.example.test/alert".into()),
    ]
}

fn with(answers: &[(&'static str, String)], key: &str, value: &str) -> Vec<(&'static str, String)> {
    answers
        .iter()
        .map(|(k, v)| {
            (
                *k,
                if *k == key {
                    value.to_string()
                } else {
                    v.clone()
                },
            )
        })
        .collect()
}

fn post_setup(browser: &mut Browser, answers: &[(&'static str, String)]) -> Answer {
    let fields: Vec<(&str, &str)> = answers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    browser.post_form("/setup", &fields)
}

/// The one line of a PEM body that shows whether it was echoed.
fn pem_line(pem: &str) -> &str {
    pem.lines().nth(1).unwrap()
}

#[test]
fn the_wizard_asks_what_the_seed_lacks_and_refuses_each_wrong_answer_on_its_field() {
    let srv = setup_server(SeedSettings::default());
    let mut browser = Browser::at(srv.addr);

    let root = browser.get("/");
    assert_eq!(root.status, 303);
    assert_eq!(root.header("location"), Some("/setup"));
    let form = browser.get("/setup");
    assert_eq!(form.status, 200, "{}", form.body);
    assert!(form
        .body
        .contains("<form id=\"setup-form\" method=\"post\" action=\"/setup\""));
    for id in [
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
    ] {
        assert!(form.body.contains(&format!("id=\"{id}\"")), "{id}");
    }
    assert!(form.body.contains("<select name=\"node\" id=\"node\""));
    assert!(form
        .body
        .contains("<option value=\"server2\">server2</option>"));
    assert!(!form.body.contains("class=\"error\""));
    let status = browser.get("/api/setup/status");
    let json: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "configured": false,
            "revision": 0,
            "asked": ["node", "admin_password", "admin_password_confirm", "cluster_secret",
                      "tls", "tls_certificate", "tls_key", "webhook"],
        })
    );

    let (certificate, key) = pair("www.example.test");
    let (_, other_key) = pair("www.example.test");
    let good = good_answers(&certificate, &key);
    let malformed = "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n";
    let cases = [
        (
            with(&good, "setup_code", "0000-0000-0000"),
            "setup_code",
            "wrong setup code",
        ),
        (
            with(
                &with(&good, "admin_password", "short1!"),
                "admin_password_confirm",
                "short1!",
            ),
            "admin_password",
            "too short",
        ),
        (
            with(&good, "tls_key", &other_key),
            "tls_key",
            "does not match the certificate",
        ),
        (
            with(&good, "tls_certificate", malformed),
            "tls_certificate",
            "PEM",
        ),
        (
            with(&good, "node", "server9"),
            "node",
            "unknown node `server9`",
        ),
    ];
    for (answers, field, message) in cases {
        let answer = post_setup(&mut browser, &answers);
        assert_eq!(answer.status, 422, "{field}: {}", answer.body);
        let error = answer
            .body
            .split_once(&format!("<p class=\"error\" id=\"error-{field}\">"))
            .unwrap_or_else(|| panic!("no error on {field}: {}", answer.body))
            .1;
        assert!(
            error.split_once("</p>").unwrap().0.contains(message),
            "{field}: {error}"
        );
        // Secrets are not echoed; the rest is kept.
        for secret in [
            NEW_PASSWORD,
            "short1!",
            SETUP_CODE,
            "0000-0000-0000",
            pem_line(&key),
        ] {
            assert!(!answer.body.contains(secret), "{field}: {secret} echoed");
        }
        assert!(answer
            .body
            .contains("value=\"https://hooks.example.test/alert\""));
        assert!(answer.body.contains("value=\"upload\" checked"), "{field}");
        if field != "tls_certificate" {
            assert!(answer.body.contains(pem_line(&certificate)), "{field}");
        }
    }
    assert_eq!(srv.settings.revision(), 0, "nothing was applied");

    let done = post_setup(&mut browser, &good);
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("id=\"setup-done\""), "{}", done.body);
    assert!(done.body.contains(&format!(
        "<pre id=\"generated-secret\">{}</pre>",
        "ab".repeat(32)
    )));
    let admin_port = Cluster::default_cluster().ports.admin;
    assert!(
        done.body
            .contains(&format!("https://10.88.0.12:{admin_port}/login")),
        "{}",
        done.body
    );
    let stored = srv.settings.settings().unwrap();
    assert_eq!(stored.node, "server2");
    assert_eq!(
        stored.webhook.as_deref(),
        Some("https://hooks.example.test/alert")
    );
    assert!(matches!(
        &stored.tls,
        api::settings::TlsChoice::Upload { certificate: c, .. } if c.contains(pem_line(&certificate))
    ));
    assert_eq!(srv.settings.revision(), 1);

    // Set up: the wizard says so and applies nothing more.
    let again = browser.get("/setup");
    assert!(again.body.contains("already set up"), "{}", again.body);
    assert!(!again.body.contains("generated-secret"));
    let again = post_setup(&mut browser, &good);
    assert!(again.body.contains("already set up"), "{}", again.body);
    assert_eq!(srv.settings.revision(), 1);
    let json: serde_json::Value =
        serde_json::from_str(&browser.get("/api/setup/status").body).unwrap();
    assert_eq!(json["configured"], true);
    assert_eq!(json["revision"], 1);
}

#[test]
fn a_seed_with_settings_asks_only_the_rest_and_wrong_setup_codes_are_rate_limited() {
    let seed = SeedSettings {
        node: Some("server1".into()),
        tls: Some(api::settings::TlsChoice::SelfSigned),
        webhook: Some(String::new()),
        ..SeedSettings::default()
    };
    let srv = setup_server(seed);
    let mut browser = Browser::at(srv.addr);
    let form = browser.get("/setup");
    for id in ["setup_code", "admin_password", "cluster_secret"] {
        assert!(form.body.contains(&format!("id=\"{id}\"")), "{id}");
    }
    for id in ["node", "tls_key", "webhook"] {
        assert!(
            !form.body.contains(&format!("id=\"{id}\"")),
            "{id} is in the seed"
        );
    }
    let good = vec![
        ("setup_code", SETUP_CODE.to_string()),
        ("admin_password", NEW_PASSWORD.to_string()),
        ("admin_password_confirm", NEW_PASSWORD.to_string()),
        ("cluster_secret", "00".repeat(32)),
    ];
    // A right code with a weak password is no failed code, however often.
    for _ in 0..7 {
        let weak = with(&good, "admin_password", "aaaaaaaaaaaa");
        let answer = post_setup(&mut browser, &weak);
        assert_eq!(answer.status, 422);
        assert!(answer.body.contains("id=\"error-admin_password\""));
    }
    let wrong = with(&good, "setup_code", "9999-9999-9999");
    for i in 0..5 {
        let answer = post_setup(&mut browser, &wrong);
        assert_eq!(answer.status, 422, "attempt {i}");
        assert!(answer
            .body
            .contains("id=\"error-setup_code\">wrong setup code"));
    }
    for answers in [&wrong, &good] {
        let answer = post_setup(&mut browser, answers);
        assert_eq!(answer.status, 429, "{}", answer.body);
        let wait: u64 = answer.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=900).contains(&wait), "{wait}");
        assert!(
            answer
                .body
                .contains("id=\"error-setup_code\">too many wrong setup codes from 127.0.0.1"),
            "{}",
            answer.body
        );
    }
    assert_eq!(srv.settings.revision(), 0);
}

#[test]
fn after_setup_every_page_needs_the_login_and_every_action_its_csrf_token() {
    let key = generate();
    let srv = full_server(&key, 8 * MIB, Some(configured()));
    let settings = srv.settings.clone().unwrap();
    let mut anonymous = Browser::new(&srv);
    for (path, status, location) in [
        ("/setup", 303, Some("/login")),
        ("/", 303, Some("/login")),
        ("/settings", 303, Some("/login")),
        ("/api/status", 401, None),
        ("/api/session", 401, None),
        ("/healthz", 200, None),
    ] {
        let answer = anonymous.get(path);
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
        assert_eq!(answer.header("location"), location, "{path}");
    }
    for path in [
        "/settings",
        "/logout",
        "/api/update/install",
        "/api/cluster/upgrade",
    ] {
        let answer = anonymous.post_form(path, &[("csrf", &"ab".repeat(32))]);
        assert_eq!(answer.status, 403, "{path}: {}", answer.body);
    }
    // A login posted without the login form's cookie (another site's form): refused before
    // the password is checked.
    let forged = anonymous.post_form(
        "/login",
        &[("csrf", &"ab".repeat(32)), ("password", PASSWORD)],
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert_eq!(settings.logins(), 0);

    let mut browser = Browser::new(&srv);
    let login = browser.login(PASSWORD);
    assert_eq!(login.status, 303, "{}", login.body);
    assert_eq!(login.header("location"), Some("/"));
    let cookie = login
        .headers
        .iter()
        .find(|(k, v)| k.eq_ignore_ascii_case("set-cookie") && v.starts_with("tandem_session="))
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(
        cookie.ends_with("; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=43200"),
        "{cookie}"
    );
    assert_eq!(browser.cookie("tandem_session").unwrap().len(), 64);
    assert_eq!(browser.get("/login").header("location"), Some("/"));
    let page = browser.get("/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<nav id=\"nav\">"), "{}", page.body);
    let session: serde_json::Value =
        serde_json::from_str(&browser.get("/api/session").body).unwrap();
    let csrf = session["csrf"].as_str().unwrap().to_string();
    assert!(page
        .body
        .contains(&format!("<meta name=\"csrf-token\" content=\"{csrf}\">")));
    assert_eq!(browser.get("/api/status").status, 200);

    // Actions: the session alone is not enough.
    let post = |path: &str, csrf: Option<&str>| {
        let mut req = client()
            .post(&srv.url(path))
            .header("Cookie", &browser.cookie_header());
        if let Some(csrf) = csrf {
            req = req.header("X-CSRF-Token", csrf);
        }
        Answer::from_response(req.send(&b"bundle"[..]).unwrap())
    };
    for path in [
        "/api/update/install?reboot=0",
        "/api/update/boot-once?slot=a",
        "/api/cluster/upgrade",
    ] {
        assert_eq!(post(path, None).status, 403, "{path}");
        assert_eq!(post(path, Some(&"0".repeat(64))).status, 403, "{path}");
    }
    // With the token the request is served (no update service runs here).
    let served = post("/api/update/install?reboot=0", Some(&csrf));
    assert_eq!(served.status, 503, "{}", served.body);
    assert!(
        served.body.contains("update service is not running"),
        "{}",
        served.body
    );

    // /metrics takes the bearer token only.
    let metrics = |authorization: Option<String>| {
        let mut req = client().get(&srv.url("/metrics"));
        if let Some(a) = authorization {
            req = req.header("Authorization", &a);
        }
        Answer::from_response(req.call().unwrap())
    };
    let refused = metrics(None);
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.header("www-authenticate"),
        Some("Bearer realm=\"tandem\"")
    );
    assert_eq!(metrics(Some("Bearer nope".into())).status, 401);
    assert_eq!(
        metrics(Some(format!("Basic {}", metrics_token()))).status,
        401
    );
    let ok = metrics(Some(format!("Bearer {}", metrics_token())));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("tandem_supervisor_up"), "{}", ok.body);

    // Logging out needs the token too, then the session is gone.
    assert_eq!(browser.post_form("/logout", &[]).status, 403);
    let old = browser.cookie_header();
    let out = browser.post_form("/logout", &[("csrf", &csrf)]);
    assert_eq!(out.status, 303);
    assert_eq!(out.header("location"), Some("/login"));
    assert!(browser.cookie("tandem_session").is_none());
    let stale = client()
        .get(&srv.url("/"))
        .header("Cookie", &old)
        .call()
        .unwrap();
    assert_eq!(stale.status().as_u16(), 303);
}

#[test]
fn ten_wrong_passwords_are_rate_limited_by_the_sixth() {
    let key = generate();
    let srv = full_server(&key, 8 * MIB, Some(configured()));
    let settings = srv.settings.clone().unwrap();
    let mut browser = Browser::new(&srv);
    let statuses: Vec<u16> = (0..10)
        .map(|i| {
            let answer = browser.login(&format!("wrong-password-{i}"));
            match answer.status {
                401 => assert!(answer.body.contains("id=\"error-password\">wrong password")),
                429 => {
                    let wait: u64 = answer.header("retry-after").unwrap().parse().unwrap();
                    assert!((1..=900).contains(&wait), "{wait}");
                    assert!(answer
                        .body
                        .contains("id=\"error-password\">too many failed logins"));
                }
                other => panic!("{other}: {}", answer.body),
            }
            assert!(
                !answer.body.contains("wrong-password-"),
                "the password is echoed"
            );
            answer.status
        })
        .collect();
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429, 429, 429, 429]);
    assert_eq!(
        settings.logins(),
        5,
        "a limited address is not even checked"
    );
    // The right password waits too.
    assert_eq!(browser.login(PASSWORD).status, 429);
}

#[test]
fn the_settings_page_changes_through_the_same_validation() {
    let key = generate();
    let srv = full_server(&key, 8 * MIB, Some(configured()));
    let settings = srv.settings.clone().unwrap();
    let mut browser = Browser::new(&srv);
    assert_eq!(browser.login(PASSWORD).status, 303);
    let mut other = Browser::new(&srv);
    assert_eq!(other.login(PASSWORD).status, 303);

    let page = browser.get("/settings");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("id=\"settings-form\""));
    assert!(page
        .body
        .contains("<td id=\"current-certificate\">self-signed</td>"));
    let csrf = crate::http_tests::hidden_csrf(&page.body);
    let mut change = |fields: &[(&str, &str)]| {
        // The first value of a field counts: the test's own, then the page's defaults.
        let mut all = fields.to_vec();
        all.extend_from_slice(&[("csrf", csrf.as_str()), ("tls", "keep")]);
        browser.post_form("/settings", &all)
    };

    let nothing = change(&[]);
    assert_eq!(nothing.status, 200);
    assert!(nothing.body.contains("Nothing to change."));
    let (certificate, _) = pair("www.example.test");
    let (_, stranger) = pair("www.example.test");
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[
                ("current_password", PASSWORD),
                ("admin_password", "weak"),
                ("admin_password_confirm", "weak"),
            ],
            "admin_password",
        ),
        (
            &[
                ("current_password", "not-the-password-1"),
                ("admin_password", NEW_PASSWORD),
                ("admin_password_confirm", NEW_PASSWORD),
            ],
            "current_password",
        ),
        (&[("webhook", "ftp://hooks.example.test/")], "webhook"),
        (
            &[
                ("tls", "upload"),
                ("tls_certificate", &certificate),
                ("tls_key", &stranger),
            ],
            "tls_key",
        ),
        (
            &[
                ("tls", "upload"),
                ("tls_certificate", "garbage"),
                ("tls_key", &stranger),
            ],
            "tls_certificate",
        ),
    ];
    for (fields, field) in cases {
        let answer = change(fields);
        assert_eq!(answer.status, 422, "{field}: {}", answer.body);
        assert!(
            answer.body.contains(&format!("id=\"error-{field}\"")),
            "{field}: {}",
            answer.body
        );
        for secret in [
            PASSWORD,
            NEW_PASSWORD,
            "not-the-password-1",
            pem_line(&stranger),
        ] {
            assert!(!answer.body.contains(secret), "{field}: {secret} echoed");
        }
    }
    assert_eq!(settings.revision(), 1, "nothing was applied");
    assert!(change(&[("webhook", "ftp://hooks.example.test/")])
        .body
        .contains("value=\"ftp://hooks.example.test/\""));

    let saved = change(&[("webhook", "https://hooks.example.test/new")]);
    assert_eq!(saved.status, 200, "{}", saved.body);
    assert!(
        saved.body.contains("id=\"notice\">Saved."),
        "{}",
        saved.body
    );
    assert!(saved
        .body
        .contains("<td id=\"current-webhook\">https://hooks.example.test/new</td>"));
    assert_eq!(
        settings.settings().unwrap().webhook.as_deref(),
        Some("https://hooks.example.test/new")
    );

    // A new password: this browser stays in, the other logs in again (with the new one).
    let saved = change(&[
        ("current_password", PASSWORD),
        ("admin_password", NEW_PASSWORD),
        ("admin_password_confirm", NEW_PASSWORD),
    ]);
    assert_eq!(saved.status, 200, "{}", saved.body);
    assert_eq!(settings.revision(), 3);
    assert_eq!(browser.get("/").status, 200);
    assert_eq!(other.get("/").status, 303);
    assert_eq!(other.login(PASSWORD).status, 401);
    assert_eq!(other.login(NEW_PASSWORD).status, 303);

    // Without its token, nothing is changed.
    let forged = browser.post_form("/settings", &[("webhook", "https://evil.test/")]);
    assert_eq!(forged.status, 403);
    assert_eq!(settings.revision(), 3);
}

#[test]
fn without_the_settings_service_metrics_and_logins_stay_closed() {
    let key = generate();
    let srv = full_server(&key, 8 * MIB, None);
    let metrics = |authorization: Option<&str>| {
        let mut req = client().get(&srv.url("/metrics"));
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        req.call().unwrap().status().as_u16()
    };
    assert_eq!(metrics(None), 401);
    assert_eq!(metrics(Some(&format!("Bearer {}", metrics_token()))), 503);
    let mut browser = Browser::new(&srv);
    let login = browser.login(PASSWORD);
    assert_eq!(login.status, 503, "{}", login.body);
    assert!(login
        .body
        .contains("id=\"error-password\">the password cannot be checked now"));
    // Those were no failed logins.
    for _ in 0..6 {
        assert_eq!(browser.login(PASSWORD).status, 503);
    }
    assert_eq!(
        client()
            .get(&srv.url("/healthz"))
            .call()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}
