//! Making a [`NodePlan`] real: its directories (with modes and owners; a fresh one emptied
//! first), then its files (atomically, each with its final mode and owner before its first
//! byte), and the services for the supervisor.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;

use anyhow::Context as _;
use nix::unistd::{Gid, Uid};

use super::plan::{Contents, NodePlan, Owner};
use crate::files::{chgrp_to, chown_to, make_dir, user_ids, write_file_owned};
use crate::supervisor::ServiceSpec;

/// Makes the plan's directories and files, and returns the services to supervise.
pub fn apply(plan: &NodePlan) -> anyhow::Result<Vec<ServiceSpec>> {
    for dir in &plan.dirs {
        if dir.fresh && dir.path.exists() {
            fs::remove_dir_all(&dir.path)
                .with_context(|| format!("clearing {}", dir.path.display()))?;
        }
        make_dir(&dir.path, dir.mode)?;
        match dir.owner {
            None => {}
            Some(Owner::User(user)) => chown_to(&dir.path, user)?,
            Some(Owner::Tree(user)) => crate::users::chown_tree(&dir.path, user)?,
            Some(Owner::Group(user)) => chgrp_to(&dir.path, user)?,
        }
    }
    write_files(&plan.files)?;
    Ok(plan.services.clone())
}

/// Writes (or for [`Contents::Absent`] removes) `files`, each atomically with its final mode
/// and owner. Their directories exist.
pub fn write_files(files: &[super::plan::File]) -> anyhow::Result<()> {
    for file in files {
        match &file.contents {
            Contents::Absent => match fs::remove_file(&file.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", file.path.display()))
                }
                _ => {}
            },
            Contents::Text(text) => {
                let owner = file.owner.map(ids).transpose()?;
                write_file_owned(&file.path, text.as_bytes(), file.mode, owner)?;
            }
            Contents::Fifo => {
                nix::unistd::mkfifo(
                    &file.path,
                    nix::sys::stat::Mode::from_bits_truncate(file.mode),
                )
                .with_context(|| format!("creating the FIFO {}", file.path.display()))?;
                // Its mode exactly, whatever the umask.
                fs::set_permissions(&file.path, fs::Permissions::from_mode(file.mode))
                    .with_context(|| format!("chmod {}", file.path.display()))?;
                if let Some(owner) = file.owner {
                    let (uid, gid) = ids(owner)?;
                    nix::unistd::chown(&file.path, Some(uid), Some(gid))
                        .with_context(|| format!("chown {}", file.path.display()))?;
                }
            }
        }
    }
    Ok(())
}

/// The uid and gid a file of the plan gets.
fn ids(owner: Owner) -> anyhow::Result<(Uid, Gid)> {
    match owner {
        Owner::User(user) | Owner::Tree(user) => user_ids(user),
        Owner::Group(user) => Ok((nix::unistd::geteuid(), user_ids(user)?.1)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    use std::path::PathBuf;

    use super::super::plan::{Dir, File};
    use super::*;

    #[test]
    fn apply_makes_dirs_then_files_with_their_modes_and_empties_fresh_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        fs::create_dir_all(run.join("old")).unwrap();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap();
        // A name that lives as long as the test: owners are `&'static str`.
        let me: &'static str = Box::leak(me.name.into_boxed_str());
        let dir = |path: PathBuf, mode, fresh| Dir {
            path,
            mode,
            owner: Some(Owner::User(me)),
            fresh,
        };
        let file = |path: PathBuf, mode, contents| File {
            path,
            mode,
            owner: Some(Owner::Group(me)),
            contents,
        };
        let plan = NodePlan {
            dirs: vec![
                dir(run.clone(), 0o751, true),
                dir(run.join("d"), 0o700, false),
            ],
            files: vec![
                file(run.join("d/key"), 0o600, Contents::Text("k".into())),
                file(run.join("fifo"), 0o660, Contents::Fifo),
            ],
            services: vec![ServiceSpec::daemon("x", ["true"])],
        };
        let services = apply(&plan).unwrap();
        assert_eq!(services, plan.services);
        let mode = |p: &std::path::Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert!(!run.join("old").exists(), "a fresh directory is emptied");
        assert_eq!(mode(&run), 0o751);
        assert_eq!(mode(&run.join("d")), 0o700);
        assert_eq!(mode(&run.join("d/key")), 0o600);
        assert_eq!(fs::read_to_string(run.join("d/key")).unwrap(), "k");
        assert!(fs::metadata(run.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(mode(&run.join("fifo")), 0o660);
        // Applied again (the next start): the same result, nothing refused.
        apply(&plan).unwrap();
        assert_eq!(fs::read_to_string(run.join("d/key")).unwrap(), "k");
    }
}
