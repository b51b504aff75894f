//! Tandem's own system users in the root filesystem: `rootfs/users.txt` (parsed here, pure)
//! added to the staged root's `passwd`, `group`, `shadow` and `gshadow` as plain text (no
//! chroot, no `useradd`): reproducible, and the ids are the file's, not whatever is free.
//!
//! Every user gets a group of its own with the same id, a locked password, no home and no
//! shell. Debian's users (www-data, mysql) come from the base's packages and are left alone.

use std::path::{Path, PathBuf};

use crate::Error;

/// The list, in the `rootfs/` directory.
pub const USERS_FILE: &str = "users.txt";
const HOME: &str = "/nonexistent";
const SHELL: &str = "/usr/sbin/nologin";
/// Longest name `useradd` accepts.
const MAX_NAME_LEN: usize = 32;
/// Ids of system users and groups are below this (Debian's `adduser.conf`), and above 0.
const FIRST_REGULAR_ID: u32 = 1000;

/// One line of `users.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `user NAME ID [GROUP,...]`: a user, its own group NAME (same id), supplementary groups.
    User {
        name: String,
        id: u32,
        groups: Vec<String>,
        line: usize,
    },
    /// `group NAME ID`.
    Group { name: String, id: u32, line: usize },
}

impl Entry {
    fn line(&self) -> usize {
        match self {
            Entry::User { line, .. } | Entry::Group { line, .. } => *line,
        }
    }
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_NAME_LEN
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}

/// Parses `users.txt`; every problem names `origin:line`.
pub fn parse(text: &str, origin: &Path) -> Result<Vec<Entry>, Error> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let bad = |message: String| Error::Input {
            path: origin.to_owned(),
            line,
            message,
        };
        let fields: Vec<&str> = raw
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let (kind, name, id, rest) = match fields.as_slice() {
            [] => continue,
            [kind, name, id, rest @ ..] => (*kind, *name, *id, rest),
            _ => {
                return Err(bad(
                    "expected `user NAME ID [GROUP,...]` or `group NAME ID`".into(),
                ))
            }
        };
        if !valid_name(name) {
            return Err(bad(format!(
                "`{name}` is not a system user or group name (a-z, 0-9, `_`, `-`, at most {MAX_NAME_LEN})"
            )));
        }
        let id: u32 = id
            .parse()
            .ok()
            .filter(|&n| n > 0 && n < FIRST_REGULAR_ID)
            .ok_or_else(|| bad(format!("id `{id}` must be 1 to {}", FIRST_REGULAR_ID - 1)))?;
        entries.push(match (kind, rest) {
            ("user", []) => Entry::User {
                name: name.into(),
                id,
                groups: Vec::new(),
                line,
            },
            ("user", [groups]) => {
                let groups: Vec<String> = groups.split(',').map(String::from).collect();
                if let Some(g) = groups.iter().find(|g| !valid_name(g)) {
                    return Err(bad(format!("`{g}` is not a group name")));
                }
                Entry::User {
                    name: name.into(),
                    id,
                    groups,
                    line,
                }
            }
            ("group", []) => Entry::Group {
                name: name.into(),
                id,
                line,
            },
            _ => {
                return Err(bad(
                    "expected `user NAME ID [GROUP,...]` or `group NAME ID`".into(),
                ))
            }
        });
    }
    Ok(entries)
}

/// Reads `rootfs/users.txt`.
pub fn load(rootfs_dir: &Path) -> Result<Vec<Entry>, Error> {
    let path = rootfs_dir.join(USERS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(STEP, &path, e))?;
    parse(&text, &path)
}

const STEP: &str = "system users";

/// The four account files of a root filesystem, as text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accounts {
    pub passwd: String,
    pub group: String,
    pub shadow: String,
    pub gshadow: String,
}

/// `(name, id)` of every entry of a colon-separated file whose third field is the id.
fn names_and_ids(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            Some((name, f.nth(1)?))
        })
        .collect()
}

fn append(text: &mut String, line: &str) {
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
}

/// Adds `member` to the last field (the member list) of `group`'s line.
fn add_member(text: &str, group: &str, member: &str) -> Option<String> {
    let mut found = false;
    let mut out = String::with_capacity(text.len() + member.len() + 1);
    for l in text.lines() {
        if l.split(':').next() == Some(group) {
            found = true;
            out.push_str(l);
            if !l.ends_with(':') {
                out.push(',');
            }
            out.push_str(member);
        } else {
            out.push_str(l);
        }
        out.push('\n');
    }
    found.then_some(out)
}

