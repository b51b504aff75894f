//! The application against real MariaDB servers (TLS from a test CA, the account REQUIRE SSL):
//! notes written and read over pooled connections, keep-alive and HEAD, writes that follow the
//! primary the agent's status file names, and certificates checked.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{agent_status, post_json, request, App, Client, MariaDb, Pki};

fn publish(status_file: &Path, text: &str) {
    let tmp = status_file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, status_file).unwrap();
}

fn connections_made(db: &MariaDb) -> u64 {
    db.root("SHOW GLOBAL STATUS LIKE 'Connections'")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn notes_are_written_and_read_over_pooled_tls_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let db = MariaDb::start(&tmp.path().join("db"), &pki);
    let status = tmp.path().join("db-status.json");
    publish(&status, &agent_status("primary", db.port));
    let app = App::start(
        &tmp.path().join("app"),
        "127.0.0.1",
        db.port,
        &pki.ca,
        &status,
    );

    // Nothing written yet (no table): an empty page, not an error.
    let empty = request(app.addr, "GET", "/notes.json", &[], "");
    assert_eq!(empty.status, 200, "{}\n{}", empty.body, db.log());
    let v = empty.json();
    assert_eq!(
        (v["node"].as_str(), v["role"].as_str()),
        (Some("server1"), Some("primary"))
    );
    assert_eq!(v["notes"], serde_json::json!([]));

    // One connection for a JSON write, a form write, the page, its HEAD and the JSON list.
    let mut c = Client::connect(app.addr);
    let tricky = "it's \"quoted\"; DROP TABLE notes; -- é ✓ 😀 \\ <b>";
    let payload = serde_json::json!({ "body": tricky }).to_string();
    let a = c.request(
        "POST",
        "/notes",
        &["Content-Type: application/json"],
        &payload,
    );
    assert_eq!(a.status, 201, "{}", a.body);
    let note = &a.json()["note"];
    assert_eq!(
        (
            note["body"].as_str(),
            note["node"].as_str(),
            a.json()["role"].as_str()
        ),
        (Some(tricky), Some("server1"), Some("primary"))
    );
    assert!(
        note["id"].as_u64().is_some() && note["created"].as_str().is_some(),
        "{note}"
    );
    let a = c.request(
        "POST",
        "/notes",
        &["Content-Type: application/x-www-form-urlencoded"],
        "body=from+a+form%21",
    );
    assert_eq!((a.status, a.header("location")), (303, Some("/")), "{a:?}");
    let page = c.request("GET", "/", &[], "");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("node: server1")
            && page.body.contains("db_role: primary")
            && page.body.contains("from a form!")
            && page.body.contains("&lt;b&gt;")
            && !page.body.contains("<b>"),
        "{}",
        page.body
    );
    let head = c.request("HEAD", "/", &[], "");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), page.header("content-length"));
    // Had the HEAD answer carried a body, this answer would not parse.
    let list = c.request("GET", "/notes.json", &[], "");
    let list = list.json();
    let bodies: Vec<&str> = list["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["from a form!", tricky]);
    assert_eq!(db.bodies(), [tricky, "from a form!"]);

    // A note one byte too large: 413 naming the limit, on the same connection still.
    let big = serde_json::json!({ "body": "x".repeat(app::store::MAX_NOTE_BYTES + 1) }).to_string();
    let a = c.request("POST", "/notes", &["Content-Type: application/json"], &big);
    assert_eq!(a.status, 413, "{}", a.body);
    assert!(a.body.contains("at most 2000 bytes"), "{}", a.body);
    assert_eq!(c.request("GET", "/?before=x", &[], "").status, 400);
    assert_eq!(c.request("DELETE", "/notes", &[], "").status, 405);
    assert_eq!(c.request("GET", "/nothing", &[], "").status, 404);

    // Pooled: reads and writes on new HTTP connections open no new database connection.
    let before = connections_made(&db);
    for i in 0..20 {
        assert_eq!(request(app.addr, "GET", "/", &[], "").status, 200);
        assert_eq!(post_json(app.addr, &format!("pooled-{i}")).status, 201);
    }
    // One connection per statement would be 60 (and one process each); the pool may open a
    // second connection when a request comes before the previous one's is back in the pool.
    // One of those counted is the count's own (the mariadb client).
    let made = connections_made(&db) - before - 1;
    assert!(
        made <= 2,
        "the application connected {made} times for 40 requests"
    );
    let open = db.app_connections();
    assert!(
        (1..=16).contains(&open),
        "{open} connections of the application"
    );
}

