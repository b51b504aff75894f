//! Property tests ("fuzzing" on the stable toolchain) of what the monitor reads from outside:
//! nginx access lines (a client chooses the request), the status lines of Tandem's services,
//! the log store's own line format, the database agent's JSON, certificate files, and
//! webhook URLs. Arbitrary input never panics; well-formed input reads back as written.
//!
//! The case count is proptest's (256, or `PROPTEST_CASES`: CI runs the default, a long run
//! sets `PROPTEST_CASES=100000`).

use api::access_log;
use api::db::{AgentStatus, PrimaryRef, Role};
use cluster_config::WebhookUrl;
use logmon::parse::{self, DbStatus, Status};
use logmon::store::{self, Entry};
use logmon::{cert, time};
use proptest::prelude::*;
use proptest::sample::{select, Index};

/// 9999-12-31T23:59:59.999Z: the last instant with a four-digit year.
const MAX_ISO_MS: i64 = 253_402_300_799_999;

/// Lines made of the characters access and status lines are built from, so that the
/// parsers' later stages are reached more often than with arbitrary text.
fn line_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,120}",
        ".{0,120}",
        r#"[0-9a-zA-Z.:\[\]"= \-TZ]{0,120}"#,
    ]
}

/// A real certificate (DER) to mutate.
fn certificate_der() -> Vec<u8> {
    let pem = crate::TestCa::generate().leaf(&["tandem.test"], Some(30)).0;
    let cert = ureq::tls::Certificate::from_pem(pem.as_bytes()).unwrap();
    cert.der().to_vec()
}

