//! The OS users the node's services run as when the supervisor is root.
//!
//! Debian's packages bring `www-data` (nginx's workers) and `mysql` (MariaDB). Tandem's own
//! users keep the services apart: code execution in the application can neither read the TLS
//! key the balancer serves nor signal the balancer. The image creates them from
//! `rootfs/users.txt` (fixed ids, so files on the data partition keep their owner across root
//! upgrades); a developer machine needs them once, and [`require`] says how to create them.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::unistd::{Group, User};

/// The balancer: the only user that can read the TLS key it serves.
pub const BALANCER: &str = "tandem-balancer";
/// The application (the demo or the user's): no privilege, no access to the others' files.
pub const APP: &str = "tandem-app";
/// The admin server: talks to the supervisor through the control socket's group.
pub const ADMIN: &str = "tandem-admin";
/// The log monitor: reads the log store and the state DB, writes only its own alerts.db.
pub const LOGMON: &str = "tandem-logmon";
/// Members may use the supervisor's control socket (mode 0660, this group): status, logs,
/// restarts and signals. Stopping the supervisor stays root's.
pub const CONTROL_GROUP: &str = "tandem-control";

/// A system user of ours: its own group, plus these supplementary groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceUser {
    pub name: &'static str,
    pub groups: &'static [&'static str],
}

/// Groups of ours that are not a user's own group.
pub const GROUPS: &[&str] = &[CONTROL_GROUP];
/// Every user of ours, as `rootfs/users.txt` creates them on the image.
pub const USERS: &[ServiceUser] = &[
    ServiceUser {
        name: BALANCER,
        groups: &[],
    },
    ServiceUser {
        name: APP,
        groups: &[],
    },
    ServiceUser {
        name: ADMIN,
        groups: &[CONTROL_GROUP],
    },
    ServiceUser {
        name: LOGMON,
        groups: &[],
    },
];

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error(
        "the node runs its services as their own users, and these are missing or incomplete: \
         {}. The image has them (rootfs/users.txt); on this machine create them with:\n{}",
        .missing.join(", "),
        .commands.join("\n")
    )]
    Missing {
        missing: Vec<String>,
        commands: Vec<String>,
    },
    #[error("looking up `{name}`: {source}")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("chown {user} {}: {source}", .path.display())]
    Chown {
        user: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn lookup_err(name: &str) -> impl FnOnce(nix::Error) -> UsersError + '_ {
    move |source| UsersError::Lookup {
        name: name.to_string(),
        source,
    }
}

/// Checks that every group in [`GROUPS`] and every user in [`USERS`] exists with its groups;
/// the error lists what is missing and the commands that create it.
pub fn require() -> Result<(), UsersError> {
    let mut missing = Vec::new();
    let mut commands = Vec::new();
    for &group in GROUPS {
        if Group::from_name(group)
            .map_err(lookup_err(group))?
            .is_none()
        {
            missing.push(format!("group {group}"));
            commands.push(format!("    groupadd --system {group}"));
        }
    }
    for user in USERS {
        let Some(found) = User::from_name(user.name).map_err(lookup_err(user.name))? else {
            missing.push(format!("user {}", user.name));
            let groups = if user.groups.is_empty() {
                String::new()
            } else {
                format!("--groups {} ", user.groups.join(","))
            };
            commands.push(format!(
                "    useradd --system --user-group --no-create-home --home-dir /nonexistent \
                 --shell /usr/sbin/nologin {groups}{}",
                user.name
            ));
            continue;
        };
        let name = CString::new(user.name).map_err(|_| UsersError::Lookup {
            name: user.name.to_string(),
            source: nix::Error::EINVAL,
        })?;
        let member_of =
            nix::unistd::getgrouplist(&name, found.gid).map_err(lookup_err(user.name))?;
        for &group in user.groups {
            let gid = Group::from_name(group)
                .map_err(lookup_err(group))?
                .map(|g| g.gid);
            if gid.is_some_and(|gid| !member_of.contains(&gid)) {
                missing.push(format!("user {} in group {group}", user.name));
                commands.push(format!(
                    "    usermod --append --groups {group} {}",
                    user.name
                ));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(UsersError::Missing { missing, commands })
    }
}

/// Gives `path` and everything below it to `user` (and its group), without following
/// symbolic links: what an earlier version left there under another user becomes the
/// service's own (and no one else's).
pub fn chown_tree(path: &Path, user: &str) -> Result<(), UsersError> {
    let chown_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UsersError::Chown {
            user: user.to_string(),
            path,
            source,
        }
    };
    let found = User::from_name(user)
        .map_err(lookup_err(user))?
        .ok_or_else(|| UsersError::Missing {
            missing: vec![format!("user {user}")],
            commands: Vec::new(),
        })?;
    let (uid, gid) = (found.uid.as_raw(), found.gid.as_raw());
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(chown_err(&p))?;
        let meta = std::fs::symlink_metadata(&p).map_err(chown_err(&p))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p).map_err(chown_err(&p))? {
                stack.push(entry.map_err(chown_err(&p))?.path());
            }
        }
    }
    Ok(())
}

/// The id of one of our groups.
pub fn gid(group: &str) -> Result<nix::unistd::Gid, UsersError> {
    Group::from_name(group)
        .map_err(lookup_err(group))?
        .map(|g| g.gid)
        .ok_or_else(|| UsersError::Missing {
            missing: vec![format!("group {group}")],
            commands: vec![format!("    groupadd --system {group}")],
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rootfs/users.txt`, which the image-builder reads: `user NAME ID [GROUP,...]` and
    /// `group NAME ID` lines.
    const IMAGE_USERS: &str = include_str!("../../rootfs/users.txt");

    fn image_lines() -> Vec<Vec<&'static str>> {
        IMAGE_USERS
            .lines()
            .map(|l| {
                l.split('#')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<Vec<_>>()
            })
            .filter(|f| !f.is_empty())
            .collect()
    }

    #[test]
    fn the_image_creates_every_user_and_group_the_node_runs_as() {
        let lines = image_lines();
        for user in USERS {
            let line = lines
                .iter()
                .find(|f| f[0] == "user" && f[1] == user.name)
                .unwrap_or_else(|| panic!("rootfs/users.txt has no user {}", user.name));
            let groups: Vec<&str> = line.get(3).map_or(Vec::new(), |g| g.split(',').collect());
            assert_eq!(groups, user.groups, "groups of {}", user.name);
        }
        for group in GROUPS {
            assert!(
                lines.iter().any(|f| f[0] == "group" && f[1] == *group),
                "rootfs/users.txt has no group {group}"
            );
        }
        assert_eq!(
            lines.len(),
            USERS.len() + GROUPS.len(),
            "rootfs/users.txt creates users the node does not use"
        );
    }

    #[test]
    fn chown_tree_reaches_every_entry_without_following_links() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (it chowns)"
        );
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("balancer");
        std::fs::create_dir_all(tree.join("tls")).unwrap();
        std::fs::write(tree.join("tls/self-signed.key"), "k").unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "o").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        chown_tree(&tree, "nobody").unwrap();
        use std::os::unix::fs::MetadataExt as _;
        let uid = |p: &Path| std::fs::symlink_metadata(p).unwrap().uid();
        for p in [
            tree.clone(),
            tree.join("tls"),
            tree.join("tls/self-signed.key"),
            tree.join("link"),
        ] {
            assert_eq!(uid(&p), 65534, "{}", p.display());
        }
        assert_eq!(uid(&outside), 0, "a link was followed");
    }
}
