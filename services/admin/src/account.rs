//! The logged-in admin port's own pages and checks (after setup): login and logout, the
//! settings page, `/api/session`, `/metrics`'s bearer token. The thin async edges around
//! [`crate::auth`] (the rules) and [`crate::forms`] (the pages); the settings service is asked
//! through its blocking socket client on the blocking pool.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::settings::{Request as SettingsRequest, Response as SettingsResponse, Secret, Status};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, RETRY_AFTER, SET_COOKIE, WWW_AUTHENTICATE};
use hyper::{Request, StatusCode};

use crate::auth::{self, Limiter, Sessions, CSRF_FIELD, LOGIN_CSRF_COOKIE, SESSION_COOKIE};
use crate::forms::{self, Form, SettingsView, PASSWORD_FIELD};
use crate::{html, lock, reply, see_other, with_header, Ctx, Resp};

/// A status question to the settings service.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// A login, setup or change (argon2 takes a second under emulation; a setup stores a lot).
pub(crate) const WORK_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest form accepted: a certificate chain and a key at their limit, urlencoded.
pub(crate) const MAX_FORM_BYTES: usize = 2 << 20;
/// A form must arrive within this.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a login form stays usable.
const LOGIN_FORM_MAX_AGE: Duration = Duration::from_secs(3600);

/// Sessions and failed logins.
#[derive(Default)]
pub(crate) struct AuthState {
    pub(crate) sessions: Sessions,
    pub(crate) logins: Limiter,
}

/// The request's live session.
pub(crate) struct SessionRef {
    pub(crate) id: String,
    pub(crate) csrf: String,
}

fn cookies(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
}

/// The live session the request's cookie names (marked used).
pub(crate) fn session_of(ctx: &Ctx, headers: &HeaderMap) -> Option<SessionRef> {
    let id = auth::cookie(cookies(headers), SESSION_COOKIE).filter(|id| auth::is_token(id))?;
    let mut state = lock(&ctx.auth);
    let session = state.sessions.touch(id, Instant::now())?;
    Some(SessionRef {
        id: id.to_string(),
        csrf: session.csrf.clone(),
    })
}

/// [`auth::TOKEN_BYTES`] random bytes from the kernel, in hex.
pub(crate) fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; auth::TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| format!("no random bytes: {e}"))?;
    Ok(hex::encode(bytes))
}

fn internal(e: &str) -> Resp {
    tracing::error!("{e}");
    reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        "internal error\n",
    )
}

/// Asks the settings service on the blocking pool.
pub(crate) async fn ask(
    socket: &Path,
    request: SettingsRequest,
    timeout: Duration,
) -> Result<SettingsResponse, String> {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || api::settings::request(&socket, &request, timeout))
        .await
        .map_err(|e| format!("asking the settings service: {e}"))?
}

/// The settings service's status.
pub(crate) async fn status(socket: &Path) -> Result<Status, String> {
    match ask(socket, SettingsRequest::Status, STATUS_TIMEOUT).await? {
        SettingsResponse::Status(status) => Ok(status),
        SettingsResponse::Error { message } => Err(message),
        _ => Err("the settings service answered a status request with something else".into()),
    }
}

/// Reads an urlencoded form body: at most [`MAX_FORM_BYTES`], within [`FORM_TIMEOUT`].
pub(crate) async fn read_form(body: Incoming) -> Result<Form, Resp> {
    let limited = http_body_util::Limited::new(body, MAX_FORM_BYTES);
    match tokio::time::timeout(FORM_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(Form::parse(&collected.to_bytes())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            format!("a form of at most {MAX_FORM_BYTES} bytes\n"),
        )),
        Ok(Err(e)) => Err(reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("reading the form: {e}\n"),
        )),
        Err(_) => Err(reply(
            StatusCode::REQUEST_TIMEOUT,
            "text/plain",
            "the form did not arrive in time\n",
        )),
    }
}

