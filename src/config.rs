//! Command line and environment: the one place where settings are read.
//!
//! Every flag falls back to a `CDC_RELAY_*` environment variable, so the same names work for the
//! binary, `scripts/services` (which writes them to `.local/services.env`), docker-compose and the tests.
//! Components receive plain typed settings from here and never read the environment themselves.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the settings and print the effective values, secrets masked.
    Check {
        /// Check only the settings of this command (default: stream, sink and status).
        #[arg(long = "for", value_parser = ["stream", "sink", "status"])]
        for_command: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct PostgresArgs {
    /// PostgreSQL connection URL, e.g. postgres://user:password@host:5432/db (password may come from the URL or PGPASSWORD).
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

    /// Source table, schema-qualified.
    #[arg(long, env = "CDC_RELAY_TABLE", default_value = "public.user_logins")]
    pub table: String,

    /// Logical replication slot name.
    #[arg(long, env = "CDC_RELAY_SLOT", default_value = "cdc_relay")]
    pub slot: String,

    /// Publication name.
    #[arg(long, env = "CDC_RELAY_PUBLICATION", default_value = "cdc_relay")]
    pub publication: String,
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "CDC_RELAY_KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Topic that carries the change events.
    #[arg(long, env = "CDC_RELAY_TOPIC", default_value = "user_events")]
    pub topic: String,

    #[command(flatten)]
    pub security: KafkaSecurityArgs,
}

/// TLS and SASL towards the brokers (librdkafka's `security.protocol`, `sasl.*`, `ssl.*`).
#[derive(Debug, Clone, Args)]
pub struct KafkaSecurityArgs {
    /// plaintext (default), ssl, sasl_plaintext or sasl_ssl.
    #[arg(long, env = "CDC_RELAY_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<String>,

    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, env = "CDC_RELAY_KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,

    /// SASL user name.
    #[arg(long, env = "CDC_RELAY_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// SASL password (prefer the file or the environment: a flag shows in the process list).
    #[arg(long, env = "CDC_RELAY_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,

    /// File holding the SASL password (overrides --kafka-sasl-password).
    #[arg(long, env = "CDC_RELAY_KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<std::path::PathBuf>,

    /// CA certificate(s), PEM, that the brokers' certificates are verified against (ssl, sasl_ssl).
    #[arg(long, env = "CDC_RELAY_KAFKA_SSL_CA_FILE")]
    pub kafka_ssl_ca_file: Option<std::path::PathBuf>,

    /// Client certificate, PEM, for brokers that require client authentication.
    #[arg(long, env = "CDC_RELAY_KAFKA_SSL_CERTIFICATE_FILE")]
    pub kafka_ssl_certificate_file: Option<std::path::PathBuf>,

    /// Private key, PEM, of the client certificate.
    #[arg(long, env = "CDC_RELAY_KAFKA_SSL_KEY_FILE")]
    pub kafka_ssl_key_file: Option<std::path::PathBuf>,
}

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
}

/// Which row operations the publication publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

/// Turns `--ops` into what the source understands.
pub struct PublishOpsArg;

