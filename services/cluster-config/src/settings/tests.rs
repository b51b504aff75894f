use super::*;

const NOW: i64 = 1_800_000_000;
const GOOD_PASSWORD: &str = "correct-Horse-7-battery";
const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn cluster() -> Cluster {
    Cluster::default_cluster()
}

fn fresh() -> Fresh {
    Fresh {
        salt: [7; 16],
        cluster_secret: [0xab; 32],
        metrics_token: [0xcd; 32],
    }
}

/// A certificate for `name` and its key, valid around [`NOW`] when `valid`.
fn pair(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn answers() -> Answers {
    let (certificate, key) = pair("www.example.test");
    Answers {
        node: Some("server1".into()),
        admin_password: Some(Secret::new(GOOD_PASSWORD)),
        admin_password_confirm: Some(Secret::new(GOOD_PASSWORD)),
        cluster_secret: Some(Secret::new(SECRET)),
        tls: Some(TlsChoice::Upload {
            certificate,
            key: Secret::new(key),
        }),
        webhook: Some("https://hooks.example.test/alert".into()),
    }
}

fn fields(errors: &[FieldError]) -> Vec<Field> {
    errors.iter().map(|e| e.field).collect()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn an_empty_seed_asks_everything_and_a_complete_one_nothing() {
    let empty = SeedSettings::default();
    assert_eq!(
        asked(&empty),
        vec![
            Field::Node,
            Field::AdminPassword,
            Field::AdminPasswordConfirm,
            Field::ClusterSecret,
            Field::Tls,
            Field::TlsCertificate,
            Field::TlsKey,
            Field::Webhook
        ]
    );
    let complete = SeedSettings {
        node: Some("server2".into()),
        cluster_secret: Some(Secret::new(SECRET)),
        admin_password_hash: Some(hash_password(GOOD_PASSWORD, &[1; 16]).unwrap()),
        metrics_token: None,
        tls: Some(TlsChoice::SelfSigned),
        webhook: Some(String::new()),
        setup_address: None,
    };
    assert!(seed_is_complete(&complete));
    // The seed alone makes the settings; answers are not needed.
    let (settings, generated) =
        setup(&cluster(), &complete, &Answers::default(), NOW, &fresh()).unwrap();
    assert_eq!(settings.node, "server2");
    assert_eq!(settings.webhook, None);
    assert_eq!(settings.metrics_token.expose(), "cd".repeat(32));
    assert!(generated.is_none());
    assert!(verify_password(
        &settings.admin_password_hash,
        GOOD_PASSWORD
    ));
    // The seed round-trips through TOML.
    let text = complete.to_toml();
    assert!(text.contains("mode = \"self-signed\""), "{text}");
    assert_eq!(SeedSettings::from_toml(&text, "seed").unwrap(), complete);
    complete.check(&cluster(), "seed", NOW).unwrap();
}

#[test]
fn good_answers_make_settings_that_round_trip() {
    let (settings, generated) = setup(
        &cluster(),
        &SeedSettings::default(),
        &answers(),
        now(),
        &fresh(),
    )
    .unwrap();
    assert!(generated.is_none());
    assert_eq!(settings.node, "server1");
    assert_eq!(
        settings.secret().unwrap(),
        [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb,
            0xcc, 0xdd, 0xee, 0xff
        ]
    );
    assert!(settings.admin_password_hash.starts_with("$argon2id$"));
    assert!(verify_password(
        &settings.admin_password_hash,
        GOOD_PASSWORD
    ));
    assert!(!verify_password(
        &settings.admin_password_hash,
        "wrong-Password-1"
    ));
    assert!(settings.uploaded_tls().is_some());
    assert_eq!(
        settings.webhook_url().unwrap().as_str(),
        "https://hooks.example.test/alert"
    );
    let back = Settings::from_json(&settings.to_json()).unwrap();
    assert_eq!(back, settings);
    let debug = format!("{settings:?}");
    assert!(
        !debug.contains("PRIVATE KEY") && !debug.contains(SECRET),
        "{debug}"
    );
    let newer = settings.to_json().replace("\"version\":1", "\"version\":2");
    assert!(Settings::from_json(&newer)
        .unwrap_err()
        .contains("format 2"));
}

#[test]
fn generate_makes_a_secret_and_shows_it_once() {
    let mut a = answers();
    a.cluster_secret = Some(Secret::new(" Generate "));
    a.tls = Some(TlsChoice::SelfSigned);
    a.webhook = Some(String::new());
    let (settings, generated) =
        setup(&cluster(), &SeedSettings::default(), &a, NOW, &fresh()).unwrap();
    assert_eq!(generated.unwrap().expose(), "ab".repeat(32));
    assert_eq!(settings.cluster_secret.expose(), "ab".repeat(32));
    assert_eq!(settings.tls, TlsChoice::SelfSigned);
    assert_eq!(settings.webhook, None);
}

/// Every wrong answer is reported at once, each on its own field.
#[test]
fn wrong_answers_each_name_their_field() {
    let check = |change: &dyn Fn(&mut Answers), expected: &[(Field, &str)]| {
        let mut a = answers();
        change(&mut a);
        let errors = setup(&cluster(), &SeedSettings::default(), &a, now(), &fresh())
            .expect_err("must be refused");
        assert_eq!(
            fields(&errors),
            expected.iter().map(|e| e.0).collect::<Vec<_>>(),
            "{errors:?}"
        );
        for (error, (_, needle)) in errors.iter().zip(expected) {
            assert!(error.message.contains(needle), "{error}: wanted {needle:?}");
        }
    };
    check(
        &|a| a.node = Some("server9".into()),
        &[(
            Field::Node,
            "unknown node `server9`: the cluster `tandem` has server1, server2",
        )],
    );
    check(&|a| a.node = None, &[(Field::Node, "required")]);
    let weak = |pw: &'static str| {
        move |a: &mut Answers| {
            a.admin_password = Some(Secret::new(pw));
            a.admin_password_confirm = Some(Secret::new(pw));
        }
    };
    check(
        &weak("short1A!"),
        &[(Field::AdminPassword, "too short: 8 characters")],
    );
    check(
        &weak("alllowercaseletters"),
        &[(Field::AdminPassword, "mix letters")],
    );
    check(
        &weak("aaaaaaaaaaaaaaaaaaaaaa1"),
        &[(Field::AdminPassword, "repeated")],
    );
    check(
        &weak("MyPassword123"),
        &[(Field::AdminPassword, "contains `password`")],
    );
    check(&weak(""), &[(Field::AdminPassword, "required")]);
    check(
        &|a| a.admin_password_confirm = Some(Secret::new("correct-Horse-7-batterx")),
        &[(Field::AdminPasswordConfirm, "does not match")],
    );
    check(
        &|a| a.cluster_secret = Some(Secret::new("abc")),
        &[(Field::ClusterSecret, "or `generate`")],
    );
    check(
        &|a| a.webhook = Some("ftp://x".into()),
        &[(Field::Webhook, "")],
    );
    // A key that belongs to another certificate.
    check(
        &|a| {
            let (certificate, _) = pair("www.example.test");
            let (_, other_key) = pair("www.example.test");
            a.tls = Some(TlsChoice::Upload {
                certificate,
                key: Secret::new(other_key),
            });
        },
        &[(Field::TlsKey, "does not match the certificate")],
    );
    // Malformed PEM in both, reported on both.
    check(
        &|a| {
            a.tls = Some(TlsChoice::Upload {
                certificate:
                    "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
                key: Secret::new("hello"),
            })
        },
        &[(Field::TlsCertificate, "PEM"), (Field::TlsKey, "not PEM")],
    );
    check(
        &|a| {
            a.tls = Some(TlsChoice::Upload {
                certificate: String::new(),
                key: Secret::new(""),
            })
        },
        &[
            (Field::TlsCertificate, "required"),
            (Field::TlsKey, "required"),
        ],
    );
    // Several at once.
    check(
        &|a| {
            a.node = Some("nope".into());
            a.webhook = Some("nope".into());
            a.tls = None;
        },
        &[
            (Field::Node, "unknown"),
            (Field::Tls, "required"),
            (Field::Webhook, ""),
        ],
    );
}

#[test]
fn an_expired_certificate_is_refused_with_its_date() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["www.example.test".into()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    let errors = check_tls(&cert.pem(), &key.serialize_pem(), now()).unwrap_err();
    assert_eq!(fields(&errors), vec![Field::TlsCertificate]);
    assert!(
        errors[0].message.contains("expired on 2021-01-01"),
        "{errors:?}"
    );
    let info = certificate_info(&cert.pem()).unwrap();
    assert_eq!(info.names, vec!["www.example.test"]);
    assert_eq!(info.sha256.len(), 32 * 3 - 1);
}

#[test]
fn a_change_needs_the_current_password_and_keeps_the_rest() {
    let (settings, _) = setup(
        &cluster(),
        &SeedSettings::default(),
        &answers(),
        now(),
        &fresh(),
    )
    .unwrap();
    let new = "another-Strong-9-phrase";
    let mut c = Change {
        current_password: Some(Secret::new("wrong-Password-1")),
        admin_password: Some(Secret::new(new)),
        admin_password_confirm: Some(Secret::new(new)),
        ..Change::default()
    };
    let errors = change(&cluster(), &settings, &c, now(), &fresh()).unwrap_err();
    assert_eq!(fields(&errors), vec![Field::CurrentPassword]);
    c.current_password = Some(Secret::new(GOOD_PASSWORD));
    c.webhook = Some(String::new());
    c.tls = Some(TlsChoice::SelfSigned);
    let next = change(&cluster(), &settings, &c, now(), &fresh()).unwrap();
    assert!(verify_password(&next.admin_password_hash, new));
    assert_eq!(next.webhook, None);
    assert_eq!(next.tls, TlsChoice::SelfSigned);
    assert_eq!(next.cluster_secret, settings.cluster_secret);
    assert_eq!(next.node, settings.node);
    // Nothing asked for: nothing changes.
    assert_eq!(
        change(&cluster(), &settings, &Change::default(), now(), &fresh()).unwrap(),
        settings
    );
}

#[test]
fn a_bad_seed_names_its_keys() {
    let seed = SeedSettings::from_toml(
        "node = \"server7\"\ncluster_secret = \"zz\"\nadmin_password_hash = \"plain\"\nwebhook = \"x\"\nsetup_address = \"10.88.0.11\"\n",
        "seed/settings.toml",
    )
    .unwrap();
    let errors = seed
        .check(&cluster(), "seed/settings.toml", NOW)
        .unwrap_err();
    let keys: Vec<&str> = errors.0.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "node",
            "cluster_secret",
            "admin_password",
            "webhook",
            "setup_address"
        ],
        "{errors}"
    );
    let text = errors.to_string();
    assert!(text.contains("seed/settings.toml"), "{text}");
    assert!(text.contains("node server1's address"), "{text}");
    let unknown = SeedSettings::from_toml("colour = \"blue\"\n", "s.toml").unwrap_err();
    assert!(unknown.to_string().contains("s.toml:1"), "{unknown}");
    assert!(unknown.to_string().contains("colour"), "{unknown}");
}
