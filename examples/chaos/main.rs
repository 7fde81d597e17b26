//! Chaos run for `scripts/chaos`: loads rows while `stream` and `sink` are killed with -9 at random
//! moments and PostgreSQL, Kafka and ClickHouse are each stopped and started once; then waits for the
//! pipeline to catch up and compares every committed PostgreSQL row with the ClickHouse current view.
//!
//!   cargo run --release --example chaos -- --rows N --kills K --seed S [--exactly-once] [--cluster]
//!
//! Reads the settings of `.local/services.env` from the environment. Exits non-zero on any missing,
//! mismatched or extra row, or if the pipeline does not converge. With `--exactly-once` the stream
//! runs in that mode, and a `read_committed` reader of the topic must see every row exactly once
//! (`duplicates: 0`). With `--cluster` it runs on the cluster stack (cluster.rs): three sinks, a
//! broker and a ClickHouse replica killed -9 and restarted, every replica checked.

mod cluster;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clickhouse::Row;
use serde::Deserialize;

/// username, event_type, event_time in microseconds.
type PgValues = (Option<String>, Option<String>, Option<i64>);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: reproducible from --seed, no dependency.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The checkout this run belongs to, from `scripts/chaos` (not the build's path: one target dir
/// serves several clones, and a prebuilt binary must not reach into another clone).
fn root() -> std::path::PathBuf {
    std::env::var_os("CDC_RELAY_ROOT")
        .map(Into::into)
        .unwrap_or_else(|| std::env::current_dir().expect("current dir"))
}

fn env(k: &str) -> String {
    std::env::var(k)
        .unwrap_or_else(|_| panic!("{k} is not set: load .local/services.env (scripts/chaos does)"))
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// Messages per id of `topic` as a `read_committed` consumer sees them, read to the end.
fn committed_counts(topic: &str) -> HashMap<u64, u64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", env("CDC_RELAY_KAFKA_BROKERS"))
        .set("group.id", format!("chaos-reader-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .expect("a Kafka consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let partitions = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map(|m| m.topics().first().map_or(0, |t| t.partitions().len()))
        .unwrap_or(0);
    let mut at_end = std::collections::HashSet::new();
    let mut counts = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while at_end.len() < partitions && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let v: serde_json::Value =
                    serde_json::from_slice(m.payload().unwrap_or(b"null")).unwrap_or_default();
                if let Some(id) = v["id"].as_u64() {
                    *counts.entry(id).or_insert(0) += 1;
                }
                at_end.remove(&m.partition());
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            _ => {}
        }
    }
    counts
}

struct Proc {
    name: String,
    args: Vec<String>,
    /// Settings of this process only (a sink's own ClickHouse node).
    env: Vec<(String, String)>,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let relay_url =
            std::env::var("CDC_RELAY_PG_RELAY_URL").unwrap_or_else(|_| env("CDC_RELAY_PG_URL"));
        let child = Command::new(env("CDC_RELAY_BIN"))
            .args(&self.args)
            .env("CDC_RELAY_PG_URL", relay_url)
            .env("CDC_RELAY_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start cdc-relay");
        self.child = Some(child);
    }
    /// How the process ended if it exited by itself: a relay must ride out every restart here.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(format!(
            "{} exited by itself ({status}); see {}",
            self.name,
            self.log.display()
        ))
    }
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    // Also on a panic: no relay outlives the run.
    fn drop(&mut self) {
        self.kill9();
    }
}

fn services(args: &[&str]) {
    let root = root().display().to_string();
    // Its output goes to a file: servers it starts must not hold our caller's pipes open.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{root}/.local/chaos/services.log"))
        .unwrap();
    let ok = Command::new(format!("{root}/scripts/services"))
        .args(args)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "scripts/services {args:?} failed");
}

#[derive(Debug, Row, Deserialize, PartialEq)]
struct ChRow {
    id: u64,
    username: Option<String>,
    event_type: Option<String>,
    event_time_us: Option<i64>,
}

