//! Userspace TCP forwarding from the host's loopback into the cluster namespace, so a browser on
//! the host reaches the cluster. Listeners live on the host; each outgoing connection is opened
//! by a thread that joined the namespace (sockets keep the namespace they were created in).

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::netns::Netns;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// One forwarded port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// What it is, for humans ("floating IP, HTTPS").
    pub label: String,
    /// Host side, e.g. `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// Cluster side, e.g. `10.88.0.10:443`.
    pub target: SocketAddr,
}

/// Running forwarders; stopped on drop.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Forwarder {
    /// Bind every listener (failing if a port is taken) and start serving.
    pub fn start(netns: Arc<Netns>, forwards: &[Forward]) -> Result<Forwarder> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for f in forwards {
            let listener = TcpListener::bind(f.listen).map_err(|source| Error::Io {
                what: format!("listening for {} on {}", f.label, f.listen),
                path: Default::default(),
                source,
            })?;
            listener.set_nonblocking(true).map_err(|source| Error::Io {
                what: format!("listener {}", f.listen),
                path: Default::default(),
                source,
            })?;
            let (netns, stop, target) = (netns.clone(), stop.clone(), f.target);
            threads.push(std::thread::spawn(move || {
                accept_loop(listener, netns, target, stop)
            }));
        }
        Ok(Forwarder { stop, threads })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    netns: Arc<Netns>,
    target: SocketAddr,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let netns = netns.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(client, &netns, target) {
                        tracing::debug!(%target, "forwarded connection: {e}");
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::warn!(%target, "accept: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Connect from inside the namespace, then copy both ways until each side is done.
fn serve(client: TcpStream, netns: &Netns, target: SocketAddr) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let upstream = netns.connect(target, CONNECT_TIMEOUT)?;
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
