//! The PostgreSQL connection and the publication's operations.

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Args)]
pub struct PostgresArgs {
    /// PostgreSQL connection URL, e.g. postgres://user:password@host:5432/db (password may come from the URL or PGPASSWORD); several hosts, e.g. postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write, are tried in order.
    #[arg(long, env = "CDC_RELAY_PG_URL", hide_env_values = true)]
    pub pg_url: String,

    /// TLS to PostgreSQL: disable, prefer, require, verify-ca or verify-full (overrides sslmode in
    /// the URL; default prefer).
    #[arg(long, env = "CDC_RELAY_PG_SSLMODE")]
    pub pg_sslmode: Option<String>,

    /// CA certificate(s), PEM, that verify-ca and verify-full check the server against.
    #[arg(long, env = "CDC_RELAY_PG_SSLROOTCERT")]
    pub pg_sslrootcert: Option<std::path::PathBuf>,

    /// File holding the PostgreSQL password (overrides one in the URL; keeps it out of the URL).
    #[arg(long, env = "CDC_RELAY_PG_PASSWORD_FILE")]
    pub pg_password_file: Option<std::path::PathBuf>,

    /// Source table, schema-qualified; repeat it (or separate with commas) to relay several
    /// through one slot and one publication.
    #[arg(
        long = "table",
        env = "CDC_RELAY_TABLE",
        default_value = "public.user_logins",
        value_delimiter = ','
    )]
    pub tables: Vec<String>,

    /// The seed's table, whose changes travel in the seed's message form (when it has the seed's
    /// shape at start) into the sink's --clickhouse-table; every other table goes in the columns
    /// form whatever its columns. Default: public.user_logins when it is relayed, else the table
    /// when only one is.
    #[arg(long, env = "CDC_RELAY_SEED_TABLE")]
    pub seed_table: Option<String>,

    /// Logical replication slot name.
    #[arg(long, env = "CDC_RELAY_SLOT", default_value = "cdc_relay")]
    pub slot: String,

    /// Publication name.
    #[arg(long, env = "CDC_RELAY_PUBLICATION", default_value = "cdc_relay")]
    pub publication: String,

    /// The confirmation ledger's boolean column: a table that has it gets `column = TRUE` once
    /// Kafka acknowledged the row, and rows still unsent are backfilled; a table without it streams
    /// without a ledger.
    #[arg(long, env = "CDC_RELAY_LEDGER_COLUMN", default_value = "sent_to_kafka")]
    pub ledger_column: String,
}

/// Which row operations the publication publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}
