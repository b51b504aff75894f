//! `appliance db-init`: the wiring of [`db::datadir::prepare`] (a supervised one-shot).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use db::datadir::{Outcome, Source};

pub fn main(
    datadir: &Path,
    owner: Option<&str>,
    template: Option<PathBuf>,
    install: Vec<String>,
) -> anyhow::Result<()> {
    let source = match template {
        Some(t) => Source::Template(t),
        None if !install.is_empty() => Source::Install(install),
        None => bail!("db-init needs --template FILE or a mariadb-install-db command after --"),
    };
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
    match db::datadir::prepare(datadir, &source, owner)? {
        Outcome::AlreadyInitialised => {
            tracing::info!(datadir = %datadir.display(), "datadir already initialised")
        }
        Outcome::Made {
            written,
            moved_aside,
        } => tracing::info!(
            datadir = %datadir.display(),
            from = match &source { Source::Template(t) => t.display().to_string(), Source::Install(a) => a[0].clone() },
            written,
            moved_aside = ?moved_aside,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "datadir made"
        ),
    }
    Ok(())
}
