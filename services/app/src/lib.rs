//! The demo application Tandem ships: a small notes service run by the supervisor behind each
//! node's nginx (`appliance app`). It reads from the node's own database and writes to the
//! primary, wherever it currently is, and every answer names the node and its database role.
//!
//! It knows Tandem only through the environment the node plan gives every application (its
//! own or a user's, see [`Config::from_env`]), and through the database agent's status file
//! ([`api::db::AgentStatus`]), which names the current primary so that a switchover is followed
//! without a restart: each write reads it, and a new primary gets a new connection pool.
//!
//! Routes: `GET /` (page), `GET /notes.json` (or `Accept: application/json`), both with
//! `?before=<id>` for older pages (`HEAD` too), `POST /notes` (form field or JSON `body`).
//! Static files (`/style.css`) are served by nginx.
//!
//! HTTP (`http.rs`): hyper on tokio, HTTP/1.1 with keep-alive, at most [`MAX_CONNECTIONS`]
//! connections and [`MAX_REQUESTS`] requests at once (503 beyond either), bounded heads and
//! bodies (431, 413), deadlines for both (the head's is also the idle keep-alive timeout).
//!
//! Database ([`store`]): `mysql_async`, a pool per server, TLS checked against the cluster CA,
//! prepared statements. A write the primary did not take (read-only during a switchover,
//! unreachable) is held and retried, against the primary published then, for up to
//! [`WRITE_HOLD`], then answered 503; only errors that certainly wrote nothing are retried.
//!
//! Limits: a page holds [`store::PAGE_SIZE`] notes, a note at most [`store::MAX_NOTE_BYTES`]
//! (413), the table at most [`store::MAX_NOTES`] (507, nothing is ever deleted to make room),
//! and each client (by its forwarded address, see [`limit::client_address`]) gets a token
//! bucket of writes (429 with `Retry-After`).

mod http;
pub mod limit;
pub mod store;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::db::{AgentStatus, Role};
use api::text::html_escape;
use serde_json::json;
use tokio::net::TcpListener;

use http::{Request, Response};
use store::{Credentials, Server, Store, StoreError};

