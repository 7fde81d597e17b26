//! `cdc-relay stream`: wires the PostgreSQL source to the Kafka producer and carries acknowledgements
//! back to the ledger and the slot.
//!
//! Order of truth, per change: produced → acknowledged by Kafka → `sent_to_kafka = TRUE` (ledger) →
//! the slot's confirmed position passes its transaction. Acknowledgements are handled strictly in the
//! order the changes were read, so a confirmed position never jumps over an unacknowledged change.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::config::{PublishOpsArg, StreamArgs};
use crate::error::Error;
use crate::event::{ChangeEvent, Lsn, Op};
use crate::failpoints;
use crate::kafka::producer::{base_config, DeliveryResult, KafkaProducer, ProducerConfig};
use crate::kafka::topic::ensure_topic;
use crate::metrics::{Counter, Gauge, Registry, Seconds};
use crate::progress::Progress;
use crate::source::postgres::backfill::Backfill;
use crate::source::postgres::catalog;
use crate::source::postgres::client::ReplicationClient;
use crate::source::postgres::ledger::Ledger;
use crate::source::postgres::stream::{ReplicationSource, SourceMessage};
use crate::source::postgres::{SourceConfig, SourceError};

type Delivery = Pin<Box<dyn Future<Output = DeliveryResult> + Send>>;

enum Item {
    Delivery {
        ledger_id: Option<i64>,
        from_backfill: bool,
        ack: Delivery,
    },
    Position(Lsn),
}

/// Where acknowledgements are tracked between Kafka and PostgreSQL.
struct Tracker {
    queue: VecDeque<Item>,
    in_flight: usize,
    /// Acknowledged rows not yet in the ledger.
    ledger_ids: Vec<i64>,
    /// Every change before this is acknowledged (its id is in `ledger_ids` or the ledger).
    confirmable: Lsn,
    /// Every change before this is acknowledged and in the ledger: what the slot is told.
    confirmed: Lsn,
    /// A delivery failed in this session: positions stop advancing until the stream restarts.
    broken: bool,
    backfill_failed: bool,
    produced: u64,
    acked: u64,
}

impl Tracker {
    fn new(confirmed: Lsn) -> Self {
        Tracker {
            queue: VecDeque::new(),
            in_flight: 0,
            ledger_ids: Vec::new(),
            confirmable: confirmed,
            confirmed,
            broken: false,
            backfill_failed: false,
            produced: 0,
            acked: 0,
        }
    }

    fn push_delivery(&mut self, event: &ChangeEvent, ack: Delivery, from_backfill: bool) {
        let ledger_id = match event.op {
            Op::Snapshot | Op::Insert | Op::Update => event.id,
            Op::Delete | Op::Truncate => None,
        };
        self.queue.push_back(Item::Delivery {
            ledger_id,
            from_backfill,
            ack,
        });
        self.in_flight += 1;
        self.produced += 1;
    }

    fn push_position(&mut self, lsn: Lsn) {
        if let Some(Item::Position(last)) = self.queue.back_mut() {
            *last = (*last).max(lsn);
        } else {
            self.queue.push_back(Item::Position(lsn));
        }
        self.advance();
    }

    /// Consumes positions at the head of the queue.
    fn advance(&mut self) {
        while let Some(Item::Position(lsn)) = self.queue.front() {
            if !self.broken {
                self.confirmable = self.confirmable.max(*lsn);
            }
            self.queue.pop_front();
        }
    }

    /// Resolves when the oldest delivery is acknowledged or failed.
    fn next_ack(&mut self) -> impl Future<Output = DeliveryResult> + '_ {
        std::future::poll_fn(move |cx| match self.queue.front_mut() {
            Some(Item::Delivery { ack, .. }) => ack.as_mut().poll(cx),
            _ => Poll::Pending,
        })
    }

    fn on_ack(&mut self, result: DeliveryResult) {
        let Some(Item::Delivery {
            ledger_id,
            from_backfill,
            ..
        }) = self.queue.pop_front()
        else {
            return;
        };
        self.in_flight -= 1;
        match result {
            Ok(()) => {
                self.acked += 1;
                self.ledger_ids.extend(ledger_id);
            }
            Err(e) => {
                if !self.broken {
                    tracing::warn!(error = %e, "Kafka delivery failed; the stream will restart from its last confirmed position");
                }
                self.broken = true;
                self.backfill_failed |= from_backfill;
            }
        }
        self.advance();
    }

    fn has_delivery_at_head(&self) -> bool {
        matches!(self.queue.front(), Some(Item::Delivery { .. }))
    }
}

