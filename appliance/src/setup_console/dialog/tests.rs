use super::*;

/// What the user or the service does next in a transcript.
enum In {
    /// A typed line.
    L(&'static str),
    /// A line longer than the line editor keeps.
    Long,
    Interrupt,
    Eof,
    /// The service's answer to the setup.
    Answer(Response),
    /// The service could not be asked.
    Lost(&'static str),
}
use In::*;

fn status(asked: &[Field]) -> Status {
    Status {
        configured: false,
        revision: 0,
        cluster: "tandem".into(),
        node: None,
        nodes: vec!["server1".into(), "server2".into()],
        asked: asked.to_vec(),
        certificate: None,
        webhook: None,
        metrics_token: None,
    }
}

/// Every field a generic image asks (the seed holds nothing).
fn generic() -> Status {
    status(&cluster_config::settings::asked(&Default::default()))
}

fn invalid(errors: &[(Field, &str)]) -> Response {
    Response::Invalid {
        errors: errors
            .iter()
            .map(|(field, message)| FieldError {
                field: *field,
                message: message.to_string(),
            })
            .collect(),
    }
}

/// Runs a dialog over `inputs` and returns its transcript: the text printed, each typed line
/// as `«line»` (echoed) or `«•line»` (not echoed), each submit with its answers as JSON, and
/// how it ended.
fn transcript(status: &Status, terminal: bool, inputs: Vec<In>) -> String {
    let mut dialog = Dialog::new(status, terminal);
    let mut out = dialog.start();
    let mut inputs = inputs.into_iter();
    let mut t = String::new();
    loop {
        t.push_str(&out.text);
        out = match out.next {
            Next::Read { echo } => match inputs.next() {
                Some(L(line)) => {
                    t.push_str(&format!("«{}{line}»", if echo { "" } else { "•" }));
                    dialog.line(line)
                }
                Some(Long) => dialog.too_long(),
                Some(Interrupt) => dialog.interrupt(),
                Some(Eof) => dialog.eof(),
                Some(_) => panic!("a service answer while reading: {t}"),
                None => {
                    t.push_str("<reading>");
                    break;
                }
            },
            Next::Submit(answers) => {
                // Unanswered fields (null) left out.
                let mut json = serde_json::to_value(&answers).unwrap();
                json.as_object_mut().unwrap().retain(|_, v| !v.is_null());
                t.push_str(&format!("<submit {json}>\n"));
                match inputs.next() {
                    Some(Answer(response)) => dialog.answer(Ok(response)),
                    Some(Lost(message)) => dialog.answer(Err(message.into())),
                    _ => panic!("no service answer for the submit: {t}"),
                }
            }
            Next::Restart { after } => {
                t.push_str(&format!("<restart after {after:?}>"));
                break;
            }
            Next::Exit { success } => {
                t.push_str(&format!("<exit success={success}>"));
                break;
            }
        };
    }
    assert!(inputs.next().is_none(), "inputs left over: {t}");
    t
}

/// `transcript` over a pipe, checked against `expected` line by line (a mismatch shows both).
fn check(status: &Status, inputs: Vec<In>, expected: &str) {
    let got = transcript(status, false, inputs);
    assert_eq!(
        got, expected,
        "\n--- got:\n{got}\n--- expected:\n{expected}"
    );
}

#[test]
fn every_field_is_asked_in_order_and_a_generated_secret_shown_once() {
    check(
        &generic(),
        vec![
            L(" server1 "),
            L("correct horse 7 battery"),
            L("correct horse 7 battery"),
            L("generate"),
            L("Self-Signed"),
            L(""),
            Answer(Response::Applied {
                cluster_secret: Some(Secret::new("ab".repeat(32))),
            }),
        ],
        &format!(
            "\
[setup] Tandem first-boot setup for cluster tandem
[setup] This machine is node (the name of this machine in the cluster description; one of server1, server2)
node> « server1 »
[setup] Admin password (at least 12 characters, mixing letters, digits or symbols)
admin_password> «•correct horse 7 battery»
[setup] Admin password (again)
admin_password_confirm> «•correct horse 7 battery»
[setup] Cluster secret (the same 64 hex digits on every node; `generate` on the first node only)
cluster_secret> «•generate»
[setup] HTTPS certificate (`self-signed`, or upload the public name's certificate and key: type `self-signed` or `upload`)
tls> «Self-Signed»
[setup] Alert webhook URL (http:// or https://; empty for none)
webhook> «»
[setup] checking the answers
<submit {{\"admin_password\":\"correct horse 7 battery\",\"admin_password_confirm\":\"correct horse 7 battery\",\"cluster_secret\":\"generate\",\"node\":\"server1\",\"tls\":{{\"mode\":\"self-signed\"}},\"webhook\":\"\"}}>
[setup] applied: this machine is server1
[setup] cluster secret: {secret}
[setup] type this secret into the other nodes' setup: it is not shown again
[setup] the node now starts its services
<exit success=true>",
            secret = "ab".repeat(32)
        ),
    );
}

#[test]
fn only_the_fields_with_errors_are_asked_again_and_the_other_answers_kept() {
    let got = transcript(
        &generic(),
        false,
        vec![
            L("server3"),
            L("short"),
            L("short"),
            L("generate"),
            L("self-signed"),
            L("https://hooks.test/x"),
            Answer(invalid(&[
                (Field::Node, "unknown node `server3`"),
                (Field::AdminPassword, "too short: 5 characters, at least 12"),
            ])),
            L("server2"),
            L("a much better one 42"),
            L("a much better one 42"),
            Answer(Response::Applied {
                cluster_secret: None,
            }),
        ],
    );
    let after_errors = got
        .split_once("[setup] error on node: unknown node `server3`\n[setup] error on admin_password: too short: 5 characters, at least 12\n")
        .unwrap_or_else(|| panic!("the errors, in one block: {got}"))
        .1;
    let prompts: Vec<&str> = after_errors.lines().filter(|l| l.contains("> «")).collect();
    assert_eq!(
        prompts,
        [
            "node> «server2»",
            "admin_password> «•a much better one 42»",
            "admin_password_confirm> «•a much better one 42»",
        ],
        "{got}"
    );
    assert!(
        after_errors.contains(r#"<submit {"admin_password":"a much better one 42","admin_password_confirm":"a much better one 42","cluster_secret":"generate","node":"server2","tls":{"mode":"self-signed"},"webhook":"https://hooks.test/x"}>"#),
        "{got}"
    );
    assert!(
        got.ends_with("[setup] applied: this machine is server2\n[setup] the node now starts its services\n<exit success=true>"),
        "no secret line without a generated secret: {got}"
    );
}

#[test]
fn a_pem_paste_ends_at_an_empty_line_and_a_tls_error_asks_the_mode_again() {
    let status = status(&[Field::Tls, Field::TlsCertificate, Field::TlsKey]);
    let got = transcript(
        &status,
        true,
        vec![
            L("scp"),
            L("upload"),
            L("-----BEGIN CERTIFICATE-----"),
            L("MIIB"),
            L("-----END CERTIFICATE-----"),
            L(""),
            L("-----BEGIN PRIVATE KEY-----"),
            L("MIGH"),
            L("-----END PRIVATE KEY-----"),
            L("  "),
            Answer(invalid(&[(
                Field::TlsKey,
                "does not match the certificate",
            )])),
            L("self-signed"),
            Lost("the settings service closed without an answer"),
        ],
    );
    let expected = "\
[setup] Tandem first-boot setup for cluster tandem
[setup] HTTPS certificate (`self-signed`, or upload the public name's certificate and key: type `self-signed` or `upload`)
tls> «scp»
[setup] error on tls: answer `self-signed` or `upload`
[setup] HTTPS certificate (`self-signed`, or upload the public name's certificate and key: type `self-signed` or `upload`)
tls> «upload»
[setup] Certificate chain (PEM) (leaf first, then intermediates; paste it, then an empty line)
tls_certificate> «-----BEGIN CERTIFICATE-----»
«MIIB»
«-----END CERTIFICATE-----»
«»
[setup] Private key (PEM) (PKCS#8, PKCS#1 or SEC1; must match the certificate; paste it, then an empty line)
tls_key> «•-----BEGIN PRIVATE KEY-----»«•MIGH»«•-----END PRIVATE KEY-----»«•  »
[setup] checking the answers
<submit {\"tls\":{\"certificate\":\"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\",\"key\":\"-----BEGIN PRIVATE KEY-----\\nMIGH\\n-----END PRIVATE KEY-----\\n\",\"mode\":\"upload\"}}>
[setup] error on tls_key: does not match the certificate
[setup] HTTPS certificate (`self-signed`, or upload the public name's certificate and key: type `self-signed` or `upload`)
tls> «self-signed»
[setup] checking the answers
<submit {\"tls\":{\"mode\":\"self-signed\"}}>
[setup] the settings service closed without an answer: starting over
<restart after 3s>";
    assert_eq!(
        got, expected,
        "\n--- got:\n{got}\n--- expected:\n{expected}"
    );
}

#[test]
fn an_oversized_paste_or_line_is_refused_before_it_is_sent() {
    let status = status(&[
        Field::Tls,
        Field::TlsCertificate,
        Field::TlsKey,
        Field::Webhook,
    ]);
    let big: &'static str = "A".repeat(60_000).leak();
    let mut inputs = vec![L("upload"), L("-----BEGIN CERTIFICATE-----")];
    inputs.extend((0..5).map(|_| L(big)));
    inputs.extend([L(""), L("x"), Long, L(""), L("c"), L(""), L("k"), L("")]);
    inputs.extend([
        Long,
        L(""),
        Answer(Response::Applied {
            cluster_secret: None,
        }),
    ]);
    let got = transcript(&status, false, inputs);
    let errors: Vec<&str> = got.lines().filter(|l| l.contains("error on")).collect();
    assert_eq!(
        errors,
        [
            "[setup] error on tls_certificate: too long: at most 262144 bytes",
            "[setup] error on tls_certificate: too long: at most 262144 bytes",
            "[setup] error on webhook: too long: at most 65536 bytes on a line",
        ],
        "{got}"
    );
    assert!(
        got.contains("\nwebhook> «»\n[setup] checking the answers\n<submit {\"tls\":{\"certificate\":\"c\\n\",\"key\":\"k\\n\",\"mode\":\"upload\"},\"webhook\":\"\"}>\n"),
        "{got}"
    );
}

#[test]
fn a_configured_node_says_so_and_exits() {
    let mut configured = status(&[]);
    configured.configured = true;
    configured.node = Some("server2".into());
    check(
        &configured,
        vec![],
        "[setup] this node is set up: it is server2 of cluster tandem\n<exit success=true>",
    );
}

#[test]
fn interruptions_and_failures_start_over_and_a_closed_pipe_stops() {
    let asked = [Field::Node, Field::Webhook];
    let cases: Vec<(bool, Vec<In>, &str)> = vec![
        (
            true,
            vec![L("server1"), Interrupt],
            "webhook> \n[setup] interrupted: starting over\n<restart after 0ns>",
        ),
        (
            true,
            vec![Eof],
            "node> \n[setup] end of input: starting over\n<restart after 3s>",
        ),
        (
            false,
            vec![Eof],
            "node> \n[setup] end of input: the wizard stops\n<exit success=false>",
        ),
        (
            false,
            vec![
                L("server1"),
                L(""),
                Answer(Response::Error {
                    message: "disk full".into(),
                }),
            ],
            "[setup] checking the answers\n<submit {\"node\":\"server1\",\"webhook\":\"\"}>\n[setup] the settings service failed: disk full: starting over\n<restart after 3s>",
        ),
        (
            false,
            vec![
                L("server1"),
                L(""),
                Answer(invalid(&[(Field::SetupCode, "does not match")])),
            ],
            "[setup] error on setup_code: does not match\n[setup] the answers were refused: starting over\n<restart after 3s>",
        ),
        (
            false,
            vec![L("server1"), L(""), Answer(Response::Denied)],
            "[setup] the settings service refused the setup code: starting over\n<restart after 3s>",
        ),
    ];
    for (terminal, inputs, ending) in cases {
        let got = transcript(&status(&asked), terminal, inputs);
        assert!(
            got.ends_with(ending),
            "\n--- got:\n{got}\n--- expected to end with:\n{ending}"
        );
    }
}

#[test]
fn a_seeded_node_is_named_at_the_end_and_no_setup_code_is_asked() {
    let mut seeded = status(&[Field::SetupCode, Field::Webhook]);
    seeded.node = Some("server1".into());
    check(
        &seeded,
        vec![
            L("http://alerts.test/hook"),
            Answer(Response::Applied {
                cluster_secret: None,
            }),
        ],
        "\
[setup] Tandem first-boot setup for cluster tandem
[setup] Alert webhook URL (http:// or https://; empty for none)
webhook> «http://alerts.test/hook»
[setup] checking the answers
<submit {\"webhook\":\"http://alerts.test/hook\"}>
[setup] applied: this machine is server1
[setup] the node now starts its services
<exit success=true>",
    );
}
