//! A node's TLS directory: on an image the seed's `tls/`, written by the image-builder; on a
//! developer machine issued at every start from a CA of its own. Read by MariaDB's setup (the
//! `db` crate) and by the admin server and its peer client (the `admin` crate).

/// The directory's name inside the seed partition.
pub const SEED_SUBDIR: &str = "tls";
/// The cluster CA's certificate: what every node trusts, as a server and as a client.
pub const CA_CERT: &str = "ca.crt";
/// The node's certificate (server and client authentication; its SANs name the node's name and
/// address), its identity towards the peers' admin port.
pub const NODE_CERT: &str = "node.crt";
/// The node's private key (root's alone in the seed).
pub const NODE_KEY: &str = "node.key";
/// MariaDB's own certificate (server authentication only), used instead of the node's when
/// present, so the server's OS user never holds the node's peer identity.
pub const DB_CERT: &str = "db.crt";
/// The key of [`DB_CERT`].
pub const DB_KEY: &str = "db.key";