/// Static application files, served by nginx from the node's web root.
pub const STATIC_FILES: &[(&str, &str)] = &[("style.css", include_str!("../static/style.css"))];
/// Connections open at once, idle keep-alive ones included (nginx keeps up to 32 per worker);
/// a connection beyond gets 503 and is closed.
pub const MAX_CONNECTIONS: usize = 512;
/// Requests served at once; more get 503 at once rather than queueing without bound.
pub const MAX_REQUESTS: usize = 64;
/// A request head must arrive within this long, and an idle keep-alive connection is closed
/// after it. Longer than nginx's upstream `keepalive_timeout` (60 s by default), so nginx always
/// closes an idle connection first: a POST nginx sends on a connection we are closing would be
/// its 502 (nginx never sends a non-idempotent request twice).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(75);
/// The request body must arrive within this long after its head (408 otherwise).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write waits for a primary that takes it (a switchover makes the old primary
/// read-only until every agent publishes the new one, about a second) before answering 503.
pub const WRITE_HOLD: Duration = Duration::from_secs(5);
/// Pause between two attempts of a held write (each re-reads the agent's status).
const WRITE_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Everything the application needs, from the environment the node plan sets.
#[derive(Clone)]
pub struct Config {
    /// `TANDEM_NODE`: shown on every page.
    pub node: String,
    /// `TANDEM_APP_ADDR` (default 127.0.0.1) and `TANDEM_APP_PORT` (default 8000).
    pub listen: SocketAddr,
    /// `TANDEM_DB_HOST`, `TANDEM_DB_PORT`: the node's own server, for reads.
    pub local_db: (String, u16),
    /// `TANDEM_DB_PRIMARY_HOST`, `TANDEM_DB_PRIMARY_PORT`: the primary when the node started.
    pub primary_db: (String, u16),
    /// `TANDEM_DB_STATUS_FILE`: the agent's status (current role and primary), if any.
    pub status_file: Option<PathBuf>,
    /// `TANDEM_DB_SSL_CA`: the cluster CA. Every database connection is TLS, the server's
    /// certificate checked against it and the server's address.
    pub db_ssl_ca: PathBuf,
    /// `TANDEM_DB_NAME` (default `app`).
    pub database: String,
    /// `TANDEM_DB_USER`.
    pub user: String,
    /// `TANDEM_DB_PASSWORD`; never logged.
    pub password: String,
    /// `TANDEM_APP_TRUSTED_PROXIES` (comma-separated addresses, default none): the proxies in
    /// front of the application (the cluster's balancers) whose `X-Forwarded-For` entries are
    /// believed when finding the client's address.
    pub trusted_proxies: Vec<IpAddr>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("node", &self.node)
            .field("listen", &self.listen)
            .field("local_db", &self.local_db)
            .field("primary_db", &self.primary_db)
            .field("status_file", &self.status_file)
            .field("db_ssl_ca", &self.db_ssl_ca)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("environment variable {name}: {problem}")]
    Env { name: &'static str, problem: String },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading the cluster CA {}: {source}", .path.display())]
    Ca {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl Config {
    /// The configuration from the process environment.
    pub fn from_env() -> Result<Config, AppError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// The configuration from `get` (an environment variable's value by name).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, AppError> {
        let required = |name: &'static str| {
            get(name).ok_or(AppError::Env {
                name,
                problem: "not set".into(),
            })
        };
        let or_default =
            |name: &'static str, default: &str| get(name).unwrap_or_else(|| default.to_string());
        let port = |name: &'static str, default: &str| -> Result<u16, AppError> {
            let v = or_default(name, default);
            v.parse().map_err(|_| AppError::Env {
                name,
                problem: format!("`{v}` is not a port"),
            })
        };
        let addr = or_default("TANDEM_APP_ADDR", "127.0.0.1");
        let ip = addr.parse().map_err(|_| AppError::Env {
            name: "TANDEM_APP_ADDR",
            problem: format!("`{addr}` is not an IP address"),
        })?;
        let trusted_proxies = get("TANDEM_APP_TRUSTED_PROXIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse::<IpAddr>().map_err(|_| AppError::Env {
                    name: "TANDEM_APP_TRUSTED_PROXIES",
                    problem: format!("`{a}` is not an IP address"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let local_host = required("TANDEM_DB_HOST")?;
        let local_port = port("TANDEM_DB_PORT", "3306")?;
        Ok(Config {
            node: required("TANDEM_NODE")?,
            listen: SocketAddr::new(ip, port("TANDEM_APP_PORT", "8000")?),
            primary_db: (
                get("TANDEM_DB_PRIMARY_HOST").unwrap_or_else(|| local_host.clone()),
                port("TANDEM_DB_PRIMARY_PORT", &local_port.to_string())?,
            ),
            local_db: (local_host, local_port),
            status_file: get("TANDEM_DB_STATUS_FILE").map(PathBuf::from),
            db_ssl_ca: PathBuf::from(required("TANDEM_DB_SSL_CA")?),
            database: or_default("TANDEM_DB_NAME", "app"),
            user: required("TANDEM_DB_USER")?,
            password: required("TANDEM_DB_PASSWORD")?,
            trusted_proxies,
        })
    }
}

/// The node's database role and the primary, as the agent last published them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DbView {
    /// `None` while the agent has published nothing readable.
    pub(crate) role: Option<Role>,
    pub(crate) primary: Server,
}

impl DbView {
    fn role_name(&self) -> &'static str {
        self.role.map_or("unknown", Role::as_str)
    }
}

/// Reads the agent's status; falls back to the start-time primary while there is none (or it
/// cannot be read).
pub(crate) fn db_view(status_json: Option<&str>, fallback: &Server) -> DbView {
    match status_json.map(AgentStatus::parse) {
        Some(Ok(status)) => DbView {
            role: Some(status.role),
            primary: Server {
                host: status.primary.address.to_string(),
                port: status.primary.port,
            },
        },
        _ => DbView {
            role: None,
            primary: fallback.clone(),
        },
    }
}

struct App {
    config: Config,
    store: Store,
    /// The primary when the node started, until the agent publishes one.
    start_primary: Server,
    /// Writes per client address.
    limiter: Mutex<limit::RateLimiter>,
    /// The rate limiter's clock starts here.
    started: Instant,
}

