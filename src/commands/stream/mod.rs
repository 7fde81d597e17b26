//! `cdc-relay stream`: wires the PostgreSQL source to the Kafka producer and carries acknowledgements
//! back to the ledger and the slot.
//!
//! Order of truth, per change: produced → acknowledged by Kafka → `sent_to_kafka = TRUE` (ledger) →
//! the slot's confirmed position passes its transaction. Acknowledgements are handled strictly in the
//! order the changes were read, so a confirmed position never jumps over an unacknowledged change.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

mod metrics;
mod tracker;

use metrics::StreamMetrics;
use tracker::Tracker;

use crate::backoff::Backoff;
use crate::config::{PublishOpsArg, StreamArgs};
use crate::error::Error;
use crate::event::{ChangeEvent, Lsn};
use crate::failpoints;
use crate::kafka::inspect;
use crate::kafka::producer::{KafkaProducer, ProducerConfig};
use crate::kafka::topic::ensure_topic;
use crate::metrics::Registry;
use crate::progress::Progress;
use crate::source::postgres::backfill::Backfill;
use crate::source::postgres::catalog;
use crate::source::postgres::client::ReplicationClient;
use crate::source::postgres::ledger::Ledger;
use crate::source::postgres::stream::{ReplicationSource, SourceMessage};
use crate::source::postgres::{SourceConfig, SourceError};

/// Why a streaming session ended.
enum SessionEnd {
    Shutdown,
    /// Connection lost, Kafka failing: reconnect from the confirmed position after a pause.
    Retry(String),
}

enum BackfillState {
    /// Read inside the new slot's snapshot (first start).
    Snapshot(Box<Backfill>),
    /// Run once the stream has passed this position (slot existed, or a backfill was interrupted).
    AfterCatchUp,
    Done,
}

struct StreamCommand {
    metrics: StreamMetrics,
    args: StreamArgs,
    cfg: SourceConfig,
    producer: KafkaProducer,
    ledger: Ledger,
    shutdown: watch::Receiver<bool>,
}

pub async fn run(args: StreamArgs, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let ops = PublishOpsArg::ops(&args.ops);
    let cfg = super::source_config(&args.postgres, ops)?;
    let sql = cfg.connect_sql().await?;
    catalog::preflight(&cfg, &sql).await?;
    catalog::ensure_publication(&cfg, &sql).await?;
    let connection =
        super::kafka_connection(&args.kafka.kafka_brokers, &args.kafka.security).await?;
    let kafka = connection.client_config();
    let partitions = ensure_topic(
        &kafka,
        &args.kafka.topic,
        args.topic_partitions,
        args.topic_replication,
    )
    .await?;
    let producer = KafkaProducer::new(&ProducerConfig {
        connection: connection.clone(),
        topic: args.kafka.topic.clone(),
        queue_messages: args.max_in_flight + args.backfill_chunk as usize + 1000,
    })?;
    tracing::info!(table = %cfg.qualified_table(), topic = %args.kafka.topic, partitions, slot = %cfg.slot, "stream starting");

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
        let topic = args.kafka.topic.clone();
        let fed_before =
            tokio::task::spawn_blocking(move || inspect::holds_relay_events(&connection, &topic))
                .await
                .map_err(|e| Error::Config(format!("inspecting the topic failed: {e}")))??;
        if fed_before {
            return Err(SourceError::SlotLost {
                slot: cfg.slot.clone(),
                reason: format!(
                    "it does not exist, but topic {} already holds events streamed from it",
                    args.kafka.topic
                ),
            }
            .into());
        }
    }
    let (client, start, backfill) = match slot {
        Some(info) => {
            catalog::check_slot(&cfg, &info)?;
            tracing::info!(slot = %cfg.slot, confirmed = ?info.confirmed_flush.map(|l| l.to_string()), "resuming from existing slot");
            (None, Lsn::ZERO, BackfillState::AfterCatchUp)
        }
        None => {
            let mut client = ReplicationClient::connect(&cfg.replication_params()?)
                .await
                .map_err(SourceError::from)?;
            let created = client
                .create_logical_slot(&cfg.slot, true)
                .await
                .map_err(SourceError::from)?;
            let snapshot = created.snapshot_name.clone().unwrap_or_default();
            tracing::info!(slot = %cfg.slot, consistent_point = %created.consistent_point, "created replication slot");
            let backfill = Backfill::in_snapshot(
                &cfg,
                &snapshot,
                created.consistent_point,
                args.backfill_chunk,
            )
            .await?;
            (
                Some(client),
                created.consistent_point,
                BackfillState::Snapshot(Box::new(backfill)),
            )
        }
    };
    drop(sql);

    let registry = Registry::default();
    let metrics = StreamMetrics::new(&registry);
    super::serve_metrics(&registry, args.metrics_addr).await?;
    let mut cmd = StreamCommand {
        metrics,
        ledger: Ledger::new(&cfg),
        args,
        cfg,
        producer,
        shutdown,
    };
    cmd.run_sessions(client, start, backfill).await
}

