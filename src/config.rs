//! Command line and environment: the one place where settings are read.
//!
//! Every flag falls back to a `CDC_RELAY_*` environment variable, so the same names work for the
//! binary, `scripts/services` (which writes them to `.local/services.env`), docker-compose and the tests.
//! Components receive plain typed settings from here and never read the environment themselves.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::sink::clickhouse::ServerVersion;

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
    /// Print the statements the sink (and setup) send to create and check the ClickHouse table,
    /// its truncates table and its current-rows view on a server of the given version, each ending
    /// with `;`, without connecting anywhere.
    ClickhouseSchema {
        /// Server version, major.minor (e.g. 18.16 or 26.9): the engine differs from 23.2 on.
        #[arg(long, value_parser = parse_server_version)]
        clickhouse_version: ServerVersion,

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
    },
}

fn parse_server_version(text: &str) -> Result<ServerVersion, String> {
    ServerVersion::parse(text).map_err(|e| e.to_string())
}

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

    /// Exactly once into Kafka: produce inside Kafka transactions, each also committing a checkpoint
    /// of how far it reaches; after any crash the replayed changes at or below the last checkpoint
    /// are dropped, so a `read_committed` consumer sees every change once.
    #[arg(long, env = "CDC_RELAY_EXACTLY_ONCE")]
    pub exactly_once: bool,

    /// With --exactly-once: most changes in one Kafka transaction.
    #[arg(
        long,
        env = "CDC_RELAY_TRANSACTION_MAX_CHANGES",
        default_value_t = 10_000
    )]
    pub transaction_max_changes: usize,

    /// With --exactly-once: longest a Kafka transaction stays open, in milliseconds.
    #[arg(long, env = "CDC_RELAY_TRANSACTION_MAX_MS", default_value = "100", value_parser = parse_millis)]
    pub transaction_max_ms: Duration,

    /// With --exactly-once: the compacted topic of checkpoints. Default: `<topic>.checkpoints`.
    #[arg(long, env = "CDC_RELAY_CHECKPOINT_TOPIC")]
    pub checkpoint_topic: Option<String>,

    /// Most messages produced but not yet acknowledged and recorded; bounds memory under any backlog.
    #[arg(long, env = "CDC_RELAY_MAX_IN_FLIGHT", default_value_t = 50_000)]
    pub max_in_flight: usize,

    /// Most row ids marked `sent_to_kafka` in one ledger statement.
    #[arg(long, env = "CDC_RELAY_LEDGER_BATCH", default_value_t = 10_000)]
    pub ledger_batch: usize,

    /// Longest time an acknowledged row waits for its ledger write, in milliseconds.
    #[arg(long, env = "CDC_RELAY_LEDGER_INTERVAL_MS", default_value = "200", value_parser = parse_millis)]
    pub ledger_interval: Duration,

    /// PostgreSQL 16+: run the ledger's UPDATEs under a replication origin and stream with
    /// `origin = none`, so the server drops them before decoding (`auto`, when the database has no
    /// other replication origins, whose changes that would drop too), or never (`off`).
    #[arg(
        long,
        env = "CDC_RELAY_LEDGER_ORIGIN",
        value_enum,
        default_value = "auto"
    )]
    pub ledger_origin: LedgerOrigin,

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

/// Whether the ledger's own writes are filtered by origin (`--ledger-origin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LedgerOrigin {
    Auto,
    Off,
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

    /// The stream's dead-letter topic whose size is shown. Default: `<topic>.stream-dlq`.
    #[arg(long, env = "CDC_RELAY_STREAM_DLQ_TOPIC")]
    pub stream_dlq_topic: Option<String>,

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

/// Masks secrets for display: the whole value of a secret setting (a password, a token, a key, but
/// not the path of a `*_FILE`), and inside any other value the secrets of URLs (the password of
/// `user:password@`, query parameters with a secret-like name such as `?password=`, `sslpassword`,
/// `api_key`) and of libpq `key=value` strings (quoted or not, spaces around `=`, escapes). A value
/// that looks like a connection string but cannot be parsed is masked whole if it mentions a secret.
pub fn mask(setting: &str, value: &str) -> String {
    let name = setting.to_ascii_lowercase();
    if name.contains("password") || (is_secret_name(&name) && !name.ends_with("_file")) {
        return if value.is_empty() {
            String::new()
        } else {
            MASK.into()
        };
    }
    masking::mask_value(value)
}

