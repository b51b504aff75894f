//! A node whose data partition lost its superblock boots degraded: it formats nothing, says why
//! on its status page, and its MariaDB files are still on the partition afterwards.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qemu::Cluster;

use crate::support::*;

/// How long a clean power-off may take (services stop in order, then sync and unmount).
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(120);

fn err(what: String) -> qemu::Error {
    qemu::Error::Vm {
        node: "server2".into(),
        what,
    }
}

fn output(cmd: &mut Command) -> qemu::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| err(format!("{shown}: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "{shown}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Byte offset of the `data` partition in a node's image (the GPT the image-builder wrote;
/// growing the partition on first boot moves its end, never its start).
fn data_offset(image: &Path) -> qemu::Result<u64> {
    let json: serde_json::Value =
        serde_json::from_str(&output(Command::new("sfdisk").arg("-J").arg(image))?)
            .map_err(|e| err(format!("sfdisk -J: {e}")))?;
    let table = &json["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    table["partitions"]
        .as_array()
        .and_then(|parts| parts.iter().find(|p| p["name"] == "data"))
        .and_then(|p| p["start"].as_u64())
        .map(|start| start * sector)
        .ok_or_else(|| err(format!("no data partition in {}", image.display())))
}

pub(crate) fn zeroed_superblock_boots_degraded(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
) {
    let node = config
        .node("server2")
        .expect("server2 in the default cluster");
    let images = images(config);
    let offset = step(cluster, "server2 powers off cleanly", || {
        let vm = cluster.vm("server2")?;
        vm.power_off()?;
        vm.wait_exit(POWER_OFF_TIMEOUT)?;
        data_offset(&images.join("server2.img"))
    });

    step(
        cluster,
        "server2's data superblock is zeroed (1 KiB at offset 1024 of the partition)",
        || {
            let vm = cluster.vm("server2")?;
            output(
                Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c"])
                    .arg(format!("write -z {} 1024", offset + 1024))
                    .arg(vm.disk()),
            )
            .map(drop)
        },
    );

    let mark = step(cluster, "server2 boots again", || {
        let vm = cluster.vm("server2")?;
        let mark = vm.serial_mark();
        vm.start()?;
        Ok(mark)
    });
    step(
        cluster,
        "server2 says on its console that it boots degraded and formatted nothing",
        || {
            cluster.vm("server2")?.wait_serial_line(
                mark,
                "a `booting degraded (nothing was formatted)` line",
                BOOT_TIMEOUT,
                |l| l.contains("booting degraded") && l.contains("no readable filesystem"),
            )
        },
    );
    step(
        cluster,
        "server2's status page says it is degraded, why, and what stays stopped",
        || {
            let admin = Admin::of(cluster, config, &node.name)?;
            admin.wait_get("/", BOOT_TIMEOUT, |r| {
                r.status == 200
                    && r.body.contains("This node is degraded")
                    && r.body.contains("no readable filesystem")
                    && r.body.contains("a backup superblock is intact")
                    && r.body.contains("mariadb")
            })?;
            let status = admin.get("/api/status")?;
            if !status.body.contains("\"subject\": \"data-partition\"") {
                return Err(err(format!(
                    "/api/status lacks the degraded record: {} {}",
                    status.status, status.body
                )));
            }
            Ok(())
        },
    );

    step(
        cluster,
        "server2's MariaDB files are still on the partition",
        || {
            let vm = cluster.vm("server2")?;
            vm.power_off()?;
            vm.wait_exit(POWER_OFF_TIMEOUT)?;
            let raw = cluster.work_dir().join("server2-after.raw");
            output(
                Command::new("qemu-img")
                    .args(["convert", "-O", "raw"])
                    .arg(vm.disk())
                    .arg(&raw),
            )?;
            // The primary superblock is still zero (nothing wrote one); read through the backup.
            let listing = output(
                Command::new("debugfs")
                    .args([
                        "-c",
                        "-s",
                        "32768",
                        "-b",
                        "4096",
                        "-R",
                        "ls -l /tandem/mysql",
                    ])
                    .arg(format!("{}?offset={offset}", raw.display())),
            );
            let _ = std::fs::remove_file(&raw);
            let listing = listing?;
            // InnoDB's system tablespace, MariaDB's own schema and the application's database.
            for file in ["ibdata1", "mysql", "app"] {
                if !listing.contains(file) {
                    return Err(err(format!("/tandem/mysql lacks {file}:\n{listing}")));
                }
            }
            Ok(())
        },
    );
}
