//! Shared helpers for the integration tests. They run against the real local services that
//! `scripts/services up` starts; settings come from the environment it writes (`.local/services.env`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

/// A setting from the services env; a missing one is a failure, never a skip.
pub fn env(name: &str) -> String {
    if let Ok(v) = std::env::var(name) {
        return v;
    }
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/.local/services.env");
    if let Ok(text) = std::fs::read_to_string(file) {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                if k == name {
                    return v.to_string();
                }
            }
        }
    }
    panic!("{name} is not set: run `scripts/services up` (it writes .local/services.env) or `scripts/test`")
}

/// A name unique to this test run, usable as a table, slot, publication or topic name.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

pub async fn pg() -> tokio_postgres::Client {
    pg_url(&env("CDC_RELAY_PG_URL")).await
}

pub async fn pg_url(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// A fresh copy of the seed's table under a unique name, set up as sql/postgres/roles.sql sets up
/// `user_logins`: the least-privilege relay role may read it and write only `sent_to_kafka`, and the
/// owner creates the publication (inserts only; see `publish`).
pub async fn create_table(pg: &tokio_postgres::Client, name: &str) {
    let ddl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sql/postgres/schema.sql"
    ))
    .unwrap();
    pg.batch_execute(&ddl.replace("user_logins", name))
        .await
        .unwrap();
    pg.batch_execute(&format!(
        "GRANT SELECT, UPDATE (sent_to_kafka) ON {name} TO cdc_relay; \
         CREATE PUBLICATION {name} FOR TABLE {name} WITH (publish = 'insert')"
    ))
    .await
    .unwrap();
}

/// Changes what the test's publication publishes, as its owner would (the relay role cannot).
pub async fn publish(pg: &tokio_postgres::Client, name: &str, ops: &str) {
    pg.batch_execute(&format!("ALTER PUBLICATION {name} SET (publish = '{ops}')"))
        .await
        .unwrap();
}

/// Waits until the slot exists, a walsender streams it and it has a consistent point, so rows
/// inserted from now on come through the change stream.
pub async fn wait_slot_streaming(pg: &tokio_postgres::Client, slot: &str, timeout: Duration) {
    eventually("slot streaming", timeout, || async {
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active AND confirmed_flush_lsn IS NOT NULL",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
}

/// Drops the slot (waiting for a dying walsender to let go of it), the publication and the table.
pub async fn drop_pipeline(pg: &tokio_postgres::Client, name: &str) {
    for _ in 0..50 {
        let r = pg
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await;
        if r.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = pg
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {name}; DROP TABLE IF EXISTS {name}"
        ))
        .await;
}

/// A ClickHouse client for the test server (or another at `url`), as the sink builds it for 18.16.
pub fn clickhouse(url: &str) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(url)
        .with_user(env("CDC_RELAY_CLICKHOUSE_USER"))
        .with_password(env("CDC_RELAY_CLICKHOUSE_PASSWORD"))
        .with_validation(false)
}

pub fn kafka_config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", env("CDC_RELAY_KAFKA_BROKERS"));
    c
}

/// A JSON message read back from Kafka, with its key and partition.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: Option<String>,
    pub partition: i32,
    pub offset: i64,
    pub value: serde_json::Value,
    /// The `cdc_relay.schema` header: the id of the message's schema record.
    pub schema: Option<String>,
}

/// Reads the topic from the beginning until `expected` messages arrived or `timeout` passed, then
/// keeps reading for `settle` to catch any extra (duplicate) messages.
pub fn read_topic(
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Received> {
    let consumer: BaseConsumer = kafka_config()
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline || settle_until.is_some_and(|s| now > s) {
            break;
        }
        if out.len() >= expected && settle_until.is_none() {
            settle_until = Some(now + settle);
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            // A broker that is down (a cluster test kills one) is reported here while the
            // consumer goes on with the others: not a message, not the end of the read.
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("reading {topic}: {e}");
                    continue;
                }
            };
            let schema = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == cdc_relay::event::SCHEMA_HEADER)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            out.push(Received {
                schema,
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                partition: m.partition(),
                offset: m.offset(),
                value: serde_json::from_slice(m.payload().unwrap_or(b"null"))
                    .unwrap_or(serde_json::Value::Null),
            });
        }
    }
    out
}

