//! The harness itself against real QEMU, OVMF and network namespaces: two VMs with blank disks
//! (the firmware boots, finds nothing, prints its boot manager on serial and opens its shell,
//! where a command is typed through the serial socket); headless Chromium filling a form on a
//! local HTTPS server whose self-signed certificate is pinned; the client probe
//! against a real TLS server (`openssl s_server`) in a namespace; the floating IP's holders as
//! ARP shows them, with namespaces standing in for nodes. Needs root and the host packages; a
//! missing one fails with the package name.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu::{Cluster, ClusterSpec, Forward, Forwarder, Netns, ProbeOptions};

const FIRMWARE: Duration = Duration::from_secs(120);
/// OVMF prints this when its boot manager runs.
const BOOT_MANAGER: &str = "BdsDxe";

fn blank_disk(path: &Path) {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M")
        .status()
        .expect("qemu-img (Debian package qemu-utils)");
    assert!(status.success());
}

fn link(cluster: &Cluster, dev: &str) -> String {
    let out = cluster.run(&["ip", "-br", "link", "show", dev]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-shot HTTP server inside the namespace, on a thread that joined it.
fn serve_once_in_namespace(cluster: &Cluster, addr: SocketAddr, body: &'static str) {
    let netns = cluster.netns().clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        netns.enter_current_thread().unwrap();
        let listener = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(resp.as_bytes()).unwrap();
        }
    });
    ready.recv().unwrap();
}

/// At the UEFI shell's `Shell> ` prompt (the firmware found nothing to boot), type `ver`; its
/// answer comes back on the serial log.
fn type_ver_at_the_shell(vm: &qemu::Vm, since: qemu::Mark) {
    let after = vm
        .answer_prompt(since, "Shell", "ver", FIRMWARE)
        .unwrap_or_else(|e| panic!("the shell prompt: {e}\n{}", vm.serial_text()));
    vm.wait_serial_text(after, "UEFI Interactive Shell", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("`ver` typed on serial: {e}\n{}", vm.serial_text()));
}