/// Serves until the process is killed (the supervisor's SIGTERM ends it).
pub fn run(config: Config) -> Result<(), AppError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    runtime.block_on(async {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| AppError::Listen {
                    addr: config.listen,
                    source,
                })?;
        serve(config, listener).await
    })
}

/// Serves on `listener` until the task is dropped. Fails only at the start, when the cluster
/// CA cannot be read.
pub async fn serve(config: Config, listener: TcpListener) -> Result<(), AppError> {
    // rustls' process-wide provider: ring, whatever else the binary links.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_pem = std::fs::read(&config.db_ssl_ca).map_err(|source| AppError::Ca {
        path: config.db_ssl_ca.clone(),
        source,
    })?;
    let server = |(host, port): &(String, u16)| Server {
        host: host.clone(),
        port: *port,
    };
    let store = Store::new(
        server(&config.local_db),
        Credentials {
            user: config.user.clone(),
            password: config.password.clone(),
            database: config.database.clone(),
            ca_pem,
        },
    );
    let listen = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(node = %config.node, %listen, local_db = ?config.local_db, "demo application listening");
    let app = Arc::new(App {
        start_primary: server(&config.primary_db),
        config,
        store,
        limiter: Mutex::new(limit::RateLimiter::default()),
        started: Instant::now(),
    });
    let limits = http::Limits {
        max_connections: MAX_CONNECTIONS,
        max_requests: MAX_REQUESTS,
        head_timeout: HEAD_TIMEOUT,
        body_timeout: BODY_TIMEOUT,
    };
    http::serve(listener, app, limits).await;
    Ok(())
}

impl http::Handler for App {
    async fn handle(&self, req: Request, peer: IpAddr) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET" | "HEAD", "/" | "/notes" | "/notes.json") => self.list(&req).await,
            ("POST", "/notes" | "/notes.json") => {
                let client = limit::client_address(
                    req.header("x-forwarded-for"),
                    peer,
                    &self.config.trusted_proxies,
                );
                self.add(&req, client).await
            }
            (_, "/" | "/notes" | "/notes.json") => Response::text(405, "method not allowed"),
            _ => Response::text(404, "not found"),
        }
    }
}

impl App {
    fn view(&self) -> DbView {
        let text = self
            .config
            .status_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        db_view(text.as_deref(), &self.start_primary)
    }

    async fn list(&self, req: &Request) -> Response {
        let before = match req.query_param("before").map(|b| b.parse::<u64>()) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => return Response::text(400, "`before` must be a note id"),
        };
        let view = self.view();
        let notes = self.store.list(before).await;
        if req.wants_json() {
            return match notes {
                Ok(page) => Response::json(
                    200,
                    &json!({
                        "node": self.config.node,
                        "role": view.role_name(),
                        "notes": page.notes,
                        "older": page.older.map(|id| format!("/notes.json?before={id}")),
                    }),
                ),
                Err(e) => Response::json(
                    503,
                    &json!({"node": self.config.node, "role": view.role_name(), "error": e.to_string()}),
                ),
            };
        }
        let status = if notes.is_ok() { 200 } else { 503 };
        Response::new(
            status,
            "text/html; charset=utf-8",
            render_page(&self.config.node, &view, &notes.map_err(|e| e.to_string())),
        )
    }

    async fn add(&self, req: &Request, client: IpAddr) -> Response {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(client, now_ms);
        if let Err(seconds) = allowed {
            let message = format!(
                "too many writes from {client}: at most {} at once and {} per second; retry in {seconds} s",
                limit::WRITE_BURST,
                limit::WRITE_REFILL_PER_S
            );
            let response = match req.wants_json() {
                true => Response::json(429, &json!({"node": self.config.node, "error": message})),
                false => Response::text(429, &message),
            };
            return Response {
                retry_after: Some(seconds),
                ..response
            };
        }
        let json_in = req
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json"));
        let body = if json_in {
            serde_json::from_slice::<serde_json::Value>(&req.body)
                .ok()
                .and_then(|v| v["body"].as_str().map(str::to_string))
        } else {
            http::form_value(&req.body, "body")
        };
        let fail = |status: u16, message: String| match req.wants_json() {
            true => Response::json(status, &json!({"node": self.config.node, "error": message})),
            false => Response::text(status, &message),
        };
        let body = match store::check_note(body.as_deref().unwrap_or("")) {
            Ok(b) => b.to_string(),
            Err(e) => return fail(e.status(), e.to_string()),
        };
        // A write the primary did not take (read-only during a switchover, unreachable) is
        // tried again, against the primary published then, until WRITE_HOLD has passed.
        let started = Instant::now();
        let (view, written) = loop {
            let view = self.view();
            let written = self
                .store
                .insert(&view.primary, &self.config.node, &body)
                .await;
            match &written {
                Err(e) if e.not_applied() && started.elapsed() + WRITE_RETRY_PAUSE < WRITE_HOLD => {
                    tokio::time::sleep(WRITE_RETRY_PAUSE).await
                }
                _ => break (view, written),
            }
        };
        if written.is_ok() && started.elapsed() >= WRITE_RETRY_PAUSE {
            tracing::info!(held_ms = started.elapsed().as_millis(), primary = %view.primary, "a write was held until the primary took it");
        }
        match written {
            Ok(note) if req.wants_json() => Response::json(
                201,
                &json!({"node": self.config.node, "role": view.role_name(), "note": note}),
            ),
            Ok(_) => Response::redirect("/"),
            Err(e @ StoreError::Full { .. }) => fail(507, e.to_string()),
            Err(e) if e.not_applied() => Response {
                retry_after: Some(1),
                ..fail(
                    503,
                    format!(
                        "writing to the primary: none took the note within {} s, nothing was written: {e}",
                        WRITE_HOLD.as_secs()
                    ),
                )
            },
            Err(e) => fail(503, format!("writing to the primary: {e}")),
        }
    }
}