const MASK: &str = "****";

/// Whether a parameter named so holds a secret (case-insensitive, and generous: masking a harmless
/// value costs nothing, showing a secret does).
fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "credential",
        "private",
        "signature",
    ]
    .iter()
    .any(|w| name.contains(w))
}

/// A small parser for the two shapes connection settings come in: URLs
/// (`scheme://user:password@host/path?k=v&k=v#fragment`) and libpq's `key=value key='quoted value'`.
mod masking {
    use super::{is_secret_name, MASK};

    pub fn mask_value(value: &str) -> String {
        if let Some(start) = url_start(value) {
            if start == 0 {
                return mask_url(value);
            }
        }
        if value.contains('=') {
            if let Some(masked) = mask_conninfo(value) {
                return masked;
            }
            if is_secret_name(value) {
                return MASK.into();
            }
        }
        // Anything else that carries a URL somewhere: everything from its scheme on is a URL.
        match url_start(value) {
            Some(start) => format!("{}{}", &value[..start], mask_url(&value[start..])),
            None => value.to_string(),
        }
    }

    /// Where the first `scheme://` begins (scheme: a letter, then letters, digits, `+ - . _`).
    fn url_start(value: &str) -> Option<usize> {
        let sep = value.find("://")?;
        let scheme_ok = |c: char| c.is_ascii_alphanumeric() || "+-._".contains(c);
        let start = value[..sep]
            .char_indices()
            .rev()
            .take_while(|&(_, c)| scheme_ok(c))
            .last()
            .map(|(i, _)| i)?;
        value[start..]
            .starts_with(|c: char| c.is_ascii_alphabetic())
            .then_some(start)
    }

