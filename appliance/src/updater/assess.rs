//! What the boot entries say about the slots, decided without touching anything: the update
//! service reads the ESP's entries and its own records, calls [`assess`], then carries out what
//! it says (record a failed version, remove its entry, start a trial or a first-boot blessing).

use api::update::{SlotState, SlotStatus};
use update::boot::{EntryFile, Slot};

/// A version the update service has a record of (`update_versions` in the state DB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub version: String,
    /// `installed`, `good` or `bad`.
    pub state: String,
    pub slot: String,
}

/// How this boot must be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootKind {
    /// The booted entry is blessed: nothing to prove.
    Blessed,
    /// A new slot's trial: the other slot holds a blessed entry to fall back to. Bless once
    /// healthy; past the deadline, reboot (into the default: the other slot).
    Trial,
    /// The image's first boot (or a slot with nothing to fall back to): bless once healthy;
    /// rebooting would not help, so there is no deadline reboot.
    FirstBoot,
    /// The booted slot has no entry (booted by hand from elsewhere): touch nothing.
    NoEntry,
}

/// [`assess`]'s verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub boot: BootKind,
    /// Both slots, booted first.
    pub slots: Vec<SlotStatus>,
    /// The other slot was tried and not blessed: record its version as bad and remove its
    /// entry (so nothing boots it again by accident).
    pub failed_trial: Option<(Slot, String)>,
}

/// Decides from the booted slot, the ESP's entries and the records.
pub fn assess(booted: Slot, entries: &[EntryFile], records: &[Record]) -> Assessment {
    let entry_of = |slot: Slot| entries.iter().find(|e| e.slot == slot);
    let other = booted.other();
    let booted_entry = entry_of(booted);
    let other_entry = entry_of(other);
    let other_blessed = other_entry.is_some_and(|e| e.counter.is_none());

    let boot = match booted_entry {
        None => BootKind::NoEntry,
        Some(e) if e.counter.is_none() => BootKind::Blessed,
        Some(_) if other_blessed => BootKind::Trial,
        Some(_) => BootKind::FirstBoot,
    };

    // The newest record of the other slot: what it held when its entry is gone.
    let other_record = records.iter().rev().find(|r| r.slot == other.to_string());
    let mut failed_trial = None;
    let (other_state, other_version) = match other_entry {
        // Booted before (a try was counted) and never blessed: its trial failed — unless this
        // boot is itself unblessed, in which case neither has proven anything yet.
        Some(e) if e.counter.is_some_and(|c| c.done > 0) && boot == BootKind::Blessed => {
            failed_trial = Some((other, e.version.clone().unwrap_or_default()));
            (SlotState::Failed, e.version.clone())
        }
        Some(e) if e.counter.is_some() => (SlotState::Pending, e.version.clone()),
        Some(e) => (SlotState::Previous, e.version.clone()),
        None => match other_record {
            Some(r) if r.state == "bad" => (SlotState::Failed, Some(r.version.clone())),
            _ => (SlotState::Empty, None),
        },
    };
    let slots = vec![
        SlotStatus {
            slot: booted.to_string(),
            state: SlotState::Booted,
            version: booted_entry.and_then(|e| e.version.clone()),
            entry: booted_entry.map(|e| e.file_name.clone()),
        },
        SlotStatus {
            slot: other.to_string(),
            state: other_state,
            version: other_version,
            entry: if failed_trial.is_some() {
                None
            } else {
                other_entry.map(|e| e.file_name.clone())
            },
        },
    ];
    Assessment {
        boot,
        slots,
        failed_trial,
    }
}

