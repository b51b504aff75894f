//! The Prometheus text exposition format (version 0.0.4) as every Tandem exporter writes it
//! (the balancer, the log monitor).

/// A label value escaped for `name{label="<value>"}`: backslash, double quote and line feed
/// are the three characters the format escapes (`\\`, `\"`, `\n`).
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str(r"\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_label;

    #[test]
    fn label_values_escape_backslash_quote_and_newline_only() {
        for (value, escaped) in [
            ("server1", "server1"),
            (r#"we"ird"#, r#"we\"ird"#),
            (r"C:\path", r"C:\\path"),
            ("a\nb", r"a\nb"),
            // Already-escaped text is escaped again: the value is taken literally.
            (r#"\"\n"#, r#"\\\"\\n"#),
            ("tab\tand é", "tab\tand é"),
            ("", ""),
        ] {
            assert_eq!(escape_label(value), escaped, "{value:?}");
        }
    }
}