/// `GET /api/setup/status`: `{"configured", "revision", "asked"}` (no secrets).
pub(crate) async fn setup_status(socket: &Path) -> Resp {
    match status(socket).await {
        Ok(status) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::json!({
                "configured": status.configured,
                "revision": status.revision,
                "asked": status.asked,
            })
            .to_string(),
        ),
        Err(e) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            serde_json::json!({ "error": e }).to_string(),
        ),
    }
}

fn login_form(ctx: &Ctx, status: StatusCode, token: &str, error: Option<&str>) -> Resp {
    let page = forms::render_login(&ctx.cluster.name, &ctx.node.name, token, error);
    with_header(
        html(status, page),
        SET_COOKIE,
        &auth::set_cookie(LOGIN_CSRF_COOKIE, token, "/login", LOGIN_FORM_MAX_AGE),
    )
}

/// The login form's token: the browser's double-submit cookie, or a new one.
fn login_token(headers: &HeaderMap) -> Result<String, String> {
    match auth::cookie(cookies(headers), LOGIN_CSRF_COOKIE).filter(|t| auth::is_token(t)) {
        Some(token) => Ok(token.to_string()),
        None => random_token(),
    }
}

/// `GET /login`.
pub(crate) fn login_page(ctx: &Ctx, headers: &HeaderMap, logged_in: bool) -> Resp {
    if logged_in {
        return see_other("/");
    }
    match login_token(headers) {
        Ok(token) => login_form(ctx, StatusCode::OK, &token, None),
        Err(e) => internal(&e),
    }
}

/// `POST /login`: the double-submit check, the address's failures, then the settings
/// service's verdict on the password.
pub(crate) async fn login(ctx: &Arc<Ctx>, req: Request<Incoming>, client: SocketAddr) -> Resp {
    let address = client.ip().to_canonical();
    let cookie = auth::cookie(cookies(req.headers()), LOGIN_CSRF_COOKIE).map(str::to_string);
    let form = match read_form(req.into_body()).await {
        Ok(form) => form,
        Err(resp) => return resp,
    };
    // Another site can make a browser post here but can neither read nor set this cookie.
    let submitted = form.get(CSRF_FIELD).unwrap_or("");
    let fresh = match cookie.as_deref() {
        Some(c) if auth::is_token(c) && auth::same(c.as_bytes(), submitted.as_bytes()) => None,
        _ => Some(random_token()),
    };
    if let Some(token) = fresh {
        return match token {
            Ok(token) => login_form(
                ctx,
                StatusCode::FORBIDDEN,
                &token,
                Some("this login form expired: enter the password again"),
            ),
            Err(e) => internal(&e),
        };
    }
    let token = cookie.unwrap_or_default();
    let started = lock(&ctx.auth).logins.begin(address, Instant::now());
    if let Err(wait) = started {
        tracing::debug!(%address, "login refused: too many failures");
        let secs = auth::retry_after_secs(wait);
        let message = format!(
            "too many failed logins from {address}: try again in {} minute(s)",
            secs.div_ceil(60)
        );
        let resp = login_form(ctx, StatusCode::TOO_MANY_REQUESTS, &token, Some(&message));
        return with_header(resp, RETRY_AFTER, &secs.to_string());
    }
    let password = Secret::new(form.get(PASSWORD_FIELD).unwrap_or(""));
    let answer = ask(
        &ctx.settings_socket,
        SettingsRequest::Login { password },
        WORK_TIMEOUT,
    )
    .await;
    match answer {
        Ok(SettingsResponse::Ok) => {
            lock(&ctx.auth).logins.clear(address);
            let (id, csrf) = match (random_token(), random_token()) {
                (Ok(id), Ok(csrf)) => (id, csrf),
                (Err(e), _) | (_, Err(e)) => return internal(&e),
            };
            lock(&ctx.auth)
                .sessions
                .open(id.clone(), csrf, Instant::now());
            tracing::info!(%address, "admin login");
            let resp = see_other("/");
            let resp = with_header(
                resp,
                SET_COOKIE,
                &auth::set_cookie(SESSION_COOKIE, &id, "/", auth::SESSION_MAX),
            );
            with_header(
                resp,
                SET_COOKIE,
                &auth::set_cookie(LOGIN_CSRF_COOKIE, "", "/login", Duration::ZERO),
            )
        }
        Ok(SettingsResponse::Denied) => {
            tracing::warn!(%address, "failed admin login: wrong password");
            login_form(
                ctx,
                StatusCode::UNAUTHORIZED,
                &token,
                Some("wrong password"),
            )
        }
        other => {
            lock(&ctx.auth).logins.forgive(address);
            let message = match other {
                Err(e) => e,
                Ok(SettingsResponse::Error { message }) => message,
                Ok(_) => "the settings service answered a login with something else".into(),
            };
            tracing::warn!(%address, "login not checked: {message}");
            login_form(
                ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                &token,
                Some(&format!("the password cannot be checked now: {message}")),
            )
        }
    }
}