impl PublishOpsArg {
    pub fn ops(ops: &[Op]) -> crate::source::postgres::PublishOps {
        crate::source::postgres::PublishOps(ops.iter().map(|o| o.as_str()).collect())
    }
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

#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Operations the publication publishes (the seed's contract is inserts only).
    #[arg(
        long,
        env = "CDC_RELAY_OPS",
        value_enum,
        value_delimiter = ',',
        default_value = "insert"
    )]
    pub ops: Vec<Op>,

    /// Partitions of the topic when it has to be created.
    #[arg(long, env = "CDC_RELAY_TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,

    /// Replication factor of the topic when it has to be created (default: min(3, brokers)).
    #[arg(long, env = "CDC_RELAY_TOPIC_REPLICATION")]
    pub topic_replication: Option<i32>,

    /// The stream's dead-letter topic: changes that cannot be produced (larger than the topic's
    /// max.message.bytes, a value that cannot be encoded). Default: `<topic>.stream-dlq`.
    #[arg(long, env = "CDC_RELAY_STREAM_DLQ_TOPIC")]
    pub stream_dlq_topic: Option<String>,

    /// Most messages produced but not yet acknowledged and recorded; bounds memory under any backlog.
    #[arg(long, env = "CDC_RELAY_MAX_IN_FLIGHT", default_value_t = 50_000)]
    pub max_in_flight: usize,

    /// Most row ids marked `sent_to_kafka` in one ledger statement.
    #[arg(long, env = "CDC_RELAY_LEDGER_BATCH", default_value_t = 10_000)]
    pub ledger_batch: usize,

    /// Longest time an acknowledged row waits for its ledger write, in milliseconds.
    #[arg(long, env = "CDC_RELAY_LEDGER_INTERVAL_MS", default_value = "200", value_parser = parse_millis)]
    pub ledger_interval: Duration,

    /// Rows read per backfill chunk.
    #[arg(long, env = "CDC_RELAY_BACKFILL_CHUNK", default_value_t = 10_000)]
    pub backfill_chunk: i64,

    /// Create a new slot when the old one was dropped or invalidated (its WAL removed). Changes made
    /// while it was gone are not streamed; rows still marked unsent are backfilled.
    #[arg(long, env = "CDC_RELAY_RECREATE_SLOT")]
    pub recreate_slot: bool,

    /// Warn (log and metric) when the slot retains more WAL than this many MiB.
    #[arg(long, env = "CDC_RELAY_MAX_RETAINED_WAL_MB", default_value_t = 1024)]
    pub max_retained_wal_mb: u64,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187) at /metrics.
    #[arg(long, env = "CDC_RELAY_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Seconds between heartbeats that keep the slot's confirmed position moving on a quiet table.
    #[arg(long, env = "CDC_RELAY_HEARTBEAT_SECS", default_value = "10", value_parser = parse_secs)]
    pub heartbeat_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,

    /// Kafka consumer group.
    #[arg(long, env = "CDC_RELAY_GROUP", default_value = "user_logins_consumer")]
    pub group: String,

    /// Topic that receives messages the sink cannot parse.
    #[arg(long, env = "CDC_RELAY_DLQ_TOPIC", default_value = "user_events.dlq")]
    pub dlq_topic: String,

    /// Most rows in one ClickHouse insert.
    #[arg(long, env = "CDC_RELAY_BATCH_ROWS", default_value_t = 20_000)]
    pub batch_rows: usize,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9188) at /metrics.
    #[arg(long, env = "CDC_RELAY_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Longest time a consumed message waits before its batch is inserted, in milliseconds.
    #[arg(long, env = "CDC_RELAY_BATCH_INTERVAL_MS", default_value = "100", value_parser = parse_millis)]
    pub batch_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,

    /// Operations the publication publishes.
    #[arg(
        long,
        env = "CDC_RELAY_OPS",
        value_enum,
        value_delimiter = ',',
        default_value = "insert"
    )]
    pub ops: Vec<Op>,

    /// Partitions of the topic when it has to be created.
    #[arg(long, env = "CDC_RELAY_TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,

    /// Replication factor of the topic when it has to be created (default: min(3, brokers)).
    #[arg(long, env = "CDC_RELAY_TOPIC_REPLICATION")]
    pub topic_replication: Option<i32>,

    /// Topic that receives messages the sink cannot parse.
    #[arg(long, env = "CDC_RELAY_DLQ_TOPIC", default_value = "user_events.dlq")]
    pub dlq_topic: String,
}

#[derive(Debug, Clone, Args)]
pub struct TeardownArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Required: confirms that the slot (and with it the stream's position) may be dropped.
    #[arg(long)]
    pub yes_drop_slot: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Kafka bootstrap servers; without them the Kafka section is skipped.
    #[arg(long, env = "CDC_RELAY_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    #[command(flatten)]
    pub kafka_security: KafkaSecurityArgs,

    /// Topic that carries the change events.
    #[arg(long, env = "CDC_RELAY_TOPIC", default_value = "user_events")]
    pub topic: String,

    /// Consumer group whose lag is shown.
    #[arg(long, env = "CDC_RELAY_GROUP", default_value = "user_logins_consumer")]
    pub group: String,

    /// Dead-letter topic whose size is shown.
    #[arg(long, env = "CDC_RELAY_DLQ_TOPIC", default_value = "user_events.dlq")]
    pub dlq_topic: String,

    /// ClickHouse HTTP(S) URL; without it the ClickHouse section is skipped.
    #[arg(long, env = "CDC_RELAY_CLICKHOUSE_URL")]
    pub clickhouse_url: Option<String>,

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

    /// ClickHouse table.
    #[arg(
        long,
        env = "CDC_RELAY_CLICKHOUSE_TABLE",
        default_value = "user_logins"
    )]
    pub clickhouse_table: String,

    /// Consumer-group lag (messages, all partitions) above which the status is unhealthy.
    #[arg(long, env = "CDC_RELAY_MAX_LAG", default_value_t = 100_000)]
    pub max_lag: i64,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Every `CDC_RELAY_*` variable some command reads, with the flag it stands for.