impl StreamCommand {
    async fn run_sessions(
        &mut self,
        mut client: Option<ReplicationClient>,
        start: Lsn,
        mut backfill: BackfillState,
    ) -> Result<(), Error> {
        let mut confirmed = start;
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
        backfill: &mut BackfillState,
    ) -> Result<SessionEnd, Error> {
        let mut source = match ReplicationSource::start(&self.cfg, client, *confirmed).await {
            Ok(s) => s,
            Err(e) if e.is_transient() => return Ok(SessionEnd::Retry(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let mut t = Tracker::new(*confirmed);
        let mut backfill_rx: Option<mpsc::Receiver<Result<Vec<ChangeEvent>, SourceError>>> = None;
        let mut backfill_task = None;
        let mut catch_up_at: Option<Lsn> = None;

        let mut progress: Option<Progress> = None;
        match std::mem::replace(backfill, BackfillState::Done) {
            BackfillState::Snapshot(b) => {
                let total = b.count_remaining(&self.cfg).await.ok().map(|n| n as u64);
                progress = Some(Progress::new("backfill", total));
                let (tx, rx) = mpsc::channel(1);
                backfill_task = Some(tokio::spawn(read_backfill(*b, tx)));
                backfill_rx = Some(rx);
                *backfill = BackfillState::AfterCatchUp; // if this session fails, redo it from the ledger
            }
            BackfillState::AfterCatchUp => {
                *backfill = BackfillState::AfterCatchUp;
                let marker = async { catalog::emit_heartbeat(self.ledger.sql().await?).await };
                match marker.await {
                    Ok(lsn) => catch_up_at = Some(lsn),
                    Err(e) if e.is_transient() => return Ok(SessionEnd::Retry(e.to_string())),
                    Err(e) => return Err(e.into()),
                }
            }
            BackfillState::Done => {}
        }

        let max_in_flight = self.args.max_in_flight.max(1);
        let mut ledger_tick = tokio::time::interval(self.args.ledger_interval);
        let mut status_tick = tokio::time::interval(Duration::from_secs(5));
        let mut heartbeat_tick = tokio::time::interval(self.args.heartbeat_interval);
        heartbeat_tick.reset();
        let mut reported = *confirmed;
        let mut retention_checks = 0u64;
        let mut backfilled = 0u64;

        // Set on shutdown while a transaction is half read: reading goes on until its Commit (or
        // this deadline), so a clean stop leaves nothing to replay.
        let mut stopping: Option<Instant> = None;
        let end = loop {
            if let Some(deadline) = stopping {
                if !source.in_transaction() || Instant::now() > deadline {
                    break SessionEnd::Shutdown;
                }
            }
            if let (Some(at), BackfillState::AfterCatchUp) = (catch_up_at, &*backfill) {
                if t.confirmed >= at && backfill_rx.is_none() {
                    tracing::info!("stream caught up; backfilling rows still marked unsent");
                    let b = match Backfill::current(&self.cfg, at, self.args.backfill_chunk).await {
                        Ok(b) => b,
                        Err(e) if e.is_transient() => break SessionEnd::Retry(e.to_string()),
                        Err(e) => return Err(e.into()),
                    };
                    let total = b.count_remaining(&self.cfg).await.ok().map(|n| n as u64);
                    progress = Some(Progress::new("backfill", total));
                    let (tx, rx) = mpsc::channel(1);
                    backfill_task = Some(tokio::spawn(read_backfill(b, tx)));
                    backfill_rx = Some(rx);
                    catch_up_at = None;
                }
            }
            if t.broken && t.in_flight == 0 {
                break SessionEnd::Retry("a Kafka delivery failed".into());
            }
            let read_more = t.in_flight < max_in_flight && !t.broken;
            tokio::select! {
                biased;
                _ = self.shutdown.changed(), if stopping.is_none() => {
                    if !source.in_transaction() {
                        break SessionEnd::Shutdown;
                    }
                    tracing::info!("finishing the transaction being read before stopping");
                    stopping = Some(Instant::now() + Duration::from_secs(30));
                    backfill_rx = None;
                }
                result = t.next_ack(), if t.has_delivery_at_head() => {
                    if result.is_ok() { self.metrics.acked.inc() } else { self.metrics.delivery_failures.inc() }
                    t.on_ack(result);
                    if t.ledger_ids.len() >= self.args.ledger_batch {
                        if let Err(e) = self.flush_ledger(&mut t).await {
                            if e.is_transient() { break SessionEnd::Retry(e.to_string()) }
                            return Err(e.into());
                        }
                    }
                }
                msg = source.next(), if read_more => {
                    match msg {
                        Ok(Some(SourceMessage::Change(event))) => {
                            let (ack, bytes) = self.producer.send(&event).await?;
                            t.push_delivery(&event, Box::pin(ack), false);
                            self.metrics.events.inc();
                            self.metrics.bytes.add(bytes as u64);
                        }
                        Ok(Some(SourceMessage::Position { lsn })) => t.push_position(lsn),
                        Ok(Some(SourceMessage::ReplyRequested { position })) => {
                            // Answer with the newest position that may be confirmed: a stopping
                            // server waits until the reply covers everything it sent.
                            if let Some(lsn) = position {
                                t.push_position(lsn);
                            }
                            if let Err(e) = self.flush_ledger(&mut t).await {
                                if e.is_transient() { break SessionEnd::Retry(e.to_string()) }
                                return Err(e.into());
                            }
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
                chunk = recv_opt(&mut backfill_rx), if read_more => {
                    match chunk {
                        Some(Ok(events)) => {
                            for event in &events {
                                let (ack, bytes) = self.producer.send(event).await?;
                                t.push_delivery(event, Box::pin(ack), true);
                                self.metrics.events.inc();
                                self.metrics.bytes.add(bytes as u64);
                            }
                            self.metrics.backfill_rows.add(events.len() as u64);
                            if backfilled > 0 {
                                // The first chunk is in flight or in the ledger: a crash here
                                // leaves a partly done backfill behind.
                                failpoints::hit(failpoints::STREAM_MID_BACKFILL);
                            }
                            backfilled += events.len() as u64;
                            if let Some(p) = progress.as_mut() {
                                p.add(events.len() as u64);
                            }
                        }
                        Some(Err(e)) if e.is_transient() => break SessionEnd::Retry(e.to_string()),
                        Some(Err(e)) => return Err(e.into()),
                        None => {
                            backfill_rx = None;
                            backfill_task = None;
                            if !t.backfill_failed {
                                *backfill = BackfillState::Done;
                            }
                            if let Some(p) = progress.take() {
                                p.finish();
                            }
                        }
                    }
                }
                _ = ledger_tick.tick() => {
                    if let Err(e) = self.flush_ledger(&mut t).await {
                        if e.is_transient() { break SessionEnd::Retry(e.to_string()) }
                        return Err(e.into());
                    }
                    if t.confirmed > reported {
                        if let Err(e) = source.send_status(t.confirmed, false).await {
                            break SessionEnd::Retry(e.to_string());
                        }
                        reported = t.confirmed;
                    }
                }
                _ = status_tick.tick() => {
                    retention_checks += 1;
                    if retention_checks % 6 == 1 {
                        self.check_retention().await;
                    }
                    self.metrics.in_flight.set(t.in_flight as i64);
                    self.metrics.lag_bytes.set(source.server_wal_end().0.saturating_sub(t.confirmed.0) as i64);
                    tracing::debug!(produced = t.produced, acked = t.acked, in_flight = t.in_flight, queued = t.queue.len(), confirmable = %t.confirmable, confirmed = %t.confirmed, "stream progress");
                    if let Err(e) = source.send_status(t.confirmed, false).await {
                        break SessionEnd::Retry(e.to_string());
                    }
                    reported = t.confirmed;
                }
                _ = heartbeat_tick.tick() => {
                    // Only when idle: a busy stream moves the position by itself.
                    if t.queue.is_empty() {
                        match self.ledger.sql().await {
                            Ok(c) => if let Err(e) = catalog::emit_heartbeat(c).await {
                                tracing::warn!(error = %e, "heartbeat failed");
                            },
                            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                        }
                    }
                }
            }
        };

        // Whatever ended the session: stop reading, let every produced message finish, and write
        // the ledger for what Kafka acknowledged, so a restart replays as little as possible.
        // Unless stopping cleanly, the replication connection goes first: a server shutting down
        // waits for its walsenders, and ours would wait with it for a ledger it cannot write.
        let skipped_ledger_changes = source.skipped_ledger_changes;
        let source = match end {
            SessionEnd::Shutdown => Some(source),
            _ => {
                drop(source);
                None
            }
        };
        if let Some(task) = backfill_task.take() {
            task.abort();
            if !matches!(backfill, BackfillState::Done) {
                *backfill = BackfillState::AfterCatchUp;
            }
        }
        drop(backfill_rx);
        let drain_deadline = Instant::now() + Duration::from_secs(150);
        while t.in_flight > 0 && Instant::now() < drain_deadline {
            let r = t.next_ack().await;
            t.on_ack(r);
        }
        let mut ledger_ok = false;
        for attempt in 0..5 {
            match self.flush_ledger(&mut t).await {
                Ok(()) => {
                    ledger_ok = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "ledger write failed while stopping");
                    tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await;
                }
            }
        }
        *confirmed = t.confirmed;
        if t.backfill_failed {
            *backfill = BackfillState::AfterCatchUp;
        }
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
            retry => Ok(retry),
        }
    }

    /// Warns when the slot holds more WAL than allowed; every 30 s, best effort.
    async fn check_retention(&mut self) {
        let sql = match self.ledger.sql().await {
            Ok(c) => c,
            Err(_) => return,
        };
        if let Ok(Some((bytes, status))) = catalog::slot_retention(&self.cfg, sql).await {
            self.metrics.retained_wal.set(bytes);
            let limit = self.args.max_retained_wal_mb.saturating_mul(1 << 20);
            if bytes as u64 > limit || status.as_deref() == Some("unreserved") {
                tracing::warn!(slot = %self.cfg.slot, retained_mb = bytes >> 20, limit_mb = self.args.max_retained_wal_mb, wal_status = ?status,
                    "the slot retains a lot of WAL: is the relay keeping up? See docs/operations.md (max_slot_wal_keep_size)");
            }
        }
    }

    /// Writes acknowledged ids to the ledger, then lets the confirmed position follow.
    async fn flush_ledger(&mut self, t: &mut Tracker) -> Result<(), SourceError> {
        if !t.ledger_ids.is_empty() {
            failpoints::hit(failpoints::STREAM_AFTER_KAFKA_ACK);
            let started = Instant::now();
            self.ledger.mark_sent(&mut t.ledger_ids).await?;
            self.metrics.ledger_seconds.record(started.elapsed());
            self.metrics.ledger_writes.inc();
            self.metrics.ledger_rows.add(t.ledger_ids.len() as u64);
            t.ledger_ids.clear();
            failpoints::hit(failpoints::STREAM_AFTER_LEDGER_WRITE);
        }
        t.confirmed = t.confirmed.max(t.confirmable);
        self.metrics.confirmed_lsn.set(t.confirmed.0 as i64);
        Ok(())
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn read_backfill(
    mut backfill: Backfill,
    tx: mpsc::Sender<Result<Vec<ChangeEvent>, SourceError>>,
) {
    loop {
        match backfill.next_chunk().await {
            Ok(Some(chunk)) => {
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}
