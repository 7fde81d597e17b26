//! The ClickHouse server, and a server version given on the command line.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP(S) URL.
    #[arg(long, env = "CDC_RELAY_CLICKHOUSE_URL")]
    pub clickhouse_url: String,

    /// ClickHouse user.
    #[arg(long, env = "CDC_RELAY_CLICKHOUSE_USER", default_value = "default")]
    pub clickhouse_user: String,

    /// ClickHouse password.
    #[arg(
        long,
        env = "CDC_RELAY_CLICKHOUSE_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    pub clickhouse_password: String,

    /// File holding the ClickHouse password (overrides --clickhouse-password).
    #[arg(long, env = "CDC_RELAY_CLICKHOUSE_PASSWORD_FILE")]
    pub clickhouse_password_file: Option<std::path::PathBuf>,

    /// CA certificate(s), PEM, that an https:// server is verified against (default: the system's
    /// trust store).
    #[arg(long, env = "CDC_RELAY_CLICKHOUSE_CA_FILE")]
    pub clickhouse_ca_file: Option<std::path::PathBuf>,

    /// ClickHouse database.
    #[arg(long, env = "CDC_RELAY_CLICKHOUSE_DATABASE", default_value = "default")]
    pub clickhouse_database: String,

    /// ClickHouse table the sink writes into.
    #[arg(
        long,
        env = "CDC_RELAY_CLICKHOUSE_TABLE",
        default_value = "user_logins"
    )]
    pub clickhouse_table: String,

    /// A cluster of the servers' `remote_servers`: every table is created `ON CLUSTER` as a
    /// ReplicatedReplacingMergeTree `<table>_local` under a Distributed table `<table>` sharded by
    /// the key, which the sink inserts into (synchronously) and the current-rows view reads.
    #[arg(long, env = "CDC_RELAY_CLICKHOUSE_CLUSTER")]
    pub clickhouse_cluster: Option<String>,
}

/// `--clickhouse-cluster` as given: an empty value (a variable set to nothing, as compose files
/// write an unset one) means one server, not a cluster named ``.
pub fn cluster_name(arg: Option<&str>) -> Option<&str> {
    arg.map(str::trim).filter(|c| !c.is_empty())
}

/// `major.minor` of a ClickHouse server, as `--clickhouse-version` gives it (`26.9`, `18.16.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClickHouseVersion {
    pub major: u32,
    pub minor: u32,
}

impl ClickHouseVersion {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.trim().split('.');
        let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
        match (next(), next()) {
            (Some(major), Some(minor)) => Ok(ClickHouseVersion { major, minor }),
            _ => Err(format!(
                "ClickHouse server version {text:?} is not understood"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_cluster_name_is_one_server() {
        assert_eq!(cluster_name(None), None);
        assert_eq!(cluster_name(Some("")), None);
        assert_eq!(cluster_name(Some("  ")), None);
        assert_eq!(cluster_name(Some("cdc_relay")), Some("cdc_relay"));
    }

    #[test]
    fn version_is_major_dot_minor() {
        assert_eq!(
            ClickHouseVersion::parse("26.9.2.1"),
            Ok(ClickHouseVersion {
                major: 26,
                minor: 9
            })
        );
        assert_eq!(
            ClickHouseVersion::parse("x"),
            Err("ClickHouse server version \"x\" is not understood".to_string())
        );
    }
}