pub fn known_settings() -> std::collections::BTreeMap<String, String> {
    use clap::CommandFactory;
    let mut out = std::collections::BTreeMap::new();
    fn walk(cmd: &clap::Command, out: &mut std::collections::BTreeMap<String, String>) {
        for arg in cmd.get_arguments() {
            if let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) {
                out.insert(env.to_string_lossy().into_owned(), long.to_string());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    walk(&Cli::command(), &mut out);
    out
}

/// Reads the TOML file and exports each key as its `CDC_RELAY_*` variable, unless that variable is
/// already set (flags and the environment take precedence). Unknown keys are errors. Returns the
/// variables it set. Must run before the command line is parsed and before any thread starts.
pub fn apply_config_file(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {} is not valid TOML: {e}", path.display()))?;
    // File keys are the flag names with underscores: `batch_interval`, not the env name's `_MS`.
    let by_key: std::collections::BTreeMap<String, String> = known_settings()
        .into_iter()
        .filter(|(_, flag)| flag != "config")
        .map(|(env, flag)| (flag.replace('-', "_"), env))
        .collect();
    let mut set = Vec::new();
    for (key, value) in table {
        let Some(env) = by_key.get(&key.replace('-', "_")).cloned() else {
            let valid: Vec<&str> = by_key.keys().map(String::as_str).collect();
            return Err(format!(
                "config file {}: unknown key {key:?}; known keys: {}",
                path.display(),
                valid.join(", ")
            ));
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => {
                return Err(format!(
                    "config file {}: key {key:?} has an unsupported value {other:?}",
                    path.display()
                ))
            }
        };
        if std::env::var_os(&env).is_none() {
            // Single-threaded at this point (called from main before the runtime starts).
            std::env::set_var(&env, text);
            set.push(env);
        }
    }
    Ok(set)
}

/// Masks secrets: password settings entirely, and the password inside URLs.
pub fn mask(setting: &str, value: &str) -> String {
    if setting.contains("PASSWORD") {
        return if value.is_empty() {
            String::new()
        } else {
            "****".into()
        };
    }
    match (value.find("://"), value.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &value[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:****{}", &value[..scheme + 3], &value[at..]),
                None => value.to_string(),
            }
        }
        _ => {
            // key=value connection strings
            value
                .split(' ')
                .map(|kv| {
                    if kv.starts_with("password=") {
                        "password=****"
                    } else {
                        kv
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
    }
}

/// Reads a secret from a file: the whole content without the trailing newline. The error names the
/// file, never the content.
pub fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
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
    fn secrets_are_masked() {
        assert_eq!(
            mask("CDC_RELAY_PG_URL", "postgres://u:secret@h:5432/db"),
            "postgres://u:****@h:5432/db"
        );
        assert_eq!(
            mask("CDC_RELAY_PG_URL", "host=h password=secret user=u"),
            "host=h password=**** user=u"
        );
        assert_eq!(mask("CDC_RELAY_CLICKHOUSE_PASSWORD", "secret"), "****");
        assert_eq!(mask("CDC_RELAY_TOPIC", "t"), "t");
    }

    #[test]
    fn every_setting_has_an_env_name() {
        let known = known_settings();
        for k in [
            "CDC_RELAY_PG_URL",
            "CDC_RELAY_KAFKA_BROKERS",
            "CDC_RELAY_CLICKHOUSE_PASSWORD",
            "CDC_RELAY_OPS",
            "CDC_RELAY_GROUP",
        ] {
            assert!(known.contains_key(k), "{k}");
        }
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
        assert_eq!(args.kafka.topic, "user_events");
    }
}