#[test]
fn harness_boots_firmware_on_a_private_network() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["a", "b"] {
        blank_disk(&dir.path().join(format!("{n}.qcow2")));
    }
    let spec = ClusterSpec::new(dir.path().join("work"))
        .node(
            "a",
            Ipv4Addr::new(10, 88, 0, 11),
            dir.path().join("a.qcow2"),
        )
        .node(
            "b",
            Ipv4Addr::new(10, 88, 0, 12),
            dir.path().join("b.qcow2"),
        );
    let netns_file = Path::new("/run/netns").join(spec.netns_name());
    let cluster = Cluster::boot(spec).unwrap_or_else(|e| panic!("boot: {e}"));
    let fail = |what: &str, e: qemu::Error| -> ! { panic!("{what}: {e}\n{}", cluster.tails(20)) };
    assert!(netns_file.exists());

    // The network: the client's address on the bridge, one tap per VM, all inside the namespace.
    let addrs =
        String::from_utf8_lossy(&cluster.run(&["ip", "-br", "addr"]).unwrap().stdout).into_owned();
    assert!(
        addrs.contains("br0") && addrs.contains("10.88.0.1/24"),
        "{addrs}"
    );
    for vm in cluster.vms() {
        assert!(
            link(&cluster, vm.tap()).contains("UP"),
            "{}",
            link(&cluster, vm.tap())
        );
    }

    // Every serial console is captured.
    for vm in cluster.vms() {
        vm.wait_serial(BOOT_MANAGER, FIRMWARE)
            .unwrap_or_else(|e| fail("firmware on serial", e));
    }

    // The serial console takes input: a command typed at the firmware's shell runs (its output
    // is not in what was typed).
    let b = cluster.vm("b").unwrap();
    type_ver_at_the_shell(b, qemu::Mark::default());

    let a = cluster.vm("a").unwrap();
    assert_eq!(a.status().unwrap(), "running");
    a.pause().unwrap();
    assert_eq!(a.status().unwrap(), "paused");
    a.resume().unwrap();
    assert_eq!(a.status().unwrap(), "running");
    a.reboot_ctrl_alt_del().unwrap();

    a.cut_network().unwrap();
    let down = link(&cluster, a.tap());
    assert!(
        down.contains("DOWN") && !down.contains("LOWER_UP"),
        "{down}"
    );
    a.restore_network().unwrap();
    assert!(link(&cluster, a.tap()).contains("LOWER_UP"));

    // Power cut, then the same overlay boots again; the log keeps both boots.
    let b = cluster.vm("b").unwrap();
    b.kill().unwrap();
    assert!(!b.is_running());
    assert!(b.wait_exit(Duration::from_secs(1)).is_ok());
    let mark = b.serial_mark();
    b.start().unwrap();
    assert!(b.start().is_err(), "a running VM cannot be started twice");
    b.wait_serial_since(mark, BOOT_MANAGER, FIRMWARE)
        .unwrap_or_else(|e| fail("firmware after restart", e));
    // Typing reaches the new QEMU too (the harness reconnects to its serial socket).
    type_ver_at_the_shell(b, mark);

    // The client: curl inside the namespace, and a forwarder from the host's loopback.
    let server = SocketAddr::from((Ipv4Addr::new(10, 88, 0, 1), 18080));
    serve_once_in_namespace(&cluster, server, "hello from the namespace");
    let resp = cluster
        .http_get("http://10.88.0.1:18080/", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (200, "hello from the namespace")
    );
    let port = 20000 + (std::process::id() % 20000) as u16;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let fwd = Forwarder::start(
        cluster.netns().clone(),
        &[Forward {
            label: "test".into(),
            listen,
            target: server,
        }],
    )
    .unwrap();
    let mut conn = TcpStream::connect(listen).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello from the namespace"),
        "{answer}"
    );
    drop(fwd);
    let refused = cluster.http_get("http://10.88.0.11:8080/", Duration::from_secs(5));
    assert!(
        refused.is_err(),
        "nothing serves on a firmware-only VM: {refused:?}"
    );

    // Clean shutdown (the firmware ignores the power button, so this ends in a kill), then drop
    // removes the namespace.
    cluster.shutdown(Duration::from_secs(2));
    assert!(cluster.vms().iter().all(|v| !v.is_running()));
    let work = cluster.work_dir().to_path_buf();
    drop(cluster);
    assert!(!netns_file.exists(), "namespace left behind");
    assert!(work.join("a.serial.log").exists() && !work.join("a.qcow2").exists());
}

#[test]
fn missing_image_is_reported_before_anything_starts() {
    let spec = ClusterSpec::new("/tmp/unused").node(
        "x",
        Ipv4Addr::new(10, 88, 0, 11),
        "/nonexistent/x.qcow2",
    );
    let netns_file = Path::new("/run/netns").join(spec.netns_name());
    let err = Cluster::boot(spec)
        .err()
        .expect("boot must fail")
        .to_string();
    assert!(
        err.contains("/nonexistent/x.qcow2") && err.contains("node x"),
        "{err}"
    );
    assert!(!netns_file.exists());
}

/// A namespace of our own: `tandem-<pid>-<n>`, so a crashed run's leftovers are removed by the
/// next one.
fn test_netns(client: Ipv4Addr) -> Arc<Netns> {
    let name = format!("tandem-{}", qemu::unique_id());
    Arc::new(Netns::create(&name, client, 24, &[]).unwrap_or_else(|e| panic!("netns: {e}")))
}