/// The form's CSRF field matches the session's token (the header did not carry it).
fn form_csrf_ok(form: &Form, session: &SessionRef) -> bool {
    auth::same(
        form.get(CSRF_FIELD).unwrap_or("").as_bytes(),
        session.csrf.as_bytes(),
    )
}

/// A form posted within a session: the session, then the form, then (when the CSRF token
/// travels in the form rather than a header) the form's token; 403 without either.
async fn session_form(
    session: Option<SessionRef>,
    req: Request<Incoming>,
    form_csrf: bool,
) -> Result<(SessionRef, Form), Resp> {
    let Some(session) = session else {
        return Err(forbidden());
    };
    let form = read_form(req.into_body()).await?;
    if form_csrf && !form_csrf_ok(&form, &session) {
        return Err(forbidden());
    }
    Ok((session, form))
}

fn forbidden() -> Resp {
    reply(
        StatusCode::FORBIDDEN,
        "text/plain",
        "refused: this needs a logged-in session and its CSRF token (the form's csrf field)\n",
    )
}

/// `POST /logout`.
pub(crate) async fn logout(
    ctx: &Ctx,
    req: Request<Incoming>,
    session: Option<SessionRef>,
    form_csrf: bool,
) -> Resp {
    let (session, _) = match session_form(session, req, form_csrf).await {
        Ok(both) => both,
        Err(resp) => return resp,
    };
    lock(&ctx.auth).sessions.close(&session.id);
    with_header(
        see_other("/login"),
        SET_COOKIE,
        &auth::set_cookie(SESSION_COOKIE, "", "/", Duration::ZERO),
    )
}

/// `GET /api/session`: the session's CSRF token, for scripts.
pub(crate) fn session_json(session: Option<&SessionRef>) -> Resp {
    match session {
        Some(s) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::json!({ "csrf": s.csrf }).to_string(),
        ),
        None => reply(StatusCode::UNAUTHORIZED, "text/plain", "log in first\n"),
    }
}

fn now_unix() -> i64 {
    (crate::unix_ms() / 1000) as i64
}

