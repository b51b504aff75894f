//! The database agent's published status (`<run>/db-status.json`): written by
//! `appliance db-agent`, read typed by the demo application (which primary takes writes), the
//! log monitor (replication alerts) and the admin server (status page). Never any secret.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// File name of the agent's published status in the run directory.
pub const STATUS_FILE: &str = "db-status.json";

/// The primary as the application and `db status` need to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryRef {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
}

/// What the agent publishes in [`STATUS_FILE`]. A stable interface: readers tolerate fields
/// they do not know (no `deny_unknown_fields`), so an agent may add some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub role: Role,
    pub primary: PrimaryRef,
    pub healthy: bool,
    pub error: Option<String>,
    pub lag_s: Option<u64>,
    pub read_only: Option<bool>,
    /// `SHOW SLAVE STATUS`'s `Slave_IO_Running`: `Yes`, `No` or `Connecting`.
    pub io_running: Option<String>,
    pub sql_running: Option<bool>,
    pub gtid_current_pos: Option<String>,
    pub gtid_slave_pos: Option<String>,
    pub gtid_binlog_pos: Option<String>,
    /// Unix time in milliseconds of this observation.
    pub updated_ms: i64,
}

/// A node's database role as the agent publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

impl AgentStatus {
    /// Parses the file's text; the error says what is wrong.
    pub fn parse(text: &str) -> Result<AgentStatus, String> {
        serde_json::from_str(text).map_err(|e| format!("{STATUS_FILE}: {e}"))
    }

    /// Both replication threads run (`Slave_IO_Running: Yes` and `Slave_SQL_Running: Yes`).
    pub fn replicating(&self) -> bool {
        self.io_running.as_deref() == Some("Yes") && self.sql_running == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_reads_back_and_tolerates_new_fields() {
        let status = AgentStatus {
            node: "server2".into(),
            role: Role::Replica,
            primary: PrimaryRef {
                name: "server1".into(),
                address: Ipv4Addr::new(10, 88, 0, 11),
                port: 3306,
            },
            healthy: true,
            error: None,
            lag_s: Some(0),
            read_only: Some(true),
            io_running: Some("Yes".into()),
            sql_running: Some(true),
            gtid_current_pos: None,
            gtid_slave_pos: None,
            gtid_binlog_pos: None,
            updated_ms: 1,
        };
        let mut json: serde_json::Value = serde_json::to_value(&status).unwrap();
        assert_eq!(json["role"], "replica");
        json["added_later"] = serde_json::json!(true);
        let back = AgentStatus::parse(&json.to_string()).unwrap();
        assert_eq!(back, status);
        assert!(back.replicating());
        let err = AgentStatus::parse(r#"{"node":"x"}"#).unwrap_err();
        assert!(err.starts_with("db-status.json: missing field"), "{err}");
    }
}
