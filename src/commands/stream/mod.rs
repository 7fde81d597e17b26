//! `cdc-relay stream`: wires the PostgreSQL source to the Kafka producer and carries acknowledgements
//! back to the ledger and the slot.
//!
//! Order of truth, per change: produced → acknowledged by Kafka → `sent_to_kafka = TRUE` (ledger) →
//! the slot's confirmed position passes its transaction. Acknowledgements are handled strictly in the
//! order the changes were read, so a confirmed position never jumps over an unacknowledged change.

use std::time::{Duration, Instant};

use tokio::sync::watch;

mod backfill;
mod exactly_once;
mod failover;
mod housekeeping;
mod identity;
mod ledger_writer;
mod metrics;
mod produce;
mod snapshot;
mod tracker;

use backfill::{BackfillMsg, BackfillRun};
use exactly_once::{ExactlyOnce, SessionStart};
use ledger_writer::LedgerWriter;
use metrics::StreamMetrics;
use tracker::Tracker;

use crate::backoff::Backoff;
use crate::commands::Error;
use crate::config::{LedgerOrigin, SnapshotMode, StreamArgs};
use crate::event::{schemas_topic, Lsn};
use crate::kafka::inspect;
use crate::kafka::producer::{KafkaProducer, ProducerConfig};
use crate::kafka::topic::{ensure_topic, ensure_topic_with};
use crate::kafka::{KafkaConnection, KafkaError};
use crate::metrics::Registry;
use crate::source::postgres::client::{ReplicationClient, SystemIdentity};
use crate::source::postgres::stream::{ReplicationSource, SourceMessage};
use crate::source::postgres::{catalog, origin};
use crate::source::postgres::{SourceConfig, SourceError, TableId, TableSpec};

/// Why a streaming session ended.
enum SessionEnd {
    Shutdown,
    /// Connection lost, Kafka failing: reconnect from the confirmed position after a pause.
    Retry(String),
    /// Something an operator must mend: what was acknowledged is written first, then the stream
    /// exits with this.
    Stop(SourceError),
}

/// Whether rows marked unsent still have to be read (after the stream caught up).
#[derive(Clone, Copy, PartialEq, Eq)]
enum BackfillState {
    Pending,
    Done,
}

struct StreamCommand {
    metrics: StreamMetrics,
    args: StreamArgs,
    cfg: SourceConfig,
    /// Each table's topic, by [`TableId`].
    topics: Vec<String>,
    /// Exactly-once checkpoints and the snapshot records.
    checkpoint_topic: String,
    connection: KafkaConnection,
    /// Tables without the ledger whose initial snapshot is still to be read.
    snapshot_pending: Vec<TableId>,
    /// Candidates whose records are still to be read (the first session does).
    snapshot_unresolved: Vec<TableId>,
    /// Exactly-once: snapshots recorded done in the open transaction, done once it commits.
    snapshot_uncommitted: Vec<TableId>,
    /// Snapshots whose every row was produced, with the delivery boundary after their last row:
    /// recorded done once Kafka acknowledged everything below it.
    snapshot_produced: Vec<(TableId, u64)>,
    producer: KafkaProducer,
    /// For heartbeats and retention checks (the ledger has its own session).
    sql: Option<tokio_postgres::Client>,
    shutdown: watch::Receiver<bool>,
    dead_lettered: u64,
    /// `--exactly-once`: Kafka transactions and checkpoints.
    eo: Option<ExactlyOnce>,
    /// The server and timeline the last replication connection reached (a change: a failover).
    server: Option<SystemIdentity>,
    /// The tables' identity records were read (identity.rs).
    identities_resolved: bool,
    /// The checkpoint topic was new: the tables' identity records are still to be written.
    identities_unrecorded: bool,
    /// Tables created again under their name since their identity was recorded: truncated and
    /// read whole at every session start until that read is acknowledged (identity.rs).
    recreated: Vec<TableId>,
}

pub async fn run(args: StreamArgs, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let rx = shutdown.clone();
    let started = super::start_when_ready("the stream", &mut shutdown, || {
        prepare(args.clone(), rx.clone())
    })
    .await?;
    match started {
        Some((mut cmd, client, start)) => cmd.run_sessions(client, start).await,
        None => Ok(()),
    }
}

