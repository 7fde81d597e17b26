//! `cdc-relay sink`: wires the Kafka consumer to the ClickHouse writer.
//!
//! Offsets are committed only after ClickHouse confirmed the insert of every message below them
//! (dead-lettered messages count once the dead-letter topic has them). A crash anywhere re-reads
//! from the last commit; re-inserted rows carry the same `_version` and collapse. A panic in the
//! insert task ends the sink with an error (exit 1) and commits nothing past the last stored batch.

mod batch;
mod generic;
mod metrics;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::commands::Error;
use crate::config::SinkArgs;
use crate::failpoints;
use crate::kafka::consumer::{Consumed, DeadLetters, KafkaConsumer};
use crate::kafka::schemas::SchemaRegistry;
use crate::kafka::topic::ensure_topic;
use crate::metrics::{Counter, Registry};
use crate::sink::clickhouse::batch::{
    fill_from_batch, fill_from_stored, keep_last_of_equal_versions,
};
use crate::sink::clickhouse::seed_columns::{self, SeedTable};
use crate::sink::clickhouse::table::GenericRow;
use crate::sink::clickhouse::tables::{GenericTables, GenericWriter};
use crate::sink::clickhouse::{schema, ClickHouseWriter, SinkError};

use batch::{parse, Batch, Parsed};
use metrics::{spawn_lag_probe, SinkMetrics};

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
    /// Every other table, from the schemas its messages name.
    tables: GenericTables,
    /// The schemas of each consumed topic, in the consumer's topic order.
    registries: Vec<SchemaRegistry>,
    /// The columns a user added to the seed's table.
    seed_table: SeedTable,
}

pub async fn run(args: SinkArgs, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let rx = shutdown.clone();
    let started = super::start_when_ready("the sink", &mut shutdown, || {
        prepare(args.clone(), rx.clone())
    })
    .await?;
    match started {
        Some(mut cmd) => cmd.run().await,
        None => Ok(()),
    }
}

/// Everything before the first message: the ClickHouse table, topics, the consumer. A service down
/// meanwhile (ClickHouse still starting, Kafka restarting) fails it as transient, and [`run`]
/// tries again.
async fn prepare(args: SinkArgs, shutdown: watch::Receiver<bool>) -> Result<SinkCommand, Error> {
    let ch = super::clickhouse_from_args(&args.clickhouse)?;
    let client = ch.client();
    let version = schema::server_version(&client, &ch.url).await?;
    let table = schema::ensure_schema(&client, &ch, version).await?;
    if table.unsigned_id {
        tracing::warn!(table = %ch.qualified_table(), "the table's id column is UInt64 (an earlier release's table): negative ids go to the dead-letter topic");
    }
    let writer = ClickHouseWriter::new(&ch);
    let watermark = writer.truncate_watermark().await?;
    tracing::info!(%version, table = %ch.qualified_table(), view = %ch.qualified_view(), truncated_below = watermark, "ClickHouse ready");

    let tables = GenericTables::new(&ch, version);
    let seed_table = SeedTable::new(&ch, version);

    let connection =
        super::kafka_connection(&args.kafka.kafka_brokers, &args.kafka.security).await?;
    let kafka = connection.client_config();
    let topics = &args.kafka.topics;
    // As `stream` and `setup` create them, whoever starts first: 3 partitions (1 for dead letters),
    // replication min(3, brokers).
    for topic in topics {
        ensure_topic(&kafka, topic, 3, None).await?;
    }
    ensure_topic(&kafka, &args.dlq_topic, 1, None).await?;
    let mut registries = Vec::with_capacity(topics.len());
    for topic in topics {
        let mut r = SchemaRegistry::new(&connection, topic)?;
        r.read_to_end().await;
        registries.push(r);
    }
    let consumer = KafkaConsumer::new(&connection, &args.group, topics)?;
    let dead_letters = DeadLetters::new(&connection, &args.dlq_topic)?;
    tracing::info!(topics = %topics.join(","), group = %args.group, dead_letters = %args.dlq_topic, "sink starting");

    let registry = Registry::default();
    let metrics = SinkMetrics::new(&registry);
    super::serve_metrics(&registry, args.metrics_addr).await?;
    if args.metrics_addr.is_some() {
        spawn_lag_probe(
            &connection,
            topics,
            &args.group,
            metrics.consumer_lag.clone(),
        );
    }
    Ok(SinkCommand {
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
        tables,
        registries,
        seed_table,
    })
}

