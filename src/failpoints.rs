//! Named crash points for tests: `CDC_RELAY_FAILPOINTS=stream.after_kafka_ack,…` makes the process
//! abort (as kill -9 would stop it) the first time it reaches a named point (`sink.insert_panic`
//! panics instead, see [`panic_if_armed`]). Unset, a failpoint costs
//! one check of a value read once at start.

use std::sync::OnceLock;

/// After Kafka acknowledged messages, before their ledger write.
pub const STREAM_AFTER_KAFKA_ACK: &str = "stream.after_kafka_ack";
/// After the ledger write, before the slot learns the new confirmed position.
pub const STREAM_AFTER_LEDGER_WRITE: &str = "stream.after_ledger_write";
/// In the middle of the backfill (after its first chunk was produced).
pub const STREAM_MID_BACKFILL: &str = "stream.mid_backfill";
/// After a ClickHouse insert, before the Kafka offsets are committed.
pub const SINK_AFTER_INSERT: &str = "sink.after_insert";
/// Inside the sink's insert task, before it inserts: the task panics (a bug, not a crash).
pub const SINK_INSERT_PANIC: &str = "sink.insert_panic";

fn active() -> &'static [String] {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        std::env::var("CDC_RELAY_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

fn armed(name: &str) -> bool {
    active().iter().any(|a| a == name)
}

/// Panics (unwinding the current task only) if `name` is an active failpoint.
pub fn panic_if_armed(name: &str) {
    if armed(name) {
        panic!("failpoint {name} reached: panicking");
    }
}

/// Aborts the process if `name` is an active failpoint.
pub fn hit(name: &str) {
    if armed(name) {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}