async fn pg() -> tokio_postgres::Client {
    loop {
        match tokio_postgres::connect(&env("CDC_RELAY_PG_URL"), tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                return c;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::main]
async fn main() {
    let rows = arg("--rows", 1_000_000);
    let kills = arg("--kills", 20);
    let seed = arg("--seed", 1);
    let exactly_once = std::env::args().any(|a| a == "--exactly-once");
    let on_cluster = std::env::args().any(|a| a == "--cluster");
    let mut rng = Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let started = Instant::now();
    let name = format!("chaos_{}_{}", std::process::id(), seed);
    let dir = root().join(".local/chaos");
    std::fs::create_dir_all(&dir).unwrap();

    let admin = pg().await;
    let ddl = std::fs::read_to_string(root().join("sql/postgres/schema.sql")).unwrap();
    admin
        .batch_execute(&ddl.replace("user_logins", &name))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "GRANT SELECT, UPDATE (sent_to_kafka) ON {name} TO cdc_relay; \
             CREATE PUBLICATION {name} FOR TABLE {name} WITH (publish = 'insert')"
        ))
        .await
        .unwrap();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut stream = Proc {
        name: "stream".into(),
        env: Vec::new(),
        args: s(&[
            "stream",
            "--table",
            &name,
            "--slot",
            &name,
            "--publication",
            &name,
            "--topic",
            &name,
        ]),
        log: dir.join(format!("{name}.stream.log")),
        child: None,
    };
    // On the cluster, three sinks in the group, each talking to the first replica of a shard
    // (docs/operations.md): nodes 1, 3 and 1 again.
    let sink_nodes = if on_cluster {
        let nodes = cluster::nodes();
        [0, 2, 0].iter().map(|&i| Some(nodes[i].clone())).collect()
    } else {
        vec![None]
    };
    let mut sinks: Vec<Proc> = sink_nodes
        .into_iter()
        .enumerate()
        .map(|(i, node)| {
            let mut args = s(&[
                "sink",
                "--topic",
                &name,
                "--group",
                &name,
                "--clickhouse-table",
                &name,
                "--dlq-topic",
                &format!("{name}.dlq"),
            ]);
            let mut env = Vec::new();
            if let Some(url) = node {
                args.extend(s(&[
                    "--clickhouse-cluster",
                    &std::env::var("CDC_RELAY_CLICKHOUSE_CLUSTER").unwrap_or_default(),
                ]));
                env.push(("CDC_RELAY_CLICKHOUSE_URL".to_string(), url));
            }
            Proc {
                name: if on_cluster {
                    format!("sink-{}", i + 1)
                } else {
                    "sink".into()
                },
                args,
                env,
                log: dir.join(format!(
                    "{name}.sink{}.log",
                    if on_cluster {
                        format!("-{}", i + 1)
                    } else {
                        String::new()
                    }
                )),
                child: None,
            }
        })
        .collect();
    if exactly_once {
        stream.args.push("--exactly-once".into());
    }
    stream.start();
    for sink in &mut sinks {
        sink.start();
    }

    // The chaos below takes about a second per event; the load is paced to last as long, so every
    // kill and restart lands while rows are flowing.
    let events = kills + 3;
    let load_secs = events as f64 * 1.05;

    // Loader: transactions of 1..=2000 rows, one in ten rolled back, until `rows` are committed.
    let loader = {
        let name = name.clone();
        let mut rng = Rng(rng.next() | 1);
        tokio::spawn(async move {
            let mut client = pg().await;
            let mut committed = 0u64;
            let mut rolled_back = 0u64;
            let began = Instant::now();
            while committed < rows {
                let due = Duration::from_secs_f64(load_secs * committed as f64 / rows as f64);
                if let Some(wait) = due.checked_sub(began.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
                let n = (1 + rng.below(2000)).min(rows - committed);
                let rollback = rng.below(10) == 0;
                let sql = format!(
                    "BEGIN; INSERT INTO {name} (username, event_type, event_time) \
                     SELECT 'u' || g || '-' || md5(random()::text), CASE WHEN g % 3 = 0 THEN 'logout' ELSE 'login' END, clock_timestamp() \
                     FROM generate_series(1, {n}) g; {}",
                    if rollback { "ROLLBACK" } else { "COMMIT" }
                );
                match client.batch_execute(&sql).await {
                    Ok(()) if rollback => rolled_back += n,
                    Ok(()) => committed += n,
                    // PostgreSQL restarting: whether the last commit landed is settled by the final
                    // comparison, which reads what PostgreSQL holds.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        client = pg().await;
                        committed = client
                            .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                            .await
                            .map(|r| r.get::<_, i64>(0) as u64)
                            .unwrap_or(committed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (committed, rolled_back)
        })
    };

    // Chaos: kills spread over the load, and each service restarted once among them; on the
    // cluster one broker and one ClickHouse replica, each killed -9.
    let mut restarts: Vec<String> = if on_cluster {
        vec![
            "postgres".into(),
            format!("kafka-{}", 1 + rng.below(3)),
            format!("clickhouse-{}", 1 + rng.below(4)),
        ]
    } else {
        vec!["postgres".into(), "kafka".into(), "clickhouse".into()]
    };
    let up: &[&str] = if on_cluster {
        &["up", "--cluster"]
    } else {
        &["up"]
    };
    let mut done_kills = 0;
    let mut done_restarts = 0;
    let mut step = 0u64;
    let mut exits: Vec<String> = Vec::new();
    while !loader.is_finished() || step < events {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1500))).await;
        exits.extend(stream.exited());
        exits.extend(sinks.iter_mut().filter_map(Proc::exited));
        if step >= events {
            continue;
        }
        let restart_now = !restarts.is_empty() && rng.below(events - step) < restarts.len() as u64;
        if restart_now {
            let svc = restarts.remove(rng.below(restarts.len() as u64) as usize);
            // A node of the cluster dies at once; a single service is stopped.
            let how = if on_cluster && svc != "postgres" {
                "kill"
            } else {
                "stop"
            };
            eprintln!("chaos: {how} {svc}");
            services(&[how, &svc]);
            tokio::time::sleep(Duration::from_millis(500 + rng.below(3000))).await;
            services(up);
            done_restarts += 1;
        } else {
            let pick = rng.below(1 + sinks.len() as u64) as usize;
            let p = if pick == 0 {
                &mut stream
            } else {
                &mut sinks[pick - 1]
            };
            eprintln!("chaos: kill -9 {}", p.name);
            p.kill9();
            tokio::time::sleep(Duration::from_millis(rng.below(1000))).await;
            p.start();
            done_kills += 1;
        }
        step += 1;
    }
    let (committed, rolled_back) = loader.await.unwrap();
    eprintln!("chaos: load done ({committed} rows committed, {rolled_back} rolled back); waiting to converge");

    // Converge: every row sent, ClickHouse holding as many current rows as PostgreSQL has.
    let ch = clickhouse::Client::default()
        .with_url(env("CDC_RELAY_CLICKHOUSE_URL"))
        .with_user(env("CDC_RELAY_CLICKHOUSE_USER"))
        .with_password(env("CDC_RELAY_CLICKHOUSE_PASSWORD"))
        .with_validation(false);
    let admin = pg().await;
    let load_done = Instant::now();
    let pg_rows: i64 = admin
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await
        .unwrap()
        .get(0);
    let mut converged = false;
    while load_done.elapsed() < Duration::from_secs(600) {
        let unsent: i64 = admin
            .query_one(
                &format!("SELECT count(*) FROM {name} WHERE sent_to_kafka IS NOT TRUE"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let current: u64 = ch
            .query(&format!("SELECT count() FROM {name}_current"))
            .fetch_one()
            .await
            .unwrap_or(0);
        if unsent == 0 && current == pg_rows as u64 {
            converged = true;
            break;
        }
        exits.extend(stream.exited());
        exits.extend(sinks.iter_mut().filter_map(Proc::exited));
        if !exits.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let converge_secs = load_done.elapsed().as_secs_f64();

    // Compare row by row.
    let pg_map: HashMap<u64, PgValues> = admin
        .query(
            &format!("SELECT id::int8, username, event_type, (extract(epoch FROM event_time) * 1000000)::int8 FROM {name}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, (r.get(1), r.get(2), r.get(3))))
        .collect();
    let ch_rows: Vec<ChRow> = ch
        .query(&format!(
            "SELECT id, username, event_type, event_time_us FROM {name}_current"
        ))
        .fetch_all()
        .await
        .unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let (mut mismatched, mut extra, mut doubled) = (0u64, 0u64, 0u64);
    for r in &ch_rows {
        if !seen.insert(r.id) {
            doubled += 1;
        }
        match pg_map.get(&r.id) {
            None => extra += 1,
            Some((u, e, t)) if (u, e, t) != (&r.username, &r.event_type, &r.event_time_us) => {
                mismatched += 1
            }
            Some(_) => {}
        }
    }
    let missing = pg_map.keys().filter(|id| !seen.contains(id)).count() as u64;
    let slot_ok: bool = admin
        .query_one(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) < 16 * 1024 * 1024, false) \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(false);
    let (brokers, topic) = (env("CDC_RELAY_KAFKA_BROKERS"), name.clone());
    let messages = tokio::task::spawn_blocking(move || {
        cdc_relay::kafka::inspect::topic_messages(
            &cdc_relay::kafka::KafkaConnection::plaintext(&brokers),
            &topic,
        )
    })
    .await
    .unwrap()
    .unwrap_or(-1);
    // Replication within a shard is asynchronous: replicas get a minute to agree.
    let replicas = if on_cluster {
        let pg_vals: HashMap<u64, cluster::Values> = pg_map.clone();
        let mut r = cluster::check(&name, &pg_vals).await;
        let until = Instant::now() + Duration::from_secs(60);
        while !r.ok(pg_rows as u64) && Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            r = cluster::check(&name, &pg_vals).await;
        }
        Some(r)
    } else {
        None
    };
    stream.stop();
    for sink in &mut sinks {
        sink.stop();
    }
    let (topic, expected) = (name.clone(), pg_rows);
    let (duplicates, unseen) = tokio::task::spawn_blocking(move || {
        let counts = committed_counts(&topic);
        let total: u64 = counts.values().sum();
        (
            total - counts.len() as u64,
            expected as u64 - counts.len().min(expected as usize) as u64,
        )
    })
    .await
    .unwrap();

    println!();
    println!("{:<28} {}", "seed", seed);
    println!("{:<28} {}", "rows committed (PostgreSQL)", pg_rows);
    println!("{:<28} {}", "rows rolled back", rolled_back);
    println!("{:<28} {}", "sinks in the group", sinks.len());
    println!("{:<28} {}", "kill -9 of stream/sink", done_kills);
    println!("{:<28} {}", "service restarts", done_restarts);
    println!("{:<28} {}", "missing in ClickHouse", missing);
    println!("{:<28} {}", "mismatched values", mismatched);
    println!("{:<28} {}", "extra rows", extra + doubled);
    println!("{:<28} {}", "Kafka offsets - rows", messages - pg_rows);
    println!(
        "{:<28} {}",
        "mode",
        if exactly_once {
            "exactly-once"
        } else {
            "at-least-once"
        }
    );
    println!("duplicates: {duplicates}");
    println!("{:<28} {}", "rows not on the topic", unseen);
    println!("{:<28} {}", "slot caught up", slot_ok);
    println!(
        "{:<28} {:.1}s (total {:.0}s)",
        "time to converge",
        converge_secs,
        started.elapsed().as_secs_f64()
    );
    if let Some(r) = &replicas {
        println!("{:<28} {:?}", "rows per shard", r.shard_rows);
        println!("{:<28} {:?}", "missing per replica", r.missing);
        println!("{:<28} {:?}", "wrong/extra per replica", r.wrong);
        println!("{:<28} {}", "ids on both shards", r.on_both_shards);
        println!("{:<28} {:?}", "view rows per node", r.view_rows);
        println!("{:<28} {}", "ids twice in a view", r.view_doubled);
    }
    println!("{:<28} {}", "relays that exited", exits.len());
    for e in &exits {
        println!("  {e}");
    }
    let ok = converged
        && exits.is_empty()
        && missing == 0
        && mismatched == 0
        && extra == 0
        && doubled == 0
        && slot_ok
        && unseen == 0
        && (!exactly_once || duplicates == 0)
        && replicas.as_ref().is_none_or(|r| r.ok(pg_rows as u64));
    println!("{:<28} {}", "result", if ok { "PASS" } else { "FAIL" });
    if ok {
        println!("chaos: 1 passed, 0 failed");
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot('{name}'); DROP PUBLICATION {name}; DROP TABLE {name}"
            ))
            .await;
    } else {
        println!("chaos: 0 passed, 1 failed (logs in {})", dir.display());
        std::process::exit(1);
    }
}
