//! Boots Tandem disk images in QEMU on a private cluster network, for end-to-end tests and for a
//! human who wants a cluster on their machine (`tandem-qemu up`).
//!
//! - [`Cluster::boot`] creates a network namespace with a bridge (the client, `10.88.0.1/24` by
//!   default) and one tap per VM, a qcow2 overlay and UEFI variable store per node, and starts one
//!   QEMU per node (TCG, or KVM when a probe guest boots) with its serial console in a file.
//! - [`Vm`] powers off (ACPI), reboots (Ctrl-Alt-Del), kills, pauses and unplugs a node.
//! - [`Cluster::http_get`], [`Cluster::run`], [`Netns::connect`]: a client inside the namespace.
//! - [`Vm::read_disk`], [`read_image`]: a disk's bytes, read from the host while QEMU runs.
//! - [`Vm::wait_serial`], [`Cluster::tails`]: serial logs for waits and failure messages;
//!   [`Vm::serial_write`], [`Vm::answer_prompt`]: typing on a serial console.
//! - [`browser::Browser`]: headless Chromium inside the namespace (chromedriver, WebDriver);
//!   [`tls`]: the certificate a server serves there, its fingerprint, checks against a CA.
//! - [`Cluster::start_probe`]: availability as a client sees it (one HTTPS GET every 20 ms);
//!   [`Cluster::vip_holders`]: who answers ARP for the floating IP.
//! - [`bench`]: `tandem-qemu failover` and `soak`, the floating IP's failover as a client sees it.
//!
//! The cluster LAN exists only inside the namespace; nothing is sent anywhere else.

mod accel;
pub mod bench;
pub mod boottime;
pub mod browser;
mod cluster;
mod disk;
mod error;
mod forward;
mod machine;
mod netns;
pub mod probe;
pub mod qmp;
mod serial;
mod session;
pub mod tls;
mod tools;
pub mod vip;

pub use browser::{Browser, BrowserOptions, Element};
pub use cluster::{
    unique_id, Cluster, ClusterSpec, HttpResponse, NodeSpec, Vm, DEFAULT_CLIENT,
    DEFAULT_MEMORY_MIB, DEFAULT_PREFIX, KEEP_ENV, NODE_PAGE,
};
pub use disk::{read_image, MAX_READ};
pub use error::{Error, Result};
pub use forward::{Forward, Forwarder};
pub use machine::{format_mac, mac_for, qemu_args, Accel, MachineConfig};
pub use netns::{Netns, BRIDGE};
pub use probe::{Probe, ProbeOptions, ProbeReport};
pub use serial::{strip_ansi, tail, wait_for, Mark};
pub use session::{
    describe, down, up, Cancel, RunDir, ShutdownSignals, UpOptions, VipWatch, PID_FILE,
};
pub use tools::{check_host, OVMF_CODE, OVMF_VARS};