/// What `stream` exports at /metrics.
struct StreamMetrics {
    events: Counter,
    backfill_rows: Counter,
    bytes: Counter,
    acked: Counter,
    delivery_failures: Counter,
    ledger_writes: Counter,
    ledger_rows: Counter,
    ledger_seconds: Seconds,
    confirmed_lsn: Gauge,
    lag_bytes: Gauge,
    in_flight: Gauge,
    restarts: Counter,
}

impl StreamMetrics {
    fn new(r: &Registry) -> Self {
        StreamMetrics {
            events: r.counter(
                "stream_events_total",
                "Change events produced to Kafka (stream and backfill).",
            ),
            backfill_rows: r.counter(
                "stream_backfill_rows_total",
                "Rows produced by the backfill.",
            ),
            bytes: r.counter("stream_bytes_total", "Payload bytes produced to Kafka."),
            acked: r.counter("stream_acked_total", "Messages acknowledged by Kafka."),
            delivery_failures: r.counter(
                "stream_delivery_failures_total",
                "Messages Kafka did not acknowledge.",
            ),
            ledger_writes: r.counter(
                "stream_ledger_writes_total",
                "sent_to_kafka ledger statements.",
            ),
            ledger_rows: r.counter("stream_ledger_rows_total", "Row ids written to the ledger."),
            ledger_seconds: r.seconds(
                "stream_ledger_seconds_total",
                "Time spent in ledger statements.",
            ),
            confirmed_lsn: r.gauge(
                "stream_confirmed_lsn",
                "Position confirmed to the slot (as an integer).",
            ),
            lag_bytes: r.gauge(
                "stream_replication_lag_bytes",
                "Server WAL end minus the confirmed position.",
            ),
            in_flight: r.gauge(
                "stream_in_flight",
                "Messages produced and not yet acknowledged.",
            ),
            restarts: r.counter(
                "stream_session_restarts_total",
                "Replication sessions restarted after a fault.",
            ),
        }
    }
}

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
    let cfg = SourceConfig::new(
        &args.postgres.pg_url,
        &args.postgres.table,
        &args.postgres.slot,
        &args.postgres.publication,
        ops,
    )?;
    let sql = cfg.connect_sql().await?;
    catalog::preflight(&cfg, &sql).await?;
    catalog::ensure_publication(&cfg, &sql).await?;
    let kafka = base_config(&args.kafka.kafka_brokers);
    let partitions = ensure_topic(
        &kafka,
        &args.kafka.topic,
        args.topic_partitions,
        args.topic_replication,
    )
    .await?;
    let producer = KafkaProducer::new(&ProducerConfig {
        brokers: args.kafka.kafka_brokers.clone(),
        topic: args.kafka.topic.clone(),
        queue_messages: args.max_in_flight + args.backfill_chunk as usize + 1000,
    })?;
    tracing::info!(table = %cfg.qualified_table(), topic = %args.kafka.topic, partitions, slot = %cfg.slot, "stream starting");

    let (client, start, backfill) = match catalog::slot_info(&cfg, &sql).await? {
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
    if let Some(addr) = args.metrics_addr {
        let bound = registry
            .serve(addr)
            .await
            .map_err(|e| Error::Config(format!("--metrics-addr {addr}: {e}")))?;
        tracing::info!(%bound, "serving metrics at /metrics");
    }
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
                        Ok(Some(SourceMessage::ReplyRequested)) => {
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
        tracing::info!(produced = t.produced, acknowledged = t.acked, confirmed = %t.confirmed, skipped_ledger_changes = source.skipped_ledger_changes, "session ended");
        match end {
            SessionEnd::Shutdown => {
                if !ledger_ok {
                    tracing::warn!("the ledger could not be written; rows acknowledged by Kafka will be sent again on the next start");
                }
                if let Err(e) = source.finish(t.confirmed).await {
                    tracing::warn!(error = %e, "could not send the final position; the next start replays from the last one the server has");
                }
                Ok(SessionEnd::Shutdown)
            }
            retry => Ok(retry),
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
