//! The Tandem supervisor library: the process supervisor core, its state database and control
//! socket, and the node roles (`run` on a developer machine, `init` as PID 1).

pub mod admin_cmd;
pub mod args;
pub mod balancer_cmd;
pub mod control;
pub mod db_init_cmd;
pub mod disk;
pub mod files;
pub mod firewall_cmd;
pub mod init;
pub mod layout;
pub mod logging;
pub mod logmon_cmd;
pub mod netif;
pub mod node;
pub mod preflight;
pub mod run_cmd;
pub mod secrets;
pub mod settings;
pub mod setup_console;
pub mod state;
pub mod supervisor;
pub mod update_cmd;
pub mod updater;
pub mod users;
