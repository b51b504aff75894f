//! The admin port's login, pure: the session table, the per-address rate limiter, cookies, the
//! CSRF check and which request needs what. Time is an argument and random bytes are made by
//! the caller, so every rule here is tested without sockets or sleeps.
//!
//! The password itself is never here: the settings service checks it (`Request::Login`), and
//! this server only keeps the sessions a successful login opened, in memory (a restart logs
//! everyone out, which is fine for a console of one appliance).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hyper::Method;

/// A session unused this long is gone.
pub(crate) const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// A session is gone this long after its login, used or not.
pub(crate) const SESSION_MAX: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the least recently used one makes room for a new login.
pub(crate) const MAX_SESSIONS: usize = 256;
/// Failed attempts (logins, setup codes) allowed per client address within [`FAILURE_WINDOW`].
pub(crate) const MAX_FAILURES: usize = 5;
/// The rate limiter's window.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Addresses tracked before the expired ones are swept out.
const SWEEP_AT: usize = 1024;

/// The session cookie.
pub(crate) const SESSION_COOKIE: &str = "tandem_session";
/// The login form's double-submit cookie (its value is the form's `csrf` field too).
pub(crate) const LOGIN_CSRF_COOKIE: &str = "tandem_login_csrf";
/// The header a script sends the session's CSRF token in.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";
/// The form field a page sends it in.
pub(crate) const CSRF_FIELD: &str = "csrf";
/// Bytes of randomness in a session id or a CSRF token (hex-encoded: twice as many digits).
pub(crate) const TOKEN_BYTES: usize = 32;

/// One logged-in browser.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Session {
    /// Every state-changing request of this session carries it.
    pub(crate) csrf: String,
    created: Instant,
    last_used: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// The open sessions by id.
#[derive(Default)]
pub(crate) struct Sessions {
    by_id: HashMap<String, Session>,
}

impl Sessions {
    /// Opens a session under `id` (random, made by the caller) with its CSRF token.
    pub(crate) fn open(&mut self, id: String, csrf: String, now: Instant) {
        if self.by_id.len() >= MAX_SESSIONS {
            self.by_id.retain(|_, s| alive(s, now));
        }
        if self.by_id.len() >= MAX_SESSIONS {
            let oldest = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.by_id.remove(&oldest);
            }
        }
        self.by_id.insert(
            id,
            Session {
                csrf,
                created: now,
                last_used: now,
            },
        );
    }

    /// The live session `id`, marked used now; an expired one is removed.
    pub(crate) fn touch(&mut self, id: &str, now: Instant) -> Option<&Session> {
        let live = self.by_id.get(id).is_some_and(|s| alive(s, now));
        if !live {
            self.by_id.remove(id);
            return None;
        }
        let session = self.by_id.get_mut(id)?;
        session.last_used = now;
        Some(session)
    }

    /// Logs `id` out.
    pub(crate) fn close(&mut self, id: &str) {
        self.by_id.remove(id);
    }

    /// Closes every session but `keep` (the password changed: other browsers log in again).
    pub(crate) fn close_others(&mut self, keep: &str) {
        self.by_id.retain(|id, _| id == keep);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }
}

fn alive(s: &Session, now: Instant) -> bool {
    now.saturating_duration_since(s.last_used) < SESSION_IDLE
        && now.saturating_duration_since(s.created) < SESSION_MAX
}

/// Failed attempts per client address: [`MAX_FAILURES`] within [`FAILURE_WINDOW`] and the
/// address waits until the oldest of them leaves the window.
///
/// An attempt counts as failed from the moment it starts ([`Limiter::begin`]) until it is
/// known to be good ([`Limiter::forgive`], [`Limiter::clear`]): parallel guesses cannot slip
/// through before the first answer.
#[derive(Default)]
pub(crate) struct Limiter {
    by_addr: HashMap<IpAddr, VecDeque<Instant>>,
}

