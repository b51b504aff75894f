//! What every scenario needs: the images, a booted cluster, steps that fail with evidence.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qemu::{Cluster, ClusterSpec, HttpResponse};

/// Under TCG on a loaded two-core machine, two nodes booting at once reach HTTP in 1–2 minutes;
/// the margin is for a busy CI host.
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Serial lines printed on each boot, after the page is up, come within this.
pub(crate) const SERIAL_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of each serial log shown when a step fails.
pub(crate) const TAIL_LINES: usize = 40;

/// The built-in cluster the images are built for (server1 10.88.0.11, server2 10.88.0.12).
pub(crate) fn cluster_config() -> cluster_config::Cluster {
    cluster_config::Cluster::default_cluster()
}

fn workspace() -> PathBuf {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    tests
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The image directory, with a node image for every node of `config`, or a panic that says how
/// to build them.
pub(crate) fn images(config: &cluster_config::Cluster) -> PathBuf {
    let dir = std::env::var_os("TANDEM_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/images"));
    let missing: Vec<String> = config
        .nodes
        .iter()
        .map(|n| dir.join(format!("{}.qcow2", n.name)))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "the end-to-end tests need the node images, and these are missing: {}\n\
         Build them with `scripts/build-images` (writes target/images), \
         or set TANDEM_IMAGES to a directory holding {}.",
        missing.join(", "),
        config
            .nodes
            .iter()
            .map(|n| format!("{}.qcow2", n.name))
            .collect::<Vec<_>>()
            .join(", "),
    );
    dir
}

/// Boot every node of the default cluster from the images, each VM on a fresh overlay.
pub(crate) fn boot_cluster() -> Cluster {
    boot_cluster_with(0)
}

/// [`boot_cluster`] with each VM's disk `extra_disk_bytes` larger than its image (the data
/// partition grows into it on the first boot).
pub(crate) fn boot_cluster_with(extra_disk_bytes: u64) -> Cluster {
    let config = cluster_config();
    let images = images(&config);
    let id = qemu::unique_id();
    let mut spec = ClusterSpec::new(workspace().join("target/e2e").join(&id));
    spec.id = id;
    spec.client = std::net::Ipv4Addr::from(u32::from(config.subnet.addr) + 1);
    spec.prefix = config.subnet.prefix;
    spec.extra_disk_bytes = extra_disk_bytes;
    for n in &config.nodes {
        spec = spec.node(&n.name, n.address, images.join(format!("{}.qcow2", n.name)));
    }
    match Cluster::boot(spec) {
        Ok(c) => {
            eprintln!(
                "booted {} VMs ({}) in namespace {}; logs in {}",
                c.vms().len(),
                c.accel().as_str(),
                c.netns().name(),
                c.work_dir().display()
            );
            c
        }
        Err(e) => panic!("booting the cluster: {e}"),
    }
}

/// Run one named step; on error, fail the test with the error and every serial log's tail.
pub(crate) fn step<T>(cluster: &Cluster, name: &str, body: impl FnOnce() -> qemu::Result<T>) -> T {
    let t0 = Instant::now();
    eprintln!("==> {name}");
    match body() {
        Ok(v) => {
            eprintln!("    ok ({:.1}s)", t0.elapsed().as_secs_f64());
            v
        }
        Err(e) => panic!(
            "step failed: {name} (after {:.1}s)\n{e}\n\n{}",
            t0.elapsed().as_secs_f64(),
            cluster.tails(TAIL_LINES)
        ),
    }
}

/// The node's page through its own balancer (HTTPS on its address), from the client. nginx's
/// web port is open to cluster peers only, so a client sees a node's page when that balancer's
/// round robin picks the node: [`wait_page`] asks until it does.
pub(crate) fn page_url(config: &cluster_config::Cluster, node: &str) -> String {
    let n = config.node(node).expect("node of the default cluster");
    format!("https://{}:{}/node.html", n.address, config.ports.https)
}

/// `boot: N` on a node's page.
pub(crate) fn boot_count(body: &str) -> Option<u64> {
    let rest = &body[body.find("boot: ")? + "boot: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Wait until `node`'s page answers 200 with its name (and, if given, this boot count).
/// Returns the boot count shown.
pub(crate) fn wait_page(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    boot: Option<u64>,
    timeout: Duration,
) -> qemu::Result<u64> {
    let needle = format!("node: {node}");
    let accept = |r: &HttpResponse| {
        r.status == 200
            && r.body.contains(&needle)
            && boot.is_none_or(|b| boot_count(&r.body) == Some(b))
    };
    let resp = cluster.wait_http(&page_url(config, node), timeout, accept)?;
    boot_count(&resp.body)
        .ok_or_else(|| qemu::Error::Http(format!("no `boot: N` on {node}'s page: {}", resp.body)))
}

#[test]
fn boot_count_is_read_from_the_page() {
    let check =
        |body: &str, expected: Option<u64>| assert_eq!(boot_count(body), expected, "{body}");
    check("<p>node: server1</p><p>boot: 3</p>", Some(3));
    check("node: server1\nboot: 12\n", Some(12));
    check("boot: x", None);
    check("no count", None);
}
