//! Command line and environment: the one place where settings are read.
//!
//! Every flag falls back to a `CDC_RELAY_*` environment variable, so the same names work for the
//! binary, `scripts/services` (which writes them to `.local/services.env`), docker-compose and the tests.
//! Components receive plain typed settings from here and never read the environment themselves.
//!
//! The settings are plain values (strings, numbers, paths and the enums defined here): the
//! commands turn them into what each component understands, so this module depends on none.

mod clickhouse;
mod file;
mod kafka;
mod postgres;
mod secret;
mod subcommands;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

pub use clickhouse::{cluster_name, ClickHouseArgs, ClickHouseVersion};
pub use file::{apply_config_file, known_settings};
pub use kafka::{KafkaArgs, KafkaSecurityArgs, SinkKafkaArgs};
pub use postgres::{Op, PostgresArgs};
pub use secret::{mask, read_secret};
pub use subcommands::{
    LedgerOrigin, SetupArgs, SinkArgs, SnapshotMode, StatusArgs, StreamArgs, TeardownArgs,
    VerifyArgs,
};

#[derive(Debug, Parser)]
#[command(
    name = "cdc-relay",
    after_help = "Settings come from flags, then CDC_RELAY_* environment variables, then the TOML file named by --config (keys are the flag names with underscores, e.g. pg_url = \"postgres://…\").",
    version,
    about = "Change-data-capture relay: PostgreSQL (pgoutput) -> Apache Kafka -> ClickHouse",
    long_about = "Change-data-capture relay: PostgreSQL (pgoutput) -> Apache Kafka -> ClickHouse.\n\n\
`stream` reads the logical replication stream of a table and produces every change to Kafka, \
marking each row `sent_to_kafka = TRUE` once Kafka acknowledged it. `sink` is a consumer-group \
member that writes the topic into a ClickHouse ReplacingMergeTree table keyed on `id`."
)]
pub struct Cli {
    /// TOML file with settings (lowest precedence: flags and CDC_RELAY_* variables win).
    #[arg(long, global = true, env = "CDC_RELAY_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Log output format.
    #[arg(long, global = true, env = "CDC_RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream changes of the table from PostgreSQL into Kafka (backfilling unsent rows first).
    Stream(StreamArgs),
    /// Consume the topic and write it into ClickHouse.
    Sink(SinkArgs),
    /// Show the state of the slot, the ledger, the topic and the ClickHouse table.
    Status(StatusArgs),
    /// Create the publication, the slot, the topics and the ClickHouse table ahead of time.
    Setup(SetupArgs),
    /// Drop the slot and the publication. The slot's position is lost: a later `stream` backfills
    /// from the ledger (`sent_to_kafka`).
    Teardown(TeardownArgs),
    /// Compare every table's ClickHouse current view with PostgreSQL: missing, extra and
    /// mismatched keys (exit 0 equal, 1 drift, 2 error); --repair sends what differs again.
    Verify(VerifyArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the settings and print the effective values, secrets masked.
    Check {
        /// Check only the settings of this command (default: stream, sink and status).
        #[arg(long = "for", value_parser = ["stream", "sink", "status", "verify"])]
        for_command: Option<String>,
    },
    /// Print the statements the sink (and setup) send to create and check the ClickHouse table,
    /// its truncates table and its current-rows view on a server of the given version, each ending
    /// with `;`, without connecting anywhere.
    ClickhouseSchema {
        /// Server version, major.minor (e.g. 18.16 or 26.9): the engine differs from 23.2 on.
        #[arg(long, value_parser = parse_clickhouse_version)]
        clickhouse_version: ClickHouseVersion,

        /// ClickHouse database.
        #[arg(long, env = "CDC_RELAY_CLICKHOUSE_DATABASE", default_value = "default")]
        clickhouse_database: String,

        /// ClickHouse table the sink writes into.
        #[arg(
            long,
            env = "CDC_RELAY_CLICKHOUSE_TABLE",
            default_value = "user_logins"
        )]
        clickhouse_table: String,

        /// The statements for tables replicated and sharded over this cluster.
        #[arg(long, env = "CDC_RELAY_CLICKHOUSE_CLUSTER")]
        clickhouse_cluster: Option<String>,
    },
}

fn parse_clickhouse_version(text: &str) -> Result<ClickHouseVersion, String> {
    ClickHouseVersion::parse(text)
}

fn parse_millis(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("expected milliseconds as a whole number: {e}"))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("expected seconds as a whole number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ops_parse_as_a_list() {
        let cli = Cli::try_parse_from([
            "cdc-relay",
            "stream",
            "--pg-url",
            "postgres://x",
            "--kafka-brokers",
            "k:1",
            "--ops",
            "insert,update,delete",
        ])
        .unwrap();
        let Command::Stream(args) = cli.command else {
            panic!("expected stream")
        };
        assert_eq!(args.ops, vec![Op::Insert, Op::Update, Op::Delete]);
        assert_eq!(args.postgres.slot, "cdc_relay");
        // The topic follows the table (commands::table_topics): user_events for the seed's.
        assert_eq!(args.kafka.topic, None);
        assert_eq!(args.postgres.tables, vec!["public.user_logins".to_string()]);
    }
}
