//! `cdc-relay sink`: wires the Kafka consumer to the ClickHouse writer.
//!
//! Offsets are committed only after ClickHouse confirmed the insert of every message below them
//! (dead-lettered messages count once the dead-letter topic has them). A crash anywhere re-reads
//! from the last commit; re-inserted rows carry the same `_version` and collapse. A panic in the
//! insert task ends the sink with an error (exit 1) and commits nothing past the last stored batch.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::commands::Error;
use crate::config::SinkArgs;
use crate::event::{ChangeEvent, Op};
use crate::failpoints;
use crate::kafka::consumer::{Consumed, DeadLetters, KafkaConsumer};
use crate::kafka::inspect;
use crate::kafka::topic::ensure_topic;
use crate::kafka::KafkaConnection;
use crate::metrics::{Counter, Gauge, Registry, Seconds};
use crate::sink::clickhouse::batch::{
    fill_from_batch, fill_from_stored, keep_last_of_equal_versions, Unfilled,
};
use crate::sink::clickhouse::{schema, ClickHouseWriter, SinkError, UserLoginRow};

struct Batch {
    rows: Vec<UserLoginRow>,
    /// Rows whose update left TOASTed columns out (index into `rows`, the columns).
    unchanged: Vec<Unfilled>,
    /// Highest handled offset per partition.
    handled: BTreeMap<i32, i64>,
    deadline: Option<Instant>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            rows: Vec::new(),
            unchanged: Vec::new(),
            handled: BTreeMap::new(),
            deadline: None,
        }
    }

    fn mark(&mut self, msg: &Consumed, interval: Duration) {
        let e = self.handled.entry(msg.partition).or_insert(msg.offset);
        *e = (*e).max(msg.offset);
        self.deadline
            .get_or_insert_with(|| Instant::now() + interval);
    }

    fn is_empty(&self) -> bool {
        self.handled.is_empty()
    }
}

/// What `sink` exports at /metrics.
#[derive(Clone)]
struct SinkMetrics {
    messages: Counter,
    bytes: Counter,
    rows_inserted: Counter,
    batches: Counter,
    insert_seconds: Seconds,
    dead_lettered: Counter,
    retries: Counter,
    commits: Counter,
    consumer_lag: Gauge,
}

impl SinkMetrics {
    fn new(r: &Registry) -> Self {
        SinkMetrics {
            messages: r.counter("sink_messages_total", "Messages consumed from Kafka."),
            bytes: r.counter("sink_bytes_total", "Payload bytes consumed."),
            rows_inserted: r.counter("sink_rows_inserted_total", "Rows inserted into ClickHouse."),
            batches: r.counter("sink_batches_total", "ClickHouse inserts."),
            insert_seconds: r.seconds(
                "sink_insert_seconds_total",
                "Time spent in ClickHouse inserts.",
            ),
            dead_lettered: r.counter(
                "sink_dead_lettered_total",
                "Messages sent to the dead-letter topic.",
            ),
            retries: r.counter(
                "sink_retries_total",
                "Retried operations (inserts, dead letters, truncates).",
            ),
            commits: r.counter("sink_commits_total", "Offset commits."),
            consumer_lag: r.gauge(
                "sink_consumer_lag",
                "Messages of the topic the group has not committed.",
            ),
        }
    }
}

struct SinkCommand {
    metrics: SinkMetrics,
    args: SinkArgs,
    consumer: KafkaConsumer,
    dead_letters: DeadLetters,
    writer: ClickHouseWriter,
    shutdown: watch::Receiver<bool>,
    dead_lettered: u64,
    inserted: u64,
    pending: Option<PendingInsert>,
    /// An insert gave up (shutdown) or failed: no later batch may be committed past its rows.
    gave_up: bool,
    /// Why the insert task failed (a panic): the sink then ends with an error.
    failed: Option<String>,
    /// The table's id column is UInt64 (a table of an earlier release).
    unsigned_id: bool,
    /// The highest truncate version this sink knows of: rows below it are gone.
    watermark: u64,
}

