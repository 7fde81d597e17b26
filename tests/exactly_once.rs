//! `stream --exactly-once` on the real PostgreSQL and Kafka: whatever is killed when, a
//! `read_committed` reader of the topic sees every change exactly once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

/// Every change of `topic` as a `read_committed` consumer sees it: (op, id, version) → how many
/// times.
fn committed_changes(
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> BTreeMap<(String, i64, u64), usize> {
    let consumer: BaseConsumer = kafka_config()
        .set("group.id", unique("eo_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = BTreeMap::new();
    let mut total = 0usize;
    let deadline = Instant::now() + timeout;
    let mut settle: Option<Instant> = None;
    while Instant::now() < deadline && settle.is_none_or(|s| Instant::now() < s) {
        if total >= expected && settle.is_none() {
            settle = Some(Instant::now() + Duration::from_secs(3));
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().unwrap_or(b"null")).unwrap_or_default();
            if let (Some(op), Some(id), Some(version)) =
                (v["op"].as_str(), v["id"].as_i64(), v["version"].as_u64())
            {
                *seen.entry((op.to_string(), id, version)).or_insert(0) += 1;
                total += 1;
            }
        }
    }
    seen
}

struct Eo(Table);

impl std::ops::Deref for Eo {
    type Target = Table;
    fn deref(&self) -> &Table {
        &self.0
    }
}

impl Eo {
    async fn new(prefix: &str) -> Eo {
        Eo(Table::new(prefix).await)
    }

    fn stream(&self, tag: &str, extra: &[&str]) -> Relay {
        let mut args = stream_args(&self.name, &["--exactly-once", "--heartbeat-interval", "1"]);
        args.extend_from_slice(extra);
        Relay::start(&format!("{}_{tag}", self.name), &args, &[])
    }

    async fn insert(&self, rows: i64) {
        self.pg
            .batch_execute(&format!(
                "INSERT INTO {} (username, event_type, event_time) \
                 SELECT 'u' || g, 'login', now() FROM generate_series(1, {rows}) g",
                self.name
            ))
            .await
            .unwrap();
    }

    /// The topic holds each change exactly once, as a read_committed reader sees it: no change
    /// twice, every row of the table, and a delete of every id in `deleted`.
    async fn assert_exactly_once(&self, deleted: &BTreeSet<i64>) {
        let want = self.ids().await;
        let got = committed_changes(
            &self.name,
            want.len() + deleted.len(),
            Duration::from_secs(120),
        );
        let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(10).collect();
        assert!(twice.is_empty(), "seen more than once: {twice:?}");
        let rows: BTreeSet<i64> = got
            .keys()
            .filter(|(op, _, _)| op != "delete")
            .map(|(_, id, _)| *id)
            .collect();
        let missing: Vec<_> = want.difference(&rows).take(10).collect();
        assert!(missing.is_empty(), "missing: {missing:?}");
        let deletes: BTreeSet<i64> = got
            .keys()
            .filter(|(op, _, _)| op == "delete")
            .map(|(_, id, _)| *id)
            .collect();
        assert_eq!(&deletes, deleted);
        // Every row sent once: one insert or snapshot per id still in the table.
        let per_id = got
            .keys()
            .filter(|(op, id, _)| op != "delete" && !deleted.contains(id))
            .count();
        assert_eq!(per_id, want.len());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_five_points_of_a_200k_load_and_the_backfill_leaves_every_id_once() {
    let t = Eo::new("eo_kill").await;
    publish(&t.pg, &t.name, "insert, delete").await;
    // Half the rows before the first start (the backfill), half written while the stream runs,
    // with deletes of backfilled rows among them (a delete leaves no row for the ledger: only the
    // transaction's commit may let the slot move past it).
    t.insert(100_000).await;
    let args = ["--ops", "insert,delete", "--backfill-chunk", "5000"];
    let mut stream = t.stream("stream", &args);
    // Changes from here on are the stream's (earlier ones only leave rows for the backfill).
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(60)).await;
    let writer = {
        let name = t.name.clone();
        tokio::spawn(async move {
            let pg = pg().await;
            let mut deleted = BTreeSet::new();
            for i in 0..100i64 {
                pg.batch_execute(&format!(
                    "INSERT INTO {name} (username, event_type, event_time) \
                     SELECT 'w' || g, 'login', now() FROM generate_series(1, 1000) g"
                ))
                .await
                .unwrap();
                let ids: Vec<i64> = (0..5).map(|k| 1 + i * 997 + k * 13).collect();
                pg.execute(
                    &format!("DELETE FROM {name} WHERE id = ANY($1)"),
                    &[&ids.iter().map(|&x| x as i32).collect::<Vec<i32>>()],
                )
                .await
                .unwrap();
                deleted.extend(ids);
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            deleted
        })
    };
    let mut seed = std::process::id() as u64 | 1;
    for _ in 0..5 {
        // xorshift: another point of the run each time.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(400 + seed % 1600)).await;
        stream.kill9();
        stream = t.stream("stream", &args);
    }
    let deleted = writer.await.unwrap();
    t.wait_all_sent(Duration::from_secs(180)).await;
    t.assert_exactly_once(&deleted).await;
    assert_eq!(stream.stop(), 0);
    t.0.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_stream_stops_and_its_open_transaction_never_becomes_visible() {
    let t = Eo::new("eo_fence").await;
    // A keeps its transaction open (it would commit after 10 minutes or a million changes).
    let mut a = t.stream(
        "a",
        &[
            "--transaction-max-ms",
            "600000",
            "--transaction-max-changes",
            "1000000",
        ],
    );
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    t.insert(500).await;
    let admin = pg_url(&env("CDC_RELAY_PG_ADMIN_URL")).await;
    let walsender = |name: String| {
        let admin = &admin;
        async move {
            admin
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&name],
                )
                .await
                .unwrap()
                .and_then(|r| r.get::<_, Option<i32>>(0))
        }
    };
    // Produced, not committed: a read_committed reader sees nothing of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(committed_changes(&t.name, 1, Duration::from_secs(5)).is_empty());

    // A hangs; the server drops its replication connection; B takes the slot over.
    unsafe_kill(a.child.id(), "STOP");
    let pid = walsender(t.name.clone()).await.expect("A streams the slot");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let b = t.stream("b", &[]);
    t.insert(500).await;
    t.wait_all_sent(Duration::from_secs(60)).await;

    // A wakes up fenced: it must stop, not produce.
    unsafe_kill(a.child.id(), "CONT");
    let status = a.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "A went on: {}", a.log_text());
    assert!(a.log_text().contains("fenced"), "{}", a.log_text());
    t.assert_exactly_once(&BTreeSet::new()).await;
    assert_eq!(b.stop(), 0);
    t.0.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_stop_commits_and_the_next_start_sends_nothing_again() {
    let t = Eo::new("eo_clean").await;
    let stream = t.stream("one", &[]);
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    t.insert(2_000).await;
    t.wait_all_sent(Duration::from_secs(60)).await;
    assert_eq!(stream.stop(), 0);
    t.insert(1_000).await;
    let stream = t.stream("two", &[]);
    t.wait_all_sent(Duration::from_secs(60)).await;
    t.assert_exactly_once(&BTreeSet::new()).await;
    assert_eq!(stream.stop(), 0);
    t.0.drop().await;
}