/// Everything before the first session: checks, topics, the producer, the slot. A service down
/// meanwhile fails it as transient, and [`run`] tries again.
async fn prepare(
    args: StreamArgs,
    shutdown: watch::Receiver<bool>,
) -> Result<(StreamCommand, Option<ReplicationClient>, Lsn), Error> {
    let ops = super::publish_ops(&args.ops);
    let mut cfg = super::source_config(&args.postgres, ops)?;
    let sql = cfg.connect_sql().await?;
    catalog::preflight(&mut cfg, &sql).await?;
    catalog::ensure_publication(&cfg, &sql).await?;
    catalog::check_publication(&cfg, &sql).await?;
    let connection =
        super::kafka_connection(&args.kafka.kafka_brokers, &args.kafka.security).await?;
    let kafka = connection.client_config();
    let topics = super::table_topics(&cfg, &args.kafka)?;
    let first_topic = topics[0].clone();
    let mut partitions = Vec::new();
    for topic in distinct(&topics) {
        partitions.push(
            ensure_topic(&kafka, topic, args.topic_partitions, args.topic_replication).await?,
        );
        // The tables' schema records, which the messages name by id: compacted, so the newest
        // record of every id stays however long the topic runs.
        ensure_topic_with(
            &kafka,
            &schemas_topic(topic),
            1,
            args.topic_replication,
            &[("cleanup.policy", "compact")],
        )
        .await?;
    }
    let dead_letter_topic = args
        .stream_dlq_topic
        .clone()
        .unwrap_or_else(|| format!("{first_topic}.stream-dlq"));
    ensure_topic(&kafka, &dead_letter_topic, 1, args.topic_replication).await?;
    let checkpoint_topic = args
        .checkpoint_topic
        .clone()
        .unwrap_or_else(|| format!("{first_topic}.checkpoints"));
    // A checkpoint topic created now holds no identity records: nothing to read (identity.rs).
    let had_checkpoints = crate::kafka::topic::topic_exists(&kafka, &checkpoint_topic)?;
    let checkpoint_partitions = ensure_topic_with(
        &kafka,
        &checkpoint_topic,
        1,
        args.topic_replication,
        &[("cleanup.policy", "compact")],
    )
    .await?;
    if checkpoint_partitions != 1 {
        return Err(Error::Config(format!(
            "checkpoint topic {checkpoint_topic} has {checkpoint_partitions} partitions; it needs exactly one (delete it, or name another with --checkpoint-topic)"
        )));
    }
    let eo = if args.exactly_once {
        Some(ExactlyOnce::new(
            &cfg.database(),
            &args.postgres.slot,
            checkpoint_topic.clone(),
            connection.clone(),
            args.transaction_max_changes,
            args.transaction_max_ms,
            cfg.tables.iter().map(TableSpec::name).collect(),
        ))
    } else {
        None
    };
    let producer = KafkaProducer::new(&ProducerConfig {
        connection: connection.clone(),
        topics: topics.clone(),
        dead_letter_topic,
        queue_messages: args.max_in_flight + args.backfill_chunk as usize + 1000,
        transactional_id: args
            .exactly_once
            .then(|| exactly_once::transactional_id(&cfg.database(), &args.postgres.slot)),
    })
    .await?;
    tracing::info!(tables = %cfg.table_names(), topics = %topics.join(", "), ?partitions, slot = %cfg.slot, dead_letters = %producer.dead_letter_topic(), max_message_bytes = producer.limit(), "stream starting");

    let mut slot = catalog::slot_info(&cfg, &sql).await?;
    if let Some(info) = &slot {
        if let Err(e @ SourceError::SlotLost { .. }) = catalog::check_slot(&cfg, info) {
            if !args.recreate_slot {
                return Err(e.into());
            }
            tracing::warn!(slot = %cfg.slot, "replacing the lost slot (--recreate-slot)");
            catalog::drop_slot(&cfg, &sql).await?;
            slot = None;
        }
    } else if !args.recreate_slot {
        // No slot, but the topic already carries our events: the slot existed and was dropped.
        // A new one would start from now and silently skip what happened in between.
        for topic in distinct(&topics) {
            let (c, t) = (connection.clone(), topic.clone());
            let fed_before =
                tokio::task::spawn_blocking(move || inspect::holds_relay_events(&c, &t))
                    .await
                    .map_err(|e| Error::Config(format!("inspecting the topic failed: {e}")))??;
            if fed_before {
                return Err(SourceError::SlotLost {
                    slot: cfg.slot.clone(),
                    reason: format!(
                        "it does not exist, but topic {topic} already holds events streamed from it"
                    ),
                }
                .into());
            }
        }
    }
    // Either way the unsent rows are backfilled once the stream has caught up, in short chunks
    // merged into the stream (source/postgres/backfill.rs): no snapshot is held open for the
    // whole backfill, so DDL issued meanwhile never waits long.
    let (client, start) = match slot {
        Some(info) => {
            catalog::check_slot(&cfg, &info)?;
            tracing::info!(slot = %cfg.slot, confirmed = ?info.confirmed_flush.map(|l| l.to_string()), "resuming from existing slot");
            catalog::ensure_failover(&cfg, &info).await;
            (None, Lsn::ZERO)
        }
        None => {
            let (client, created) = catalog::create_slot(&cfg).await?;
            (Some(client), created.consistent_point)
        }
    };

    // Tables without the ledger to read whole: all of them with a new slot (whatever earlier
    // slots recorded); with an existing one, those not recorded done (one added to --table
    // later), looked up at the first session (after exactly-once fenced an older producer, whose
    // open transaction would hold a read_committed reader back).
    let candidates: Vec<TableId> = match args.snapshot {
        SnapshotMode::Never => Vec::new(),
        SnapshotMode::Initial => (0..cfg.tables.len())
            .filter(|&t| cfg.tables[t].ledger_column.is_none())
            .collect(),
    };
    let (snapshot_pending, snapshot_unresolved) = match client {
        Some(_) => (candidates, Vec::new()),
        None => (Vec::new(), candidates),
    };
    // After the slot: the origin goes with it, and is dropped when found without one.
    cfg.ledger_origin =
        origin::ledger_origin(&cfg, &sql, args.ledger_origin == LedgerOrigin::Auto).await;
    let registry = Registry::default();
    let metrics = StreamMetrics::new(&registry);
    metrics
        .ledger_origin
        .set(i64::from(cfg.ledger_origin.is_some()));
    super::serve_metrics(&registry, args.metrics_addr).await?;
    let mut cmd = StreamCommand {
        metrics,
        args,
        cfg,
        topics,
        checkpoint_topic,
        connection,
        snapshot_pending,
        snapshot_unresolved,
        snapshot_produced: Vec::new(),
        snapshot_uncommitted: Vec::new(),
        producer,
        sql: Some(sql),
        shutdown,
        dead_lettered: 0,
        eo,
        server: None,
        identities_resolved: false,
        identities_unrecorded: false,
        recreated: Vec::new(),
    };
    if cmd.eo.is_none() && had_checkpoints {
        // Before the slot is active: the first session then reads changes at once. (With
        // exactly-once, after the session fenced an older producer, whose open transaction would
        // hold this read_committed read back.)
        cmd.resolve_identities().await?;
        cmd.identities_resolved = true;
    } else if !had_checkpoints {
        // A new checkpoint topic: the tables are as they are now; recorded in the first session.
        cmd.identities_resolved = true;
        cmd.identities_unrecorded = true;
    }
    Ok((cmd, client, start))
}

