//! The crate's one integration-test binary: the corpus of invalid files in `tests/bad/`, the
//! shipped configurations, a no-panic sweep over mangled input and property tests
//! ([`fuzz`]).

mod fuzz;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_config::{Algorithm, BalancerMode, Cluster, ConfigError, DbRole, Ipv4Net};

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One `# expect: <line>: <key>: <message substring>` line; `-` for "no line".
#[derive(Debug)]
struct Expect {
    line: Option<usize>,
    key: String,
    message: String,
}

impl Expect {
    fn parse(spec: &str) -> Result<Expect, String> {
        let bad = || format!("malformed `# expect: {spec}`, want `<line>: <key>: <message>`");
        let (line, rest) = spec.split_once(": ").ok_or_else(bad)?;
        let (key, message) = rest.split_once(": ").ok_or_else(bad)?;
        let line = match line {
            "-" => None,
            n => Some(n.parse().map_err(|_| bad())?),
        };
        Ok(Expect {
            line,
            key: key.to_owned(),
            message: message.to_owned(),
        })
    }

    fn matches(&self, e: &ConfigError) -> bool {
        let prefix = match self.line {
            Some(line) => format!("{}:{line}", e.origin),
            None => e.origin.clone(),
        };
        e.line == self.line
            && e.key == self.key
            && e.message.contains(&self.message)
            && e.to_string().starts_with(&prefix)
    }
}

/// Every `# expect:` line in the file's leading comment block, in order.
fn expectations(text: &str) -> Result<Vec<Expect>, String> {
    let expects: Vec<Expect> = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(Expect::parse)
        .collect::<Result<_, _>>()?;
    if expects.is_empty() {
        return Err("no `# expect: <line>: <key>: <message>` line at the top".to_owned());
    }
    Ok(expects)
}

/// Each file must fail with exactly the expected errors: same count (no cascades, nothing
/// missed) and, in order, the expected line, key and message.
fn check_bad_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let expects = expectations(&text)?;
    let errors = match Cluster::load(path) {
        Ok(_) => return Err("parsed without error".to_owned()),
        Err(errors) => errors,
    };
    // For reviewing the wording of every message: SHOW_CONFIG_ERRORS=1 cargo test -- --nocapture
    if std::env::var_os("SHOW_CONFIG_ERRORS").is_some() {
        eprintln!("{errors}");
    }
    let ok = errors.0.len() == expects.len()
        && expects
            .iter()
            .zip(&errors.0)
            .all(|(want, got)| want.matches(got));
    if ok {
        return Ok(());
    }
    let want: Vec<String> = expects
        .iter()
        .map(|e| {
            let line = e.line.map_or("-".to_owned(), |l| l.to_string());
            format!("    {line}: {}: ...{}...", e.key, e.message)
        })
        .collect();
    Err(format!(
        "expected:\n{}\n  got:\n    {}",
        want.join("\n"),
        errors.to_string().replace('\n', "\n    ")
    ))
}

#[test]
fn every_bad_file_fails_with_the_expected_errors() {
    let dir = crate_dir().join("tests/bad");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "only {} files in {}",
        files.len(),
        dir.display()
    );

    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| {
            check_bad_file(f)
                .err()
                .map(|why| format!("{}:\n  {why}", f.display()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} bad files did not fail as expected:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}

#[test]
fn default_cluster_and_its_file_agree() {
    let from_file = Cluster::load(&crate_dir().join("default-cluster.toml")).unwrap();
    assert_eq!(from_file, Cluster::default_cluster());
    assert_eq!(from_file.name, "tandem");
    assert_eq!(from_file.primary().name, "server2");
    assert_eq!(
        from_file
            .peers("server2")
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>(),
        ["server1"]
    );
}

#[test]
fn local_example_parses() {
    let path = crate_dir().join("../../examples/local-cluster.toml");
    let c = Cluster::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (c.name.as_str(), c.domain.as_str()),
        ("local", "tandem.localhost")
    );
    assert_eq!(c.subnet, "127.0.0.0/8".parse::<Ipv4Net>().unwrap());
    assert_eq!(c.floating_ip, Ipv4Addr::new(127, 0, 0, 10));
    let nodes: Vec<_> = c
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.address, n.db_role))
        .collect();
    assert_eq!(
        nodes,
        [
            ("server1", Ipv4Addr::new(127, 0, 0, 11), DbRole::Replica),
            ("server2", Ipv4Addr::new(127, 0, 0, 12), DbRole::Primary),
        ]
    );
    let p = c.ports;
    assert_eq!(
        [p.http, p.https, p.web, p.app, p.db, p.admin],
        [8080, 8443, 8081, 8000, 3306, 9443]
    );
    assert_eq!(c.firewall.admin_cidrs, [c.subnet]);
    // Everything not written takes the defaults.
    let d = Cluster::default_cluster();
    assert_eq!(
        (&c.balancer, &c.tls, &c.app, &c.db, &c.alerts),
        (&d.balancer, &d.tls, &d.app, &d.db, &d.alerts)
    );
}

