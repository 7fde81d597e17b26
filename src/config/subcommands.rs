//! The settings of each command, made of the connection groups and the command's own flags.

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{parse_millis, parse_secs};
use super::{ClickHouseArgs, KafkaArgs, KafkaSecurityArgs, Op, PostgresArgs, SinkKafkaArgs};

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

    /// Replication factor of the topic when it has to be created (default: min(3, live brokers), at
    /// least the brokers' default.replication.factor).
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

    /// The compacted topic of checkpoints (exactly-once checkpoints; which initial snapshots are
    /// done). Default: `<topic>.checkpoints` of the first table's topic.
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

    /// Tables without the ledger column: read each whole table once, on the first start and when
    /// the table is added to --table later, merged into the stream (`initial`), or stream only
    /// the changes from now on (`never`).
    #[arg(
        long,
        env = "CDC_RELAY_SNAPSHOT",
        value_enum,
        default_value = "initial"
    )]
    pub snapshot: SnapshotMode,

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

/// `--snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotMode {
    Initial,
    Never,
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
    pub kafka: SinkKafkaArgs,

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

    /// Longest wait, in seconds, for the schema record a message names to appear in
    /// `<topic>.schemas`; after it the message goes to the dead-letter topic.
    #[arg(long = "schema-wait-secs", env = "CDC_RELAY_SCHEMA_WAIT_SECS", default_value = "30", value_parser = parse_secs)]
    pub schema_wait: Duration,
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

    /// Replication factor of the topic when it has to be created (default: min(3, live brokers), at
    /// least the brokers' default.replication.factor).
    #[arg(long, env = "CDC_RELAY_TOPIC_REPLICATION")]
    pub topic_replication: Option<i32>,

    /// Topic that receives messages the sink cannot parse.
    #[arg(long, env = "CDC_RELAY_DLQ_TOPIC", default_value = "user_events.dlq")]
    pub dlq_topic: String,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,

    /// The sink's consumer group: verify waits until it has consumed what the snapshot saw.
    #[arg(long, env = "CDC_RELAY_GROUP", default_value = "user_logins_consumer")]
    pub group: String,

    /// Longest wait, in seconds, for the stream and the sink to deliver what a snapshot saw.
    #[arg(long = "wait-secs", env = "CDC_RELAY_VERIFY_WAIT_SECS", default_value = "300", value_parser = parse_secs)]
    pub wait_secs: Duration,

    /// Compare what ClickHouse holds now, without waiting for the stream and the sink (changes
    /// still on their way count as differences; for a stopped pipeline).
    #[arg(long)]
    pub no_wait: bool,

    /// Send what differs again (rows of missing and mismatched keys, deletes of extra keys) and
    /// verify again.
    #[arg(long)]
    pub repair: bool,

    /// Keys shown per kind of difference.
    #[arg(long, default_value_t = 10)]
    pub examples: usize,

    /// Serve the progress as Prometheus metrics on this address at /metrics.
    #[arg(long, env = "CDC_RELAY_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
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
