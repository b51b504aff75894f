//! `appliance db-init`: the wiring of [`db::datadir::prepare`] (a supervised one-shot).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use db::datadir::Outcome;

pub fn main(datadir: &Path, owner: Option<&str>, template: &Path) -> anyhow::Result<()> {
    let owner = match owner {
        None => None,
        Some(name) => {
            let user = nix::unistd::User::from_name(name)
                .with_context(|| format!("looking up user {name}"))?
                .with_context(|| format!("no user {name}"))?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        }
    };
    let t0 = Instant::now();
    match db::datadir::prepare(datadir, template, owner)? {
        Outcome::AlreadyInitialised => {
            tracing::info!(datadir = %datadir.display(), "datadir already initialised")
        }
        Outcome::Made {
            written,
            moved_aside,
        } => tracing::info!(
            datadir = %datadir.display(),
            template = %template.display(),
            written,
            moved_aside = ?moved_aside,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "datadir made"
        ),
    }
    Ok(())
}