/// What `Netns::spawn` promises a child: it runs inside the namespace, leads its own process
/// group and starts with no signal blocked, even when the thread that made the namespace (and so
/// its spawner thread) blocks some, as the `tandem-qemu` CLI does for `sigwait`.
#[test]
fn spawned_commands_run_in_the_namespace_in_their_own_group_with_no_signal_blocked() {
    use nix::sys::signal::{SigSet, Signal};
    use std::os::unix::fs::MetadataExt as _;

    let mut blocked = SigSet::empty();
    blocked.add(Signal::SIGUSR1);
    let before = blocked
        .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
        .unwrap();
    let netns = test_netns(Ipv4Addr::new(10, 88, 0, 1));
    before.thread_set_mask().unwrap();

    // Each command reports on itself (a shell between would show its own mask and group).
    let run = |argv: &[&str]| {
        let out = netns.output(argv).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{argv:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let ns = run(&["readlink", "/proc/self/ns/net"]);
    let ns = ns.trim();
    let stat = run(&["cat", "/proc/self/stat"]);
    let stat: Vec<&str> = stat.split_whitespace().collect();
    let (pid, pgrp) = (stat[0], stat[4]);
    let status = run(&["cat", "/proc/self/status"]);
    let sigblk = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
    let inode = std::fs::metadata(netns.path()).unwrap().ino();
    assert_eq!(ns, format!("net:[{inode}]"), "not inside {}", netns.name());
    assert_eq!(pgrp, pid, "not the leader of its own process group");
    assert_eq!(
        sigblk.split_whitespace().nth(1),
        Some("0000000000000000"),
        "{sigblk}"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl s_server -WWW` serving the files of `dir` over TLS at `addr`, inside `netns`;
/// returns once it accepts connections.
fn start_tls_server(netns: &Netns, dir: &Path, addr: SocketAddr) -> Child {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-quiet", "-WWW", "-accept", &addr.to_string()])
        .args(["-cert", "cert.pem", "-key", "key.pem"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut child = netns
        .spawn(cmd)
        .unwrap_or_else(|e| panic!("openssl s_server (Debian package openssl): {e}"));
    let t0 = Instant::now();
    while netns.connect(addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("openssl s_server exited ({status})");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "openssl s_server not listening"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn probe_measures_what_a_client_sees() {
    let netns = test_netns(Ipv4Addr::new(10, 88, 0, 1));
    let server = SocketAddr::from((Ipv4Addr::new(10, 88, 0, 5), 8443));
    netns
        .ip_cmd(&["addr", "add", "10.88.0.5/24", "dev", qemu::BRIDGE])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=probe"])
        .args(["-days", "1", "-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(dir.path()));
    std::fs::write(dir.path().join("node.html"), "<p>node: probe-test</p>\n").unwrap();
    let url = format!("https://{server}/node.html");

    // Steady state: requests answered, by the node the page names. No timing is asserted: this
    // runs beside QEMU tests on two cores, where the host stalls a whole second at times.
    let mut tls = start_tls_server(&netns, dir.path(), server);
    let opts = ProbeOptions::new(&url, Duration::from_secs(2));
    let steady = qemu::Probe::start(&netns, opts.clone()).unwrap().wait();
    let summary = steady.summary();
    assert!(steady.sent >= 20, "the schedule did not run: {summary}");
    assert_eq!(steady.ok + steady.failed, steady.sent, "{summary}");
    assert!(steady.ok * 10 >= steady.sent * 9, "{summary}");
    assert_eq!(
        steady.by_node.get("probe-test"),
        Some(&steady.ok),
        "{summary}"
    );

    // An outage: the server is gone for ~300 ms (connections refused), then back.
    let probe = qemu::Probe::start(&netns, opts).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    tls.kill().unwrap();
    tls.wait().unwrap();
    let killed_at = probe.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let mut tls = start_tls_server(&netns, dir.path(), server);
    let back_at = probe.elapsed();
    let outage = probe.wait();
    let _ = tls.kill();
    let _ = tls.wait();
    let summary = outage.summary();
    eprintln!("outage from {killed_at:?} to {back_at:?}: {summary}");
    assert!(
        outage.longest_gap >= Duration::from_millis(250),
        "{summary}"
    );
    assert!(
        outage.failed > 0 && outage.errors.contains_key("refused"),
        "{summary}"
    );
    assert_eq!(outage.ok + outage.failed, outage.sent, "{summary}");
    // A gap covers the outage: it starts at the kill and lasts past most of it. A worker
    // thread stamps its answer's end when it runs again: on a loaded host (QEMU or Chromium in
    // the tests beside this one) an answer read before the kill can be stamped a little after.
    let slack = Duration::from_millis(50);
    assert!(
        outage.gaps.iter().any(|&(at, len)| at <= killed_at + slack
            && at + len >= killed_at + Duration::from_millis(250)),
        "no gap covers the kill at {killed_at:?}: {summary}"
    );
}

/// A stand-in node: its own namespace, plugged into `client`'s bridge, holding `ip` on an
/// interface with the MAC [`qemu::mac_for`] gives `node_address`.
fn stand_in(client: &Netns, port: &str, node_address: Ipv4Addr, ip: Ipv4Addr) -> Arc<Netns> {
    let ns = test_netns(node_address);
    client
        .ip_cmd(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])
        .unwrap();
    client
        .ip_cmd(&["link", "set", port, "master", qemu::BRIDGE, "up"])
        .unwrap();
    let mac = qemu::format_mac(qemu::mac_for(node_address));
    ns.ip_cmd(&["link", "set", "eth0", "address", &mac])
        .unwrap();
    ns.ip_cmd(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])
        .unwrap();
    ns.ip_cmd(&["link", "set", "eth0", "up"]).unwrap();
    ns
}

#[test]
fn arp_shows_every_holder_of_an_address() {
    let vip = Ipv4Addr::new(10, 88, 0, 10);
    let nodes = [
        ("server1", Ipv4Addr::new(10, 88, 0, 11)),
        ("server2", Ipv4Addr::new(10, 88, 0, 12)),
    ];
    let client = test_netns(Ipv4Addr::new(10, 88, 0, 1));
    let one = stand_in(&client, "p1", nodes[0].1, vip);
    let two = stand_in(&client, "p2", nodes[1].1, vip);
    let holders = || {
        let macs = qemu::vip::arp_macs(&client, vip).unwrap_or_else(|e| panic!("arping: {e}"));
        qemu::vip::name_holders(&macs, nodes)
    };
    // A split brain shows as two holders.
    assert_eq!(holders(), ["server1", "server2"]);
    two.ip_cmd(&["link", "set", "eth0", "down"]).unwrap();
    assert_eq!(holders(), ["server1"]);
    one.ip_cmd(&["link", "set", "eth0", "down"]).unwrap();
    assert_eq!(holders(), Vec::<String>::new());
}

/// A form over HTTPS (Python's standard library) at `addr` inside `netns`: `GET /` is a form
/// with a `name` field, `POST /` answers `<p id="greeting">hello NAME</p>`.
const FORM_SERVER: &str = r#"
import html, http.server, ssl, sys, urllib.parse
class H(http.server.BaseHTTPRequestHandler):
    def page(self, body):
        b = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self):
        self.page('<!doctype html><title>form</title><h1>A local form</h1>'
                  '<form method="post" action="/"><label>Name <input id="name" name="name"></label>'
                  '<button id="submit">Send</button></form>')
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        q = urllib.parse.parse_qs(self.rfile.read(n).decode())
        self.page('<!doctype html><title>done</title><p id="greeting">hello '
                  + html.escape(q.get("name", [""])[0]) + '</p>')
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("cert.pem", "key.pem")
s = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"#;

fn openssl_stdout(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The browser harness end to end, on something local: the served certificate read by the TLS
/// client inside the namespace matches openssl's fingerprint and key hash of the file; a
/// browser that does not pin the key refuses the page; one that pins it opens the form, fills
/// it, submits it and screenshots each step.
#[test]
fn browser_fills_a_form_over_https_with_a_pinned_certificate() {
    let netns = test_netns(Ipv4Addr::new(10, 88, 0, 1));
    let server = SocketAddr::from((Ipv4Addr::new(10, 88, 0, 5), 8443));
    netns
        .ip_cmd(&["addr", "add", "10.88.0.5/24", "dev", qemu::BRIDGE])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=form"])
        .args(["-days", "1", "-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(dir.path()));
    let mut cmd = Command::new("python3");
    cmd.args(["-c", FORM_SERVER, "10.88.0.5", "8443"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null());
    let mut python = netns
        .spawn(cmd)
        .unwrap_or_else(|e| panic!("python3 (Debian package python3): {e}"));
    let t0 = Instant::now();
    while netns.connect(server, Duration::from_millis(200)).is_err() {
        assert!(
            python.try_wait().unwrap().is_none(),
            "the form server exited"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the form server never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let chain = qemu::tls::served_chain(&netns, server, None, Duration::from_secs(10)).unwrap();
    let served = qemu::tls::fingerprint(&chain[0]);
    let openssl = openssl_stdout(
        dir.path(),
        "openssl x509 -in cert.pem -noout -fingerprint -sha256",
    );
    let openssl = openssl.rsplit('=').next().unwrap();
    assert!(
        qemu::tls::same_fingerprint(&served, openssl),
        "{served} vs {openssl}"
    );
    let spki = qemu::tls::spki_sha256(&chain[0]).unwrap();
    let openssl_spki = openssl_stdout(
        dir.path(),
        "openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin -outform der \
         | openssl dgst -sha256 -binary | base64",
    );
    assert_eq!(spki, openssl_spki);
    let pem = std::fs::read_to_string(dir.path().join("cert.pem")).unwrap();
    assert_eq!(qemu::tls::pem_certificates(&pem).unwrap(), chain);
    // Self-signed: it is its own CA, for its name, not for the address.
    let wrong_ip = qemu::tls::verify_chain(&chain, &pem, server.ip());
    assert!(
        wrong_ip.is_err(),
        "a certificate for CN=form passed for {}",
        server.ip()
    );

    let work =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("browser-{}", qemu::unique_id()));
    let url = format!("https://{server}/");
    {
        let browser = qemu::Browser::start(&netns, qemu::BrowserOptions::new(&work)).unwrap();
        let refused = browser.goto(&url);
        let form = browser.find_all("#name").unwrap_or_default();
        assert!(
            refused.is_err() || form.is_empty(),
            "an unpinned self-signed certificate was accepted: {refused:?}"
        );
        eprintln!(
            "without the pin: {refused:?}, title {:?}, screenshot {}",
            browser.title().unwrap_or_default(),
            browser
                .screenshot("unpinned certificate refused")
                .unwrap()
                .display()
        );
    }
    let mut opts = qemu::BrowserOptions::new(&work);
    opts.trusted_spki = vec![spki];
    let browser = qemu::Browser::start(&netns, opts).unwrap();
    browser.goto(&url).unwrap();
    assert_eq!(browser.title().unwrap(), "form");
    let shots = [browser.screenshot("form").unwrap()];
    browser.fill("#name", "Tandem <b>").unwrap();
    browser.click_on("#submit").unwrap();
    let greeting = browser
        .wait_for("#greeting", Duration::from_secs(30))
        .unwrap();
    assert_eq!(browser.text(&greeting).unwrap(), "hello Tandem <b>");
    let shots = [shots[0].clone(), browser.screenshot("greeting").unwrap()];
    for (shot, name) in shots.iter().zip(["02-form.png", "03-greeting.png"]) {
        eprintln!("screenshot: {}", shot.display());
        assert!(shot.ends_with(name), "{}", shot.display());
        let png = std::fs::read(shot).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
            "{}",
            shot.display()
        );
    }
    drop(browser);
    let _ = python.kill();
    let _ = python.wait();
}
