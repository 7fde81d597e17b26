//! `cdc-relay sink` against the real Kafka and ClickHouse (and, end to end, with `stream` from the real
//! PostgreSQL): what the current view shows after redeliveries, deletes, poison messages and faults.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use clickhouse::Row;
use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Row, Deserialize, PartialEq)]
struct Current {
    id: u64,
    username: Option<String>,
    event_type: Option<String>,
    event_time: Option<u32>,
    event_time_us: Option<i64>,
    _version: u64,
}

async fn current(ch: &clickhouse::Client, table: &str) -> Vec<Current> {
    ch.query(&format!(
        "SELECT id, username, event_type, event_time, event_time_us, _version FROM {table}_current ORDER BY id"
    ))
    .fetch_all()
    .await
    .unwrap_or_default()
}

async fn count(ch: &clickhouse::Client, sql: &str) -> u64 {
    ch.query(sql).fetch_one::<u64>().await.unwrap_or(0)
}

/// A sink test's own topic, group and ClickHouse table.
struct SinkSetup {
    name: String,
    ch_url: String,
}

impl SinkSetup {
    fn new(prefix: &str) -> Self {
        SinkSetup {
            name: unique(prefix),
            ch_url: env("CDC_RELAY_CLICKHOUSE_URL"),
        }
    }

    fn dlq(&self) -> String {
        format!("{}_dlq", self.name)
    }

    fn start(&self, tag: &str) -> Relay {
        let dlq = self.dlq();
        let args = [
            "sink",
            "--topic",
            &self.name,
            "--group",
            &self.name,
            "--clickhouse-table",
            &self.name,
            "--dlq-topic",
            &dlq,
            "--batch-rows",
            "2000",
        ];
        Relay::start(
            &format!("{}_{tag}", self.name),
            &args,
            &[("CDC_RELAY_CLICKHOUSE_URL", self.ch_url.as_str())],
        )
    }

    fn ch(&self) -> clickhouse::Client {
        clickhouse(&self.ch_url)
    }

    async fn wait_current(&self, expected: u64, timeout: Duration) {
        let ch = self.ch();
        let sql = format!("SELECT count() FROM {}_current", self.name);
        eventually(
            &format!("{expected} rows in the current view"),
            timeout,
            || async { (count(&ch, &sql).await == expected).then_some(()) },
        )
        .await;
    }
}

fn event(id: i64, op: &str, user: &str, version: u64) -> serde_json::Value {
    json!({
        "id": id, "op": op, "user": user, "event": "login",
        "timestamp": 1_700_000_000.5 + id as f64,
        "event_time": null, "lsn": "0/1", "version": version,
    })
}

async fn produce(topic: &str, messages: &[(Option<String>, Vec<u8>)]) {
    let messages: Vec<_> = messages
        .iter()
        .map(|(k, v)| (None, k.clone(), v.clone()))
        .collect();
    produce_at(topic, &messages).await
}