pub async fn run(args: SinkArgs, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let ch = super::clickhouse_from_args(&args.clickhouse)?;
    let client = ch.client();
    // ClickHouse may still be starting: wait for it rather than exit.
    let mut backoff = Backoff::new();
    let version = loop {
        match schema::server_version(&client, &ch.url).await {
            Ok(v) => break v,
            Err(e) if !e.is_transient() => return Err(e.into()),
            Err(e) => {
                let pause = backoff.next_pause();
                tracing::warn!(error = %e, retry_in = ?pause, "ClickHouse not reachable yet");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    };
    let table = schema::ensure_schema(&client, &ch, version).await?;
    if table.unsigned_id {
        tracing::warn!(table = %ch.qualified_table(), "the table's id column is UInt64 (an earlier release's table): negative ids go to the dead-letter topic");
    }
    let writer = ClickHouseWriter::new(&ch);
    let watermark = writer.truncate_watermark().await?;
    tracing::info!(%version, table = %ch.qualified_table(), view = %ch.qualified_view(), truncated_below = watermark, "ClickHouse ready");

    let connection =
        super::kafka_connection(&args.kafka.kafka_brokers, &args.kafka.security).await?;
    let kafka = connection.client_config();
    // As `stream` and `setup` create them, whoever starts first: 3 partitions (1 for dead letters),
    // replication min(3, brokers).
    ensure_topic(&kafka, &args.kafka.topic, 3, None).await?;
    ensure_topic(&kafka, &args.dlq_topic, 1, None).await?;
    let consumer = KafkaConsumer::new(&connection, &args.group, &args.kafka.topic)?;
    let dead_letters = DeadLetters::new(&connection, &args.dlq_topic)?;
    tracing::info!(topic = %args.kafka.topic, group = %args.group, dead_letters = %args.dlq_topic, "sink starting");

    let registry = Registry::default();
    let metrics = SinkMetrics::new(&registry);
    super::serve_metrics(&registry, args.metrics_addr).await?;
    if args.metrics_addr.is_some() {
        spawn_lag_probe(&args, &connection, metrics.consumer_lag.clone());
    }
    let mut cmd = SinkCommand {
        metrics,
        writer,
        args,
        consumer,
        dead_letters,
        shutdown,
        dead_lettered: 0,
        inserted: 0,
        pending: None,
        gave_up: false,
        failed: None,
        unsigned_id: table.unsigned_id,
        watermark,
    };
    cmd.run().await
}

impl SinkCommand {
    async fn run(&mut self) -> Result<(), Error> {
        let mut batch = Batch::new();
        loop {
            let deadline = batch.deadline;
            let room = batch.rows.len() < self.args.batch_rows;
            let unsigned_id = self.unsigned_id;
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                // Commit as soon as an insert lands, not only when the next batch is due: an idle
                // sink must not sit on uncommitted offsets.
                result = insert_done(&mut self.pending) => {
                    if !self.complete_insert(result).await {
                        break;
                    }
                }
                msg = self.consumer.recv_parsed(|p| parse(p, unsigned_id)), if room => {
                    match msg {
                        Ok((msg, parsed)) => self.handle(msg, parsed, &mut batch).await?,
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                _ = sleep_until_opt(deadline) => {
                    if !self.flush(&mut batch).await {
                        break;
                    }
                }
            }
            if batch.rows.len() >= self.args.batch_rows && !self.flush(&mut batch).await {
                break;
            }
        }
        if self.flush(&mut batch).await {
            self.finish_insert().await;
        }
        tracing::info!(
            inserted = self.inserted,
            dead_lettered = self.dead_lettered,
            "sink stopped"
        );
        match self.failed.take() {
            Some(why) => Err(SinkError::InsertTask(why).into()),
            None => Ok(()),
        }
    }

    async fn handle(
        &mut self,
        msg: Consumed,
        parsed: Result<Parsed, String>,
        batch: &mut Batch,
    ) -> Result<(), Error> {
        self.metrics.messages.inc();
        self.metrics.bytes.add(msg.len as u64);
        match parsed {
            Ok(Parsed::Row(row, unchanged, moved_from)) => {
                if !unchanged.is_empty() {
                    batch.unchanged.push(Unfilled {
                        idx: batch.rows.len(),
                        cols: unchanged,
                        from: moved_from.unwrap_or(row.id),
                    });
                }
                batch.rows.push(row);
            }
            Ok(Parsed::Truncate { version }) => {
                // Everything before the truncate must be stored before it applies.
                if !self.flush(batch).await || !self.finish_insert().await {
                    return Ok(());
                }
                let writer = &self.writer;
                let applied = self
                    .retry("applying a truncate", || writer.truncate_before(version))
                    .await;
                if applied.is_none() {
                    return Ok(()); // shutting down: not marked, so read again next time
                }
                self.watermark = self.watermark.max(version);
            }
            Err(reason) => {
                if !self.dead_letter(&msg, &reason).await {
                    return Ok(());
                }
            }
        }
        batch.mark(&msg, self.args.batch_interval);
        Ok(())
    }

    /// `false` if shutdown interrupted it: the message is then not marked handled.
    async fn dead_letter(&mut self, msg: &Consumed, reason: &str) -> bool {
        self.dead_lettered += 1;
        self.metrics.dead_lettered.inc();
        let n = self.dead_lettered;
        // Logged without flooding: the first ten, then at powers of two.
        if n <= 10 || n.is_power_of_two() {
            tracing::warn!(partition = msg.partition, offset = msg.offset, error = reason, dead_lettered_total = n, topic = %self.dead_letters.topic(), "message sent to the dead-letter topic");
        }
        let dl = &self.dead_letters;
        self.retry("writing to the dead-letter topic", || dl.send(msg, reason))
            .await
            .is_some()
    }

    async fn retry<T, F, Fut, E>(&self, what: &str, op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        retry(what, &self.metrics.retries, self.shutdown.clone(), op).await
    }

    /// Starts inserting the batch while the next one fills; commits the previous batch's offsets
    /// first. `false` if it gave up because of shutdown.
    async fn flush(&mut self, batch: &mut Batch) -> bool {
        if batch.is_empty() {
            return true;
        }
        // One insert at a time, in order: the previous one must be stored before this batch is
        // completed from stored rows (unchanged TOAST columns) and before its offsets are committed.
        if !self.finish_insert().await {
            return false;
        }
        let writer = &self.writer;
        if !batch.unchanged.is_empty() {
            let unchanged = std::mem::take(&mut batch.unchanged);
            let rest = fill_from_batch(&mut batch.rows, unchanged, self.watermark);
            if !rest.is_empty() {
                let mut ids: Vec<i64> = rest.iter().map(|u| u.from).collect();
                ids.sort_unstable();
                ids.dedup();
                let below = rest
                    .iter()
                    .map(|u| batch.rows[u.idx]._version)
                    .max()
                    .unwrap_or(0);
                let Some(stored) = self
                    .retry("reading values an update left unchanged", || {
                        writer.rows_below(&ids, below)
                    })
                    .await
                else {
                    return false;
                };
                fill_from_stored(&mut batch.rows, &rest, &stored);
            }
        }
        keep_last_of_equal_versions(&mut batch.rows);
        let batch = std::mem::replace(batch, Batch::new());
        let (writer, metrics, shutdown) = (
            self.writer.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        );
        let rows = batch.rows;
        let count = rows.len();
        let task = tokio::spawn(async move {
            failpoints::panic_if_armed(failpoints::SINK_INSERT_PANIC);
            let started = Instant::now();
            let done = retry(
                "inserting into ClickHouse",
                &metrics.retries,
                shutdown,
                || writer.insert(&rows),
            )
            .await;
            if done.is_some() {
                metrics.insert_seconds.record(started.elapsed());
                metrics.batches.inc();
                metrics.rows_inserted.add(rows.len() as u64);
                tracing::debug!(rows = rows.len(), "batch inserted");
            }
            done
        });
        self.pending = Some(PendingInsert {
            task,
            rows: count,
            handled: batch.handled,
        });
        true
    }

    /// Waits for the insert in flight, then commits its offsets. `false` if it gave up because of
    /// shutdown (the offsets stay uncommitted; the rows are read again next time).
    async fn finish_insert(&mut self) -> bool {
        if self.gave_up {
            return false;
        }
        if self.pending.is_none() {
            return true;
        }
        let result = insert_done(&mut self.pending).await;
        self.complete_insert(result).await
    }

    /// Commits the offsets of the insert that just ended (`result`), unless it gave up or failed.
    async fn complete_insert(&mut self, result: InsertResult) -> bool {
        let Some(pending) = self.pending.take() else {
            return true;
        };
        match result {
            Ok(Some(())) => {}
            Ok(None) => {
                self.gave_up = true;
                return false;
            }
            Err(e) => {
                // A panic is a bug: stop, commit nothing more, exit non-zero. The next start reads
                // these rows again.
                tracing::error!(error = %e, "the insert task failed");
                self.gave_up = true;
                self.failed = Some(e.to_string());
                return false;
            }
        }
        failpoints::hit(failpoints::SINK_AFTER_INSERT);
        self.inserted += pending.rows as u64;
        self.metrics.commits.inc();
        if let Err(e) = self.consumer.commit(&pending.handled).await {
            // Not fatal: the rows are stored; a later commit covers them, or they are re-read and
            // collapse with the stored versions.
            tracing::warn!(error = %e, "offset commit failed");
        }
        true
    }
}

/// What one message means to the sink.
enum Parsed {
    /// The row to store, the columns the change left out (unchanged TOAST values), and the id a
    /// key update moved the row from.
    Row(UserLoginRow, Vec<String>, Option<i64>),
    /// Hide every row stored before this version.
    Truncate { version: u64 },
}

/// A message as the sink uses it; `Err` sends it to the dead-letter topic with the reason.
/// `unsigned_id`: the table's id is UInt64, so a negative id cannot be stored.
fn parse(payload: &[u8], unsigned_id: bool) -> Result<Parsed, String> {
    let (mut event, micros) =
        ChangeEvent::from_json_with_time(payload).map_err(|e| e.to_string())?;
    if event.op == Op::Truncate {
        return Ok(Parsed::Truncate {
            version: event.version,
        });
    }
    let unchanged = std::mem::take(&mut event.unchanged);
    let moved_from = event
        .moved_from
        .as_ref()
        .and_then(crate::event::RowKey::as_int);
    let row = UserLoginRow::from_parts(event, micros).map_err(|e| e.to_string())?;
    row.check_storable(unsigned_id).map_err(|e| e.to_string())?;
    Ok(Parsed::Row(row, unchanged, moved_from))
}

type InsertResult = Result<Option<()>, tokio::task::JoinError>;

/// The end of the insert in flight; never, without one. Cancel-safe: the task keeps running.
async fn insert_done(pending: &mut Option<PendingInsert>) -> InsertResult {
    match pending {
        Some(p) => (&mut p.task).await,
        None => std::future::pending().await,
    }
}

/// An insert running while the next batch fills.
struct PendingInsert {
    /// `None` if it gave up because of shutdown.
    task: tokio::task::JoinHandle<Option<()>>,
    rows: usize,
    handled: BTreeMap<i32, i64>,
}

/// Retries `op` with backoff until it succeeds or shutdown is asked for (then gives up; the offsets
/// of the unfinished work are not committed, so nothing is lost).
async fn retry<T, F, Fut, E>(
    what: &str,
    retries: &Counter,
    mut shutdown: watch::Receiver<bool>,
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::new();
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                let pause = backoff.next_pause();
                retries.inc();
                tracing::warn!(error = %e, retry_in = ?pause, "{what} failed; retrying");
                if *shutdown.borrow() {
                    return None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return None,
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Refreshes the consumer-lag gauge every 10 s (watermarks and committed offsets, off the runtime).
fn spawn_lag_probe(args: &SinkArgs, connection: &KafkaConnection, gauge: Gauge) {
    let (connection, topic, group) = (
        connection.clone(),
        args.kafka.topic.clone(),
        args.group.clone(),
    );
    tokio::spawn(async move {
        loop {
            let (c, t, g) = (connection.clone(), topic.clone(), group.clone());
            if let Ok(Ok(parts)) =
                tokio::task::spawn_blocking(move || inspect::group_lag(&c, &t, &g)).await
            {
                gauge.set(parts.iter().map(|p| p.lag).sum());
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
}