impl SinkCommand {
    async fn run(&mut self) -> Result<(), Error> {
        let mut batch = Batch::new();
        loop {
            // A wait inside a message's handling may have seen the shutdown first (a watch
            // notifies once per receiver): the flag, not only the notification, ends the loop.
            if *self.shutdown.borrow() {
                break;
            }
            let deadline = batch.deadline;
            let room = batch.len() < self.args.batch_rows;
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
                msg = self.consumer.recv_parsed(|p| parse(p, unsigned_id), Parsed::decided_later), if room => {
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
            if batch.len() >= self.args.batch_rows && !self.flush(&mut batch).await {
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
            Ok(Parsed::Row(m)) => {
                if !self.seed_message(&msg, m, batch).await? {
                    return Ok(()); // shutting down: not marked, so read again next time
                }
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
            Ok(Parsed::Columns(event)) => {
                if !self.columns_message(&msg, *event, batch).await? {
                    return Ok(()); // shutting down: not marked, so read again next time
                }
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
                let mut added: Vec<String> = rest
                    .iter()
                    .flat_map(|u| u.cols.iter())
                    .filter(|c| seed_columns::is_added(c))
                    .cloned()
                    .collect();
                added.sort_unstable();
                added.dedup();
                let below = rest
                    .iter()
                    .map(|u| batch.rows[u.idx].row._version)
                    .max()
                    .unwrap_or(0);
                let Some(stored) = self
                    .retry("reading values an update left unchanged", || {
                        writer.rows_below(&ids, &added, below)
                    })
                    .await
                else {
                    return false;
                };
                fill_from_stored(&mut batch.rows, &rest, &stored);
            }
        }
        keep_last_of_equal_versions(&mut batch.rows);
        if !self.complete_generic(batch).await {
            return false;
        }
        let batch = std::mem::replace(batch, Batch::new());
        let (writer, generic, metrics, shutdown) = (
            self.writer.clone(),
            self.tables.writer().clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        );
        let rows = batch.rows;
        let tables: Vec<(String, Vec<GenericRow>)> = batch
            .tables
            .into_iter()
            .map(|(name, t)| (name, t.rows))
            .collect();
        let count = rows.len() + tables.iter().map(|(_, r)| r.len()).sum::<usize>();
        let task = tokio::spawn(async move {
            failpoints::panic_if_armed(failpoints::SINK_INSERT_PANIC);
            insert_all(&writer, &generic, &metrics, shutdown, &rows, &tables).await
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

/// Inserts the seed's rows, then each table's, each retried until ClickHouse confirms it (an
/// insert that landed is not repeated for another table's failure). `None` if shutdown came first.
async fn insert_all(
    writer: &ClickHouseWriter,
    generic: &GenericWriter,
    metrics: &SinkMetrics,
    shutdown: watch::Receiver<bool>,
    rows: &[crate::sink::clickhouse::SeedRow],
    tables: &[(String, Vec<GenericRow>)],
) -> Option<()> {
    let record = |started: Instant, n: usize| {
        metrics.insert_seconds.record(started.elapsed());
        metrics.batches.inc();
        metrics.rows_inserted.add(n as u64);
        tracing::debug!(rows = n, "batch inserted");
    };
    if !rows.is_empty() {
        let started = Instant::now();
        retry(
            "inserting into ClickHouse",
            &metrics.retries,
            shutdown.clone(),
            || writer.insert(rows),
        )
        .await?;
        record(started, rows.len());
    }
    for (table, rows) in tables {
        let started = Instant::now();
        retry(
            "inserting into ClickHouse",
            &metrics.retries,
            shutdown.clone(),
            || generic.insert(table, rows),
        )
        .await?;
        record(started, rows.len());
    }
    Some(())
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
    handled: BTreeMap<(usize, i32), i64>,
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
