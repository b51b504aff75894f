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

/// One directory on the way to the state directory, as `stat` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirAccess {
    pub path: std::path::PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// A service user's identity, as the kernel checks permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gids: Vec<u32>,
}

/// The first directory of `path` (its ancestors, outermost first, then itself) that `who`
/// cannot search, if any. Root searches everything.
pub fn first_unsearchable<'a>(path: &'a [DirAccess], who: &Identity) -> Option<&'a DirAccess> {
    if who.uid == 0 {
        return None;
    }
    path.iter().find(|d| {
        let bit = if d.uid == who.uid {
            0o100
        } else if who.gids.contains(&d.gid) {
            0o010
        } else {
            0o001
        };
        d.mode & bit == 0
    })
}

/// Fails, before any service starts, when a service that runs as another user cannot reach
/// `state_dir` (e.g. a parent directory that is 0700): MariaDB would otherwise crash-loop on
/// "Permission denied". Names the directory, its owner and mode, and the services and users.
pub fn require_reachable_state_dir(
    state_dir: &Path,
    services: &[crate::supervisor::ServiceSpec],
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let state_dir = std::path::absolute(state_dir)?;
    let mut chain = Vec::new();
    for dir in state_dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let Ok(meta) = std::fs::metadata(dir) else {
            break; // Not created yet: the supervisor creates it with a reachable mode.
        };
        chain.push(DirAccess {
            path: dir.to_path_buf(),
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        });
    }
    let mut problems = Vec::new();
    let mut users: Vec<(&str, Vec<&str>)> = Vec::new();
    for spec in services {
        if let Some(user) = spec.user.as_deref() {
            match users.iter_mut().find(|(u, _)| *u == user) {
                Some((_, names)) => names.push(&spec.name),
                None => users.push((user, vec![&spec.name])),
            }
        }
    }
    for (user, names) in users {
        let Some(who) = identity(user) else { continue };
        if let Some(dir) = first_unsearchable(&chain, &who) {
            problems.push(format!(
                "{} (user {user}) cannot reach {}: {} is mode {:04o}, owner uid {} gid {}",
                names.join(", "),
                state_dir.display(),
                dir.path.display(),
                dir.mode,
                dir.uid,
                dir.gid
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "state directory {}: {}; choose a state directory every service user can reach (e.g. below /var/lib) or allow search on that directory (chmod o+x)",
        state_dir.display(),
        problems.join("; ")
    )
}

/// The user as the supervisor will switch to it (`None`: unknown here, which starting the
/// service reports).
fn identity(user: &str) -> Option<Identity> {
    let (creds, _) = crate::supervisor::credentials(user).ok()?;
    Some(Identity {
        uid: creds.uid,
        gids: creds.groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_user_needs_search_on_every_directory_on_the_way() {
        let dir = |path: &str, uid, gid, mode| DirAccess {
            path: path.into(),
            uid,
            gid,
            mode,
        };
        let mysql = Identity {
            uid: 100,
            gids: vec![101],
        };
        let root = Identity {
            uid: 0,
            gids: vec![0],
        };
        let check = |chain: &[DirAccess], who: &Identity, expected: Option<&str>| {
            assert_eq!(
                first_unsearchable(chain, who).map(|d| d.path.to_str().unwrap()),
                expected,
                "{chain:?} {who:?}"
            )
        };
        let open = [dir("/", 0, 0, 0o755), dir("/var", 0, 0, 0o755)];
        check(&open, &mysql, None);
        // A home directory that is 0700: the classic "Permission denied" crash loop.
        let home = [
            dir("/", 0, 0, 0o755),
            dir("/root", 0, 0, 0o700),
            dir("/root/state", 0, 0, 0o755),
        ];
        check(&home, &mysql, Some("/root"));
        check(&home, &root, None);
        // Search through the owner bit, the group bit (a supplementary group), or other.
        check(&[dir("/d", 100, 0, 0o100)], &mysql, None);
        check(&[dir("/d", 100, 0, 0o011)], &mysql, Some("/d"));
        check(&[dir("/d", 0, 101, 0o010)], &mysql, None);
        check(&[dir("/d", 0, 101, 0o701)], &mysql, Some("/d"));
        check(&[dir("/d", 0, 5, 0o001)], &mysql, None);
        // Read without search is not enough.
        check(&[dir("/d", 0, 0, 0o744)], &mysql, Some("/d"));
    }
}