/// `GET /settings`.
pub(crate) async fn settings_page(ctx: &Ctx, session: Option<SessionRef>) -> Resp {
    let Some(session) = session else {
        return see_other("/login");
    };
    let status = status(&ctx.settings_socket).await;
    let view = SettingsView {
        cluster: &ctx.cluster.name,
        node: &ctx.node.name,
        csrf: &session.csrf,
        status: status.as_ref().ok(),
        form: None,
        errors: &[],
        notice: None,
        general: status.as_ref().err().map(String::as_str),
        now_unix: now_unix(),
    };
    let code = match status {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    html(code, forms::render_settings(&view))
}

/// `POST /settings`: the form as a `Change`; refused answers on their fields.
pub(crate) async fn settings_post(
    ctx: &Ctx,
    req: Request<Incoming>,
    session: Option<SessionRef>,
    form_csrf: bool,
) -> Resp {
    let (session, form) = match session_form(session, req, form_csrf).await {
        Ok(both) => both,
        Err(resp) => return resp,
    };
    let before = match status(&ctx.settings_socket).await {
        Ok(status) => status,
        Err(e) => return settings_answer(ctx, &session, None, Some(&form), &[], None, Some(&e)),
    };
    let Some(change) = forms::settings_change(&form, before.webhook.as_deref()) else {
        return settings_answer(
            ctx,
            &session,
            Some(&before),
            None,
            &[],
            Some("Nothing to change."),
            None,
        );
    };
    let password = change.admin_password.is_some();
    let answer = ask(
        &ctx.settings_socket,
        SettingsRequest::Change { change },
        WORK_TIMEOUT,
    )
    .await;
    match answer {
        Ok(SettingsResponse::Applied { .. }) => {
            if password {
                // Other browsers logged in with the old password log in again.
                lock(&ctx.auth).sessions.close_others(&session.id);
            }
            tracing::info!(password, "settings changed from the admin page");
            let after = status(&ctx.settings_socket).await;
            if let Ok(after) = &after {
                *lock(&ctx.metrics_token) = after.metrics_token.clone();
            }
            settings_answer(
                ctx,
                &session,
                after.as_ref().ok(),
                None,
                &[],
                Some("Saved."),
                after.as_ref().err().map(String::as_str),
            )
        }
        Ok(SettingsResponse::Invalid { errors }) => settings_answer(
            ctx,
            &session,
            Some(&before),
            Some(&form),
            &errors,
            None,
            None,
        ),
        other => {
            let message = match other {
                Err(e) => e,
                Ok(SettingsResponse::Error { message }) => message,
                Ok(_) => "the settings service answered a change with something else".into(),
            };
            tracing::warn!("settings change failed: {message}");
            settings_answer(
                ctx,
                &session,
                Some(&before),
                Some(&form),
                &[],
                None,
                Some(&message),
            )
        }
    }
}

/// The settings page after a post: 200 when saved or unchanged, 422 with field errors, 503
/// when the service failed.
fn settings_answer(
    ctx: &Ctx,
    session: &SessionRef,
    status: Option<&Status>,
    form: Option<&Form>,
    errors: &[api::settings::FieldError],
    notice: Option<&str>,
    general: Option<&str>,
) -> Resp {
    let code = match (errors.is_empty(), general) {
        (false, _) => StatusCode::UNPROCESSABLE_ENTITY,
        (true, Some(_)) => StatusCode::SERVICE_UNAVAILABLE,
        (true, None) => StatusCode::OK,
    };
    let view = SettingsView {
        cluster: &ctx.cluster.name,
        node: &ctx.node.name,
        csrf: &session.csrf,
        status,
        form,
        errors,
        notice,
        general,
        now_unix: now_unix(),
    };
    html(code, forms::render_settings(&view))
}

/// Asks the settings service for `/metrics`'s token and keeps it (a failure keeps the old
/// one: the token changes only through this server's settings page).
pub(crate) async fn refresh_metrics_token(ctx: Arc<Ctx>) -> Option<Secret> {
    match status(&ctx.settings_socket).await {
        Ok(status) => {
            *lock(&ctx.metrics_token) = status.metrics_token.clone();
            status.metrics_token
        }
        Err(e) => {
            tracing::debug!("metrics token: {e}");
            lock(&ctx.metrics_token).clone()
        }
    }
}

/// `/metrics` takes `Authorization: Bearer <metrics token>`: 401 without it, 503 while the
/// token cannot be known (never open).
pub(crate) async fn metrics_allowed(ctx: &Arc<Ctx>, headers: &HeaderMap) -> Result<(), Resp> {
    let unauthorized = || {
        with_header(
            reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "/metrics needs Authorization: Bearer <the metrics token>\n",
            ),
            WWW_AUTHENTICATE,
            "Bearer realm=\"tandem\"",
        )
    };
    let Some(authorization) = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(unauthorized());
    };
    let known = lock(&ctx.metrics_token).clone();
    let token = match known {
        Some(token) => Some(token),
        None => refresh_metrics_token(ctx.clone()).await,
    };
    match token {
        Some(token) if auth::bearer_ok(Some(authorization), token.expose()) => Ok(()),
        Some(_) => Err(unauthorized()),
        None => Err(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the metrics token is not known (the settings service does not answer)\n",
        )),
    }
}