impl StreamCommand {
    async fn run_sessions(
        &mut self,
        mut client: Option<ReplicationClient>,
        start: Lsn,
    ) -> Result<(), Error> {
        let mut confirmed = start;
        // Unsent rows of the tables with the ledger, whole tables still to snapshot.
        let mut backfill = if !self.backfill_tables().is_empty() {
            BackfillState::Pending
        } else {
            BackfillState::Done
        };
        let mut backoff = Backoff::new();
        loop {
            let session_start = Instant::now();
            let result = self
                .session(client.take(), &mut confirmed, &mut backfill)
                .await;
            match result {
                Ok(SessionEnd::Shutdown) => {
                    tracing::info!(confirmed = %confirmed, "stream stopped cleanly");
                    return Ok(());
                }
                Ok(SessionEnd::Retry(why)) => {
                    self.metrics.restarts.inc();
                    if session_start.elapsed() > Duration::from_secs(60) {
                        backoff.reset();
                    }
                    let pause = backoff.next_pause();
                    tracing::warn!(reason = %why, retry_in = ?pause, confirmed = %confirmed, "stream interrupted; reconnecting");
                    if self.sleep_or_shutdown(pause).await {
                        return Ok(());
                    }
                }
                Ok(SessionEnd::Stop(e)) => return Err(e.into()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sleeps; `true` if shutdown was asked for meanwhile.
    async fn sleep_or_shutdown(&mut self, pause: Duration) -> bool {
        if *self.shutdown.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => false,
            _ = self.shutdown.changed() => true,
        }
    }

    /// One replication connection's life. Transient trouble ends it with `Retry` after everything
    /// acknowledged so far is written to the ledger; the caller reconnects from `confirmed`.
    async fn session(
        &mut self,
        client: Option<ReplicationClient>,
        confirmed: &mut Lsn,
        backfill_state: &mut BackfillState,
    ) -> Result<SessionEnd, Error> {
        let client = match self
            .replication_client(client, confirmed, backfill_state)
            .await
        {
            Ok(c) => c,
            Err(e) if e.is_transient() => return Ok(SessionEnd::Retry(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let mut source = match ReplicationSource::start(&self.cfg, client, *confirmed).await {
            Ok(s) => s,
            Err(e) if e.is_transient() => return Ok(SessionEnd::Retry(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        if let Some(eo) = self.eo.as_mut() {
            match eo.start(&self.producer, &self.cfg).await {
                Ok(()) => {}
                Err(SessionStart::Kafka(e @ KafkaError::Fatal(_))) => return Err(e.into()),
                Err(SessionStart::Kafka(e)) => return Ok(SessionEnd::Retry(e.to_string())),
                Err(SessionStart::Source(e)) if e.is_transient() => {
                    return Ok(SessionEnd::Retry(e.to_string()))
                }
                Err(SessionStart::Source(e)) => return Err(e.into()),
            }
        }
        if !self.snapshot_unresolved.is_empty() {
            match self.resolve_snapshots().await {
                Ok(()) if self.snapshot_pending.is_empty() => {}
                Ok(()) => *backfill_state = BackfillState::Pending,
                Err(e @ KafkaError::Fatal(_)) => return Err(e.into()),
                Err(e) => return Ok(SessionEnd::Retry(e.to_string())),
            }
        }
        if !self.identities_resolved {
            match self.resolve_identities().await {
                Ok(()) => self.identities_resolved = true,
                Err(e @ KafkaError::Fatal(_)) => return Err(e.into()),
                Err(e) => return Ok(SessionEnd::Retry(e.to_string())),
            }
        }
        let mut truncated = Vec::new();
        if !self.recreated.is_empty() {
            match self.truncate_recreated().await {
                Ok(versions) => {
                    truncated = versions;
                    *backfill_state = BackfillState::Pending;
                }
                Err(e) if e.is_transient() => return Ok(SessionEnd::Retry(e.to_string())),
                Err(e) => return Err(e),
            }
        }
        let mut t = Tracker::new(*confirmed, self.eo.is_some());
        let mut ledger = LedgerWriter::start(&self.cfg);
        let mut backfill = BackfillRun::default();
        for (table, version) in truncated {
            backfill.note_from(table, version);
        }
        if *backfill_state == BackfillState::Pending {
            backfill.note_early(&self.backfill_tables());
        }
        // The backfill starts once the stream has passed this marker, written now: rows the stream
        // still has to deliver are then not read twice.
        let mut catch_up_at = None;
        if *backfill_state == BackfillState::Pending {
            match self.heartbeat().await {
                Ok(lsn) => catch_up_at = Some(lsn),
                Err(e) if e.is_transient() => return Ok(SessionEnd::Retry(e.to_string())),
                Err(e) => return Err(e.into()),
            }
        }

        let max_in_flight = self.args.max_in_flight.max(1);
        let ledger_batch = self.args.ledger_batch.max(1);
        let mut ledger_tick = tokio::time::interval(self.args.ledger_interval);
        let mut status_tick = tokio::time::interval(Duration::from_secs(5));
        let mut heartbeat_tick = tokio::time::interval(self.args.heartbeat_interval);
        heartbeat_tick.reset();
        let mut reported = *confirmed;
        let mut retention_checks = 0u64;

        // Set on shutdown while a transaction is half read: reading goes on until its Commit (or
        // this deadline), so a clean stop leaves nothing to replay.
        let mut stopping: Option<Instant> = None;
        let end = loop {
            if let Some(deadline) = stopping {
                if !source.in_transaction() || Instant::now() > deadline {
                    break SessionEnd::Shutdown;
                }
            }
            // Caught up once the stream has read past the marker: the rows it delivered are in the
            // window's seed until the ledger has them, so none is read twice.
            if catch_up_at.is_some_and(|at| t.read_upto >= at) && stopping.is_none() {
                catch_up_at = None;
                tracing::info!("stream caught up; backfilling rows still marked unsent");
                let hold = self.eo.is_some();
                let tables = self.backfill_tables();
                backfill.start(&self.cfg, tables, self.args.backfill_chunk, hold);
            }
            if let Err(e) = self.record_done_snapshots(&t).await {
                if matches!(e, KafkaError::Fatal(_)) {
                    return Err(e.into());
                }
                break SessionEnd::Retry(e.to_string());
            }
            if t.broken && t.in_flight == 0 {
                break SessionEnd::Retry("a Kafka delivery failed".into());
            }
            if let Some(eo) = self.eo.as_mut() {
                if eo.committing && t.in_flight == 0 && !t.broken {
                    if let Err(e) = eo.commit(&self.producer, &mut t).await {
                        if matches!(e, KafkaError::Fatal(_)) {
                            return Err(e.into());
                        }
                        eo.abort(&self.producer, &mut t).await;
                        break SessionEnd::Retry(e.to_string());
                    }
                    snapshot::committed(
                        &mut self.snapshot_pending,
                        &mut self.snapshot_uncommitted,
                        &mut self.recreated,
                    );
                }
                // Rows of a chunk go out only once the previous chunk's are in the ledger, so a
                // checkpoint never has to name more than one chunk's rows.
                if t.backfill_unrecorded() == 0 {
                    backfill.let_next_chunk_go();
                }
            }
            ledger.maybe_start(&mut t, ledger_batch, false);
            let read_more = t.in_flight < max_in_flight
                && t.unrecorded_acked() < max_in_flight
                && !t.broken
                && !self.eo.as_ref().is_some_and(|eo| eo.committing);
            let transaction_due = self.eo.as_ref().and_then(ExactlyOnce::due);
            tokio::select! {
                biased;
                _ = self.shutdown.changed(), if stopping.is_none() => {
                    backfill.stop();
                    if !source.in_transaction() {
                        break SessionEnd::Shutdown;
                    }
                    tracing::info!("finishing the transaction being read before stopping");
                    stopping = Some(Instant::now() + Duration::from_secs(30));
                }
                result = t.next_ack(), if t.has_delivery_at_head() => {
                    if result.is_ok() { self.metrics.acked.inc() } else { self.metrics.delivery_failures.inc() }
                    t.on_ack(result);
                }
                outcome = ledger.outcome() => {
                    if let Err(e) = ledger.finish(outcome, &mut t, &self.metrics) {
                        if e.is_transient() { break SessionEnd::Retry(e.to_string()) }
                        return Err(e.into());
                    }
                    self.metrics.ledger_waiting.set(t.unrecorded_acked() as i64);
                }
                msg = source.next(), if read_more => {
                    match msg {
                        Ok(Some(SourceMessage::Change(table, event, order))) => {
                            backfill.note(table, event.op, event.key.as_ref(), !event.unchanged.is_empty(), event.version);
                            if self.eo.as_ref().is_some_and(|eo| eo.replayed(order)) {
                                t.push_committed(self.ledger_id(table, event.op, event.id()));
                            } else {
                                self.produce(&mut t, table, &event, false, order).await?;
                            }
                        }
                        Ok(Some(SourceMessage::DeadLetter(table, dead, order))) => {
                            backfill.note(table, dead.op, dead.row_key().as_ref(), false, dead.version);
                            let ledger_id = self.ledger_id(table, dead.op, dead.id);
                            if self.eo.as_ref().is_some_and(|eo| eo.replayed(order)) {
                                t.push_committed(ledger_id);
                            } else {
                                self.dead_letter(&mut t, &dead, ledger_id, false, order).await?;
                            }
                        }
                        Ok(Some(SourceMessage::Watermark { tag, lsn })) => {
                            if let Some(released) = backfill.on_watermark(&tag, lsn) {
                                self.produce_backfill(&mut t, released).await?;
                            }
                            if !source.in_transaction() {
                                t.push_position(lsn);
                            }
                        }
                        Ok(Some(SourceMessage::Position { lsn })) => t.push_position(lsn),
                        Ok(Some(SourceMessage::ReplyRequested { position })) => {
                            // Answer with the newest position that may be confirmed: a stopping
                            // server waits until the reply covers everything it sent.
                            if let Some(lsn) = position {
                                t.push_position(lsn);
                            }
                            ledger.maybe_start(&mut t, ledger_batch, true);
                            if let Err(e) = source.send_status(t.confirmed, false).await {
                                break SessionEnd::Retry(e.to_string());
                            }
                            reported = t.confirmed;
                        }
                        Ok(None) => break SessionEnd::Retry("the server ended the replication stream".into()),
                        Err(e) if e.is_transient() => break SessionEnd::Retry(e.to_string()),
                        Err(e) => return Err(e.into()),
                    }
                }
                msg = backfill.next(), if read_more => {
                    match msg {
                        BackfillMsg::Table { table, scope, run } => {
                            self.snapshot_produced_upto(backfill.table(), &t);
                            tracing::info!(table = %self.cfg.tables[table].name(), ?scope, "backfilling");
                            backfill.on_table(table, scope, &run);
                        }
                        BackfillMsg::Total(total) => backfill.set_total(total),
                        BackfillMsg::Open(reply) => {
                            if let Some(table) = backfill.table() {
                                backfill.open_window(table, t.unrecorded_stream_ids(table));
                            }
                            let _ = reply.send(());
                        }
                        BackfillMsg::Chunk(chunk, release) => {
                            if let Some(released) = backfill.on_chunk(chunk, release) {
                                self.produce_backfill(&mut t, released).await?;
                            }
                        }
                        BackfillMsg::Done => {
                            self.snapshot_produced_upto(backfill.table(), &t);
                            if !t.backfill_failed {
                                *backfill_state = BackfillState::Done;
                            }
                        }
                        BackfillMsg::Failed(e) if e.is_transient() => break SessionEnd::Retry(e.to_string()),
                        BackfillMsg::Failed(e) => return Err(e.into()),
                    }
                }
                _ = sleep_until_opt(transaction_due) => {
                    if let Some(eo) = self.eo.as_mut() {
                        eo.committing = true;
                    }
                }
                _ = ledger_tick.tick() => {
                    ledger.maybe_start(&mut t, ledger_batch, true);
                    if t.confirmed > reported {
                        if let Err(e) = source.send_status(t.confirmed, false).await {
                            break SessionEnd::Retry(e.to_string());
                        }
                        reported = t.confirmed;
                    }
                }
                _ = status_tick.tick() => {
                    retention_checks += 1;
                    if self.identities_unrecorded {
                        // Off the start: the first tick comes once the loop runs.
                        if let Err(e) = self.record_identities().await {
                            break SessionEnd::Retry(e.to_string());
                        }
                        self.identities_unrecorded = false;
                    }
                    if retention_checks % 6 == 1 {
                        self.check_retention().await;
                    }
                    self.metrics.in_flight.set(t.in_flight as i64);
                    self.metrics.ledger_decoded.add(source.take_ledger_transactions());
                    self.metrics.ledger_waiting.set(t.unrecorded_acked() as i64);
                    self.metrics.confirmed_lsn.set(t.confirmed.0 as i64);
                    self.metrics.lag_bytes.set(source.server_wal_end().0.saturating_sub(t.confirmed.0) as i64);
                    tracing::debug!(produced = t.produced, acked = t.acked, in_flight = t.in_flight, queued = t.queue.len(), waiting_for_ledger = t.unrecorded_acked(), confirmed = %t.confirmed, "stream progress");
                    if let Err(e) = source.send_status(t.confirmed, false).await {
                        break SessionEnd::Retry(e.to_string());
                    }
                    reported = t.confirmed;
                }
                _ = heartbeat_tick.tick() => {
                    // Only when idle: a busy stream moves the position by itself.
                    if t.queue.is_empty() {
                        if let Err(e) = self.heartbeat().await {
                            tracing::warn!(error = %e, "heartbeat failed");
                        }
                    }
                    // A relayed table dropped, replaced or unpublished stops the stream loudly.
                    if let Err(e) = self.check_tables().await {
                        break SessionEnd::Stop(e);
                    }
                }
            }
        };

        // Whatever ended the session: stop reading, let every produced message finish, and write
        // the ledger for what Kafka acknowledged, so a restart replays as little as possible.
        // Unless stopping cleanly, the replication connection goes first: a server shutting down
        // waits for its walsenders, and ours would wait with it for a ledger it cannot write.
        let skipped_ledger_changes = source.skipped_ledger_changes;
        self.metrics
            .ledger_decoded
            .add(source.take_ledger_transactions());
        let source = match end {
            SessionEnd::Shutdown => Some(source),
            _ => {
                drop(source);
                None
            }
        };
        backfill.stop();
        let drain_deadline = Instant::now() + Duration::from_secs(150);
        while t.in_flight > 0 && Instant::now() < drain_deadline {
            let r = t.next_ack().await;
            t.on_ack(r);
        }
        if let Some(eo) = self.eo.as_mut() {
            // A clean stop commits what it produced; anything else aborts it, and the next session
            // replays it.
            let clean = matches!(end, SessionEnd::Shutdown) && t.in_flight == 0 && !t.broken;
            if eo.is_open() {
                let committed = if clean {
                    eo.commit(&self.producer, &mut t).await
                } else {
                    Err(KafkaError::Delivery("the session failed".into()))
                };
                match committed {
                    Ok(()) => snapshot::committed(
                        &mut self.snapshot_pending,
                        &mut self.snapshot_uncommitted,
                        &mut self.recreated,
                    ),
                    Err(e) => {
                        if clean {
                            tracing::warn!(error = %e, "could not commit the last Kafka transaction; it is aborted and replayed on the next start");
                        }
                        eo.abort(&self.producer, &mut t).await;
                    }
                }
            }
        }
        let ledger_deadline = Instant::now() + Duration::from_secs(15);
        let ledger_ok = ledger
            .drain(&mut t, ledger_batch, &self.metrics, ledger_deadline)
            .await;
        if let Some(eo) = self.eo.as_mut() {
            eo.remember_unrecorded(&t);
            if let Some(e) = self.producer.fatal_error() {
                return Err(e.into());
            }
        }
        *confirmed = t.confirmed;
        if t.backfill_failed {
            *backfill_state = BackfillState::Pending;
        }
        // Done once recorded (in exactly-once mode, once committed: no transaction is begun
        // here); what is not is read again by the next session.
        if self.eo.is_none() {
            let _ = self.record_done_snapshots(&t).await;
        }
        self.snapshot_produced.clear();
        self.snapshot_uncommitted.clear();
        if !self.snapshot_pending.is_empty() {
            *backfill_state = BackfillState::Pending;
        }
        self.metrics.confirmed_lsn.set(t.confirmed.0 as i64);
        tracing::info!(produced = t.produced, acknowledged = t.acked, confirmed = %t.confirmed, skipped_ledger_changes, "session ended");
        match end {
            SessionEnd::Shutdown => {
                if !ledger_ok {
                    tracing::warn!("the ledger could not be written; rows acknowledged by Kafka will be sent again on the next start");
                }
                let finished = match source {
                    Some(source) => source.finish(t.confirmed).await,
                    None => Ok(()),
                };
                if let Err(e) = finished {
                    tracing::warn!(error = %e, "could not send the final position; the next start replays from the last one the server has");
                }
                Ok(SessionEnd::Shutdown)
            }
            SessionEnd::Stop(e) => Err(e.into()),
            retry => Ok(retry),
        }
    }
}

/// The topics, each once (tables may share one).
fn distinct(topics: &[String]) -> Vec<&String> {
    let mut seen = Vec::new();
    for t in topics {
        if !seen.contains(&t) {
            seen.push(t);
        }
    }
    seen
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
