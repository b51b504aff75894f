//! The harness itself against real QEMU, OVMF and network namespaces: two VMs with blank disks
//! (the firmware boots, finds nothing and prints its boot manager on serial). Needs root and the
//! host packages; a missing one fails with the package name.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qemu::{Cluster, ClusterSpec, Forward, Forwarder};

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
