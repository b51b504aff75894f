//! Property tests ("fuzzing" on the stable toolchain) of the config parser: arbitrary
//! TOML-ish text and mutations of the default cluster must give either a `Cluster` whose
//! invariants hold or errors that each name the file and a line or a key; never a panic.
//!
//! The case count is proptest's (256, or `PROPTEST_CASES`: CI runs the default, a long run
//! sets `PROPTEST_CASES=100000`).

use std::collections::HashSet;

use cluster_config::{Cluster, ConfigErrors, DbRole, WebhookUrl, DEFAULT_CLUSTER_TOML};
use proptest::prelude::*;
use proptest::sample::{select, Index};

const ORIGIN: &str = "fuzz.toml";

/// The contract of `Cluster::from_toml` for any input.
fn check(text: &str) -> Result<(), TestCaseError> {
    match Cluster::from_toml(text, ORIGIN) {
        Ok(c) => {
            // What every consumer relies on once a `Cluster` exists.
            prop_assert!(!c.nodes.is_empty());
            let primaries = c
                .nodes
                .iter()
                .filter(|n| n.db_role == DbRole::Primary)
                .count();
            prop_assert_eq!(primaries, 1, "{:?}", c.nodes);
            let names: HashSet<_> = c.nodes.iter().map(|n| &n.name).collect();
            let addresses: HashSet<_> = c.nodes.iter().map(|n| n.address).collect();
            prop_assert_eq!(names.len(), c.nodes.len());
            prop_assert_eq!(addresses.len(), c.nodes.len());
            prop_assert!(c.subnet.contains(c.floating_ip));
            prop_assert!(!addresses.contains(&c.floating_ip));
            for n in &c.nodes {
                prop_assert!(c.subnet.contains(n.address), "{n:?}");
            }
        }
        Err(ConfigErrors(errors)) => {
            prop_assert!(!errors.is_empty());
            let lines = text.lines().count() + 1;
            for e in &errors {
                prop_assert_eq!(&e.origin, ORIGIN);
                prop_assert!(!e.message.is_empty(), "{e:?}");
                prop_assert!(
                    e.line.is_some() || !e.key.is_empty(),
                    "no line, no key: {e:?}"
                );
                prop_assert!(e.line.is_none_or(|l| (1..=lines).contains(&l)), "{e:?}");
                prop_assert!(e.to_string().starts_with(ORIGIN), "{e}");
            }
        }
    }
    Ok(())
}

/// Every key of the wire format, so generated lines often reach validation.
const KEYS: &[&str] = &[
    "address",
    "admin",
    "admin_cidrs",
    "advert_interval_ms",
    "algorithm",
    "app",
    "backup",
    "cert_expiry_days",
    "certificate",
    "command",
    "cooldown_s",
    "db",
    "db_role",
    "disk_used_percent",
    "domain",
    "error_ratio_5xx",
    "expect_status",
    "fall",
    "files",
    "floating_ip",
    "gateway",
    "hsts_max_age_s",
    "http",
    "https",
    "interval_ms",
    "key",
    "max_lag_ms",
    "mode",
    "name",
    "path",
    "preempt_delay_s",
    "rise",
    "router_id",
    "server_id",
    "subnet",
    "timeout_ms",
    "web",
    "webhook",
    "weight",
    "window_s",
    "vrrp_priority",
];