#[test]
fn optional_settings_reach_the_domain_types() {
    let text = r#"
        [cluster]
        name = "shop"
        domain = "shop.example.test"
        subnet = "10.88.0.0/24"
        floating_ip = "10.88.0.10"
        gateway = "10.88.0.1"

        [[node]]
        name = "a"
        address = "10.88.0.21"
        db_role = "replica"
        server_id = 7
        weight = 3

        [[node]]
        name = "b"
        address = "10.88.0.22"
        db_role = "primary"
        backup = true
        vrrp_priority = 200

        [[node]]
        name = "c"
        address = "10.88.0.23"
        db_role = "replica"

        [balancer]
        algorithm = "leastconn"
        mode = "active-passive"

        [balancer.health]
        interval_ms = 500
        timeout_ms = 500
        rise = 1

        [tls]
        certificate = "/data/tls/cert.pem"
        key = "/data/tls/key.pem"
        hsts_max_age_s = 0

        [firewall]
        admin_cidrs = ["10.88.0.0/24", "192.168.7.0/24"]

        [app]
        files = "/data/app"
        command = ["/usr/bin/shop", "--port", "8000"]

        [alerts]
        webhook = "https://alerts.example.test/hook"
        error_ratio_5xx = 1
        cooldown_s = 0
    "#;
    let c = Cluster::from_toml(text, "inline").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 88, 0, 1)));
    let nodes: Vec<_> = c
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                n.server_id,
                n.weight,
                n.backup,
                n.vrrp_priority,
            )
        })
        .collect();
    // server_id defaults to the position, vrrp_priority to 150, 100, 99, ...
    assert_eq!(
        nodes,
        [
            ("a", 7, 3, false, 150),
            ("b", 2, 1, true, 200),
            ("c", 3, 1, false, 99)
        ]
    );
    assert_eq!(c.balancer.algorithm, Algorithm::LeastConnections);
    assert_eq!(c.balancer.mode, BalancerMode::ActivePassive);
    assert_eq!(c.balancer.health.interval, Duration::from_millis(500));
    assert_eq!((c.balancer.health.rise, c.balancer.health.fall), (1, 3));
    assert_eq!(c.tls.certificate, Some(PathBuf::from("/data/tls/cert.pem")));
    assert_eq!(c.tls.key, Some(PathBuf::from("/data/tls/key.pem")));
    assert_eq!(c.tls.hsts_max_age, 0);
    assert_eq!(c.firewall.admin_cidrs.len(), 2);
    assert_eq!(c.app.files, Some(PathBuf::from("/data/app")));
    assert_eq!(
        c.app.command.as_deref(),
        Some(&["/usr/bin/shop".to_owned(), "--port".into(), "8000".into()][..])
    );
    assert_eq!(
        c.alerts.webhook.as_ref().map(|u| u.as_str()),
        Some("https://alerts.example.test/hook")
    );
    assert_eq!(
        (c.alerts.error_ratio_5xx, c.alerts.cooldown),
        (1.0, Duration::ZERO)
    );
}

#[test]
fn unreadable_file_names_the_path_and_has_no_line() {
    let path = crate_dir().join("tests/no-such-file.toml");
    let errors = Cluster::load(&path).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    let e = &errors.0[0];
    assert_eq!((e.line, e.key.as_str()), (None, ""));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read the file: ", path.display())),
        "{e}"
    );
}

/// Truncations and single-line mangles of a valid file: each must give a result, not a panic,
/// and every error must carry the origin and a message.
#[test]
fn mangled_input_never_panics() {
    let text = cluster_config::DEFAULT_CLUSTER_TOML;
    let mut inputs: Vec<String> = text
        .char_indices()
        .map(|(i, _)| text[..i].to_owned())
        .collect();
    let lines: Vec<&str> = text.lines().collect();
    let mangles = [
        "",
        "x",
        "= 1",
        "[",
        "[[node]]",
        "a = \"\u{0}\"",
        "port = -1",
        "é = 1",
    ];
    for i in 0..lines.len() {
        for m in mangles {
            let mut l = lines.clone();
            l[i] = m;
            inputs.push(l.join("\n"));
        }
        let mut l = lines.clone();
        l[i] = &lines[i][..lines[i].len() / 2];
        inputs.push(l.join("\n"));
    }
    for input in &inputs {
        if let Err(errors) = Cluster::from_toml(input, "mangled") {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(e.origin == "mangled" && !e.message.is_empty(), "{e:?}");
                assert!(
                    e.line
                        .is_none_or(|l| l >= 1 && l <= input.lines().count() + 1),
                    "{e:?} for {input:?}"
                );
            }
        }
    }
}