impl Limiter {
    /// Starts an attempt from `addr`, or says how long it must wait.
    pub(crate) fn begin(&mut self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.by_addr.len() >= SWEEP_AT {
            self.by_addr.retain(|_, times| {
                expire(times, now);
                !times.is_empty()
            });
        }
        let times = self.by_addr.entry(addr).or_default();
        expire(times, now);
        if times.len() >= MAX_FAILURES {
            let oldest = times.front().copied().unwrap_or(now);
            let wait = (oldest + FAILURE_WINDOW).saturating_duration_since(now);
            return Err(wait.max(Duration::from_secs(1)));
        }
        times.push_back(now);
        Ok(())
    }

    /// The attempt just begun was not a failure (a setup refused for another reason than its
    /// code).
    pub(crate) fn forgive(&mut self, addr: IpAddr) {
        if let Some(times) = self.by_addr.get_mut(&addr) {
            times.pop_back();
        }
    }

    /// A success: the address starts afresh.
    pub(crate) fn clear(&mut self, addr: IpAddr) {
        self.by_addr.remove(&addr);
    }
}

fn expire(times: &mut VecDeque<Instant>, now: Instant) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= FAILURE_WINDOW)
    {
        times.pop_front();
    }
}

/// Whole seconds for `Retry-After`, rounded up.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'a>(
    headers: impl IntoIterator<Item = &'a str>,
    name: &str,
) -> Option<&'a str> {
    headers
        .into_iter()
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// `Set-Cookie` for a cookie only this site's HTTPS pages send back; `max_age` 0 removes it.
pub(crate) fn set_cookie(name: &str, value: &str, path: &str, max_age: Duration) -> String {
    format!(
        "{name}={value}; Path={path}; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        max_age.as_secs()
    )
}