const HEADERS: &[&str] = &[
    "[cluster]",
    "[[node]]",
    "[ports]",
    "[balancer]",
    "[balancer.health]",
    "[tls]",
    "[firewall]",
    "[app]",
    "[db]",
    "[alerts]",
    "[vrrp]",
    "[node]",
    "[[cluster]]",
    "[",
    "[[",
    "]",
    "[a.b.c]",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (-5i64..300).prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("true".to_string()),
        Just("false".to_string()),
        "\"[a-z0-9 ._/:-]{0,20}\"",
        r#""10\.88\.[0-9]{1,3}\.[0-9]{1,3}(/[0-9]{1,2})?""#,
        r#""(https?|ftp)://[a-z0-9.:\[\]@-]{0,20}(/[ -~]{0,10})?""#,
        r#"\[("[a-z0-9./]{0,8}"(, )?){0,3}\]"#,
        "\\{ ?([a-z_]{1,8} = [0-9]{1,3},? ?){0,2}\\}",
        "1979-05-27T07:32:00Z",
        "\\PC{0,12}",
    ]
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        select(HEADERS).prop_map(str::to_string),
        (select(KEYS), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        ("[a-z_.\"]{1,12}", value()).prop_map(|(k, v)| format!("{k} = {v}")),
        "#\\PC{0,20}",
        "\\PC{0,40}",
        ".{0,40}",
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Index, String),
    ReplaceValue(Index, String),
    Delete(Index),
    Duplicate(Index),
    Insert(Index, String),
    Truncate(Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), line()).prop_map(|(i, l)| Mutation::Replace(i, l)),
        (any::<Index>(), value()).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Duplicate),
        (any::<Index>(), line()).prop_map(|(i, l)| Mutation::Insert(i, l)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, at)| Mutation::Truncate(i, at)),
    ]
}

/// The default cluster with `mutations` applied line by line.
fn mutate(mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = DEFAULT_CLUSTER_TOML.lines().map(str::to_string).collect();
    for m in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let n = lines.len();
        match m {
            Mutation::Replace(i, l) => lines[i.index(n)] = l.clone(),
            Mutation::ReplaceValue(i, v) => {
                let line = &mut lines[i.index(n)];
                if let Some((key, _)) = line.split_once('=') {
                    *line = format!("{key}= {v}");
                }
            }
            Mutation::Delete(i) => {
                lines.remove(i.index(n));
            }
            Mutation::Duplicate(i) => {
                let l = lines[i.index(n)].clone();
                lines.insert(i.index(n), l);
            }
            Mutation::Insert(i, l) => lines.insert(i.index(n + 1), l.clone()),
            Mutation::Truncate(i, at) => {
                let line = &mut lines[i.index(n)];
                let cut: Vec<usize> = line.char_indices().map(|(b, _)| b).collect();
                if !cut.is_empty() {
                    line.truncate(cut[at.index(cut.len())]);
                }
            }
        }
    }
    lines.join("\n")
}

proptest! {
    #[test]
    fn fuzz_toml_ish_text_gives_a_cluster_or_located_errors(
        lines in prop::collection::vec(line(), 0..40)
    ) {
        check(&lines.join("\n"))?;
    }

    #[test]
    fn fuzz_arbitrary_text_gives_a_cluster_or_located_errors(text in "\\PC{0,400}") {
        check(&text)?;
    }

    #[test]
    fn fuzz_mutated_default_cluster_gives_a_cluster_or_located_errors(
        mutations in prop::collection::vec(mutation(), 1..6)
    ) {
        check(&mutate(&mutations))?;
    }

    /// A webhook URL is accepted with a consistent origin, or refused with a message that
    /// never repeats its path or query (they carry tokens, and errors are printed).
    #[test]
    fn fuzz_webhook_urls_never_leak_their_path(
        scheme in select(&["http", "https", "HTTPS", "ftp", "http:", ""][..]),
        authority in "[a-z0-9.:\\[\\]@%_-]{0,24}",
        path in "[/?][ -~]{0,30}",
    ) {
        let token = format!("{path}T0KEN");
        let url = format!("{scheme}://{authority}{token}");
        match WebhookUrl::parse(&url) {
            Ok(parsed) => {
                prop_assert_eq!(parsed.as_str(), url.as_str());
                prop_assert!(parsed.port() > 0);
                prop_assert!(!parsed.origin().contains("T0KEN"));
                let shown = format!("{parsed:?}");
                prop_assert!(!shown.contains("T0KEN"), "{}", shown);
            }
            Err(message) => prop_assert!(!message.contains("T0KEN"), "{}", message),
        }
    }
}