/// The HTML page: the node, its role, a page of notes (newest first, a link to older ones) and
/// a form.
pub(crate) fn render_page(
    node: &str,
    view: &DbView,
    notes: &Result<store::Page, String>,
) -> String {
    let mut s =
        String::from("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Notes — ");
    s.push_str(&html_escape(node));
    s.push_str("</title><link rel=\"stylesheet\" href=\"/style.css\"></head>\n<body>\n<header>\n");
    s.push_str(&format!(
        "<p class=\"node\">node: {}</p>\n",
        html_escape(node)
    ));
    s.push_str(&format!(
        "<p class=\"role\">db_role: {}</p>\n",
        view.role_name()
    ));
    s.push_str(&format!(
        "<p class=\"primary\">primary: {}:{}</p>\n</header>\n",
        html_escape(&view.primary.host),
        view.primary.port
    ));
    s.push_str(&format!("<h1>Notes</h1>\n<form method=\"post\" action=\"/notes\"><textarea name=\"body\" maxlength=\"{}\" required></textarea><button>Add</button></form>\n", store::MAX_NOTE_BYTES));
    match notes {
        Ok(page) if page.notes.is_empty() => s.push_str("<p>No notes yet.</p>\n"),
        Ok(page) => {
            s.push_str("<ol>\n");
            for n in &page.notes {
                s.push_str(&format!(
                    "<li><p>{}</p><small>#{} via {} at {}</small></li>\n",
                    html_escape(&n.body),
                    n.id,
                    html_escape(&n.node),
                    html_escape(&n.created)
                ));
            }
            s.push_str("</ol>\n");
            if let Some(id) = page.older {
                s.push_str(&format!(
                    "<p class=\"older\"><a href=\"/?before={id}\">Older notes</a></p>\n"
                ));
            }
        }
        Err(e) => s.push_str(&format!(
            "<p class=\"error\">The local database did not answer: {}</p>\n",
            html_escape(e)
        )),
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_comes_from_the_environment() {
        let env = |name: &str| {
            let value = match name {
                "TANDEM_NODE" => "server1",
                "TANDEM_APP_ADDR" => "127.0.0.11",
                "TANDEM_DB_HOST" => "127.0.0.11",
                "TANDEM_DB_USER" => "tandem_app",
                "TANDEM_DB_PASSWORD" => "hunter2",
                "TANDEM_APP_RUN_DIR" => "/run/tandem/app",
                "TANDEM_DB_SSL_CA" => "/run/tandem/mysqld/tls-ca.pem",
                _ => return None,
            };
            Some(value.to_string())
        };
        let c = Config::from_lookup(env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.11:8000");
        assert_eq!(
            (c.primary_db.0.as_str(), c.primary_db.1, c.database.as_str()),
            ("127.0.0.11", 3306, "app")
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        let e = Config::from_lookup(|n| {
            if n == "TANDEM_APP_PORT" {
                Some("x".into())
            } else {
                env(n)
            }
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment variable TANDEM_APP_PORT: `x` is not a port"
        );
        let e =
            Config::from_lookup(|n| if n == "TANDEM_NODE" { None } else { env(n) }).unwrap_err();
        assert_eq!(e.to_string(), "environment variable TANDEM_NODE: not set");
        assert!(c.trusted_proxies.is_empty());
        let with = |value: &'static str| {
            Config::from_lookup(move |n| match n {
                "TANDEM_APP_TRUSTED_PROXIES" => Some(value.to_string()),
                _ => env(n),
            })
        };
        assert_eq!(
            with("10.88.0.11, 10.88.0.10").unwrap().trusted_proxies,
            [IpAddr::from([10, 88, 0, 11]), IpAddr::from([10, 88, 0, 10])]
        );
        assert_eq!(
            with("10.88.0.11,nginx").unwrap_err().to_string(),
            "environment variable TANDEM_APP_TRUSTED_PROXIES: `nginx` is not an IP address"
        );
    }

    #[test]
    fn the_agents_status_names_role_and_primary() {
        let fallback = Server {
            host: "10.88.0.12".into(),
            port: 3306,
        };
        let status = api::db::AgentStatus {
            node: "server2".into(),
            role: Role::Replica,
            primary: api::db::PrimaryRef {
                name: "server1".into(),
                address: std::net::Ipv4Addr::new(10, 88, 0, 11),
                port: 3307,
            },
            healthy: true,
            error: None,
            lag_s: Some(0),
            read_only: Some(true),
            io_running: Some("Yes".into()),
            sql_running: Some(true),
            gtid_current_pos: None,
            gtid_slave_pos: None,
            gtid_binlog_pos: None,
            updated_ms: 1,
        };
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(
            db_view(Some(&text), &fallback),
            DbView {
                role: Some(Role::Replica),
                primary: Server {
                    host: "10.88.0.11".into(),
                    port: 3307
                },
            }
        );
        let unknown = DbView {
            role: None,
            primary: fallback.clone(),
        };
        assert_eq!(db_view(None, &fallback), unknown);
        assert_eq!(unknown.role_name(), "unknown");
        assert_eq!(db_view(Some("{garbage"), &fallback), unknown);
        // Only part of a status (an agent of another version, a torn file) is no status.
        let partial = r#"{"role": "primary", "primary": {"name": "server1", "address": "10.88.0.11", "port": 3306}}"#;
        assert_eq!(db_view(Some(partial), &fallback), unknown);
    }

    #[test]
    fn page_names_node_and_role_and_escapes_notes() {
        let view = DbView {
            role: Some(Role::Replica),
            primary: Server {
                host: "10.88.0.12".into(),
                port: 3306,
            },
        };
        let note = |id: u64, body: &str| store::Note {
            id,
            node: "server2".into(),
            body: body.into(),
            created: "now".into(),
        };
        let notes = store::Page {
            notes: vec![note(1, "<script>")],
            older: None,
        };
        let page = render_page("server1", &view, &Ok(notes));
        assert!(
            page.contains("node: server1") && page.contains("db_role: replica"),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;") && !page.contains("<script>"));
        assert!(!page.contains("Older notes"));
        let notes = store::Page {
            notes: vec![note(9, "newer"), note(8, "older")],
            older: Some(8),
        };
        let page = render_page("server1", &view, &Ok(notes));
        assert!(
            page.find("newer").unwrap() < page.find("older").unwrap(),
            "newest first: {page}"
        );
        assert!(
            page.contains("<a href=\"/?before=8\">Older notes</a>"),
            "{page}"
        );
        let page = render_page("server1", &view, &Err("down".into()));
        assert!(page.contains("did not answer: down"));
    }
}
