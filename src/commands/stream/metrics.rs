//! The counters and gauges `stream` exports.

use crate::metrics::{Counter, Gauge, Registry, Seconds};

/// What `stream` exports at /metrics.
pub(super) struct StreamMetrics {
    pub events: Counter,
    pub backfill_rows: Counter,
    pub bytes: Counter,
    pub acked: Counter,
    pub delivery_failures: Counter,
    pub ledger_writes: Counter,
    pub ledger_rows: Counter,
    pub ledger_seconds: Seconds,
    pub confirmed_lsn: Gauge,
    pub lag_bytes: Gauge,
    pub in_flight: Gauge,
    pub restarts: Counter,
    pub retained_wal: Gauge,
    pub ledger_locked: Gauge,
    pub ledger_waiting: Gauge,
    pub ledger_decoded: Counter,
    pub ledger_origin: Gauge,
    pub dead_lettered: Counter,
}

impl StreamMetrics {
    pub fn new(r: &Registry) -> Self {
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
            retained_wal: r.gauge(
                "stream_slot_retained_wal_bytes",
                "WAL the slot keeps from being removed.",
            ),
            ledger_locked: r.gauge(
                "stream_ledger_locked_rows",
                "Acknowledged rows the last ledger write could not record because another transaction (or DDL) held them locked.",
            ),
            ledger_waiting: r.gauge(
                "stream_ledger_waiting_rows",
                "Acknowledged rows not yet recorded in the ledger (the confirmed position waits for them).",
            ),
            ledger_decoded: r.counter(
                "stream_ledger_transactions_decoded_total",
                "This slot's ledger transactions the server decoded and sent (and the stream dropped); none when they are filtered by origin.",
            ),
            ledger_origin: r.gauge(
                "stream_ledger_origin_filter",
                "1 when the server filters the ledger's writes out before decoding (PostgreSQL 16+, --ledger-origin).",
            ),
            dead_lettered: r.counter(
                "stream_dead_lettered_total",
                "Changes sent to the stream's dead-letter topic (too large for the topic, or not encodable).",
            ),
        }
    }
}