/// `accounts` with `entries` added (pure). A name or id the base already uses is an error
/// naming the line of `users_file` that asks for it.
pub fn add(accounts: &Accounts, entries: &[Entry], users_file: &Path) -> Result<Accounts, Error> {
    let mut out = accounts.clone();
    let conflict = |entry: &Entry, message: String| Error::Input {
        path: users_file.to_owned(),
        line: entry.line(),
        message,
    };
    // Groups first: users may name groups defined further down.
    let groups = entries.iter().filter(|e| matches!(e, Entry::Group { .. }));
    let users = entries.iter().filter(|e| matches!(e, Entry::User { .. }));
    for entry in groups.chain(users) {
        let (name, id) = match entry {
            Entry::User { name, id, .. } | Entry::Group { name, id, .. } => (name.as_str(), *id),
        };
        let id_text = id.to_string();
        let mut taken: Vec<(&str, Vec<(&str, &str)>)> = vec![("group", names_and_ids(&out.group))];
        if matches!(entry, Entry::User { .. }) {
            taken.push(("passwd", names_and_ids(&out.passwd)));
        }
        for (file, existing) in &taken {
            if let Some((other, _)) = existing.iter().find(|(n, i)| *n == name || *i == id_text) {
                return Err(conflict(
                    entry,
                    format!("`{name}` ({id}) clashes with `{other}` in /etc/{file}"),
                ));
            }
        }
        append(&mut out.group, &format!("{name}:x:{id}:"));
        append(&mut out.gshadow, &format!("{name}:!::"));
        if let Entry::User { groups, .. } = entry {
            append(
                &mut out.passwd,
                &format!("{name}:x:{id}:{id}:Tandem {name}:{HOME}:{SHELL}"),
            );
            // Locked password, no aging.
            append(&mut out.shadow, &format!("{name}:!:::::::"));
            for group in groups {
                let missing = || conflict(entry, format!("no group `{group}` to add `{name}` to"));
                out.group = add_member(&out.group, group, name).ok_or_else(missing)?;
                out.gshadow = add_member(&out.gshadow, group, name).ok_or_else(missing)?;
            }
        }
    }
    Ok(out)
}