    /// `value` starts with `scheme://`.
    fn mask_url(value: &str) -> String {
        let sep = value.find("://").expect("a URL") + 3;
        let (scheme, rest) = value.split_at(sep);
        // The user info ends at an `@`, but which one is ambiguous once a password holds unencoded
        // `@`, `/` or `?`, and parsers differ: libpq takes the first `@` before the path,
        // tokio-postgres the first `@` anywhere. `config check` must hide whatever any of them (or
        // the user) took for the password, so the user info runs to the latest of: the first `@`,
        // the last `@` before the path, the last `@` before the query, and the last `@` at all
        // unless that one sits in a query parameter's value (`?user=a@b`). Without a `:` in it
        // there is no password there.
        let before = |stops: &[char]| rest.find(|c| stops.contains(&c)).unwrap_or(rest.len());
        let last = rest.rfind('@').filter(|&l| {
            let segment_start = rest[..l].rfind(['?', '&']);
            !segment_start.is_some_and(|s| rest[s..l].contains('='))
        });
        let at = [
            rest.find('@'),
            rest[..before(&['/'])].rfind('@'),
            rest[..before(&['?', '#'])].rfind('@'),
            last,
        ]
        .into_iter()
        .flatten()
        .max()
        .filter(|&at| rest[..at].contains(':'));
        let mut out = String::from(scheme);
        let after = match at {
            Some(at) => {
                let userinfo = &rest[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
                &rest[at..]
            }
            None => rest,
        };
        let Some(q) = after.find('?') else {
            out.push_str(after);
            return out;
        };
        out.push_str(&after[..=q]);
        let query = &after[q + 1..];
        let (query, fragment) = match query.find('#') {
            Some(h) => query.split_at(h),
            None => (query, ""),
        };
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if is_secret_name(&percent_decode(k)) && !v.is_empty() => {
                    format!("{k}={MASK}")
                }
                Some((k, v)) => {
                    let decoded = percent_decode(v);
                    if mask_value(&decoded) == decoded {
                        kv.to_string()
                    } else {
                        format!("{k}={MASK}")
                    }
                }
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
        out.push_str(fragment);
        out
    }

    /// `%XX` decoded (invalid sequences kept as they are), for comparing names.
    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if b[i] == b'%' && i + 2 < b.len() {
                if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// libpq's `keyword = value` list: whitespace between pairs and around `=`; a value is either
    /// unquoted (up to whitespace) or in single quotes; a backslash escapes the next character in
    /// both. Secret values become `****`, everything else (spacing included) is kept. `None` when
    /// the text is not such a list.
    fn mask_conninfo(s: &str) -> Option<String> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        let take_ws = |r: &str| r.len() - r.trim_start().len();
        loop {
            let ws = take_ws(rest);
            out.push_str(&rest[..ws]);
            rest = &rest[ws..];
            if rest.is_empty() {
                return Some(out);
            }
            let key_len = rest
                .find(|c: char| c.is_whitespace() || c == '=')
                .unwrap_or(rest.len());
            if key_len == 0 {
                return None;
            }
            let key = &rest[..key_len];
            out.push_str(key);
            rest = &rest[key_len..];
            let ws = take_ws(rest);
            if !rest[ws..].starts_with('=') {
                return None;
            }
            let eq = ws + 1;
            let ws = eq + take_ws(&rest[eq..]);
            out.push_str(&rest[..ws]);
            rest = &rest[ws..];
            let mut chars = rest.char_indices();
            let quoted = rest.starts_with('\'');
            if quoted {
                chars.next();
            }
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        // The escaped character, whatever it is; a trailing backslash is invalid.
                        chars.next()?;
                    }
                    '\'' if quoted => {
                        end = Some(i + 1);
                        break;
                    }
                    c if !quoted && c.is_whitespace() => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = match end {
                Some(e) => e,
                None if quoted => return None, // unterminated quote
                None => rest.len(),
            };
            let value = &rest[..end];
            let empty = value.is_empty() || value == "''";
            if is_secret_name(key) && !empty {
                out.push_str(if quoted { "'****'" } else { MASK });
            } else if value.contains("://") {
                out.push_str(&mask_value(value));
            } else {
                out.push_str(value);
            }
            rest = &rest[end..];
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
    fn secrets_are_masked_in_every_form() {
        let pg = |v: &str| mask("CDC_RELAY_PG_URL", v);
        // (input, expected): the secret is always the text "S3cr3t"-something.
        let cases = [
            // URL query parameters, any case, percent-encoded names.
            (
                "postgres://h/db?password=S3cr3t",
                "postgres://h/db?password=****",
            ),
            (
                "postgres://u@h:5432/db?sslmode=require&sslpassword=S3cr3t&application_name=x",
                "postgres://u@h:5432/db?sslmode=require&sslpassword=****&application_name=x",
            ),
            (
                "postgresql://u:S3cr3t@h/db?PassWord=S3cr3t2#frag",
                "postgresql://u:****@h/db?PassWord=****#frag",
            ),
            (
                "postgres://h/db?pass%77ord=S3cr3t&api_KEY=S3cr3t2&x_token=S3cr3t3&client_secret=S3cr3t4",
                "postgres://h/db?pass%77ord=****&api_KEY=****&x_token=****&client_secret=****",
            ),
            // Empty values stay empty (nothing to hide, and it shows the setting is blank).
            ("postgres://h/db?password=", "postgres://h/db?password="),
            // User info, also with characters libpq would want encoded.
            (
                "https://default:S3cr3t@ch.example:8443/?database=x",
                "https://default:****@ch.example:8443/?database=x",
            ),
            ("http://u:S3/cr3t@h:1/db", "http://u:****@h:1/db"),
            ("http://u:S3?cr3t@h:1/db", "http://u:****@h:1/db"),
            ("http://u:S3@cr3t@h:1/db?user=a@b", "http://u:****@h:1/db?user=a@b"),
            ("postgres://u:S3cr3t@h1:1,h2:2/db", "postgres://u:****@h1:1,h2:2/db"),
            // Options that carry a secret-looking setting are masked whole.
            (
                "postgres://h/db?options=-c%20password%3DS3cr3t",
                "postgres://h/db?options=****",
            ),
            (
                "postgres://h/db?options=-c%20search_path%3Dapp",
                "postgres://h/db?options=-c%20search_path%3Dapp",
            ),
            // key=value strings: quoted, spaces around `=`, escaped quotes and backslashes.
            (
                "host=h password=S3cr3t user=u",
                "host=h password=**** user=u",
            ),
            (
                "host=h password='S3cr3t with spaces' user=u",
                "host=h password='****' user=u",
            ),
            (
                "host=h  password  =  'S3cr3t'   dbname=d",
                "host=h  password  =  '****'   dbname=d",
            ),
            (
                r"host=h password='S3cr3t \' still secret' user=u",
                "host=h password='****' user=u",
            ),
            (
                r"host=h password=S3cr3t\ still user=u",
                "host=h password=**** user=u",
            ),
            (
                "host=h PASSWORD=S3cr3t sslpassword='S3cr3t2' sslkey=/k.pem",
                "host=h PASSWORD=**** sslpassword='****' sslkey=****",
            ),
            ("host=h password='' user=u", "host=h password='' user=u"),
            // As libpq reads it: the value after `=` and spaces is `user=u`.
            ("host=h password= user=u", "host=h password= ****"),
            // Unparseable with a secret in it: masked whole.
            ("host=h password='S3cr3t", "****"),
            ("=S3cr3t password", "****"),
            // Nothing secret: unchanged.
            ("host=h user=u dbname=d", "host=h user=u dbname=d"),
            ("postgres://u@h/db", "postgres://u@h/db"),
        ];
        for (input, want) in cases {
            assert_eq!(pg(input), want, "{input}");
            let got = pg(input);
            assert!(!got.contains("S3cr3t"), "{input} -> {got}");
        }
        // Kafka and ClickHouse settings go through the same masking.
        assert_eq!(
            mask(
                "CDC_RELAY_KAFKA_BROKERS",
                "SASL_SSL://u:S3cr3t@k1:9093,k2:9093"
            ),
            "SASL_SSL://u:****@k1:9093,k2:9093"
        );
        assert_eq!(
            mask("CDC_RELAY_KAFKA_BROKERS", "k1:9092,k2:9092"),
            "k1:9092,k2:9092"
        );
        assert_eq!(
            mask(
                "CDC_RELAY_CLICKHOUSE_URL",
                "https://u:S3cr3t@h/?password=S3cr3t2"
            ),
            "https://u:****@h/?password=****"
        );
        assert_eq!(mask("CDC_RELAY_KAFKA_SASL_PASSWORD", "S3cr3t"), "****");
        assert_eq!(mask("CDC_RELAY_SOME_API_TOKEN", "S3cr3t"), "****");
        // File settings show the path (it is not the secret).
        assert_eq!(
            mask("CDC_RELAY_KAFKA_SSL_KEY_FILE", "/etc/k.pem"),
            "/etc/k.pem"
        );
        // Free text with a URL inside.
        assert_eq!(
            mask("CDC_RELAY_X", "see http://u:S3cr3t@h/x"),
            "see http://u:****@h/x"
        );
    }

    proptest::proptest! {
        /// Whatever surrounds it, a password in a URL's user info, in a secret query parameter or
        /// in a key=value string never survives masking.
        #[test]
        fn no_password_survives_masking(
            secret in "[A-Za-z0-9 '\\\\/?@#&=%:]{1,20}",
            user in "[a-z]{1,8}",
            form in 0usize..5,
        ) {
            let marker = format!("Zq{secret}Zq");
            let enc: String = marker.bytes().map(|b| format!("%{b:02X}")).collect();
            let quoted = marker.replace('\\', "\\\\").replace('\'', "\\'");
            let value = match form {
                0 => format!("postgres://{user}:{enc}@h:5432/db"),
                1 => format!("postgres://{user}@h/db?sslmode=require&password={enc}"),
                2 => format!("host=h user={user} password='{quoted}' dbname=d"),
                3 => format!("host=h password = '{quoted}'"),
                // Unencoded: with `=` as well it could pass for a query parameter.
                _ => format!("https://{user}:{}@h:8443/", marker.replace('=', "")),
            };
            let masked = mask("CDC_RELAY_PG_URL", &value);
            let raw = if form == 4 { marker.replace('=', "") } else { marker.clone() };
            proptest::prop_assert!(!masked.contains(&raw), "{} -> {}", value, masked);
            proptest::prop_assert!(!masked.contains(&enc), "{} -> {}", value, masked);
        }
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
