//! `verify`'s progress as metrics (`--metrics-addr`), for a run on a large table that someone
//! watches from a dashboard rather than the terminal.

use crate::metrics::{Counter, Gauge, Registry, Seconds};

#[derive(Clone)]
pub struct VerifyMetrics {
    pub registry: Registry,
    /// 1 bucket sums, 2 rows of the differing buckets, 3 the differing keys again; 0 between.
    pub pass: Gauge,
    pub tables_verified: Counter,
    pub postgres_rows: Counter,
    pub differing_buckets: Gauge,
    pub missing: Gauge,
    pub extra: Gauge,
    pub mismatched: Gauge,
    pub waited: Seconds,
}

impl VerifyMetrics {
    pub fn new() -> Self {
        let r = Registry::default();
        VerifyMetrics {
            pass: r.gauge(
                "verify_pass",
                "Pass of the table being verified: 1 bucket sums, 2 differing buckets, 3 differing keys.",
            ),
            tables_verified: r.counter("verify_tables_total", "Tables verified."),
            postgres_rows: r.counter(
                "verify_postgres_rows_total",
                "PostgreSQL rows compared by bucket sums.",
            ),
            differing_buckets: r.gauge(
                "verify_differing_buckets",
                "Buckets of the last table whose sums differed.",
            ),
            missing: r.gauge("verify_missing_keys", "Keys of the last table missing in ClickHouse."),
            extra: r.gauge("verify_extra_keys", "Keys of the last table only ClickHouse has."),
            mismatched: r.gauge(
                "verify_mismatched_keys",
                "Keys of the last table whose values differ.",
            ),
            waited: r.seconds(
                "verify_wait_seconds_total",
                "Time spent waiting for the stream and the sink to reach a snapshot.",
            ),
            registry: r,
        }
    }
}
