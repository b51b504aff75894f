//! What a running cluster serves beyond each node's page: the application writing to the
//! primary and reading replicated rows locally, the firewall as seen from a client, and the
//! admin port. Non-destructive steps, run on the lifecycle test's cluster before it reboots
//! anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu::{Cluster, HttpResponse};

/// Replication and the first database setup on a fresh cluster take a while under TCG.
pub(crate) const DB_TIMEOUT: Duration = Duration::from_secs(180);

/// POST a note through `node`'s balancer → some node's nginx → app; the app writes to the
/// primary wherever it is.
pub(crate) fn post_note(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    text: &str,
) -> qemu::Result<()> {
    let n = config.node(node).expect("node of the default cluster");
    let url = format!("https://{}:{}/notes", n.address, config.ports.https);
    let body = format!("{{\"body\":\"{text}\"}}");
    qemu::wait_for(DB_TIMEOUT, &format!("POST {url}"), || {
        let out = cluster
            .run(&[
                "curl",
                "-sS",
                "-k",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Content-Type: application/json",
                "-H",
                "Accept: application/json",
                "--data",
                &body,
                &url,
            ])
            .map_err(|e| e.to_string())?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if code.starts_with('2') {
            Ok(())
        } else {
            Err(format!(
                "answered {code:?} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    })
}

/// Wait until `node`'s application lists a note with `text` (read from its local database).
/// Asked through the node's balancer until an answer comes from `node` itself (the JSON names
/// the node that served it): a client cannot reach a node's web port directly.
pub(crate) fn wait_note(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    text: &str,
    timeout: Duration,
) -> qemu::Result<HttpResponse> {
    let n = config.node(node).expect("node of the default cluster");
    let url = format!("https://{}:{}/notes.json", n.address, config.ports.https);
    let served_by = format!("\"node\":\"{node}\"");
    cluster.wait_http(&url, timeout, |r| {
        r.status == 200 && r.body.contains(&served_by) && r.body.contains(text)
    })
}

/// [`wait_note`] on every node of the cluster, in turn.
pub(crate) fn wait_note_everywhere(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    text: &str,
) -> qemu::Result<()> {
    for node in &config.nodes {
        wait_note(cluster, config, &node.name, text, DB_TIMEOUT)?;
    }
    Ok(())
}

/// `curl` exit code for a plain TCP connection attempt from the client: 0 connected (or
/// answered), 7 refused, 28 timed out (dropped by a firewall).
pub(crate) fn tcp_probe(cluster: &Cluster, addr: &str, port: u16) -> qemu::Result<i32> {
    let out = cluster.run(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        "-o",
        "/dev/null",
        &format!("telnet://{addr}:{port}"),
    ])?;
    Ok(out.status.code().unwrap_or(-1))
}

pub(crate) fn run(cluster: &Cluster, config: &cluster_config::Cluster) -> String {
    let note = format!("e2e note {}", std::process::id());
    crate::support::step(
        cluster,
        "a note posted through server1 lands on the primary (server2)",
        || {
            post_note(cluster, config, "server1", &note)?;
            wait_note(cluster, config, "server2", &note, Duration::from_secs(10))
        },
    );
    crate::support::step(cluster, "server1 reads the note from its replica", || {
        wait_note(cluster, config, "server1", &note, Duration::from_secs(30))
    });

    crate::support::step(
        cluster,
        "the firewall drops MariaDB from a non-peer, admin port open to the admin network",
        || {
            let db = tcp_probe(cluster, "10.88.0.12", config.ports.db)?;
            if db != 28 {
                return Err(qemu::Error::Http(format!(
                    "3306 from the client: curl exit {db}, expected 28 (dropped)"
                )));
            }
            // nginx behind the balancer is for cluster peers only (issue 10 item 9).
            let web = tcp_probe(cluster, "10.88.0.12", config.ports.web)?;
            if web != 28 {
                return Err(qemu::Error::Http(format!(
                    "web port {} from the client: curl exit {web}, expected 28 (dropped)",
                    config.ports.web
                )));
            }
            let health = cluster.http_get(
                &format!("https://10.88.0.11:{}/healthz", config.ports.admin),
                Duration::from_secs(10),
            )?;
            if health.status != 200 {
                return Err(qemu::Error::Http(format!(
                    "admin /healthz answered {}",
                    health.status
                )));
            }
            Ok(())
        },
    );

    crate::support::step(
        cluster,
        "the admin port shows the status page after a login, and metrics to the bearer token",
        || {
            let admin = crate::support::Admin::of(cluster, config, "server2")?;
            let page = admin.wait_get("/", Duration::from_secs(60), |r| {
                r.status == 200
                    && r.body.contains("data-service=\"mariadb\"")
                    && r.body.contains("database role")
            })?;
            if !page.body.contains("node <b>server2</b>") {
                return Err(qemu::Error::Http(format!(
                    "status page of the wrong node: {}",
                    page.body
                )));
            }
            crate::support::wait_metrics(
                cluster,
                config,
                "server2",
                Duration::from_secs(30),
                |m| {
                    m.contains(
                        "tandem_supervisor_service_running{node=\"server2\",service=\"nginx\"} 1",
                    )
                },
            )?;
            let anonymous = crate::support::metrics(
                cluster,
                std::net::Ipv4Addr::new(10, 88, 0, 12),
                config.ports.admin,
                None,
            )?;
            if anonymous.status != 401 {
                return Err(qemu::Error::Http(format!(
                    "/metrics without the token answered {}",
                    anonymous.status
                )));
            }
            Ok(())
        },
    );
    crate::support::step(
        cluster,
        "the balancer on server1 round-robins HTTPS (h2) over both nodes and redirects HTTP",
        || {
            let url = format!("https://10.88.0.11:{}/node.html", config.ports.https);
            cluster.wait_http(&url, Duration::from_secs(60), |r| r.status == 200)?;
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..6 {
                let r = cluster.http_get(&url, Duration::from_secs(10))?;
                for node in ["server1", "server2"] {
                    if r.body.contains(&format!("node: {node}")) {
                        seen.insert(node);
                    }
                }
            }
            if seen.len() != 2 {
                return Err(qemu::Error::Http(format!(
                    "6 requests through the balancer reached only {seen:?}"
                )));
            }
            let out = cluster.run(&[
                "curl",
                "-sk",
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{ssl_verify_result}",
                &url,
            ])?;
            let version = String::from_utf8_lossy(&out.stdout).to_string();
            if !version.starts_with('2') {
                return Err(qemu::Error::Http(format!(
                    "expected HTTP/2 over TLS, got {version:?}"
                )));
            }
            let redirect = cluster.http_get(
                &format!("http://10.88.0.11:{}/", config.ports.http),
                Duration::from_secs(10),
            )?;
            if redirect.status != 301 && redirect.status != 308 {
                return Err(qemu::Error::Http(format!(
                    "plain HTTP answered {} instead of a redirect",
                    redirect.status
                )));
            }
            Ok(())
        },
    );
    crate::support::step(
        cluster,
        "the peer API answers only clients with a certificate from the cluster CA",
        || peer_api_requires_cluster_certificate(cluster, config),
    );
    note
}

/// A client certificate from the CA in `ca_dir` (created there if absent), as PEM files.
fn client_cert(
    dir: &Path,
    ca_dir: &Path,
    cluster: &str,
    name: &str,
) -> qemu::Result<(PathBuf, PathBuf)> {
    let err =
        |e: image_builder::Error| qemu::Error::Http(format!("client certificate {name}: {e}"));
    let (ca, _) = image_builder::pki::load_or_create_ca(ca_dir, cluster).map_err(err)?;
    let cert = image_builder::pki::client_cert(&ca, name).map_err(err)?;
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    image_builder::pki::write_file(&crt, cert.cert_pem.as_bytes(), 0o644).map_err(err)?;
    image_builder::pki::write_file(&key, cert.key_pem.as_bytes(), 0o600).map_err(err)?;
    Ok((crt, key))
}

/// A client certificate `peer` from the cluster CA, in `subdir` of the cluster's work dir.
pub(crate) fn peer_client_cert(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    subdir: &Path,
) -> qemu::Result<(PathBuf, PathBuf)> {
    let dir = cluster.work_dir().join(subdir);
    std::fs::create_dir_all(&dir).map_err(|e| qemu::Error::Http(e.to_string()))?;
    // The admin server takes a certificate as a peer's only if its SAN names a node: the test
    // acts as server2's tooling.
    client_cert(
        &dir,
        &crate::support::ca_dir(config)?,
        &config.name,
        "server2",
    )
}

fn peer_api_requires_cluster_certificate(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
) -> qemu::Result<()> {
    let dir = cluster.work_dir().join("peer-certs");
    let (peer_crt, peer_key) = peer_client_cert(cluster, config, Path::new("peer-certs"))?;
    // Same names, another CA: must be refused at the handshake.
    let (rogue_crt, rogue_key) = client_cert(&dir, &dir.join("rogue-ca"), &config.name, "rogue")?;
    let url = format!("https://10.88.0.11:{}/api/peer/ping", config.ports.admin);
    let curl = |cert: Option<(&Path, &Path)>| -> qemu::Result<(i32, String)> {
        let mut argv: Vec<String> = ["curl", "-sk", "--max-time", "10", "-w", " %{http_code}"]
            .map(String::from)
            .to_vec();
        if let Some((crt, key)) = cert {
            argv.extend([
                "--cert".into(),
                crt.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]);
        }
        argv.push(url.clone());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = cluster.run(&argv)?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let (_, with_peer) = curl(Some((&peer_crt, &peer_key)))?;
    if !with_peer.contains("pong from server1") || !with_peer.ends_with(" 200") {
        return Err(qemu::Error::Http(format!(
            "with a cluster certificate: {with_peer:?}"
        )));
    }
    let (_, without) = curl(None)?;
    if !without.ends_with(" 403") {
        return Err(qemu::Error::Http(format!(
            "without a certificate: {without:?}, expected 403"
        )));
    }
    // The cluster's CA, but a name that is no node's (issue 10 item 12).
    let (outsider_crt, outsider_key) = client_cert(
        &dir,
        &crate::support::ca_dir(config)?,
        &config.name,
        "evil.example",
    )?;
    let (_, outsider) = curl(Some((&outsider_crt, &outsider_key)))?;
    if !outsider.ends_with(" 403") {
        return Err(qemu::Error::Http(format!(
            "a cluster certificate naming no node: {outsider:?}, expected 403"
        )));
    }
    let (code, rogue) = curl(Some((&rogue_crt, &rogue_key)))?;
    if code == 0 && rogue.contains("pong") {
        return Err(qemu::Error::Http(format!(
            "a certificate from another CA was accepted: {rogue:?}"
        )));
    }
    Ok(())
}