/// A token as this server makes them: [`TOKEN_BYTES`] random bytes in lower-case hex.
pub(crate) fn is_token(text: &str) -> bool {
    text.len() == 2 * TOKEN_BYTES && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Equal, in a time that depends only on the lengths (tokens have a fixed one).
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Authorization: Bearer <token>` carries `expected`.
pub(crate) fn bearer_ok(authorization: Option<&str>, expected: &str) -> bool {
    let Some(value) = authorization else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && !expected.is_empty()
        && same(token.trim().as_bytes(), expected.as_bytes())
}

/// What a request needs before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Anyone (health, the login form, the login itself with its own check).
    Open,
    /// A peer's client certificate (checked before this table).
    Peer,
    /// A page: without a session, the login page.
    Page,
    /// JSON for a logged-in browser: without a session, 401.
    Api,
    /// A state-changing request whose body is not a form (an upload): session and the CSRF
    /// header.
    Action,
    /// A form post: session and the CSRF token in the header or the form.
    Form,
    /// `/metrics`: the bearer token.
    Metrics,
}

/// Which rule a request falls under in full mode (pure).
pub(crate) fn access(method: &Method, path: &str) -> Access {
    let read = method == Method::GET || method == Method::HEAD;
    match path {
        p if p.starts_with("/api/peer/") => Access::Peer,
        "/healthz" | "/login" | "/api/setup/status" => Access::Open,
        "/metrics" => Access::Metrics,
        "/setup" if read => Access::Open,
        "/settings" | "/logout" if !read => Access::Form,
        _ if !read => Access::Action,
        "/" | "/settings" => Access::Page,
        p if p.starts_with("/api/") => Access::Api,
        _ => Access::Open,
    }
}

/// What the CSRF header said, against the session's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Csrf {
    /// No header (a form may still carry the token).
    Absent,
    Matches,
    Wrong,
}

impl Csrf {
    pub(crate) fn check(sent: Option<&str>, session: Option<&str>) -> Csrf {
        match (sent, session) {
            (None, _) => Csrf::Absent,
            (Some(sent), Some(token)) if same(sent.as_bytes(), token.as_bytes()) => Csrf::Matches,
            (Some(_), _) => Csrf::Wrong,
        }
    }
}

/// What to do with a request before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Serve,
    /// 303 to the login page.
    Login,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// Serve only if the form's `csrf` field matches (the handler reads the body).
    ServeIfFormCsrf,
}

/// The gate of a request (pure): its rule, whether it has a live session, what its CSRF header
/// said. Peers and the metrics bearer are checked where they are served.
pub(crate) fn gate(access: Access, session: bool, csrf: Csrf) -> Gate {
    match (access, session, csrf) {
        (Access::Open | Access::Peer | Access::Metrics, _, _) => Gate::Serve,
        (Access::Page, true, _) | (Access::Api, true, _) => Gate::Serve,
        (Access::Page, false, _) => Gate::Login,
        (Access::Api, false, _) => Gate::Unauthorized,
        (Access::Action | Access::Form, false, _) => Gate::Forbidden,
        (Access::Action | Access::Form, true, Csrf::Matches) => Gate::Serve,
        (Access::Action | Access::Form, true, Csrf::Wrong) => Gate::Forbidden,
        (Access::Action, true, Csrf::Absent) => Gate::Forbidden,
        (Access::Form, true, Csrf::Absent) => Gate::ServeIfFormCsrf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn sessions_end_after_30_idle_minutes_or_12_hours() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        s.open("a".into(), "ta".into(), t0);
        // Used every 29 minutes: alive, until 12 hours after the login.
        let mut t = t0;
        while t + 29 * MIN < t0 + SESSION_MAX {
            t += 29 * MIN;
            assert_eq!(s.touch("a", t).map(|s| s.csrf.clone()), Some("ta".into()));
        }
        assert!(s.touch("a", t0 + SESSION_MAX).is_none());
        assert_eq!(s.len(), 0, "an expired session is removed");
        // Idle for 30 minutes: gone.
        s.open("b".into(), "tb".into(), t0);
        assert!(s.touch("b", t0 + 29 * MIN).is_some());
        assert!(s.touch("b", t0 + 59 * MIN).is_none());
        assert!(s.touch("nope", t0).is_none());
        // Logout, and a password change closing the others.
        for id in ["c", "d", "e"] {
            s.open(id.into(), format!("t{id}"), t0);
        }
        s.close("c");
        assert!(s.touch("c", t0).is_none());
        s.close_others("d");
        assert!(s.touch("d", t0).is_some());
        assert!(s.touch("e", t0).is_none());
    }

    #[test]
    fn a_full_table_drops_the_least_recently_used_session() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        for i in 0..MAX_SESSIONS {
            s.open(
                format!("s{i}"),
                String::new(),
                t0 + Duration::from_secs(i as u64),
            );
        }
        let later = t0 + Duration::from_secs(MAX_SESSIONS as u64);
        assert!(s.touch("s0", later).is_some());
        s.open("new".into(), String::new(), later);
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(
            s.touch("s1", later).is_none(),
            "s1 was the least recently used"
        );
        assert!(s.touch("s0", later).is_some() && s.touch("new", later).is_some());
    }

    #[test]
    fn five_failures_in_15_minutes_make_an_address_wait() {
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut l = Limiter::default();
        for i in 0..5 {
            assert_eq!(l.begin(a, t0 + i * MIN), Ok(()), "attempt {i}");
        }
        // The sixth waits until the first leaves the window; another address does not.
        assert_eq!(l.begin(a, t0 + 5 * MIN), Err(10 * MIN));
        assert_eq!(l.begin(b, t0 + 5 * MIN), Ok(()));
        assert_eq!(
            l.begin(a, t0 + 15 * MIN - Duration::from_millis(1)),
            Err(Duration::from_secs(1))
        );
        assert_eq!(l.begin(a, t0 + 15 * MIN), Ok(()));
        assert_eq!(l.begin(a, t0 + 15 * MIN), Err(MIN));
        // A success starts afresh; a forgiven attempt does not count.
        l.clear(a);
        for _ in 0..10 {
            assert_eq!(l.begin(a, t0 + 16 * MIN), Ok(()));
            l.forgive(a);
        }
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(10 * MIN), 600);
    }

    #[test]
    fn cookies_are_found_by_name() {
        let cases: [(&[&str], &str, Option<&str>); 6] = [
            (&["tandem_session=abc"], SESSION_COOKIE, Some("abc")),
            (
                &["a=1; tandem_session=abc; b=2"],
                SESSION_COOKIE,
                Some("abc"),
            ),
            (
                &["a=1", "tandem_session=\"abc\""],
                SESSION_COOKIE,
                Some("abc"),
            ),
            (&["xtandem_session=abc"], SESSION_COOKIE, None),
            (&["tandem_session"], SESSION_COOKIE, None),
            (&[], SESSION_COOKIE, None),
        ];
        for (headers, name, expected) in cases {
            assert_eq!(
                cookie(headers.iter().copied(), name),
                expected,
                "{headers:?}"
            );
        }
        assert_eq!(
            set_cookie(SESSION_COOKIE, "abc", "/", SESSION_MAX),
            "tandem_session=abc; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=43200"
        );
    }

    #[test]
    fn tokens_and_bearers_compare_whole() {
        let token = "ab".repeat(TOKEN_BYTES);
        assert!(is_token(&token));
        assert!(!is_token(&token.to_uppercase()) && !is_token("ab") && !is_token(""));
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd") && !same(b"abc", b"ab") && !same(b"", b"a"));
        let cases = [
            (Some("Bearer s3cret"), true),
            (Some("bearer s3cret"), true),
            (Some("Bearer  s3cret "), true),
            (Some("Bearer s3cre"), false),
            (Some("Bearer s3cretx"), false),
            (Some("Basic s3cret"), false),
            (Some("s3cret"), false),
            (None, false),
        ];
        for (header, ok) in cases {
            assert_eq!(bearer_ok(header, "s3cret"), ok, "{header:?}");
        }
        assert!(
            !bearer_ok(Some("Bearer "), ""),
            "an empty token opens nothing"
        );
        assert_eq!(Csrf::check(None, Some("t")), Csrf::Absent);
        assert_eq!(Csrf::check(Some("t"), Some("t")), Csrf::Matches);
        assert_eq!(Csrf::check(Some("u"), Some("t")), Csrf::Wrong);
        assert_eq!(Csrf::check(Some("t"), None), Csrf::Wrong);
    }

    #[test]
    fn every_request_meets_its_gate() {
        use Access::*;
        let (get, post) = (Method::GET, Method::POST);
        let rules = [
            (&get, "/", Page),
            (&get, "/settings", Page),
            (&post, "/settings", Form),
            (&post, "/logout", Form),
            (&get, "/login", Open),
            (&post, "/login", Open),
            (&get, "/setup", Open),
            (&post, "/setup", Action),
            (&get, "/api/setup/status", Open),
            (&get, "/api/status", Api),
            (&get, "/api/session", Api),
            (&post, "/api/update/install", Action),
            (&post, "/api/update/boot-once", Action),
            (&post, "/api/cluster/upgrade", Action),
            (&post, "/api/peer/update", Peer),
            (&get, "/api/peer/ping", Peer),
            (&get, "/metrics", Metrics),
            (&get, "/healthz", Open),
            (&Method::HEAD, "/", Page),
            (&Method::DELETE, "/api/status", Action),
            (&get, "/nope", Open),
        ];
        for (method, path, expected) in rules {
            assert_eq!(access(method, path), expected, "{method} {path}");
        }
        let gates = [
            (Open, false, Csrf::Absent, Gate::Serve),
            (Metrics, false, Csrf::Absent, Gate::Serve),
            (Page, false, Csrf::Absent, Gate::Login),
            (Page, true, Csrf::Absent, Gate::Serve),
            (Api, false, Csrf::Matches, Gate::Unauthorized),
            (Api, true, Csrf::Absent, Gate::Serve),
            (Action, false, Csrf::Matches, Gate::Forbidden),
            (Action, true, Csrf::Absent, Gate::Forbidden),
            (Action, true, Csrf::Wrong, Gate::Forbidden),
            (Action, true, Csrf::Matches, Gate::Serve),
            (Form, false, Csrf::Absent, Gate::Forbidden),
            (Form, true, Csrf::Absent, Gate::ServeIfFormCsrf),
            (Form, true, Csrf::Wrong, Gate::Forbidden),
            (Form, true, Csrf::Matches, Gate::Serve),
        ];
        for (access, session, csrf, expected) in gates {
            assert_eq!(
                gate(access, session, csrf),
                expected,
                "{access:?} session={session} {csrf:?}"
            );
        }
    }
}
