//! Change semantics under day-one operations, on the real PostgreSQL, Kafka and ClickHouse: re-sent
//! rows, DDL and row locks during a backfill, key updates, odd column types, oversized rows,
//! partitioned tables, and restarts while rows are written. Each test asserts the data itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use clickhouse::Row;
use common::*;
use serde::Deserialize;

#[derive(Debug, Row, Deserialize, PartialEq)]
struct Current {
    id: i64,
    username: Option<String>,
    event_type: Option<String>,
    _version: u64,
}

/// One test's table, slot, publication, topic, group and ClickHouse table (all named alike).
struct E2e(Table);

impl std::ops::Deref for E2e {
    type Target = Table;
    fn deref(&self) -> &Table {
        &self.0
    }
}

impl E2e {
    async fn new(prefix: &str, ops: &str) -> E2e {
        let t = Table::new(prefix).await;
        publish(&t.pg, &t.name, &ops.replace(',', ", ")).await;
        E2e(t)
    }

    fn stream(&self, ops: &str, extra: &[&str]) -> Relay {
        let mut args = stream_args(&self.name, &["--ops", ops, "--heartbeat-interval", "1"]);
        args.extend_from_slice(extra);
        Relay::start(&format!("{}_stream", self.name), &args, &[])
    }

    fn sink(&self) -> Relay {
        let dlq = format!("{}_dlq", self.name);
        Relay::start(
            &format!("{}_sink", self.name),
            &[
                "sink",
                "--topic",
                &self.name,
                "--group",
                &self.name,
                "--clickhouse-table",
                &self.name,
                "--dlq-topic",
                &dlq,
            ],
            &[],
        )
    }

