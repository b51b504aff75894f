//! nginx's access lines: the `log_format` the `web` crate renders into `nginx.conf` and the
//! parser the log monitor reads nginx's stdout with. One definition, so the two never drift.

/// The name of the format in `nginx.conf` (`log_format <name> …`, `access_log … <name>`).
pub const FORMAT_NAME: &str = "tandem";

/// The format's text, as nginx's `log_format` takes it (inside single quotes). [`parse`] reads
/// the lines it produces.
pub const FORMAT: &str =
    "$remote_addr [$time_iso8601] \"$request\" $status $body_bytes_sent $request_time";

/// One line of [`FORMAT`]: `$remote_addr [$time_iso8601] "$request" $status
/// $body_bytes_sent $request_time`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLine<'a> {
    /// `$remote_addr`: the client's address (the balancer's, behind it).
    pub remote: &'a str,
    /// `$time_iso8601`, as nginx wrote it.
    pub time: &'a str,
    /// `GET / HTTP/1.1` (nginx escapes quotes inside it as `\x22`).
    pub request: &'a str,
    /// `$status`: three digits (nginx logs `000` or `499` for oddities).
    pub status: u16,
    /// `$body_bytes_sent`.
    pub bytes: u64,
    /// `$request_time`, in seconds.
    pub request_time: f64,
}

/// Parses one access line; `None` for anything else (nginx also prints notices on stdout
/// only when misconfigured, and those are not requests). The request is read between the
/// first `"` after the time and the last `"` before the numbers, so a client's quotes and
/// spaces in it (escaped or not) never shift the fields.
pub fn parse(line: &str) -> Option<AccessLine<'_>> {
    let (rest, request_time) = line.rsplit_once(' ')?;
    let (rest, bytes) = rest.rsplit_once(' ')?;
    let (rest, status) = rest.rsplit_once(' ')?;
    let request_time: f64 = request_time
        .parse()
        .ok()
        .filter(|t: &f64| t.is_finite() && *t >= 0.0)?;
    let bytes: u64 = bytes.parse().ok()?;
    if status.len() != 3 || !status.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let status: u16 = status.parse().ok()?;
    let (remote, rest) = rest.split_once(" [")?;
    let (time, rest) = rest.split_once("] ")?;
    let request = rest.strip_prefix('"')?.strip_suffix('"')?;
    if remote.is_empty() || remote.contains(' ') || time.is_empty() {
        return None;
    }
    Some(AccessLine {
        remote,
        time,
        request,
        status,
        bytes,
        request_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`FORMAT`] with every `$variable` replaced as nginx would; panics on a variable the
    /// test does not know (one the parser was not written for).
    fn render(values: &[(&str, &str)]) -> String {
        let mut out = String::new();
        let mut rest = FORMAT;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..end];
            let value = values
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("${name} in FORMAT but not in the test"));
            out.push_str(value.1);
            rest = &after[end..];
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn the_format_and_the_parser_agree() {
        let line = render(&[
            ("remote_addr", "10.88.0.1"),
            ("time_iso8601", "2025-01-02T03:04:05+00:00"),
            ("request", r"GET /a\x22b c HTTP/1.1"),
            ("status", "502"),
            ("body_bytes_sent", "157"),
            ("request_time", "1.234"),
        ]);
        assert_eq!(
            line,
            r#"10.88.0.1 [2025-01-02T03:04:05+00:00] "GET /a\x22b c HTTP/1.1" 502 157 1.234"#
        );
        assert_eq!(
            parse(&line),
            Some(AccessLine {
                remote: "10.88.0.1",
                time: "2025-01-02T03:04:05+00:00",
                request: r"GET /a\x22b c HTTP/1.1",
                status: 502,
                bytes: 157,
                request_time: 1.234,
            })
        );
        assert!(
            !FORMAT.contains('\''),
            "nginx.conf quotes the format in single quotes"
        );
    }

    #[test]
    fn access_lines() {
        // line -> (remote, request, status, bytes, request_time) or None
        type Row = (
            &'static str,
            Option<(&'static str, &'static str, u16, u64, f64)>,
        );
        let table: &[Row] = &[
            (
                r#"10.88.0.1 [2025-01-02T03:04:05+00:00] "GET / HTTP/1.1" 200 612 0.000"#,
                Some(("10.88.0.1", "GET / HTTP/1.1", 200, 612, 0.0)),
            ),
            (
                r#"::1 [2025-01-02T03:04:05+00:00] "POST /api?x=1 HTTP/2.0" 502 157 1.234"#,
                Some(("::1", "POST /api?x=1 HTTP/2.0", 502, 157, 1.234)),
            ),
            // Quotes in the request are escaped by nginx; spaces in it are fine.
            (
                r#"1.2.3.4 [t] "GET /a\x22b c HTTP/1.1" 404 0 0.010"#,
                Some(("1.2.3.4", r"GET /a\x22b c HTTP/1.1", 404, 0, 0.01)),
            ),
            // A bad request line is logged as "-" or garbage, still a request.
            (
                r#"1.2.3.4 [t] "-" 400 0 0.000"#,
                Some(("1.2.3.4", "-", 400, 0, 0.0)),
            ),
            (
                r#"1.2.3.4 [t] "" 499 0 0.001"#,
                Some(("1.2.3.4", "", 499, 0, 0.001)),
            ),
            (r#"1.2.3.4 [t] "GET /" 2000 0 0.0"#, None),
            (r#"1.2.3.4 [t] "GET /" 200 -5 0.0"#, None),
            (r#"1.2.3.4 [t] "GET /" 200 5 -1"#, None),
            (r#"1.2.3.4 [t] "GET /" 200 5 NaN"#, None),
            (r#"1.2.3.4 "GET /" 200 5 0.1"#, None),
            (r#"1.2.3.4 [t] GET / 200 5 0.1"#, None),
            (
                "2025/01/02 03:04:05 [notice] 1#1: start worker processes",
                None,
            ),
            ("", None),
        ];
        for (line, expected) in table {
            let got = parse(line).map(|a| (a.remote, a.request, a.status, a.bytes, a.request_time));
            assert_eq!(got, *expected, "{line}");
        }
    }
}
