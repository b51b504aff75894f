//! Just enough HTTP/1.1 for an application behind nginx: one request per connection, bounded
//! head and body, `Content-Length` bodies only (nginx never sends chunked requests upstream
//! unless the client did; those get 411).

use std::io::{BufRead, BufReader, Read, Write};

/// Longest accepted request head (request line + headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// The query string (after `?`), empty when there is none.
    pub query: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The decoded value of query parameter `name`, if present.
    pub fn query_param(&self, name: &str) -> Option<String> {
        parse_form(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Whether the client asked for JSON rather than a page.
    pub fn wants_json(&self) -> bool {
        self.path.ends_with(".json")
            || self
                .header("accept")
                .is_some_and(|a| a.contains("application/json"))
            || self
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/json"))
    }
}

/// Why a request could not be read; each maps to a status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The peer closed or timed out before a full head (no response is owed).
    Closed,
    Bad(&'static str),
    HeadTooLarge,
    BodyTooLarge,
    LengthRequired,
}

impl ReadError {
    pub fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            ReadError::Closed => None,
            ReadError::Bad(why) => Some((400, why)),
            ReadError::HeadTooLarge => Some((431, "request head too large")),
            ReadError::BodyTooLarge => Some((413, "request body too large")),
            ReadError::LengthRequired => Some((411, "a body needs Content-Length")),
        }
    }
}

/// Method, target and headers of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
}

/// Parses a complete request head (without the final blank line).
pub fn parse_head(head: &str) -> Result<Head, ReadError> {
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err(ReadError::Bad("malformed request line"));
    }
    if !target.starts_with('/') {
        return Err(ReadError::Bad("request target must be a path"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or(ReadError::Bad("malformed header"))?;
        if name.is_empty() || name.contains(' ') {
            return Err(ReadError::Bad("malformed header"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
    })
}

/// Reads one request, enforcing [`MAX_HEAD`] and [`MAX_BODY`].
pub fn read_request(stream: impl Read) -> Result<Request, ReadError> {
    let mut reader = BufReader::new(stream.take((MAX_HEAD + MAX_BODY) as u64));
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = reader
            .by_ref()
            .take((MAX_HEAD + 1 - head.len()) as u64)
            .read_until(b'\n', &mut head)
            .map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(if head.len() > MAX_HEAD {
                ReadError::HeadTooLarge
            } else {
                ReadError::Closed
            });
        }
        if head.len() > MAX_HEAD {
            return Err(ReadError::HeadTooLarge);
        }
        if &head[before..] == b"\r\n" || &head[before..] == b"\n" {
            break;
        }
    }
    let text =
        std::str::from_utf8(&head).map_err(|_| ReadError::Bad("request head is not UTF-8"))?;
    let text = text.replace("\r\n", "\n").replace('\n', "\r\n");
    let Head {
        method,
        path,
        query,
        headers,
    } = parse_head(text.trim_end_matches("\r\n"))?;
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if find("transfer-encoding").is_some() {
        return Err(ReadError::LengthRequired);
    }
    let length = match find("content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ReadError::Bad("invalid Content-Length"))?,
    };
    if length > MAX_BODY {
        return Err(ReadError::BodyTooLarge);
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|_| ReadError::Closed)?;
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// A response; always `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub location: Option<String>,
    /// `Retry-After` in seconds (429, 503).
    pub retry_after: Option<u64>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            location: None,
            retry_after: None,
            body: body.into(),
        }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(value).unwrap_or_default();
        body.push(b'\n');
        Response::new(status, "application/json", body)
    }

    pub fn text(status: u16, text: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{text}\n"))
    }

    pub fn redirect(to: &str) -> Response {
        Response {
            location: Some(to.to_string()),
            ..Response::new(303, "text/plain; charset=utf-8", "")
        }
    }

    pub fn write_to(&self, mut out: impl Write) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(location) = &self.location {
            head.push_str(&format!("Location: {location}\r\n"));
        }
        if let Some(seconds) = self.retry_after {
            head.push_str(&format!("Retry-After: {seconds}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(&self.body)?;
        out.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        303 => "See Other",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// Decodes `application/x-www-form-urlencoded` text into pairs.
pub fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(raw: &str) -> Result<Request, ReadError> {
        read_request(raw.as_bytes())
    }

    #[test]
    fn reads_requests_with_bodies_and_limits() {
        let r = read("POST /notes?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\nabcdEXTRA").unwrap();
        assert_eq!(
            (
                r.method.as_str(),
                r.path.as_str(),
                r.query.as_str(),
                r.body.as_slice()
            ),
            ("POST", "/notes", "x=1", &b"abcd"[..])
        );
        assert_eq!(
            (r.query_param("x").as_deref(), r.query_param("y")),
            (Some("1"), None)
        );
        assert!(r.wants_json());
        let r = read("GET / HTTP/1.0\nAccept: text/html\n\n").unwrap();
        assert!(!r.wants_json() && r.body.is_empty());
        assert!(read("GET /notes.json HTTP/1.1\r\n\r\n")
            .unwrap()
            .wants_json());
        assert_eq!(
            read("GET / HTTP/1.1\r\nHost: a\r\n"),
            Err(ReadError::Closed)
        );
        assert_eq!(read(""), Err(ReadError::Closed));
        assert_eq!(
            read("GET /\r\n\r\n"),
            Err(ReadError::Bad("malformed request line"))
        );
        assert_eq!(
            read("GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(ReadError::Bad("request target must be a path"))
        );
        assert_eq!(
            read("GET / HTTP/1.1\r\nbad header\r\n\r\n"),
            Err(ReadError::Bad("malformed header"))
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(read(&big), Err(ReadError::HeadTooLarge));
        let huge = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(read(&huge), Err(ReadError::BodyTooLarge));
        assert_eq!(
            read("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ReadError::LengthRequired)
        );
        assert_eq!(
            read("POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            Err(ReadError::Closed)
        );
        assert_eq!(
            read("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(ReadError::Bad("invalid Content-Length"))
        );
    }

    #[test]
    fn forms_decode() {
        assert_eq!(
            parse_form("body=hello+world%21&x=%zz&y"),
            [
                ("body".into(), "hello world!".into()),
                ("x".into(), "%zz".into()),
                ("y".into(), String::new())
            ]
        );
        assert_eq!(
            parse_form("a=%C3%A9%"),
            [("a".to_string(), "é%".to_string())]
        );
    }

    #[test]
    fn responses_are_complete() {
        let mut out = Vec::new();
        Response::redirect("/").write_to(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 303 See Other\r\n")
                && text.contains("Location: /\r\n")
                && text.contains("Content-Length: 0\r\n")
        );
        let mut out = Vec::new();
        Response {
            retry_after: Some(3),
            ..Response::text(429, "slow down")
        }
        .write_to(&mut out)
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n")
                && text.contains("Retry-After: 3\r\n"),
            "{text}"
        );
    }
}