    async fn current(&self) -> BTreeMap<i64, Current> {
        clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"))
            .query(&format!(
                "SELECT toInt64(id) AS id, username, event_type, _version FROM {}_current ORDER BY id",
                self.name
            ))
            .fetch_all::<Current>()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.id, r))
            .collect()
    }

    /// Waits until ClickHouse's current view has exactly PostgreSQL's ids, then checks it stays so.
    async fn wait_clickhouse_equals_postgres(&self, timeout: Duration) {
        let want = self.ids().await;
        eventually("ClickHouse's ids equal PostgreSQL's", timeout, || async {
            (self
                .current()
                .await
                .keys()
                .copied()
                .collect::<BTreeSet<_>>()
                == want)
                .then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let got: BTreeSet<i64> = self.current().await.keys().copied().collect();
        assert_eq!(got, want, "ClickHouse drifted after matching");
    }

    /// `cdc-relay status --json` for this pipeline (PostgreSQL and Kafka sections).
    fn status(&self) -> serde_json::Value {
        let out = relay(
            &[
                "status",
                "--json",
                "--table",
                &self.name,
                "--slot",
                &self.name,
                "--publication",
                &self.name,
                "--topic",
                &self.name,
                "--group",
                &self.name,
            ],
            &[],
        )
        .env_remove("CDC_RELAY_CLICKHOUSE_URL")
        .output()
        .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn read(&self, expected: usize, settle: Duration) -> Vec<Received> {
        read_topic(&self.name, expected, Duration::from_secs(60), settle)
    }

    async fn drop(self) {
        self.0.drop().await;
    }
}

fn id_counts(msgs: &[Received]) -> BTreeMap<i64, usize> {
    let mut m = BTreeMap::new();
    for r in msgs {
        if let Some(id) = r.value["id"].as_i64() {
            *m.entry(id).or_insert(0) += 1;
        }
    }
    m
}

/// What the relay exports at /metrics, as name → value.
fn metrics(addr: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return out;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((k, v)) = line.rsplit_once(' ') {
            if let Ok(v) = v.parse() {
                out.insert(k.to_string(), v);
            }
        }
    }
    out
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resent_row_replaces_the_streamed_one_in_clickhouse() {
    let p = E2e::new("sem_resend", "insert").await;
    let stream = p.stream("insert", &[]);
    let sink = p.sink();
    wait_slot_streaming(&p.pg, &p.name, Duration::from_secs(30)).await;
    p.exec(
        "INSERT INTO {t} (id, username, event_type, event_time) VALUES (7, 'ann', 'login', now())",
    )
    .await;
    eventually(
        "the insert in ClickHouse",
        Duration::from_secs(60),
        || async { p.current().await.get(&7).map(|r| r.event_type.clone()) },
    )
    .await;
    p.wait_all_sent(Duration::from_secs(30)).await;
    assert_eq!(stream.stop(), 0);
    // The documented way to send a row again: change it, reset its flag, restart the stream.
    p.exec("UPDATE {t} SET event_type = 'logout', sent_to_kafka = FALSE WHERE id = 7")
        .await;
    let stream = p.stream("insert", &[]);
    let row = eventually(
        "the re-sent row in ClickHouse",
        Duration::from_secs(60),
        || async {
            p.current()
                .await
                .remove(&7)
                .filter(|r| r.event_type.as_deref() == Some("logout"))
        },
    )
    .await;
    let msgs = p.read(2, Duration::from_secs(1));
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let (insert, snapshot) = (&msgs[0].value, &msgs[1].value);
    assert_eq!(
        (insert["op"].as_str(), snapshot["op"].as_str()),
        (Some("insert"), Some("snapshot"))
    );
    assert!(
        snapshot["version"].as_u64() > insert["version"].as_u64(),
        "the later read wins: {insert} {snapshot}"
    );
    assert_eq!(row._version, snapshot["version"].as_u64().unwrap());
    assert_eq!(p.count("sent_to_kafka IS NOT TRUE").await, 0);
    assert_eq!(stream.stop(), 0);
    assert_eq!(sink.stop(), 0);
    p.drop().await;
}

/// Starts the first backfill of `rows` unsent rows in chunks of 1000 and returns once the first
/// messages are on the topic (the backfill is running).
async fn start_big_backfill(p: &E2e, rows: i64, ops: &str) -> Relay {
    p.exec(&format!(
        "INSERT INTO {{t}} (username, event_type, event_time) \
         SELECT 'u' || g, 'login', now() FROM generate_series(1, {rows}) g"
    ))
    .await;
    let stream = p.stream(ops, &["--backfill-chunk", "1000"]);
    eventually(
        "the backfill under way",
        Duration::from_secs(60),
        || async { (p.count("sent_to_kafka").await > 0).then_some(()) },
    )
    .await;
    assert!(
        p.count("sent_to_kafka IS NOT TRUE").await > 0,
        "the backfill finished before the DDL could meet it: give it more rows"
    );
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_during_the_first_backfill_completes_in_seconds_and_truncated_rows_never_reappear()
{
    let ops = "insert,update,delete,truncate";
    let p = E2e::new("sem_trunc", ops).await;
    let sink = p.sink();
    let stream = start_big_backfill(&p, 300_000, ops).await;
    let started = Instant::now();
    // Bounded, so a regression fails here instead of hanging the suite.
    p.exec("SET lock_timeout = '60s'; TRUNCATE {t}").await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "TRUNCATE took {took:?}");
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'after' || g, 'login', now() FROM generate_series(1, 5) g").await;
    p.wait_all_sent(Duration::from_secs(60)).await;
    p.wait_clickhouse_equals_postgres(Duration::from_secs(90))
        .await;
    let current = p.current().await;
    assert_eq!(current.len(), 5);
    assert!(current
        .values()
        .all(|r| r.username.as_deref().unwrap().starts_with("after")));
    assert_eq!(stream.stop(), 0);
    assert_eq!(sink.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_during_a_backfill_completes_in_seconds_and_every_row_arrives_once() {
    let p = E2e::new("sem_ddl", "insert").await;
    let stream = start_big_backfill(&p, 300_000, "insert").await;
    for ddl in [
        "ALTER TABLE {t} ADD COLUMN note TEXT",
        "CREATE INDEX ON {t} (username)",
        "ALTER TABLE {t} ALTER COLUMN note SET DEFAULT 'x'",
    ] {
        let started = Instant::now();
        p.exec(&format!("SET lock_timeout = '60s'; {ddl}")).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "{ddl} took {took:?}");
    }
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'live' || g, 'login', now() FROM generate_series(1, 100) g").await;
    p.wait_all_sent(Duration::from_secs(120)).await;
    let msgs = p.read(300_100, Duration::from_secs(2));
    let counts = id_counts(&msgs);
    assert_eq!(
        counts.keys().copied().collect::<BTreeSet<_>>(),
        p.ids().await
    );
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "sent twice: {:?}",
        &twice[..twice.len().min(10)]
    );
    assert_eq!(stream.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_row_lock_delays_only_the_confirmation_not_the_stream() {
    let p = E2e::new("sem_lock", "insert").await;
    let metrics_addr = free_port();
    let stream = p.stream(
        "insert",
        &["--ledger-interval", "5000", "--metrics-addr", &metrics_addr],
    );
    wait_slot_streaming(&p.pg, &p.name, Duration::from_secs(30)).await;
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) VALUES (1, 'locked', 'login', now())")
        .await;
    // Another session holds the row before the ledger (every 5 s) gets to it.
    let holder = pg().await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT * FROM {} WHERE id = 1 FOR UPDATE",
            p.name
        ))
        .await
        .unwrap();
    eventually(
        "the locked row acknowledged",
        Duration::from_secs(30),
        || async {
            (metrics(&metrics_addr).get("cdc_relay_stream_acked_total") == Some(&1.0)).then_some(())
        },
    )
    .await;
    let started = Instant::now();
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) SELECT g, 'free', 'login', now() FROM generate_series(2, 11) g").await;
    eventually(
        "the rows behind the lock acknowledged by Kafka",
        Duration::from_secs(30),
        || async {
            (metrics(&metrics_addr).get("cdc_relay_stream_acked_total") == Some(&11.0))
                .then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "rows behind the lock took {took:?}"
    );
    let msgs = read_topic(&p.name, 11, Duration::from_secs(30), Duration::ZERO);
    assert_eq!(id_counts(&msgs).len(), 11, "{msgs:?}");
    // The rest is recorded; the locked row waits, and the metrics say so.
    eventually(
        "the unlocked rows recorded",
        Duration::from_secs(30),
        || async { (p.count("sent_to_kafka").await == 10).then_some(()) },
    )
    .await;
    eventually(
        "the ledger reports the locked row",
        Duration::from_secs(30),
        || async {
            let m = metrics(&metrics_addr);
            (m.get("cdc_relay_stream_ledger_locked_rows") == Some(&1.0)).then_some(())
        },
    )
    .await;
    assert_eq!(p.count("id = 1 AND sent_to_kafka IS NOT TRUE").await, 1);
    // status names the session holding the table's rows.
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let status = p.status();
    let locks = status["postgres"]["table_locks"].as_array().unwrap();
    assert!(
        locks
            .iter()
            .any(|l| l["pid"] == holder_pid && l["mode"] == "RowShareLock" && l["granted"] == true),
        "{locks:?}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    p.wait_all_sent(Duration::from_secs(30)).await;
    assert_eq!(stream.stop(), 0);
    let msgs = p.read(11, Duration::from_secs(1));
    assert_eq!(msgs.len(), 11, "nothing sent twice: {msgs:?}");
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_key_update_is_a_delete_and_a_new_row_and_keeps_unchanged_toast() {
    let ops = "insert,update,delete";
    let p = E2e::new("sem_key", ops).await;
    let stream = p.stream(ops, &[]);
    let sink = p.sink();
    wait_slot_streaming(&p.pg, &p.name, Duration::from_secs(30)).await;
    // ~6 KB of incompressible text: stored out of line, so the key update does not resend it.
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) SELECT 1, string_agg(md5(g::text || random()::text), ''), 'login', now() FROM generate_series(1, 200) g").await;
    p.exec(
        "INSERT INTO {t} (id, username, event_type, event_time) VALUES (2, 'two', 'login', now())",
    )
    .await;
    let big: String =
        p.pg.query_one(
            &format!("SELECT username FROM {} WHERE id = 1", p.name),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eventually(
        "both rows in ClickHouse",
        Duration::from_secs(60),
        || async { (p.current().await.len() == 2).then_some(()) },
    )
    .await;
    // The start's backfill of unsent rows reads these two as well: a key update that leaves the
    // TOASTed value out, inside its window, lets the chunk's whole row go out too (by design: it
    // holds the value the update lacks), a seventh message. The update comes after it.
    eventually("the start's backfill done", Duration::from_secs(60), || {
        let log = stream.log_text();
        async move { log.contains("backfill done").then_some(()) }
    })
    .await;
    p.exec("UPDATE {t} SET id = id + 1000000, event_type = 'moved' WHERE id IN (1, 2)")
        .await;
    p.wait_clickhouse_equals_postgres(Duration::from_secs(60))
        .await;
    let current = p.current().await;
    assert_eq!(
        current.keys().copied().collect::<Vec<_>>(),
        [1_000_001, 1_000_002]
    );
    assert_eq!(
        current[&1_000_001].username.as_deref(),
        Some(big.as_str()),
        "unchanged TOAST survives the key change"
    );
    assert_eq!(current[&1_000_002].username.as_deref(), Some("two"));
    assert!(current
        .values()
        .all(|r| r.event_type.as_deref() == Some("moved")));
    // On the topic: a delete of the old key and the new row, one transaction (one version), the
    // new row naming the key it moved from.
    let msgs = p.read(6, Duration::from_secs(1));
    for (old, new) in [(1, 1_000_001), (2, 1_000_002)] {
        let find = |op: &str, id: i64| {
            msgs.iter()
                .find(|m| m.value["op"] == op && m.value["id"] == id)
                .unwrap_or_else(|| panic!("no {op} of {id}: {msgs:?}"))
                .value
                .clone()
        };
        let (delete, update) = (find("delete", old), find("update", new));
        assert_eq!(delete["version"], update["version"]);
        assert_eq!(update["moved_from"], old);
    }
    assert_eq!(msgs.len(), 6, "{msgs:?}");
    assert_eq!(stream.stop(), 0);
    assert_eq!(sink.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_enum_column_is_backfilled_and_streamed_as_its_text() {
    let p = E2e::new("sem_enum", "insert").await;
    let ty = format!("{}_ev", p.name);
    p.exec(&format!(
        "CREATE TYPE {ty} AS ENUM ('login', 'logout'); \
         ALTER TABLE {{t}} ALTER COLUMN event_type TYPE {ty} USING event_type::{ty}; \
         INSERT INTO {{t}} (username, event_type, event_time) VALUES ('a', 'login', now()), ('b', 'logout', now()), ('c', NULL, now())"
    ))
    .await;
    let stream = p.stream("insert", &[]);
    p.wait_all_sent(Duration::from_secs(30)).await;
    wait_slot_streaming(&p.pg, &p.name, Duration::from_secs(30)).await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) VALUES ('d', 'logout', now())")
        .await;
    p.wait_all_sent(Duration::from_secs(30)).await;
    let msgs = p.read(4, Duration::from_secs(1));
    let got: BTreeMap<String, serde_json::Value> = msgs
        .iter()
        .map(|m| {
            (
                m.value["user"].as_str().unwrap().to_string(),
                m.value["event"].clone(),
            )
        })
        .collect();
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    assert_eq!(got["a"], "login");
    assert_eq!(got["b"], "logout");
    assert!(got["c"].is_null());
    assert_eq!(got["d"], "logout");
    assert_eq!(stream.stop(), 0);
    p.drop().await;
    let _ = pg()
        .await
        .batch_execute(&format!("DROP TYPE IF EXISTS {ty}"))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_row_goes_to_the_dead_letter_topic_and_the_rows_behind_it_flow() {
    let p = E2e::new("sem_big", "insert").await;
    let dlq = format!("{}.stream-dlq", p.name);
    // One too large for the topic (3 MB) before the start, for the backfill.
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) VALUES (1, repeat('x', 3000000), 'login', now())").await;
    let stream = p.stream("insert", &[]);
    wait_slot_streaming(&p.pg, &p.name, Duration::from_secs(30)).await;
    // Streamed: one too large, one just under the broker's limit, ten ordinary rows.
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) VALUES (2, repeat('y', 3000000), 'login', now())").await;
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) VALUES (3, repeat('z', 1000000), 'login', now())").await;
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) SELECT g, 'ok', 'login', now() FROM generate_series(4, 13) g").await;
    p.wait_all_sent(Duration::from_secs(60)).await;
    let msgs = p.read(11, Duration::from_secs(1));
    assert_eq!(
        id_counts(&msgs).keys().copied().collect::<Vec<_>>(),
        (3..=13).collect::<Vec<_>>()
    );
    assert_eq!(
        msgs.iter().find(|m| m.value["id"] == 3).unwrap().value["user"]
            .as_str()
            .unwrap()
            .len(),
        1_000_000
    );
    let dead = read_topic(&dlq, 2, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(dead.len(), 2, "{dead:?}");
    let mut dead_ids: Vec<i64> = dead
        .iter()
        .map(|d| d.value["id"].as_i64().unwrap())
        .collect();
    dead_ids.sort();
    assert_eq!(dead_ids, [1, 2]);
    for d in &dead {
        assert!(
            d.value["error"]
                .as_str()
                .unwrap()
                .contains("max.message.bytes"),
            "{}",
            d.value["error"]
        );
        assert_eq!(d.value["table"], format!("public.{}", p.name));
        assert!(d.value["lsn"].as_str().unwrap().contains('/'));
        assert_eq!(d.value["row_truncated"], true);
        assert!(
            d.value["row"].as_str().unwrap().len() > 100_000,
            "as much of the row as fits"
        );
    }
    assert_eq!(p.status()["kafka"]["stream_dead_letters"], 2);
    assert_eq!(stream.stop(), 0, "the stream kept running");
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_table_is_backfilled_and_streamed_through_its_root() {
    let name = unique("sem_part");
    let pg = pg().await;
    pg.batch_execute(&format!(
        "CREATE TABLE {name} (id SERIAL, username TEXT, event_type TEXT, event_time TIMESTAMP, \
                              sent_to_kafka BOOLEAN DEFAULT FALSE, PRIMARY KEY (id)) PARTITION BY RANGE (id); \
         CREATE TABLE {name}_a PARTITION OF {name} FOR VALUES FROM (MINVALUE) TO (100); \
         CREATE TABLE {name}_b PARTITION OF {name} FOR VALUES FROM (100) TO (MAXVALUE); \
         GRANT SELECT, UPDATE (sent_to_kafka) ON {name} TO cdc_relay; \
         INSERT INTO {name} (id, username, event_type, event_time) VALUES (1, 'a', 'login', now()), (150, 'b', 'login', now()), (2, 'c', 'login', now())"
    ))
    .await
    .unwrap();
    let p = E2e(Table {
        name: name.clone(),
        pg,
    });
    // Published per partition, the changes would carry the partitions' names: refused up front.
    p.exec("CREATE PUBLICATION {t} FOR TABLE {t} WITH (publish = 'insert')")
        .await;
    let out = relay(
        &[
            "stream",
            "--table",
            &name,
            "--slot",
            &name,
            "--publication",
            &name,
            "--topic",
            &name,
        ],
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("publish_via_partition_root = true"),
        "{stderr}"
    );

    p.exec("ALTER PUBLICATION {t} SET (publish_via_partition_root = true)")
        .await;
    let stream = p.stream("insert", &[]);
    p.wait_all_sent(Duration::from_secs(30)).await;
    wait_slot_streaming(&p.pg, &name, Duration::from_secs(30)).await;
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) VALUES (3, 'd', 'login', now()), (101, 'e', 'login', now()), (102, 'f', 'login', now()), (4, 'g', 'login', now()), (500, 'h', 'login', now())").await;
    p.wait_all_sent(Duration::from_secs(30)).await;
    let msgs = p.read(8, Duration::from_secs(1));
    let counts = id_counts(&msgs);
    assert_eq!(
        counts.keys().copied().collect::<BTreeSet<_>>(),
        p.ids().await
    );
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    assert_eq!(msgs.len(), 8);
    assert_eq!(stream.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_the_stream_does_not_relay_stops_it_instead_of_being_skipped() {
    let p = E2e::new("sem_other", "insert").await;
    let other = format!("{}_other", p.name);
    let mut stream = p.stream("insert", &[]);
    wait_slot_streaming(&p.pg, &p.name, Duration::from_secs(30)).await;
    p.exec(&format!(
        "CREATE TABLE {other} (id INT PRIMARY KEY); ALTER PUBLICATION {{t}} ADD TABLE {other}; \
         INSERT INTO {other} VALUES (1); \
         INSERT INTO {{t}} (username, event_type, event_time) VALUES ('after', 'login', now())"
    ))
    .await;
    let status = stream.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", stream.log_text());
    assert!(stream.log_text().contains(&other), "{}", stream.log_text());
    // The slot did not move past the change: taking the table out lets the next start deliver the
    // row written after it.
    p.exec(&format!("ALTER PUBLICATION {{t}} DROP TABLE {other}"))
        .await;
    let mut again = p.stream("insert", &[]);
    let status = again.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(2),
        "the change is still there: {}",
        again.log_text()
    );
    let _ = p.pg.batch_execute(&format!("DROP TABLE {other}")).await;
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_restart_while_rows_are_written_sends_each_row_once() {
    let p = E2e::new("sem_restart", "insert").await;
    let mut stream = p.stream("insert", &[]);
    wait_slot_streaming(&p.pg, &p.name, Duration::from_secs(30)).await;
    let writer = {
        let name = p.name.clone();
        tokio::spawn(async move {
            let pg = pg().await;
            for i in 0..300 {
                pg.execute(
                    &format!("INSERT INTO {name} (username, event_type, event_time) VALUES ($1, 'login', now())"),
                    &[&format!("w{i}")],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(stream.stop(), 0);
        stream = p.stream("insert", &[]);
    }
    writer.await.unwrap();
    p.wait_all_sent(Duration::from_secs(60)).await;
    let msgs = p.read(300, Duration::from_secs(2));
    let counts = id_counts(&msgs);
    assert_eq!(
        counts.keys().copied().collect::<BTreeSet<_>>(),
        p.ids().await
    );
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent twice: {twice:?}");
    assert_eq!(msgs.len(), 300);
    assert_eq!(stream.stop(), 0);
    p.drop().await;
}

/// PostgreSQL 16+ drops the ledger's own UPDATEs before decoding them (a replication origin on the
/// ledger session, `origin = none` on the stream); before 16 the stream sees and drops them itself.
/// Either way every row arrives once and is recorded. Runs on every major of the matrix.
#[tokio::test(flavor = "multi_thread")]
async fn the_ledgers_writes_are_filtered_before_decoding_on_postgres_16_and_later() {
    let p = E2e::new("sem_origin", "insert,update,delete").await;
    let version: i32 =
        p.pg.query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .unwrap()
            .get(0);
    let metrics_addr = free_port();
    let stream = p.stream(
        "insert,update,delete",
        &["--ledger-interval", "50", "--metrics-addr", &metrics_addr],
    );
    wait_slot_streaming(&p.pg, &p.name, Duration::from_secs(30)).await;
    for batch in 0..5 {
        p.exec(&format!(
            "INSERT INTO {{t}} (id, username, event_type, event_time) \
             SELECT g, 'u' || g, 'login', now() FROM generate_series({}, {}) g",
            batch * 100 + 1,
            batch * 100 + 100
        ))
        .await;
        p.wait_all_sent(Duration::from_secs(30)).await;
    }
    // A user's UPDATE still streams, also of a row the ledger wrote.
    p.exec("UPDATE {t} SET username = 'renamed' WHERE id = 7")
        .await;
    let msgs = p.read(501, Duration::from_secs(2));
    assert_eq!(
        msgs.len(),
        501,
        "500 inserts and the user's update, once each"
    );
    let counts = id_counts(&msgs);
    assert_eq!(
        counts.keys().copied().collect::<BTreeSet<_>>(),
        (1..=500).collect::<BTreeSet<i64>>()
    );
    assert_eq!(counts[&7], 2);
    // The status tick (every 5 s) publishes the count of decoded ledger transactions.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = metrics(&metrics_addr);
    let decoded = m["cdc_relay_stream_ledger_transactions_decoded_total"];
    let filtered = m["cdc_relay_stream_ledger_origin_filter"];
    let origin = format!("cdc_relay_ledger_{}", p.name);
    let origins: i64 =
        p.pg.query_one(
            "SELECT count(*) FROM pg_replication_origin WHERE roname = $1",
            &[&origin],
        )
        .await
        .unwrap()
        .get(0);
    if version >= 160000 {
        assert_eq!(filtered, 1.0, "PostgreSQL {version}: origin filter on");
        assert_eq!(origins, 1, "origin {origin} created");
        assert_eq!(
            decoded, 0.0,
            "PostgreSQL {version}: no ledger transaction decoded"
        );
    } else {
        assert_eq!(filtered, 0.0, "PostgreSQL {version}: no origin filter");
        assert!(
            decoded >= 5.0,
            "PostgreSQL {version}: ledger transactions decoded: {decoded}"
        );
    }
    assert_eq!(stream.stop(), 0);
    p.drop().await;
}

/// A stream and a sink started while PostgreSQL, Kafka and ClickHouse hang up on every connection
/// (a host booting, a supervisor restarting everything) wait for them instead of exiting, and once
/// the services answer every row arrives once. Before, the first refused connection at start
/// ended the process (a chaos run lost its stream this way while PostgreSQL restarted).
#[tokio::test(flavor = "multi_thread")]
async fn started_while_every_service_hangs_up_stream_and_sink_wait_then_deliver_every_row() {
    let p = E2e::new("sw", "insert").await;
    let insert = |from: i64| {
        format!(
            "INSERT INTO {{t}} (username, event_type, event_time) \
             SELECT 'u' || g, 'login', now() FROM generate_series({from}, {}) g",
            from + 499
        )
    };
    p.exec(&insert(1)).await;
    let (pg_url, brokers, ch_url) = (
        env("CDC_RELAY_PG_RELAY_URL"),
        env("CDC_RELAY_KAFKA_BROKERS"),
        env("CDC_RELAY_CLICKHOUSE_URL"),
    );
    let (pg_at, ch_at) = (host_port(&pg_url), host_port(&ch_url));
    let pg_gate = Gate::closed(&pg_at).await;
    let kafka_gate = Gate::closed(&brokers).await;
    let ch_gate = Gate::closed(&ch_at).await;
    let gated_pg = pg_gate.url(&pg_url, &pg_at);
    let gated_kafka = format!("127.0.0.1:{}", kafka_gate.port);
    let gated_ch = ch_gate.url(&ch_url, &ch_at);
    let mut stream = Relay::start(
        &format!("{}_stream", p.name),
        &stream_args(&p.name, &["--heartbeat-interval", "1"]),
        &[
            ("CDC_RELAY_PG_URL", &gated_pg),
            ("CDC_RELAY_KAFKA_BROKERS", &gated_kafka),
        ],
    );
    let dlq = format!("{}_dlq", p.name);
    let mut sink = Relay::start(
        &format!("{}_sink", p.name),
        &[
            "sink",
            "--topic",
            &p.name,
            "--group",
            &p.name,
            "--clickhouse-table",
            &p.name,
            "--dlq-topic",
            &dlq,
        ],
        &[
            ("CDC_RELAY_CLICKHOUSE_URL", &gated_ch),
            ("CDC_RELAY_KAFKA_BROKERS", &gated_kafka),
        ],
    );
    // Each command waits at the first service it needs, saying which and why.
    let waiting_for = |r: &Relay, what: &str| {
        r.log_text()
            .lines()
            .any(|l| l.contains("could not start yet") && l.contains(what))
    };
    eventually(
        "both commands waiting for PostgreSQL / ClickHouse",
        Duration::from_secs(30),
        || async {
            (waiting_for(&stream, "postgres") && waiting_for(&sink, "clickhouse")).then_some(())
        },
    )
    .await;
    pg_gate.open();
    ch_gate.open();
    eventually(
        "both commands waiting for Kafka",
        Duration::from_secs(90),
        || async { (waiting_for(&stream, "kafka") && waiting_for(&sink, "kafka")).then_some(()) },
    )
    .await;
    for r in [&mut stream, &mut sink] {
        assert!(
            r.child.try_wait().unwrap().is_none(),
            "a command exited while a service was down: {}",
            r.log_text()
        );
    }
    p.exec(&insert(501)).await;
    kafka_gate.open();
    p.wait_all_sent(Duration::from_secs(120)).await;
    p.wait_clickhouse_equals_postgres(Duration::from_secs(60))
        .await;
    assert_eq!(p.ids().await.len(), 1000);
    let msgs = read_topic(
        &p.name,
        1000,
        Duration::from_secs(30),
        Duration::from_secs(2),
    );
    assert!(
        id_counts(&msgs).values().all(|&n| n == 1) && id_counts(&msgs).len() == 1000,
        "every row once on the topic"
    );
    assert_eq!(stream.stop(), 0);
    assert_eq!(sink.stop(), 0);
    p.0.drop().await;
}
