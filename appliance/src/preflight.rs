//! Checks that the programs a node runs exist before anything starts, so a missing package is
//! one clear error instead of a crash loop.

use std::path::Path;

/// Debian package that provides each program we run.
fn package_of(program: &str) -> &'static str {
    match Path::new(program).file_name().and_then(|n| n.to_str()) {
        Some("nginx") => "nginx-light",
        Some("mariadbd" | "mariadb-install-db") => "mariadb-server",
        Some("mariadb") => "mariadb-client",
        Some("keepalived") => "keepalived",
        Some("nft") => "nftables",
        _ => "?",
    }
}

/// Fails naming every missing program and the `apt-get install` line that brings them.
pub fn require_programs(programs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|p| package_of(p)).collect();
    packages.sort_unstable();
    packages.dedup();
    anyhow::bail!(
        "missing programs: {} (install them with: apt-get install -y {}; or run scripts/setup-host)",
        missing.join(", "),
        packages.join(" ")
    )
}