/// Versions recorded as bad, oldest first, each once.
pub fn bad_versions(records: &[Record]) -> Vec<String> {
    let mut bad: Vec<String> = Vec::new();
    for r in records {
        if r.state == "bad" && !bad.contains(&r.version) {
            bad.push(r.version.clone());
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use update::boot::Counter;

    fn entry(slot: Slot, counter: Option<(u32, u32)>, version: &str) -> EntryFile {
        let file_name = match counter {
            None => format!("appliance-{slot}.conf"),
            Some((left, 0)) => format!("appliance-{slot}+{left}.conf"),
            Some((left, done)) => format!("appliance-{slot}+{left}-{done}.conf"),
        };
        EntryFile {
            slot,
            file_name,
            counter: counter.map(|(left, done)| Counter { left, done }),
            version: Some(version.to_string()),
        }
    }

    fn states(a: &Assessment) -> Vec<(String, SlotState, Option<String>)> {
        a.slots
            .iter()
            .map(|s| (s.slot.clone(), s.state, s.version.clone()))
            .collect()
    }

    #[test]
    fn a_fresh_image_blesses_its_first_boot_without_a_deadline() {
        let a = assess(Slot::A, &[entry(Slot::A, Some((2, 1)), "0.1.0")], &[]);
        assert_eq!(a.boot, BootKind::FirstBoot);
        assert_eq!(a.failed_trial, None);
        assert_eq!(
            states(&a),
            [
                ("a".into(), SlotState::Booted, Some("0.1.0".into())),
                ("b".into(), SlotState::Empty, None)
            ]
        );
    }

    #[test]
    fn an_installed_slot_is_pending_until_booted_then_on_trial() {
        let installed = [
            entry(Slot::A, None, "0.1.0"),
            entry(Slot::B, Some((3, 0)), "0.2.0"),
        ];
        let a = assess(Slot::A, &installed, &[]);
        assert_eq!(a.boot, BootKind::Blessed);
        assert_eq!(a.slots[1].state, SlotState::Pending);
        assert_eq!(a.failed_trial, None);

        // systemd-boot counted the try and booted b: a trial, a to fall back to.
        let trying = [
            entry(Slot::A, None, "0.1.0"),
            entry(Slot::B, Some((2, 1)), "0.2.0"),
        ];
        let b = assess(Slot::B, &trying, &[]);
        assert_eq!(b.boot, BootKind::Trial);
        assert_eq!(
            states(&b),
            [
                ("b".into(), SlotState::Booted, Some("0.2.0".into())),
                ("a".into(), SlotState::Previous, Some("0.1.0".into()))
            ]
        );
    }

    #[test]
    fn back_on_the_old_slot_after_a_try_the_new_one_failed() {
        let entries = [
            entry(Slot::A, None, "0.1.0"),
            entry(Slot::B, Some((2, 1)), "0.3.0"),
        ];
        let a = assess(Slot::A, &entries, &[]);
        assert_eq!(a.boot, BootKind::Blessed);
        assert_eq!(a.failed_trial, Some((Slot::B, "0.3.0".into())));
        assert_eq!(a.slots[1].state, SlotState::Failed);
        assert_eq!(a.slots[1].entry, None, "the failed entry is to be removed");

        // Next boot: the entry is gone, the record remembers.
        let records = [Record {
            version: "0.3.0".into(),
            state: "bad".into(),
            slot: "b".into(),
        }];
        let later = assess(Slot::A, &[entry(Slot::A, None, "0.1.0")], &records);
        assert_eq!(later.failed_trial, None);
        assert_eq!(
            later.slots[1],
            SlotStatus {
                slot: "b".into(),
                state: SlotState::Failed,
                version: Some("0.3.0".into()),
                entry: None
            }
        );
        assert_eq!(bad_versions(&records), ["0.3.0"]);
    }

    #[test]
    fn two_blessed_slots_and_a_slot_booted_by_hand() {
        let both = [entry(Slot::A, None, "0.1.0"), entry(Slot::B, None, "0.2.0")];
        // The operator booted a once; b stays the default.
        let a = assess(Slot::A, &both, &[]);
        assert_eq!(a.boot, BootKind::Blessed);
        assert_eq!(a.slots[1].state, SlotState::Previous);
        assert_eq!(a.failed_trial, None);
        // Booted from a slot without an entry: nothing is decided.
        let none = assess(Slot::B, &[entry(Slot::A, None, "0.1.0")], &[]);
        assert_eq!(none.boot, BootKind::NoEntry);
        assert_eq!(none.failed_trial, None);
    }

    #[test]
    fn an_unblessed_boot_never_condemns_the_other_slot() {
        // Both counted (a fresh image whose first boot is still unblessed, b installed and
        // tried once): nothing is known to be good, nothing is marked bad.
        let entries = [
            entry(Slot::A, Some((1, 2)), "0.1.0"),
            entry(Slot::B, Some((2, 1)), "0.2.0"),
        ];
        let a = assess(Slot::A, &entries, &[]);
        assert_eq!(a.boot, BootKind::FirstBoot);
        assert_eq!(a.failed_trial, None);
        assert_eq!(a.slots[1].state, SlotState::Pending);
    }
}
