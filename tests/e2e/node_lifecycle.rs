//! Each node boots from its image, serves its page, keeps its data partition across a clean
//! reboot and across a power cut; the floating IP moves when the holder's balancer or machine
//! dies and settles on one node after a split. One cluster for the whole sequence: booting two
//! VMs under TCG costs about a minute, so the scenarios share it and run in order.

use qemu::Mark;

use crate::support::*;

#[test]
fn two_nodes_boot_serve_reboot_and_survive_a_power_cut() {
    let config = cluster_config();
    let cluster = boot_cluster();
    let mut boots: std::collections::HashMap<String, u64> = std::collections::HashMap::new();

    for node in ["server1", "server2"] {
        let count = step(
            &cluster,
            &format!("{node} serves its page on the web port"),
            || wait_page(&cluster, &config, node, None, BOOT_TIMEOUT),
        );
        boots.insert(node.to_string(), count);
    }

    for node in ["server1", "server2"] {
        step(
            &cluster,
            &format!("{node}'s serial console shows MariaDB ready"),
            || {
                cluster.vm(node)?.wait_serial_line(
                    Mark::default(),
                    "a `service=mariadb ... ready` line",
                    SERIAL_TIMEOUT,
                    |l| l.contains("service=mariadb") && l.contains("ready"),
                )
            },
        );
    }

    for node in ["server1", "server2"] {
        step(
            &cluster,
            &format!("{node} blesses its boot entry once every service is ready"),
            || {
                // The update service blesses the first boot's counted entry (`appliance-a+3`).
                crate::updates::wait_update(
                    &cluster,
                    &config,
                    node,
                    "slot a blessed",
                    SERIAL_TIMEOUT,
                    |v| crate::updates::running(v, "0.1.0", "a"),
                )
            },
        );
    }

    let note = crate::services::run(&cluster, &config);
    let certs = crate::floating_ip::peer_certs(&cluster, &config);
    crate::floating_ip::run(&cluster, &config, &certs);

    step(
        &cluster,
        "server1 reboots cleanly on Ctrl-Alt-Del and counts the boot",
        || {
            let vm = cluster.vm("server1")?;
            let before = boots["server1"];
            vm.reboot_ctrl_alt_del()?;
            let now = wait_page(&cluster, &config, "server1", Some(before + 1), BOOT_TIMEOUT)?;
            // A reboot, not a power-off: the same QEMU process carried on.
            if !vm.is_running() {
                return Err(qemu::Error::Vm {
                    node: "server1".into(),
                    what: "QEMU exited on Ctrl-Alt-Del".into(),
                });
            }
            boots.insert("server1".to_string(), now);
            Ok(())
        },
    );

    // The power cut hits whichever node holds the floating IP now.
    let holder = crate::floating_ip::power_cut_of_holder(&cluster, &config, &mut boots);
    crate::floating_ip::split_and_heal(&cluster, &config, &holder);

    step(
        &cluster,
        "the note survived the reboot, the power cut and the split on both nodes",
        || crate::services::wait_note_everywhere(&cluster, &config, &note),
    );

    // Last, as it leaves server2 degraded.
    crate::disk_faults::zeroed_superblock_boots_degraded(&cluster, &config);
}