proptest! {
    #[test]
    fn fuzz_access_parser_never_panics_and_keeps_its_shape(line in line_like()) {
        if let Some(a) = access_log::parse(&line) {
            prop_assert!(!a.remote.is_empty() && !a.remote.contains(' '));
            prop_assert!(a.status <= 999);
            prop_assert!(a.request_time.is_finite() && a.request_time >= 0.0);
        }
    }

    /// nginx's `log_format tandem` ([`access_log::FORMAT`]) reads back field by field, whatever the client put in the
    /// request (quotes, brackets, spaces, things that look like a status and a size).
    #[test]
    fn fuzz_access_lines_round_trip(
        remote in "[0-9a-f.:]{1,39}",
        stamp in "[0-9T:+.-]{1,25}",
        request in "[^\n\r]{0,80}",
        status in 100u16..=999,
        bytes in any::<u64>(),
        millis in 0u64..100_000_000,
    ) {
        let line = format!(
            "{remote} [{stamp}] \"{request}\" {status} {bytes} {}.{:03}",
            millis / 1000,
            millis % 1000
        );
        let a = access_log::parse(&line);
        prop_assert!(a.is_some(), "not parsed: {}", line);
        let a = a.unwrap();
        prop_assert_eq!(
            (a.remote, a.time, a.request, a.status, a.bytes),
            (remote.as_str(), stamp.as_str(), request.as_str(), status, bytes)
        );
        prop_assert!((a.request_time - millis as f64 / 1000.0).abs() < 1e-9);
    }

    #[test]
    fn fuzz_status_parser_never_panics(line in line_like()) {
        let _ = parse::parse_status(&line);
    }

    /// A health line as the balancer or a `check=` reporter prints it reads back; the same
    /// line behind anything that is not tracing's timestamp is no status (a client's words
    /// quoted in another log).
    #[test]
    fn fuzz_status_lines_round_trip_and_stay_anchored(
        ms in 0..MAX_ISO_MS,
        level in select(&["TRACE", "DEBUG", "INFO", "WARN", "ERROR"][..]),
        name in "[A-Za-z0-9_.-]{1,16}",
        up in any::<bool>(),
        message in "[a-zA-Z0-9 ().:,]{0,30}",
        balancer_form in any::<bool>(),
        quoted in any::<bool>(),
        junk in "[^0-9 \t\n\r\u{b}\u{c}\u{85}\u{a0}\u{1680}\u{2000}-\u{200a}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}][^\n]{0,20}",
    ) {
        let q = |v: &str| if quoted { format!("\"{v}\"") } else { v.to_string() };
        let fields = if balancer_form {
            format!("backend={} state={}", q(&name), q(if up { "up" } else { "down" }))
        } else {
            format!("check={} up={up}", q(&name))
        };
        let line = format!("{}  {level} health: {message} {fields}", time::format_iso_ms(ms));
        prop_assert_eq!(
            parse::parse_status(&line),
            Some(Status::Health { check: name.clone(), up }),
            "{}", line
        );
        let quoted_line = format!("{junk} {line}");
        prop_assert_eq!(parse::parse_status(&quoted_line), None, "{}", quoted_line);
    }

    #[test]
    fn fuzz_db_status_never_panics(json in prop_oneof![
        "\\PC{0,80}",
        r#"\{("(role|healthy|io_running|sql_running|lag_s)": ?("primary"|"replica"|"Yes"|true|false|null|-?[0-9]{1,20}|[0-9]\.[0-9]e[0-9]{1,3}),? ?){0,5}\}"#,
    ]) {
        let _ = parse::db_status(&json);
    }

    /// Whatever the agent publishes reads back as what the monitor alerts on: a primary's
    /// health, a replica's threads and lag.
    #[test]
    fn fuzz_db_status_reads_the_agents_record(
        primary in any::<bool>(),
        healthy in any::<bool>(),
        lag_s in any::<Option<u64>>(),
        io_running in prop::option::of(select(&["Yes", "No", "Connecting"][..])),
        sql_running in any::<Option<bool>>(),
        error in prop::option::of("\\PC{0,20}"),
    ) {
        let status = AgentStatus {
            node: "server2".into(),
            role: if primary { Role::Primary } else { Role::Replica },
            primary: PrimaryRef {
                name: "server1".into(),
                address: std::net::Ipv4Addr::new(10, 88, 0, 11),
                port: 3306,
            },
            healthy,
            error,
            lag_s,
            read_only: None,
            io_running: io_running.map(str::to_string),
            sql_running,
            gtid_current_pos: None,
            gtid_slave_pos: None,
            gtid_binlog_pos: None,
            updated_ms: 1,
        };
        let json = serde_json::to_string(&status).unwrap();
        let expected = if primary {
            DbStatus::Primary { healthy }
        } else {
            DbStatus::Replica {
                running: io_running == Some("Yes") && sql_running == Some(true),
                lag_ms: lag_s.map(|s| s.saturating_mul(1000)),
            }
        };
        prop_assert_eq!(parse::db_status(&json), Ok(expected), "{}", json);
    }

    #[test]
    fn fuzz_store_parser_never_panics(line in line_like()) {
        if let Some(stored) = store::parse_line(&line) {
            prop_assert!(line.ends_with(stored.text));
        }
    }

    /// What the store writes reads back: the time to the millisecond, the tag, the pid and the
    /// text (newlines, which would split the line, become spaces).
    #[test]
    fn fuzz_store_lines_round_trip(
        ts_ms in 0..MAX_ISO_MS,
        tag in select(&["stdout", "stderr", "event"][..]),
        pid in any::<Option<i32>>(),
        text in ".{0,80}|\\PC{0,80}|[ \n\r]{0,5}",
    ) {
        let entry = Entry { ts_ms, log: "nginx".into(), tag: tag.into(), pid, text: text.clone() };
        let written = store::format_line(&entry);
        let line = written.strip_suffix('\n');
        prop_assert!(line.is_some_and(|l| !l.contains('\n')), "{:?}", written);
        let stored = store::parse_line(line.unwrap());
        prop_assert!(stored.is_some(), "{:?}", written);
        let stored = stored.unwrap();
        let expected = text.replace(['\n', '\r'], " ");
        prop_assert_eq!(
            (stored.ts_ms, stored.tag, stored.pid, stored.text),
            (ts_ms, tag, pid, expected.as_str())
        );
    }

    #[test]
    fn fuzz_times_round_trip(ms in 0..MAX_ISO_MS, junk in "\\PC{0,30}") {
        prop_assert_eq!(time::parse_iso_ms(&time::format_iso_ms(ms)), Some(ms));
        let _ = time::parse_iso_ms(&junk);
    }

    /// Certificate files are read as found: garbage, PEM around garbage and a real
    /// certificate with bytes changed or cut off never panic.
    #[test]
    fn fuzz_certificate_reader_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        edits in prop::collection::vec((any::<Index>(), any::<u8>()), 0..8),
        cut in any::<Index>(),
    ) {
        let _ = cert::not_after_ms(&bytes);
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            String::from_utf8_lossy(&bytes)
        );
        let _ = cert::not_after_ms(pem.as_bytes());
        let mut der = CERTIFICATE.with(Clone::clone);
        for (at, byte) in &edits {
            let i = at.index(der.len());
            der[i] = *byte;
        }
        let _ = cert::not_after_ms(&der);
        der.truncate(cut.index(der.len() + 1));
        let _ = cert::not_after_ms(&der);
    }

    /// Every URL the config accepts is one the HTTP client takes, to the same place.
    #[test]
    fn fuzz_webhook_urls_accepted_by_the_config_are_sendable(
        scheme in select(&["http", "https", "HTTP", "ftp"][..]),
        authority in r"[a-zA-Z0-9.:\[\]_%@-]{0,24}",
        rest in "([/?][!-~]{0,30})?",
    ) {
        let url = format!("{scheme}://{authority}{rest}");
        if let Ok(parsed) = WebhookUrl::parse(&url) {
            let uri = ureq::http::Uri::try_from(parsed.as_str());
            prop_assert!(uri.is_ok(), "{} accepted but not a URI: {:?}", url, uri);
            let uri = uri.unwrap();
            let default_port = if parsed.is_https() { 443 } else { 80 };
            prop_assert_eq!(
                uri.scheme_str().map(str::to_ascii_lowercase),
                Some(if parsed.is_https() { "https" } else { "http" }.to_string())
            );
            prop_assert_eq!(
                uri.host().map(|h| h.trim_start_matches('[').trim_end_matches(']')),
                Some(parsed.host())
            );
            prop_assert_eq!(uri.port_u16().unwrap_or(default_port), parsed.port());
        }
    }
}

thread_local! {
    /// Generated once per test thread: key generation is slow next to a parse.
    static CERTIFICATE: Vec<u8> = certificate_der();
}

#[test]
fn the_mutated_certificate_is_a_certificate() {
    let der = CERTIFICATE.with(Clone::clone);
    let days = (cert::not_after_ms(&der).unwrap() - time::now_ms()) / 86_400_000;
    assert!((29..=30).contains(&days), "{days}");
}