/// Adds `entries` to the account files under `root` (their modes and owners are kept).
pub fn add_to_root(root: &Path, entries: &[Entry], users_file: &Path) -> Result<(), Error> {
    let path = |name: &str| -> PathBuf { root.join("etc").join(name) };
    let read = |name: &str| {
        let p = path(name);
        std::fs::read_to_string(&p).map_err(|e| Error::io(STEP, &p, e))
    };
    let before = Accounts {
        passwd: read("passwd")?,
        group: read("group")?,
        shadow: read("shadow")?,
        gshadow: read("gshadow")?,
    };
    let after = add(&before, entries, users_file)?;
    for (name, text) in [
        ("passwd", &after.passwd),
        ("group", &after.group),
        ("shadow", &after.shadow),
        ("gshadow", &after.gshadow),
    ] {
        let p = path(name);
        // Rewriting the existing file in place keeps its mode (shadow: 0640 root:shadow).
        std::fs::write(&p, text).map_err(|e| Error::io(STEP, &p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nmysql:x:100:101:MySQL Server,,,:/nonexistent:/bin/false\n";
    const BASE_GROUPS: &str = "root:x:0:\nwww-data:x:33:\nshadow:x:42:\nmysql:x:101:\n";

    fn base() -> Accounts {
        Accounts {
            passwd: BASE.into(),
            group: BASE_GROUPS.into(),
            shadow: "root:*:19000:0:99999:7:::\n".into(),
            gshadow: "root:*::\nshadow:*::\n".into(),
        }
    }

    fn entries(text: &str) -> Vec<Entry> {
        parse(text, Path::new("users.txt")).unwrap()
    }

    #[test]
    fn parses_users_and_groups_with_their_lines() {
        assert_eq!(
            entries("# c\n\ngroup tandem-control 960\nuser tandem-admin 963 tandem-control,shadow # x\nuser tandem-app 962\n"),
            [
                Entry::Group { name: "tandem-control".into(), id: 960, line: 3 },
                Entry::User { name: "tandem-admin".into(), id: 963, groups: vec!["tandem-control".into(), "shadow".into()], line: 4 },
                Entry::User { name: "tandem-app".into(), id: 962, groups: vec![], line: 5 },
            ]
        );
        let bad = |text: &str, expected: &str| {
            let e = parse(text, Path::new("users.txt")).unwrap_err().to_string();
            assert!(
                e.contains(expected) && e.starts_with("users.txt:"),
                "{text:?}: {e}"
            );
        };
        bad("user x\n", "expected `user NAME ID");
        bad("\nuser Tandem 960\n", "users.txt:2: `Tandem` is not");
        bad("user tandem 1000\n", "id `1000` must be 1 to 999");
        bad("user tandem 0\n", "must be 1 to 999");
        bad("group g 960 extra\n", "expected");
        bad("member tandem 960\n", "expected");
        bad("user tandem 960 a,B\n", "`B` is not a group name");
    }

    #[test]
    fn adds_locked_users_with_own_groups_and_memberships() {
        let e = entries("user tandem-admin 963 tandem-control\ngroup tandem-control 960\n");
        let after = add(&base(), &e, Path::new("users.txt")).unwrap();
        assert_eq!(
            after.passwd,
            format!(
                "{BASE}tandem-admin:x:963:963:Tandem tandem-admin:/nonexistent:/usr/sbin/nologin\n"
            )
        );
        assert_eq!(
            after.group,
            format!("{BASE_GROUPS}tandem-control:x:960:tandem-admin\ntandem-admin:x:963:\n")
        );
        assert_eq!(
            after.shadow,
            "root:*:19000:0:99999:7:::\ntandem-admin:!:::::::\n"
        );
        assert_eq!(
            after.gshadow,
            "root:*::\nshadow:*::\ntandem-control:!::tandem-admin\ntandem-admin:!::\n"
        );
        // A second member is appended with a comma.
        let e = entries("group g 960\nuser a 961 g\nuser b 962 g\n");
        let after = add(&base(), &e, Path::new("users.txt")).unwrap();
        assert!(after.group.contains("\ng:x:960:a,b\n"), "{}", after.group);
    }

    #[test]
    fn a_name_or_id_the_base_uses_is_refused_with_its_line() {
        let check = |text: &str, expected: &str| {
            let e = add(&base(), &entries(text), Path::new("users.txt"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        };
        check(
            "user tandem 960\nuser www-data 961\n",
            "users.txt:2: `www-data` (961) clashes with `www-data` in /etc/group",
        );
        check(
            "user tandem 100\n",
            "`tandem` (100) clashes with `mysql` in /etc/passwd",
        );
        check("group tandem 101\n", "clashes with `mysql` in /etc/group");
        check(
            "user a 960\nuser b 960\n",
            "users.txt:2: `b` (960) clashes with `a`",
        );
        check(
            "user a 960 nosuch\n",
            "users.txt:1: no group `nosuch` to add `a` to",
        );
    }

    #[test]
    fn the_repository_list_parses_and_fits_a_debian_base() {
        let dir = Path::new(crate::DEFAULT_ROOTFS_DIR);
        let e = load(dir).unwrap();
        assert!(!e.is_empty());
        add(&base(), &e, &dir.join(USERS_FILE)).unwrap();
    }

    #[test]
    fn add_to_root_rewrites_the_files_in_place() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let b = base();
        for (name, text, mode) in [
            ("passwd", &b.passwd, 0o644),
            ("group", &b.group, 0o644),
            ("shadow", &b.shadow, 0o640),
            ("gshadow", &b.gshadow, 0o640),
        ] {
            std::fs::write(etc.join(name), text).unwrap();
            std::fs::set_permissions(etc.join(name), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        add_to_root(
            root.path(),
            &entries("user tandem-app 962\n"),
            Path::new("users.txt"),
        )
        .unwrap();
        let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
        assert!(passwd
            .ends_with("tandem-app:x:962:962:Tandem tandem-app:/nonexistent:/usr/sbin/nologin\n"));
        let mode = std::fs::metadata(etc.join("shadow"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o640);
    }
}