/// Produces (partition, key, value) messages; partition `None` lets the key choose.
async fn produce_at(topic: &str, messages: &[(Option<i32>, Option<String>, Vec<u8>)]) {
    let producer: FutureProducer = kafka_config().set("linger.ms", "5").create().unwrap();
    // The topic exists with 3 partitions before the sink starts.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_config().create().unwrap();
    let _ = admin
        .create_topics(
            [&rdkafka::admin::NewTopic::new(
                topic,
                3,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await;
    // send_result enqueues at once; awaiting `send` one by one would produce one message per linger.
    let mut acks = Vec::with_capacity(messages.len());
    for (p, k, v) in messages {
        loop {
            let mut r = FutureRecord::to(topic).payload(v);
            if let Some(k) = k {
                r = r.key(k);
            }
            if let Some(p) = p {
                r = r.partition(*p);
            }
            match producer.send_result(r) {
                Ok(ack) => {
                    acks.push(ack);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
    for ack in acks {
        ack.await.expect("delivery report").expect("produced");
    }
}

fn good(events: &[serde_json::Value]) -> Vec<(Option<String>, Vec<u8>)> {
    events
        .iter()
        .map(|e| (Some(e["id"].to_string()), serde_json::to_vec(e).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_rows_end_to_end_from_postgres_to_clickhouse() {
    let name = unique("e2e_seed");
    let pg = pg().await;
    create_table(&pg, &name).await;
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sql/postgres/seed-data.sql"
    ))
    .unwrap();
    pg.batch_execute(&seed.replace("user_logins", &name))
        .await
        .unwrap();
    let expected: Vec<(i64, String, String, i64)> = pg
        .query(
            &format!("SELECT id::int8, username, event_type, (extract(epoch FROM event_time) * 1000000)::int8 FROM {name} ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let stream = Relay::start(&format!("{name}_stream"), &stream_args(&name, &[]), &[]);
    let s = SinkSetup {
        name: name.clone(),
        ch_url: env("CDC_RELAY_CLICKHOUSE_URL"),
    };
    let sink = s.start("sink");
    s.wait_current(3, Duration::from_secs(60)).await;
    let rows = current(&s.ch(), &name).await;
    assert_eq!(rows.len(), 3);
    for (row, (id, user, ev, us)) in rows.iter().zip(&expected) {
        assert_eq!(row.id as i64, *id);
        assert_eq!(row.username.as_deref(), Some(user.as_str()));
        assert_eq!(row.event_type.as_deref(), Some(ev.as_str()));
        assert_eq!(row.event_time_us, Some(*us), "microseconds survive");
        assert_eq!(
            row.event_time,
            Some((*us / 1_000_000) as u32),
            "event_time is the epoch second in UTC"
        );
    }
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    drop_pipeline(&pg, &name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redeliveries_collapse_to_the_newest_and_deletes_hide_rows() {
    let s = SinkSetup::new("sk_versions");
    let events = vec![
        event(1, "insert", "v1", 10),
        event(1, "update", "v3", 30),
        event(1, "update", "v2", 20), // late redelivery of an older change
        event(1, "update", "v3", 30), // duplicate
        event(2, "insert", "gone", 10),
        event(2, "delete", "", 11),
        event(3, "snapshot", "snap", 0),
        event(3, "snapshot", "snap", 0),
    ];
    produce(&s.name, &good(&events)).await;
    let sink = s.start("sink");
    s.wait_current(2, Duration::from_secs(60)).await;
    let ch = s.ch();
    // All 6 distinct versions landed, the 2 exact duplicates (same id and version in the batch)
    // only once; the view shows one current row per live id.
    let raw_sql = format!("SELECT count() FROM {}", s.name);
    eventually("6 raw rows", Duration::from_secs(30), || async {
        (count(&ch, &raw_sql).await == 6).then_some(())
    })
    .await;
    let distinct = format!("SELECT uniqExact(id, _version) FROM {}", s.name);
    assert_eq!(count(&ch, &distinct).await, 6);
    let rows = current(&ch, &s.name).await;
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(rows[0].username.as_deref(), Some("v3"));
    assert_eq!(rows[0]._version, 30);
    assert_eq!(rows[1].username.as_deref(), Some("snap"));
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_go_to_the_dead_letter_topic_and_the_sink_keeps_going() {
    let s = SinkSetup::new("sk_poison");
    let mut msgs = Vec::new();
    for i in 1..=10_000i64 {
        msgs.push((
            Some(i.to_string()),
            serde_json::to_vec(&event(i, "insert", "u", i as u64)).unwrap(),
        ));
        if i % 10 == 0 {
            let bad: Vec<u8> = match i % 40 {
                0 => b"not json at all".to_vec(),
                10 => br#"{"op":"insert","lsn":"0/1","version":1}"#.to_vec(), // no id
                20 => br#"{"id":"seven","op":"insert","user":null,"event":null,"timestamp":null,"event_time":null,"lsn":"0/1","version":1}"#.to_vec(),
                // id out of range (negative ids are stored since ids are Int64)
                _ => {
                    let mut e = event(1, "insert", "big", 1);
                    e["id"] = json!(9_223_372_036_854_775_808u64);
                    serde_json::to_vec(&e).unwrap()
                }
            };
            msgs.push((None, bad));
        }
    }
    produce(&s.name, &msgs).await;
    let mut sink = s.start("sink");
    s.wait_current(10_000, Duration::from_secs(120)).await;
    let dlq = read_topic(
        &s.dlq(),
        1000,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    assert_eq!(dlq.len(), 1000, "every poison message dead-lettered once");
    assert!(
        sink.child.try_wait().unwrap().is_none(),
        "sink still running"
    );
    // The rows are all there and the poison is not.
    let ch = s.ch();
    assert_eq!(
        count(
            &ch,
            &format!("SELECT count() FROM {}_current WHERE id <= 10000", s.name)
        )
        .await,
        10_000
    );
    // Headers carry the error and the original position; checked on one message.
    let consumer: rdkafka::consumer::BaseConsumer = kafka_config()
        .set("group.id", unique("hdr"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    use rdkafka::consumer::Consumer;
    use rdkafka::message::{Headers, Message};
    consumer.subscribe(&[&s.dlq()]).unwrap();
    let m = loop {
        if let Some(m) = consumer.poll(Duration::from_secs(5)) {
            break m.unwrap();
        }
    };
    let headers = m.headers().expect("headers");
    let names: Vec<&str> = headers.iter().map(|h| h.key).collect();
    for k in [
        "cdc_relay.error",
        "cdc_relay.original_partition",
        "cdc_relay.original_offset",
    ] {
        assert!(names.contains(&k), "{names:?}");
    }
    assert_eq!(sink.stop(), 0);
}

/// A ClickHouse server of the test's own, so stopping it does not disturb tests running alongside.
struct PrivateClickHouse {
    dir: std::path::PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateClickHouse {
    fn start(name: &str) -> Self {
        let services_dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".local/clickhouse");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(".local/{name}"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = 28_000 + (std::process::id() % 1000) as u16;
        let config = std::fs::read_to_string(services_dir.join("config.xml"))
            .unwrap()
            .replace(services_dir.to_str().unwrap(), dir.to_str().unwrap());
        let config = regex_replace(&config, "http_port", &port.to_string());
        let config = regex_replace(&config, "tcp_port", &(port + 1000).to_string());
        std::fs::create_dir_all(dir.join("log")).unwrap();
        std::fs::copy(services_dir.join("users.xml"), dir.join("users.xml")).unwrap();
        std::fs::write(dir.join("config.xml"), config).unwrap();
        let mut ch = PrivateClickHouse {
            dir,
            port,
            child: None,
        };
        ch.resume();
        ch
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn resume(&mut self) {
        let child = std::process::Command::new("clickhouse-server")
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .current_dir(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private ClickHouse did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn regex_replace(xml: &str, tag: &str, value: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open).unwrap() + open.len();
    let end = xml[start..].find(&close).unwrap() + start;
    format!("{}{}{}", &xml[..start], value, &xml[end..])
}

#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_down_for_10s_mid_load_loses_nothing() {
    let mut ch_server = PrivateClickHouse::start(&unique("ch_private"));
    let s = SinkSetup {
        name: unique("sk_chdown"),
        ch_url: ch_server.url(),
    };
    let first: Vec<_> = (1..=5_000)
        .map(|i| event(i, "insert", "a", i as u64))
        .collect();
    produce(&s.name, &good(&first)).await;
    let sink = s.start("sink");
    s.wait_current(5_000, Duration::from_secs(60)).await;
    ch_server.kill();
    let second: Vec<_> = (5_001..=10_000)
        .map(|i| event(i, "insert", "b", i as u64))
        .collect();
    produce(&s.name, &good(&second)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    ch_server.resume();
    s.wait_current(10_000, Duration::from_secs(120)).await;
    let ch = s.ch();
    let ids: u64 = count(
        &ch,
        &format!("SELECT uniqExact(id) FROM {}_current", s.name),
    )
    .await;
    assert_eq!(ids, 10_000);
    assert!(
        sink.log_text().contains("retrying"),
        "the sink saw the outage and retried"
    );
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_sink_mid_load_loses_nothing() {
    let s = SinkSetup::new("sk_kill");
    let events: Vec<_> = (1..=30_000)
        .map(|i| event(i, "insert", "k", i as u64))
        .collect();
    produce(&s.name, &good(&events)).await;
    let sink = s.start("sink1");
    let ch = s.ch();
    let sql = format!("SELECT count() FROM {}", s.name);
    eventually(
        "part of the load inserted",
        Duration::from_secs(60),
        || async { (count(&ch, &sql).await >= 2_000).then_some(()) },
    )
    .await;
    sink.kill9();
    let sink = s.start("sink2");
    s.wait_current(30_000, Duration::from_secs(120)).await;
    let raw = count(&ch, &sql).await;
    println!(
        "sink kill -9: {raw} raw rows for 30000 ids ({} re-inserted)",
        raw - 30_000
    );
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sinks_in_one_group_share_the_work() {
    let s = SinkSetup::new("sk_two");
    let a = s.start("a");
    let b = s.start("b");
    // Let both join before the load arrives, so both get partitions.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let events: Vec<_> = (1..=20_000)
        .map(|i| event(i, "insert", "two", i as u64))
        .collect();
    produce(&s.name, &good(&events)).await;
    s.wait_current(20_000, Duration::from_secs(120)).await;
    let ch = s.ch();
    let per_id: Vec<(u64, u64)> = ch
        .query(&format!(
            "SELECT id, count() FROM {}_current GROUP BY id HAVING count() > 1",
            s.name
        ))
        .fetch_all()
        .await
        .unwrap();
    assert!(
        per_id.is_empty(),
        "ids more than once in the current view: {per_id:?}"
    );
    let inserted = |log: &str| log.matches("batch inserted").count();
    let (la, lb) = (a.log_text(), b.log_text());
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    by.insert("a", inserted(&la));
    by.insert("b", inserted(&lb));
    assert!(
        by.values().all(|n| *n > 0),
        "both sinks inserted batches: {by:?}"
    );
    assert_eq!(a.stop(), 0);
    assert_eq!(b.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incompatible_existing_table_is_a_clear_error_naming_the_column() {
    let s = SinkSetup::new("sk_badschema");
    s.ch()
        .query(&format!("CREATE TABLE {} (id String, _version UInt64) ENGINE = ReplacingMergeTree(_version) ORDER BY id", s.name))
        .execute()
        .await
        .unwrap();
    let out = relay(
        &[
            "sink",
            "--topic",
            &s.name,
            "--group",
            &s.name,
            "--clickhouse-table",
            &s.name,
        ],
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("column id has type String"), "{stderr}");
}

/// stream + sink on one fresh table, for end-to-end checks.
async fn start_pipeline(
    prefix: &str,
    ops: &str,
) -> (String, tokio_postgres::Client, Relay, SinkSetup, Relay) {
    let name = unique(prefix);
    let pg = pg().await;
    create_table(&pg, &name).await;
    publish(&pg, &name, &ops.replace(',', ", ")).await;
    let stream = Relay::start(
        &format!("{name}_stream"),
        &stream_args(&name, &["--ops", ops]),
        &[],
    );
    let s = SinkSetup {
        name: name.clone(),
        ch_url: env("CDC_RELAY_CLICKHOUSE_URL"),
    };
    let sink = s.start("sink");
    wait_slot_streaming(&pg, &name, Duration::from_secs(30)).await;
    (name, pg, stream, s, sink)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_that_leaves_a_toasted_value_out_keeps_it_in_clickhouse() {
    let (name, pg, stream, s, sink) = start_pipeline("e2e_toast", "insert,update").await;
    // ~6 KB of incompressible text: stored out of line (TOAST), so an update of another column
    // does not send it again.
    pg.batch_execute(&format!(
        "INSERT INTO {name} (id, username, event_type, event_time) \
         SELECT 1, string_agg(md5(g::text || random()::text), ''), 'login', now() FROM generate_series(1, 200) g"
    ))
    .await
    .unwrap();
    let big: String = pg
        .query_one(&format!("SELECT username FROM {name} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(big.len(), 6400);
    s.wait_current(1, Duration::from_secs(60)).await;
    pg.batch_execute(&format!(
        "UPDATE {name} SET event_type = 'logout' WHERE id = 1"
    ))
    .await
    .unwrap();
    let ch = s.ch();
    let row = eventually(
        "the update in ClickHouse",
        Duration::from_secs(60),
        || async {
            current(&ch, &name)
                .await
                .into_iter()
                .find(|r| r.event_type.as_deref() == Some("logout"))
        },
    )
    .await;
    assert_eq!(
        row.username.as_deref(),
        Some(big.as_str()),
        "the unchanged TOASTed username survives"
    );
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    drop_pipeline(&pg, &name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_hides_earlier_rows_and_keeps_later_ones() {
    let (name, pg, stream, s, sink) = start_pipeline("e2e_truncate", "insert,truncate").await;
    pg.batch_execute(&format!(
        "INSERT INTO {name} (username, event_type, event_time) SELECT 'old' || g, 'login', now() FROM generate_series(1, 5) g"
    ))
    .await
    .unwrap();
    s.wait_current(5, Duration::from_secs(60)).await;
    pg.batch_execute(&format!(
        "TRUNCATE {name}; INSERT INTO {name} (username, event_type, event_time) SELECT 'new' || g, 'login', now() FROM generate_series(1, 2) g"
    ))
    .await
    .unwrap();
    let ch = s.ch();
    let rows = eventually(
        "only the rows after the truncate",
        Duration::from_secs(60),
        || async {
            let rows = current(&ch, &name).await;
            (rows.len() == 2).then_some(rows)
        },
    )
    .await;
    assert!(
        rows.iter()
            .all(|r| r.username.as_deref().unwrap().starts_with("new")),
        "{rows:?}"
    );
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    drop_pipeline(&pg, &name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_every_stage_and_fails_when_the_stream_is_down() {
    let (name, pg, stream, s, sink) = start_pipeline("e2e_status", "insert").await;
    pg.batch_execute(&format!(
        "INSERT INTO {name} (username, event_type, event_time) SELECT 'u' || g, 'login', now() FROM generate_series(1, 25) g"
    ))
    .await
    .unwrap();
    s.wait_current(25, Duration::from_secs(60)).await;
    let dlq = s.dlq();
    let args = [
        "status",
        "--json",
        "--table",
        &name,
        "--slot",
        &name,
        "--publication",
        &name,
        "--topic",
        &name,
        "--group",
        &name,
        "--clickhouse-table",
        &name,
        "--dlq-topic",
        &dlq,
    ];
    // The sink commits right after its insert and the stream's ledger records after Kafka's
    // acknowledgement, each on its own clock: wait until both caught up, then read the report.
    let status = eventually(
        "a healthy status with zero lag and the ledger caught up",
        Duration::from_secs(30),
        || async {
            let out = relay(&args, &[]).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (out.status.code() == Some(0)
                && v["kafka"]["total_lag"] == 0
                && v["postgres"]["unsent_rows"] == 0)
                .then_some(v)
        },
    )
    .await;
    assert_eq!(status["postgres"]["unsent_rows"], 0);
    assert_eq!(status["postgres"]["sent_rows"], 25);
    assert_eq!(status["postgres"]["slot"]["active"], true);
    assert_eq!(
        status["postgres"]["publication_ops"],
        serde_json::json!(["insert"])
    );
    assert_eq!(status["kafka"]["partitions"].as_array().unwrap().len(), 3);
    assert_eq!(status["clickhouse"]["current_rows"], 25);
    assert_eq!(status["kafka"]["dead_letters"], 0);

    assert_eq!(stream.stop(), 0);
    let out = relay(&args, &[]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "an inactive slot is unhealthy");
    assert_eq!(v["healthy"], false);
    assert!(v["problems"][0].as_str().unwrap().contains("not active"));
    assert_eq!(sink.stop(), 0);
    drop_pipeline(&pg, &name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_ahead_of_time_then_stream_delivers_old_and_new_rows_once_and_teardown_asks_first() {
    let name = unique("e2e_setup");
    let pg = pg().await;
    create_table(&pg, &name).await;
    let insert = |tag: &str| {
        format!("INSERT INTO {name} (username, event_type, event_time) SELECT '{tag}' || g, 'login', now() FROM generate_series(1, 5) g")
    };
    pg.batch_execute(&insert("before")).await.unwrap();
    let dlq = format!("{name}_dlq");
    let common = ["--table", &name, "--slot", &name, "--publication", &name];
    let mut setup_args = vec![
        "setup",
        "--topic",
        &name,
        "--clickhouse-table",
        &name,
        "--dlq-topic",
        &dlq,
    ];
    setup_args.extend_from_slice(&common);
    let out = relay(&setup_args, &[]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slots: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1);
    let s = SinkSetup {
        name: name.clone(),
        ch_url: env("CDC_RELAY_CLICKHOUSE_URL"),
    };
    assert_eq!(
        count(&s.ch(), &format!("SELECT count() FROM {name}_current")).await,
        0,
        "table and view exist"
    );
    pg.batch_execute(&insert("after")).await.unwrap();

    let mut stream_args = vec!["stream", "--topic", &name];
    stream_args.extend_from_slice(&common);
    let stream = Relay::start(&format!("{name}_stream"), &stream_args, &[]);
    let sink = s.start("sink");
    s.wait_current(10, Duration::from_secs(60)).await;
    let msgs = read_topic(&name, 10, Duration::from_secs(30), Duration::from_secs(2));
    assert_eq!(
        msgs.len(),
        10,
        "rows from before the slot by the backfill, later ones by the stream, none twice"
    );
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);

    let mut teardown = vec!["teardown"];
    teardown.extend_from_slice(&common);
    // Dropping the publication takes the table's owner: teardown is an administrator's job.
    let owner_url = env("CDC_RELAY_PG_URL");
    let owner = [("CDC_RELAY_PG_URL", owner_url.as_str())];
    let out = relay(&teardown, &owner).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "teardown without confirmation refuses"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes-drop-slot"));
    teardown.push("--yes-drop-slot");
    let out = relay(&teardown, &owner).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slots: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
    drop_pipeline(&pg, &name).await;
}

fn truncate_event(version: u64) -> serde_json::Value {
    json!({
        "op": "truncate", "user": null, "event": null, "timestamp": null,
        "event_time": null, "lsn": "0/1", "version": version,
    })
}

/// One message on partition `p` (keyed by its id, if any).
fn on(p: i32, e: &serde_json::Value) -> (Option<i32>, Option<String>, Vec<u8>) {
    (
        Some(p),
        e.get("id").map(|id| id.to_string()),
        serde_json::to_vec(e).unwrap(),
    )
}

/// The ids the current view shows, in order (signed: new tables store negative ids).
async fn view_ids(ch: &clickhouse::Client, table: &str) -> Vec<i64> {
    ch.query(&format!("SELECT id FROM {table}_current ORDER BY id"))
        .fetch_all()
        .await
        .unwrap_or_default()
}

impl SinkSetup {
    /// Waits until the sink created its table, then stops background merges on it, so the test
    /// sees every stored version as the sink inserted it.
    async fn wait_table_and_stop_merges(&self) {
        let ch = self.ch();
        let sql = format!(
            "SELECT count() FROM system.tables WHERE database = 'default' AND name = '{}_current'",
            self.name
        );
        eventually("the sink's table", Duration::from_secs(60), || async {
            (count(&ch, &sql).await == 1).then_some(())
        })
        .await;
        ch.query(&format!("SYSTEM STOP MERGES {}", self.name))
            .execute()
            .await
            .unwrap();
    }

    async fn wait_raw(&self, filter: &str, expected: u64) {
        let ch = self.ch();
        let sql = format!("SELECT count() FROM {} WHERE {filter}", self.name);
        eventually(
            &format!("{expected} stored rows with {filter}"),
            Duration::from_secs(60),
            || async { (count(&ch, &sql).await == expected).then_some(()) },
        )
        .await;
    }
}

/// The `cdc_relay.error` header of every message in the dead-letter topic.
fn dead_letter_errors(topic: &str, expected: usize) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = kafka_config()
        .set("group.id", unique("dlq_reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut settle = None;
    while std::time::Instant::now() < deadline
        && settle.is_none_or(|s| std::time::Instant::now() < s)
    {
        if out.len() >= expected && settle.is_none() {
            settle = Some(std::time::Instant::now() + Duration::from_secs(2));
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let error = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "cdc_relay.error"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.push(error);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncate_hides_lower_versions_that_arrive_after_it_also_after_a_restart() {
    let s = SinkSetup::new("sk_trunc_wm");
    // Before the truncate (version 1000), on every partition.
    let mut msgs: Vec<_> = (1..=6)
        .map(|i| {
            on(
                (i % 3) as i32,
                &event(i, "insert", "before", 100 + i as u64),
            )
        })
        .collect();
    msgs.push(on(0, &truncate_event(1000)));
    produce_at(&s.name, &msgs).await;
    let sink = s.start("sink1");
    let ch = s.ch();
    let watermark = format!("SELECT max(version) FROM {}_truncates", s.name);
    eventually("the truncate applied", Duration::from_secs(60), || async {
        (count(&ch, &watermark).await == 1000).then_some(())
    })
    .await;
    // After the sink applied it: lower versions from other partitions (changes committed before
    // the truncate that Kafka delivered late), and later changes on every partition.
    let mut msgs: Vec<_> = (11..=16)
        .map(|i| {
            on(
                1 + (i % 2) as i32,
                &event(i, "insert", "late", 500 + i as u64),
            )
        })
        .collect();
    msgs.extend(
        (21..=26).map(|i| on((i % 3) as i32, &event(i, "insert", "after", 979 + i as u64))),
    );
    produce_at(&s.name, &msgs).await;
    s.wait_raw("id BETWEEN 1 AND 26", 18).await;
    let expected: Vec<i64> = (21..=26).collect();
    assert_eq!(view_ids(&ch, &s.name).await, expected);
    assert_eq!(sink.stop(), 0);

    // A restarted sink knows the watermark from ClickHouse.
    let msgs = vec![
        on(1, &event(31, "insert", "late", 999)),
        on(2, &event(32, "insert", "late", 1)),
        on(0, &event(41, "insert", "after", 2000)),
    ];
    produce_at(&s.name, &msgs).await;
    let sink = s.start("sink2");
    s.wait_raw("id IN (31, 32, 41)", 3).await;
    let mut expected = expected;
    expected.push(41);
    assert_eq!(view_ids(&ch, &s.name).await, expected);
    let users: Vec<String> = ch
        .query(&format!(
            "SELECT DISTINCT assumeNotNull(username) FROM {}_current",
            s.name
        ))
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(users, vec!["after".to_string()]);
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unchanged_column_is_filled_from_the_newest_earlier_version_not_a_newer_one() {
    let s = SinkSetup::new("sk_toast_ver");
    let sink = s.start("sink");
    s.wait_table_and_stop_merges().await;
    produce(
        &s.name,
        &good(&[event(1, "insert", "a", 10), event(1, "update", "c", 30)]),
    )
    .await;
    s.wait_raw("id = 1", 2).await;
    // A change older than the stored newest (as after a re-read) that left username out.
    let mut late = event(1, "update", "", 20);
    late["user"] = serde_json::Value::Null;
    late["event"] = json!("late");
    late["unchanged"] = json!(["username"]);
    produce(&s.name, &good(&[late])).await;
    s.wait_raw("id = 1", 3).await;
    let ch = s.ch();
    let filled: String = ch
        .query(&format!(
            "SELECT ifNull(username, 'NULL') FROM {} WHERE id = 1 AND _version = 20",
            s.name
        ))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(filled, "a", "filled from version 10, the newest below 20");
    let rows = current(&ch, &s.name).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].username.as_deref(), rows[0]._version),
        (Some("c"), 30)
    );
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn of_equal_versions_of_one_id_in_a_batch_the_later_message_is_stored() {
    let s = SinkSetup::new("sk_same_ver");
    let sink = s.start("sink");
    s.wait_table_and_stop_merges().await;
    // Two changes of id 1 in one transaction (one version), in partition order.
    produce(
        &s.name,
        &good(&[
            event(1, "update", "first", 5),
            event(2, "insert", "other", 5),
            event(1, "update", "second", 5),
        ]),
    )
    .await;
    s.wait_current(2, Duration::from_secs(60)).await;
    s.wait_raw("1", 2).await;
    let ch = s.ch();
    assert_eq!(
        count(&ch, &format!("SELECT count() FROM {} WHERE id = 1", s.name)).await,
        1,
        "only the last of the equal versions inserted"
    );
    let rows = current(&ch, &s.name).await;
    assert_eq!(rows[0].username.as_deref(), Some("second"));
    assert_eq!(rows[1].username.as_deref(), Some("other"));
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_table_stores_negative_ids() {
    let s = SinkSetup::new("sk_negative");
    produce(
        &s.name,
        &good(&[event(-5, "insert", "neg", 3), event(7, "insert", "pos", 4)]),
    )
    .await;
    let sink = s.start("sink");
    s.wait_current(2, Duration::from_secs(60)).await;
    let ch = s.ch();
    assert_eq!(view_ids(&ch, &s.name).await, vec![-5, 7]);
    let user: String = ch
        .query(&format!(
            "SELECT assumeNotNull(username) FROM {}_current WHERE id = -5",
            s.name
        ))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(user, "neg");
    let id_type: String = ch
        .query("SELECT type FROM system.columns WHERE database = 'default' AND table = ? AND name = 'id'")
        .bind(&s.name)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(id_type, "Int64");
    assert!(dead_letter_errors(&s.dlq(), 0).is_empty());
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_of_an_earlier_release_keeps_working_and_its_view_gets_the_truncate_filter() {
    let s = SinkSetup::new("sk_legacy");
    let ch = s.ch();
    let t = &s.name;
    // The DDL of the previous release: id UInt64, a view without the truncate filter.
    for ddl in [
        format!("CREATE TABLE {t} (id UInt64, username Nullable(String), event_type Nullable(String), event_time Nullable(DateTime), event_time_us Nullable(Int64), op String, _lsn String, _version UInt64, _deleted UInt8, _ingested_at DateTime DEFAULT now()) ENGINE = ReplacingMergeTree(_version) ORDER BY id"),
        format!("CREATE VIEW {t}_current AS SELECT id, username, event_type, event_time, event_time_us, op, _lsn, _version FROM {t} FINAL WHERE _deleted = 0"),
        format!("INSERT INTO {t} (id, username, event_type, op, _lsn, _version, _deleted) VALUES (100, 'old', 'login', 'snapshot', '0/1', 1, 0)"),
    ] {
        ch.query(&ddl).execute().await.unwrap();
    }
    let mut msgs = good(&[
        event(1, "insert", "a", 10),
        event(-5, "insert", "neg", 11),
        event(2, "insert", "b", 12),
    ]);
    msgs.push((None, serde_json::to_vec(&truncate_event(5)).unwrap()));
    produce(t, &msgs).await;
    let sink = s.start("sink");
    s.wait_raw("1", 3).await;
    eventually("the truncate applied", Duration::from_secs(60), || async {
        (count(&ch, &format!("SELECT max(version) FROM {t}_truncates")).await == 5).then_some(())
    })
    .await;
    assert_eq!(
        view_ids(&ch, t).await,
        vec![1, 2],
        "id 100 (version 1) truncated"
    );
    let errors = dead_letter_errors(&s.dlq(), 1);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("id -5")
            && errors[0].contains("UInt64")
            && errors[0].contains("--clickhouse-table"),
        "{}",
        errors[0]
    );
    let view: String = ch
        .query(
            "SELECT create_table_query FROM system.tables WHERE database = 'default' AND name = ?",
        )
        .bind(format!("{t}_current"))
        .fetch_one()
        .await
        .unwrap();
    assert!(view.contains(&format!("{t}_truncates")), "{view}");
    let id_type: String = ch
        .query("SELECT type FROM system.columns WHERE database = 'default' AND table = ? AND name = 'id'")
        .bind(t)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(id_type, "UInt64", "the data table is kept as it was");
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_the_sink_creates_are_replicated_min_3_brokers() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let s = SinkSetup::new("sk_repl");
    let sink = s.start("sink");
    let consumer: BaseConsumer = kafka_config().create().unwrap();
    let (brokers, topic, dlq) =
        eventually("the sink's topics", Duration::from_secs(60), || async {
            let md = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .ok()?;
            let replicas = |name: &str| -> Option<Vec<usize>> {
                let t = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())?;
                let r: Vec<usize> = t.partitions().iter().map(|p| p.replicas().len()).collect();
                (!r.is_empty()).then_some(r)
            };
            Some((md.brokers().len(), replicas(&s.name)?, replicas(&s.dlq())?))
        })
        .await;
    let expected = brokers.min(3);
    assert!(expected >= 1);
    assert_eq!(
        topic,
        vec![expected; 3],
        "3 partitions, min(3, {brokers}) replicas each"
    );
    assert_eq!(
        dlq,
        vec![expected],
        "1 partition, min(3, {brokers}) replicas"
    );
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_warns_and_fails_when_unconsumed_messages_near_the_topic_retention() {
    let (name, pg, stream, s, sink) = start_pipeline("e2e_retention", "insert").await;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_config().create().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Two topics that keep messages for 60 s, read by a group that committed nothing: one with
    // messages written 55 s ago (92 % of the retention), one with fresh messages.
    let producer: FutureProducer = kafka_config().create().unwrap();
    let mut topics = Vec::new();
    for (tag, age_ms) in [("stale", 55_000), ("fresh", 0)] {
        let topic = format!("{name}_{tag}");
        let new =
            rdkafka::admin::NewTopic::new(&topic, 2, rdkafka::admin::TopicReplication::Fixed(1))
                .set("retention.ms", "60000");
        admin
            .create_topics([&new], &rdkafka::admin::AdminOptions::new())
            .await
            .unwrap()
            .into_iter()
            .for_each(|r| {
                r.unwrap();
            });
        for i in 0..4 {
            let payload = serde_json::to_vec(&event(i, "insert", tag, 1)).unwrap();
            let key = i.to_string();
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&payload)
                        .partition((i % 2) as i32)
                        .timestamp(now_ms - age_ms),
                    Duration::from_secs(30),
                )
                .await
                .unwrap();
        }
        topics.push(topic);
    }
    let status = |topic: &str| {
        let group = format!("{topic}_nobody");
        let dlq = s.dlq();
        let args = [
            "status",
            "--json",
            "--table",
            &name,
            "--slot",
            &name,
            "--publication",
            &name,
            "--topic",
            topic,
            "--group",
            &group,
            "--clickhouse-table",
            &name,
            "--dlq-topic",
            &dlq,
            "--max-lag",
            "1000000",
        ];
        let out = relay(&args, &[]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), v)
    };
    let (code, v) = status(&topics[0]);
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["healthy"], false);
    assert_eq!(v["kafka"]["retention_ms"], 60_000);
    let warnings = v["kafka"]["retention_warnings"].as_array().unwrap();
    assert_eq!(
        warnings
            .iter()
            .map(|w| w["partition"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1],
        "{v:#}"
    );
    for w in warnings {
        let age = w["oldest_unconsumed_age_ms"].as_i64().unwrap();
        assert!((55_000..65_000).contains(&age), "{w}");
    }
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(
        problems.len(),
        2,
        "only the retention is wrong: {problems:?}"
    );
    assert!(problems
        .iter()
        .all(|p| p.as_str().unwrap().contains("retention.ms 60000")));

    let (code, v) = status(&topics[1]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["kafka"]["total_lag"], 4);
    assert_eq!(v["kafka"]["retention_warnings"], json!([]));

    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    drop_pipeline(&pg, &name).await;
}