#[test]
fn writes_follow_the_primary_named_in_the_status_file() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (local, other) = std::thread::scope(|s| {
        let a = s.spawn(|| MariaDb::start(&tmp.path().join("local"), &pki));
        let b = s.spawn(|| MariaDb::start(&tmp.path().join("other"), &pki));
        (a.join().unwrap(), b.join().unwrap())
    });
    let status = tmp.path().join("db-status.json");
    publish(&status, &agent_status("replica", other.port));
    let app = App::start(
        &tmp.path().join("app"),
        "127.0.0.1",
        local.port,
        &pki.ca,
        &status,
    );

    // The primary is the other server: writes go there, reads stay local.
    let a = post_json(app.addr, "on-other");
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.json()["role"], "replica");
    assert_eq!(other.bodies(), ["on-other"]);
    assert!(local.bodies().is_empty());
    assert_eq!(other.app_connections(), 1);
    // (No replication here: the table the primary created is created locally by hand.)
    local.root(&format!("USE app; {}", app::store::SCHEMA_SQL));

    // A switchover: the old primary turns read-only, a write meanwhile is held, and once the
    // agent names the local server it lands there, once.
    other.root("SET GLOBAL read_only = ON");
    let addr = app.addr;
    let writer = std::thread::spawn(move || {
        let at = Instant::now();
        (post_json(addr, "held"), at.elapsed())
    });
    std::thread::sleep(Duration::from_millis(700));
    publish(&status, &agent_status("primary", local.port));
    let (a, held) = writer.join().unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    assert!(held >= Duration::from_millis(600), "not held: {held:?}");
    assert_eq!(a.json()["role"], "primary");
    assert_eq!(local.bodies(), ["held"]);
    assert_eq!(other.bodies(), ["on-other"]);
    // The old primary's pool is closed: its connections go.
    support::wait_for(
        "the old primary's connections to close",
        Duration::from_secs(5),
        || other.app_connections() == 0,
    );
    assert_eq!(post_json(app.addr, "local").status, 201);
    assert_eq!(local.bodies(), ["held", "local"]);

    // And back: a new pool for the other server.
    other.root("SET GLOBAL read_only = OFF");
    publish(&status, &agent_status("replica", other.port));
    assert_eq!(post_json(app.addr, "back").status, 201);
    assert_eq!(other.bodies(), ["on-other", "back"]);
    assert_eq!(other.app_connections(), 1);

    // A primary nobody answers: held for the whole hold, then 503, nothing written.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = nowhere.local_addr().unwrap().port();
    drop(nowhere);
    publish(&status, &agent_status("replica", port));
    let at = Instant::now();
    let a = post_json(app.addr, "nowhere");
    let took = at.elapsed();
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.header("retry-after"), Some("1"));
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("nothing was written"),
        "{}",
        a.body
    );
    assert!(
        took >= app::WRITE_HOLD - Duration::from_millis(200) && took < app::WRITE_HOLD * 2,
        "{took:?}"
    );
    assert_eq!(local.bodies(), ["held", "local"]);
    assert_eq!(other.bodies(), ["on-other", "back"]);
    // Reads never depended on the primary.
    assert_eq!(request(app.addr, "GET", "/notes.json", &[], "").status, 200);
}

#[test]
fn the_server_certificate_is_checked_against_the_cluster_ca_and_the_address() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let db = MariaDb::start(&tmp.path().join("db"), &pki);
    let status = tmp.path().join("db-status.json");
    publish(&status, &agent_status("primary", db.port));
    let refused = |app: &App, why: &str| {
        let a = request(app.addr, "GET", "/notes.json", &[], "");
        assert_eq!(a.status, 503, "{why}: {}", a.body);
        let error = a.json()["error"].as_str().unwrap().to_string();
        assert!(
            error.contains("certificate") || error.contains("Certificate"),
            "{why}: {error}"
        );
        // A write is not held: a refused certificate will not change.
        let at = Instant::now();
        let a = post_json(app.addr, "never");
        assert_eq!(a.status, 503, "{why}: {}", a.body);
        assert!(
            at.elapsed() < Duration::from_secs(2),
            "{why}: held {:?}",
            at.elapsed()
        );
    };
    let other_ca = Pki::new().ca;
    let app = App::start(
        &tmp.path().join("a"),
        "127.0.0.1",
        db.port,
        &other_ca,
        &status,
    );
    refused(&app, "another CA");
    // The certificate names 127.0.0.1, not localhost (the local server, for reads).
    let app = App::start(
        &tmp.path().join("b"),
        "localhost",
        db.port,
        &pki.ca,
        &status,
    );
    let a = request(app.addr, "GET", "/notes.json", &[], "");
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(
        a.body.contains("NotValidForName") || a.body.contains("not valid for"),
        "{}",
        a.body
    );
    let app = App::start(
        &tmp.path().join("c"),
        "127.0.0.1",
        db.port,
        &pki.ca,
        &status,
    );
    assert_eq!(request(app.addr, "GET", "/notes.json", &[], "").status, 200);
    assert_eq!(post_json(app.addr, "checked").status, 201);
    assert_eq!(db.bodies(), ["checked"]);
}