/// The `cdc-relay` binary with the services' settings in its environment.
/// `stream` for a test pipeline whose table, slot, publication and topic share `name`, then `extra`.
pub fn stream_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "stream",
        "--table",
        name,
        "--slot",
        name,
        "--publication",
        name,
        "--topic",
        name,
    ];
    args.extend_from_slice(extra);
    args
}

/// `stream` of several tables through slot and publication `slot`, each table (in `public`) to a
/// topic of its own name, then `extra`.
pub fn tables_stream_args(slot: &str, tables: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["stream", "--slot", slot, "--publication", slot]
        .map(String::from)
        .to_vec();
    for t in tables {
        args.extend(["--table".into(), t.to_string()]);
        args.extend(["--route".into(), format!("public.{t}={t}")]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// [`Relay::start`] with owned arguments.
pub fn start_relay(log_name: &str, args: &[String]) -> Relay {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Relay::start(log_name, &args, &[])
}

pub fn relay(args: &[&str], extra_env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc-relay"));
    cmd.args(args);
    // The relay runs as the least-privilege role, never as the table's owner or a superuser.
    cmd.env("CDC_RELAY_PG_URL", env("CDC_RELAY_PG_RELAY_URL"));
    for k in [
        "CDC_RELAY_KAFKA_BROKERS",
        "CDC_RELAY_CLICKHOUSE_URL",
        "CDC_RELAY_CLICKHOUSE_USER",
        "CDC_RELAY_CLICKHOUSE_PASSWORD",
    ] {
        cmd.env(k, env(k));
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.env("CDC_RELAY_LOG", "info,cdc_relay=debug");
    cmd
}

/// A running relay process, killed when dropped; its output goes to a log file for post-mortems.
pub struct Relay {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Relay {
    pub fn start(name: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Relay {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".local/test-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = relay(args, extra_env)
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start cdc-relay");
        Relay { child, log }
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> i32 {
        unsafe_kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "relay did not stop within 60s; log: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to end by itself (e.g. at a failpoint).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit within {timeout:?}; log: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Count of messages per key.
pub fn by_key(msgs: &[Received]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in msgs {
        *m.entry(r.key.clone().unwrap_or_default()).or_insert(0) += 1;
    }
    m
}

/// One test's private copy of the seed's table (see [`create_table`]), also naming its slot,
/// publication and topic.
pub struct Table {
    pub name: String,
    pub pg: tokio_postgres::Client,
}

impl Table {
    pub async fn new(prefix: &str) -> Table {
        let name = unique(prefix);
        let pg = pg().await;
        create_table(&pg, &name).await;
        Table { name, pg }
    }

    /// Runs SQL with `{t}` standing for the table's name.
    pub async fn exec(&self, sql: &str) {
        self.pg
            .batch_execute(&sql.replace("{t}", &self.name))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn count(&self, where_: &str) -> i64 {
        self.pg
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE {where_}", self.name),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn ids(&self) -> std::collections::BTreeSet<i64> {
        self.pg
            .query(&format!("SELECT id::int8 FROM {}", self.name), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn wait_all_sent(&self, timeout: Duration) {
        eventually("every row marked sent_to_kafka", timeout, || async {
            (self.count("sent_to_kafka IS NOT TRUE").await == 0).then_some(())
        })
        .await;
    }

    /// Drops the slot, the publication and the table.
    pub async fn drop(self) {
        drop_pipeline(&self.pg, &self.name).await;
    }
}

/// A table of the test's own DDL, readable by the relay role, with a publication of every op.
pub struct AnyTable {
    pub name: String,
    pub pg: tokio_postgres::Client,
}

impl AnyTable {
    pub async fn new(prefix: &str, ddl: &str) -> AnyTable {
        let name = unique(prefix);
        let pg = pg().await;
        pg.batch_execute(&ddl.replace("{t}", &name)).await.unwrap();
        pg.batch_execute(&format!(
            "GRANT SELECT ON {name} TO cdc_relay; \
             CREATE PUBLICATION {name} FOR TABLE {name} WITH (publish = 'insert, update, delete, truncate')"
        ))
        .await
        .unwrap();
        AnyTable { name, pg }
    }

    pub fn start(&self) -> Relay {
        Relay::start(
            &self.name,
            &stream_args(&self.name, &["--ops", "insert,update,delete,truncate"]),
            &[],
        )
    }

    pub async fn exec(&self, sql: &str) {
        self.pg
            .batch_execute(&sql.replace("{t}", &self.name))
            .await
            .unwrap();
    }

    pub async fn drop(self) {
        drop_pipeline(&self.pg, &self.name).await;
    }
}

/// The rows of `<table>_current` (`table` as `db.name`), each column's JSON as ClickHouse prints it
/// (64-bit integers unquoted, strings re-quoted canonically); empty while the view does not exist.
pub async fn clickhouse_current(
    table: &str,
    columns: &str,
    order: &str,
) -> Vec<HashMap<String, String>> {
    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    let sql = format!("SELECT {columns} FROM {table}_current ORDER BY {order}");
    let Ok(mut cursor) = ch
        .query(&sql)
        .with_setting("output_format_json_quote_64bit_integers", "0")
        .with_setting("output_format_json_quote_denormals", "1")
        .fetch_bytes("JSONEachRow")
    else {
        return Vec::new();
    };
    let mut text = Vec::new();
    while let Ok(Some(chunk)) = cursor.next().await {
        text.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<HashMap<String, Box<serde_json::value::RawValue>>>(l).ok()
        })
        .map(|m| m.into_iter().map(|(k, v)| (k, canon(v.get()))).collect())
        .collect()
}

/// Waits until [`clickhouse_current`] of `table` on `columns` (ordered by `order`) is `want`;
/// panics after `timeout` with the first rows that differ and `logs()` (the sinks' logs).
pub async fn wait_current_equal(
    table: &str,
    columns: &str,
    order: &str,
    want: &[HashMap<String, String>],
    timeout: Duration,
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = clickhouse_current(table, columns, order).await;
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            let differ: Vec<_> = want
                .iter()
                .filter(|w| !got.contains(w))
                .take(6)
                .map(|w| (w, got.iter().find(|g| g.get(order) == w.get(order))))
                .collect();
            panic!(
                "ClickHouse has {} rows, PostgreSQL {}; first differences (PostgreSQL, ClickHouse): {differ:#?}\nsink logs: {}",
                got.len(),
                want.len(),
                logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub fn canon(raw: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(v @ serde_json::Value::String(_)) => v.to_string(),
        _ => raw.to_string(),
    }
}

/// A TCP port in front of a service that, while closed, accepts each connection and hangs up at
/// once (a server that is down or shutting down), and once opened forwards to `upstream`.
pub struct Gate {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    pub async fn closed(upstream: &str) -> Gate {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(AtomicBool::new(false));
        let is_open = open.clone();
        let upstream = upstream.to_string();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !is_open.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Gate { port, open }
    }

    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// `url` with its `host:port` replaced by this gate's.
    pub fn url(&self, url: &str, upstream: &str) -> String {
        url.replace(upstream, &format!("127.0.0.1:{}", self.port))
    }
}

/// The `host:port` of a URL such as `postgres://u:p@127.0.0.1:15432/db` or `http://127.0.0.1:8123`.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap().to_string()
}
