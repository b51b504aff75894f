//! Each node boots from its image, serves its page, keeps its data partition across a clean
//! reboot and across a power cut. One cluster for the whole sequence: booting two VMs under TCG
//! costs about a minute, so the scenarios share it and run in order.

use std::time::Duration;

use qemu::Mark;

use crate::support::*;

#[test]
fn two_nodes_boot_serve_reboot_and_survive_a_power_cut() {
    let config = cluster_config();
    let cluster = boot_cluster();
    let mut boots = std::collections::HashMap::new();

    for node in ["server1", "server2"] {
        let count = step(
            &cluster,
            &format!("{node} serves its page on the web port"),
            || wait_page(&cluster, &config, node, None, BOOT_TIMEOUT),
        );
        boots.insert(node, count);
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
                cluster.vm(node)?.wait_serial_line(
                    Mark::default(),
                    "a `boot entry blessed` line",
                    SERIAL_TIMEOUT,
                    |l| l.contains("boot entry blessed") && l.contains("appliance-a+"),
                )
            },
        );
    }

    let note = crate::services::run(&cluster, &config);

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
            boots.insert("server1", now);
            Ok(())
        },
    );

    step(
        &cluster,
        "server2 comes back after a power cut and counts the boot",
        || {
            let vm = cluster.vm("server2")?;
            let before = boots["server2"];
            vm.kill()?;
            // The other node does not care.
            wait_page(&cluster, &config, "server1", None, Duration::from_secs(60))?;
            vm.start()?;
            wait_page(&cluster, &config, "server2", Some(before + 1), BOOT_TIMEOUT)?;
            Ok(())
        },
    );

    step(
        &cluster,
        "the note survived the reboot and the power cut on both nodes",
        || {
            for node in ["server2", "server1"] {
                crate::services::wait_note(
                    &cluster,
                    &config,
                    node,
                    &note,
                    crate::services::DB_TIMEOUT,
                )?;
            }
            Ok(())
        },
    );
}
