//! The relay on a Kafka cluster and a replicated, sharded ClickHouse (issue #16), on the stack
//! `scripts/services up --cluster` starts: 3 KRaft brokers, ClickHouse cluster `cdc_relay` of 2
//! shards x 2 replicas over ZooKeeper. These tests need that stack, so they are `#[ignore]`d in the
//! single-node run; scripts/test runs them with `--ignored --test-threads=1` once the cluster is up
//! (one of them kills and restarts a ClickHouse server).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

fn cluster() -> String {
    env("CDC_RELAY_CLICKHOUSE_CLUSTER")
}

/// Every ClickHouse node's URL, in node order: nodes 1 and 2 are shard 1, 3 and 4 shard 2.
fn nodes() -> Vec<String> {
    env("CDC_RELAY_TEST_CLICKHOUSE_NODES")
        .split(',')
        .map(String::from)
        .collect()
}

/// Replicas of each partition of `topic`, and its `min.insync.replicas` where the topic's own
/// setting (not the brokers' default, which is 2 on this stack too) says so.
async fn topic_settings(topic: &str) -> (Vec<usize>, String) {
    let replicas = partition_replicas(topic);
    let admin: AdminClient<DefaultClientContext> = kafka_config().create().unwrap();
    let configs = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    let resource = configs.into_iter().next().unwrap().unwrap();
    let min_isr = resource
        .get("min.insync.replicas")
        .filter(|e| e.source == ConfigSource::DynamicTopic)
        .and_then(|e| e.value.clone())
        .unwrap_or_default();
    (replicas, min_isr)
}

/// Replicas of each partition of `topic`; none where there is no such topic.
fn partition_replicas(topic: &str) -> Vec<usize> {
    let consumer: BaseConsumer = kafka_config().create().unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.replicas().len())
        .collect()
}

/// `SELECT sql` on node `url`, as tab-separated lines.
async fn lines(url: &str, sql: &str) -> Vec<String> {
    try_lines(url, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql} on {url}: {e}"))
}

async fn try_lines(url: &str, sql: &str) -> Result<Vec<String>, clickhouse::error::Error> {
    let mut cursor = clickhouse(url).query(sql).fetch_bytes("TSV")?;
    let mut out = Vec::new();
    while let Some(chunk) = cursor.next().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8(out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect())
}

/// `id \t v` of every current row of `table` that node `url` holds itself (its replica of its
/// shard), by id; empty while the node cannot answer.
async fn local_rows(url: &str, table: &str) -> BTreeMap<i64, String> {
    try_lines(
        url,
        &format!(
            "SELECT id, v FROM default.{table}_local FINAL WHERE _deleted = 0 \
             AND _version >= (SELECT max(version) FROM default.{table}_truncates)"
        ),
    )
    .await
    .unwrap_or_default()
    .into_iter()
    .map(|l| {
        let (id, v) = l.split_once('\t').unwrap();
        (id.parse().unwrap(), v.to_string())
    })
    .collect()
}

async fn pg_rows(t: &AnyTable) -> BTreeMap<i64, String> {
    t.pg.query(&format!("SELECT id::int8, v FROM {}", t.name), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The first 10 ids whose rows differ between `a` and `b`, or that only one of them has.
fn first_differences<'a>(
    a: &'a BTreeMap<i64, String>,
    b: &'a BTreeMap<i64, String>,
) -> Vec<&'a i64> {
    a.iter()
        .filter(|(k, v)| b.get(k) != Some(v))
        .map(|(k, _)| k)
        .chain(b.keys().filter(|k| !a.contains_key(k)))
        .take(10)
        .collect()
}

/// Each shard's two replicas hold the same rows; no id is on both shards; together they are
/// exactly `want`; and the current-rows view, read through each node, is `want` too, each id once.
async fn every_replica_holds(t: &AnyTable, want: &BTreeMap<i64, String>) -> Result<(), String> {
    let nodes = nodes();
    let mut shards: Vec<BTreeMap<i64, String>> = Vec::new();
    for pair in nodes.chunks(2) {
        let a = local_rows(&pair[0], &t.name).await;
        let b = local_rows(&pair[1], &t.name).await;
        if a != b {
            let differ = first_differences(&a, &b);
            return Err(format!(
                "the replicas {} and {} of one shard differ ({} / {} rows; first ids that differ: {differ:?})",
                pair[0],
                pair[1],
                a.len(),
                b.len()
            ));
        }
        shards.push(a);
    }
    let both: BTreeSet<&i64> = shards[0]
        .keys()
        .filter(|k| shards[1].contains_key(k))
        .collect();
    if !both.is_empty() {
        return Err(format!("ids on both shards: {both:?}"));
    }
    if want.len() >= 2 && (shards[0].is_empty() || shards[1].is_empty()) {
        return Err(format!(
            "one shard holds every row: the Distributed table does not shard ({} / {})",
            shards[0].len(),
            shards[1].len()
        ));
    }
    let union: BTreeMap<i64, String> = shards.into_iter().flatten().collect();
    if &union != want {
        let differ = first_differences(want, &union);
        return Err(format!(
            "the shards together ({} rows) differ from PostgreSQL ({} rows); first ids: {differ:?}",
            union.len(),
            want.len()
        ));
    }
    for url in &nodes {
        let view = try_lines(
            url,
            &format!("SELECT id, v FROM default.{}_current", t.name),
        )
        .await
        .map_err(|e| format!("the view on {url}: {e}"))?;
        let rows: BTreeMap<i64, String> = view
            .iter()
            .map(|l| {
                let (id, v) = l.split_once('\t').unwrap();
                (id.parse().unwrap(), v.to_string())
            })
            .collect();
        if view.len() != rows.len() {
            return Err(format!("an id twice in the view on {url}"));
        }
        if &rows != want {
            return Err(format!(
                "the view on {url} ({} rows) differs from PostgreSQL ({} rows)",
                rows.len(),
                want.len()
            ));
        }
    }
    Ok(())
}

/// Polls until every replica holds `want` (replication within a shard is asynchronous, and the
/// tables appear once the sink created them); fails with what still differs after 90 s.
async fn converge(t: &AnyTable, want: &BTreeMap<i64, String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let ready = try_lines(
            &nodes()[0],
            &format!("SELECT count() FROM default.{}_current", t.name),
        )
        .await
        .is_ok();
        let outcome = if ready {
            every_replica_holds(t, want).await
        } else {
            Err("no current-rows view yet".into())
        };
        match outcome {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// A `sink` of `t`'s topic in group `t.name`, with `--clickhouse-cluster`, talking to ClickHouse
/// node `node` (0-based); its log is `<t.name>_<name>.log`.
fn cluster_sink(t: &AnyTable, node: usize, name: &str) -> Relay {
    let (cluster, dlq, url) = (
        cluster(),
        format!("{}.sink-dlq", t.name),
        nodes()[node].clone(),
    );
    Relay::start(
        &format!("{}_{name}", t.name),
        &[
            "sink",
            "--topic",
            &t.name,
            "--group",
            &t.name,
            "--dlq-topic",
            &dlq,
            "--clickhouse-cluster",
            &cluster,
            "--clickhouse-url",
            &url,
        ],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the cluster of `scripts/services up --cluster` (scripts/test runs it)"]
async fn topics_on_three_brokers_have_three_replicas_and_two_in_sync() {
    let t = AnyTable::new(
        "clustertopic",
        "CREATE TABLE {t} (id int PRIMARY KEY, v text)",
    )
    .await;
    let relay = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(60)).await;
    t.exec("INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 100) g")
        .await;
    let got = read_topic(
        &t.name,
        100,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(by_key(&got).len(), 100);
    for topic in [
        t.name.clone(),
        format!("{}.schemas", t.name),
        format!("{}.stream-dlq", t.name),
    ] {
        let (replicas, min_isr) = topic_settings(&topic).await;
        assert!(!replicas.is_empty(), "{topic} has no partitions");
        assert!(
            replicas.iter().all(|&r| r == 3),
            "{topic}: replicas per partition {replicas:?}"
        );
        assert_eq!(min_isr, "2", "{topic}: min.insync.replicas");
    }
    assert_eq!(relay.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the cluster of `scripts/services up --cluster` (scripts/test runs it)"]
async fn two_shards_of_two_replicas_hold_each_current_row_once_through_updates_deletes_key_moves_and_truncate(
) {
    let t = AnyTable::new(
        "clusterrows",
        "CREATE TABLE {t} (id int PRIMARY KEY, v text)",
    )
    .await;
    let stream = t.start();
    let cluster = cluster();
    let sink = cluster_sink(&t, 0, "sink");
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(60)).await;
    t.exec(
        "INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 3000) g; \
         UPDATE {t} SET v = 'u' || id WHERE id % 3 = 0; \
         DELETE FROM {t} WHERE id % 5 = 0; \
         UPDATE {t} SET id = id + 100000 WHERE id % 7 = 0; \
         UPDATE {t} SET v = 'again' WHERE id > 100000 AND id % 2 = 0;",
    )
    .await;
    let want = pg_rows(&t).await;
    assert!(want.len() > 2000);
    converge(&t, &want).await;

    // The storage is replicated and sharded as documented, on every node.
    for url in nodes() {
        let engines = lines(
            &url,
            &format!(
                "SELECT name, engine FROM system.tables WHERE database = 'default' AND name LIKE '{}%' ORDER BY name",
                t.name
            ),
        )
        .await;
        assert_eq!(
            engines,
            vec![
                format!("{}\tDistributed", t.name),
                format!("{}_current\tView", t.name),
                format!("{}_local\tReplicatedReplacingMergeTree", t.name),
                format!("{}_truncates\tReplicatedMergeTree", t.name),
            ],
            "on {url}"
        );
    }

    // `verify` reads through the Distributed table: equal now; a row gone from one shard (both
    // its replicas: a lightweight delete is replicated) is found by its key.
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "verify",
            "--json",
            "--table",
            &t.name,
            "--slot",
            &t.name,
            "--publication",
            &t.name,
            "--topic",
            &t.name,
            "--group",
            &t.name,
            "--clickhouse-cluster",
            &cluster,
        ];
        args.extend_from_slice(extra);
        let out = relay(&args, &[]).output().unwrap();
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (
            out.status.code(),
            report,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, report, log) = verify(&[]);
    assert_eq!(code, Some(0), "{report:#}\n{log}");
    assert_eq!(
        report["tables"][0]["clickhouse_rows"],
        want.len(),
        "{report:#}"
    );
    let gone = *want.keys().nth(want.len() / 2).unwrap();
    for url in nodes() {
        // A mutation of a replicated table runs on every replica of its shard; the row is gone
        // from the shard, as a lost insert would leave it.
        let _ = clickhouse(&url)
            .query(&format!(
                "ALTER TABLE default.{}_local DELETE WHERE id = {gone}",
                t.name
            ))
            .execute()
            .await;
    }
    let (code, report, log) =
        eventually("verify sees the row gone", Duration::from_secs(60), || {
            let r = verify(&[]);
            async move { (r.0 == Some(1)).then_some(r) }
        })
        .await;
    assert_eq!(code, Some(1), "{report:#}\n{log}");
    assert_eq!(
        report["tables"][0]["missing"]["examples"],
        serde_json::json!([gone.to_string()]),
        "{report:#}"
    );

    // A column added in PostgreSQL reaches every node's storage, Distributed table and view.
    t.exec("ALTER TABLE {t} ADD COLUMN n int; INSERT INTO {t} VALUES (999999, 'n', 5)")
        .await;
    let mut want = pg_rows(&t).await;
    want.remove(&gone);
    converge(&t, &want).await;
    for url in nodes() {
        let n = eventually(
            "the new column on every node",
            Duration::from_secs(60),
            || {
                let (url, name) = (url.clone(), t.name.clone());
                async move {
                    let n = try_lines(
                        &url,
                        &format!("SELECT n FROM default.{name}_current WHERE id = 999999"),
                    )
                    .await
                    .ok()?;
                    n.first().cloned()
                }
            },
        )
        .await;
        assert_eq!(n, "5", "on {url}");
        let columns = lines(
            &url,
            &format!(
                "SELECT table FROM system.columns WHERE database = 'default' AND name = 'n' \
                 AND table IN ('{0}', '{0}_local', '{0}_current') ORDER BY table",
                t.name
            ),
        )
        .await;
        assert_eq!(columns.len(), 3, "column n on {url}: {columns:?}");
    }

    // A truncate hides every earlier row on every node; rows after it show.
    t.exec("TRUNCATE {t}; INSERT INTO {t} SELECT g, 'after' || g FROM generate_series(1, 50) g")
        .await;
    let want = pg_rows(&t).await;
    assert_eq!(want.len(), 50);
    converge(&t, &want).await;

    assert_eq!(stream.stop(), 0);
    assert_eq!(sink.stop(), 0);
    t.drop().await;
}

/// `scripts/services ARGS` (its output to a log: servers it starts must not hold our pipes);
/// whether it succeeded.
fn try_services(args: &[&str]) -> bool {
    let root = env!("CARGO_MANIFEST_DIR");
    let Ok(log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{root}/.local/test-logs/cluster-services.log"))
    else {
        return false;
    };
    let Ok(err) = log.try_clone() else {
        return false;
    };
    std::process::Command::new(format!("{root}/scripts/services"))
        .args(args)
        .stdout(log)
        .stderr(err)
        .status()
        .is_ok_and(|s| s.success())
}

fn services(args: &[&str]) {
    assert!(try_services(args), "scripts/services {args:?} failed");
}

/// Kills node `name` of the cluster (`kafka-3`, `clickhouse-4`); the node is started again when
/// the returned guard is dropped, also when the test fails, so the next tests have it.
#[must_use]
fn kill_node(name: &str) -> Revive {
    services(&["kill", name]);
    Revive
}

struct Revive;

impl Drop for Revive {
    fn drop(&mut self) {
        if !try_services(&["up", "--cluster"]) {
            eprintln!(
                "scripts/services up --cluster failed: see .local/test-logs/cluster-services.log"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the cluster of `scripts/services up --cluster` (scripts/test runs it)"]
async fn a_sink_started_while_a_replica_is_down_writes_at_once_and_the_replica_catches_up() {
    let t = AnyTable::new(
        "clusterdown",
        "CREATE TABLE {t} (id int PRIMARY KEY, v text)",
    )
    .await;
    let stream = t.start();
    let sink = cluster_sink(&t, 0, "sink");
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(60)).await;
    t.exec("INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 500) g")
        .await;
    converge(&t, &pg_rows(&t).await).await;
    assert_eq!(sink.stop(), 0);

    // Replica 1 of shard 2 dies, the one every sink writes that shard to; a sink starts (its
    // tables exist: no ON CLUSTER statement, which would wait for the dead server up to 180 s)
    // and its rows reach both shards at once, shard 2 through its other replica.
    let down = kill_node("clickhouse-3");
    let sink = cluster_sink(&t, 0, "sink2");
    t.exec(
        "INSERT INTO {t} SELECT g, 'w' || g FROM generate_series(501, 1000) g; \
            UPDATE {t} SET v = 'x' WHERE id <= 100",
    )
    .await;
    let node1 = nodes()[0].clone();
    let started = std::time::Instant::now();
    eventually(
        "1000 rows through the live servers",
        Duration::from_secs(40),
        || {
            let (url, name) = (node1.clone(), t.name.clone());
            async move {
                let n = try_lines(&url, &format!("SELECT count() FROM default.{name}_current"))
                    .await
                    .ok()?;
                (n.first().map(String::as_str) == Some("1000")).then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "rows visible {:?} after the sink started with a server down",
        started.elapsed()
    );

    // Back up, the replica fetches what it missed from its shard's other replica.
    drop(down);
    converge(&t, &pg_rows(&t).await).await;
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

/// `id -> "n md5(big)"` of every current row of `table` that node `url` holds itself.
async fn local_big_rows(url: &str, table: &str) -> BTreeMap<i64, String> {
    try_lines(
        url,
        &format!(
            "SELECT id, concat(toString(n), ' ', lower(hex(MD5(ifNull(big, 'NULL'))))) \
             FROM default.{table}_local FINAL WHERE _deleted = 0"
        ),
    )
    .await
    .unwrap_or_default()
    .into_iter()
    .filter_map(|l| {
        let (id, v) = l.split_once('\t')?;
        Some((id.parse().ok()?, v.to_string()))
    })
    .collect()
}

/// `SYSTEM START|STOP FETCHES` of `table`'s storage on the second replica of each shard.
async fn second_replicas_fetch(table: &str, on: bool) {
    let verb = if on { "START" } else { "STOP" };
    for url in nodes().iter().skip(1).step_by(2) {
        clickhouse(url)
            .query(&format!("SYSTEM {verb} FETCHES default.{table}_local"))
            .execute()
            .await
            .unwrap_or_else(|e| panic!("SYSTEM {verb} FETCHES on {url}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the cluster of `scripts/services up --cluster` (scripts/test runs it)"]
async fn a_sink_taking_partitions_over_keeps_toasted_values_while_second_replicas_lag() {
    // The worst moment for a value an update leaves out: the sink that wrote the row's earlier
    // version hands its partitions to a sink on another server while the second replica of each
    // shard has fetched nothing (fetches stopped). Both sinks talk to first replicas, as
    // docs/operations.md says to: the new sink must read each shard where the old one wrote it
    // (the first replica, `load_balancing=in_order`), not a lagging copy, or the value is lost.
    let t = AnyTable::new(
        "clustertoast",
        "CREATE TABLE {t} (id int PRIMARY KEY, n int, big text); \
         ALTER TABLE {t} ALTER COLUMN big SET STORAGE EXTERNAL",
    )
    .await;
    let stream = t.start();
    let pg_big = || async {
        t.pg.query(
            &format!(
                "SELECT id::int8, n::text || ' ' || md5(big) FROM {}",
                t.name
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
        .collect::<BTreeMap<i64, String>>()
    };
    let sink = cluster_sink(&t, 0, "sink1");
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(60)).await;
    // One row creates the tables on every node, so that fetches can be stopped on them.
    t.exec("INSERT INTO {t} VALUES (0, 0, 'zero')").await;
    eventually(
        "the first row on every node",
        Duration::from_secs(60),
        || {
            let name = t.name.clone();
            async move {
                for url in nodes() {
                    try_lines(&url, &format!("SELECT 1 FROM default.{name}_local"))
                        .await
                        .ok()?;
                }
                Some(())
            }
        },
    )
    .await;
    second_replicas_fetch(&t.name, false).await;

    // 10 kB per value, stored out of line (TOAST), not compressible.
    t.exec(
        "INSERT INTO {t} SELECT g, 1, (SELECT string_agg(md5(g::text || '-' || i), '') \
         FROM generate_series(1, 320) i) FROM generate_series(1, 40) g",
    )
    .await;
    let written = pg_big().await;
    let first_replicas = || async {
        let mut held = BTreeMap::new();
        for url in nodes().iter().step_by(2) {
            held.extend(local_big_rows(url, &t.name).await);
        }
        held
    };
    eventually(
        "the rows on the first replica of each shard",
        Duration::from_secs(60),
        || async { (first_replicas().await == written).then_some(()) },
    )
    .await;
    for url in nodes().iter().skip(1).step_by(2) {
        let held = local_big_rows(url, &t.name).await;
        assert!(
            held.keys().all(|&id| id == 0),
            "fetches were stopped, yet {url} holds {:?}",
            held.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(sink.stop(), 0);

    // Updates that leave `big` out of the change; the next sink talks to replica 1 of shard 2.
    t.exec("UPDATE {t} SET n = 2 WHERE id > 0").await;
    let want = pg_big().await;
    let sink = cluster_sink(&t, 2, "sink2");
    eventually(
        "the updates on the first replica of each shard",
        Duration::from_secs(60),
        || async {
            let held = first_replicas().await;
            (held.len() == want.len() && held.values().all(|v| !v.starts_with("1 "))).then_some(())
        },
    )
    .await;
    let held = first_replicas().await;
    assert_eq!(
        first_differences(&held, &want),
        Vec::<&i64>::new(),
        "rows whose update lost its unchanged value"
    );

    // Fetching again, the second replicas catch up to the same rows.
    second_replicas_fetch(&t.name, true).await;
    eventually(
        "every replica holds PostgreSQL's rows",
        Duration::from_secs(60),
        || async {
            // Both replicas of a shard alike, and the shards together PostgreSQL's rows.
            let mut all = BTreeMap::new();
            for pair in nodes().chunks(2) {
                let a = local_big_rows(&pair[0], &t.name).await;
                if a != local_big_rows(&pair[1], &t.name).await {
                    return None;
                }
                all.extend(a);
            }
            (all == want).then_some(())
        },
    )
    .await;
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the cluster of `scripts/services up --cluster` (scripts/test runs it)"]
async fn a_topic_created_while_a_broker_is_down_gets_three_replicas_all_the_same() {
    // Two live brokers of three: a topic made now with 2 copies (and min.insync.replicas 1) would
    // stay that weak for good. The brokers ask for 3 (default.replication.factor), and a KRaft
    // controller places the third replica on the stopped broker, which catches up once back.
    let t = AnyTable::new(
        "clusterbrokerdown",
        "CREATE TABLE {t} (id int PRIMARY KEY, v text)",
    )
    .await;
    let down = kill_node("kafka-3");
    // Until the controller fences it (broker.session.timeout.ms, 9 s), the dead broker is still
    // in the metadata, and the live count would be 3 anyway.
    eventually(
        "the dead broker out of the metadata",
        Duration::from_secs(60),
        || async {
            let consumer: BaseConsumer = kafka_config().create().unwrap();
            let md = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .ok()?;
            (md.brokers().len() == 2).then_some(())
        },
    )
    .await;
    let relay = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(120)).await;
    t.exec("INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 100) g")
        .await;
    let got = read_topic(
        &t.name,
        100,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(
        by_key(&got).len(),
        100,
        "acks=all with two of three in sync"
    );
    for topic in [t.name.clone(), format!("{}.schemas", t.name)] {
        let (replicas, min_isr) = topic_settings(&topic).await;
        assert!(
            !replicas.is_empty() && replicas.iter().all(|&r| r == 3),
            "{topic}: replicas per partition {replicas:?}"
        );
        assert_eq!(min_isr, "2", "{topic}");
    }
    drop(down);
    assert_eq!(relay.stop(), 0);
    t.drop().await;
}

/// Offsets `group` has committed on `topic`, and the topic's high watermarks, each summed over the
/// partitions.
fn committed_and_high(group: &str, topic: &str) -> (i64, i64) {
    let consumer: BaseConsumer = kafka_config().set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut high = 0;
    for p in 0..partition_replicas(topic).len() as i32 {
        tpl.add_partition(topic, p);
        high += consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap()
            .1;
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    (committed, high)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the cluster of `scripts/services up --cluster` (scripts/test runs it)"]
async fn offsets_are_committed_only_for_rows_every_shard_has_written() {
    // Both replicas of shard 2 die. The node the sink talks to could take the rows into its
    // Distributed table's spool and answer at once; the sink must not take that for stored.
    let t = AnyTable::new(
        "clustersync",
        "CREATE TABLE {t} (id int PRIMARY KEY, v text)",
    )
    .await;
    let stream = t.start();
    let sink = cluster_sink(&t, 0, "sink");
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(60)).await;
    t.exec("INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 200) g")
        .await;
    converge(&t, &pg_rows(&t).await).await;
    let before = eventually("the group's commit", Duration::from_secs(30), || {
        let (c, h) = committed_and_high(&t.name, &t.name);
        async move { (c == h && c > 0).then_some(c) }
    })
    .await;

    let down = (kill_node("clickhouse-3"), kill_node("clickhouse-4"));
    t.exec("INSERT INTO {t} SELECT g, 'w' || g FROM generate_series(201, 400) g")
        .await;
    eventually("the new rows on the topic", Duration::from_secs(30), || {
        let (_, h) = committed_and_high(&t.name, &t.name);
        async move { (h >= before + 200).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (during, _) = committed_and_high(&t.name, &t.name);
    assert_eq!(
        during, before,
        "offsets were committed while shard 2 could store none of the rows"
    );

    drop(down);
    converge(&t, &pg_rows(&t).await).await;
    eventually("the group's commit after", Duration::from_secs(60), || {
        let (c, h) = committed_and_high(&t.name, &t.name);
        async move { (c == h && c >= before + 200).then_some(()) }
    })
    .await;
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the cluster of `scripts/services up --cluster` (scripts/test runs it)"]
async fn a_table_of_the_other_layout_is_refused_and_left_as_it_is() {
    let t = AnyTable::new(
        "clusterlayout",
        "CREATE TABLE {t} (id int PRIMARY KEY, v text)",
    )
    .await;
    // A plain table of that name on node 1, as a sink without --clickhouse-cluster left it.
    let node1 = clickhouse(&nodes()[0]);
    for sql in [
        format!(
            "CREATE TABLE default.{} (id Int32, v String, _version UInt64) \
             ENGINE = ReplacingMergeTree(_version) ORDER BY id",
            t.name
        ),
        format!("INSERT INTO default.{} VALUES (1, 'kept', 1)", t.name),
    ] {
        node1.query(&sql).execute().await.unwrap();
    }
    let stream = t.start();
    let mut sink = cluster_sink(&t, 0, "sink");
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(60)).await;
    t.exec("INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 10) g")
        .await;
    // No retry mends it: the sink stops, saying what to do.
    let status = sink.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{}", sink.log_text());
    assert!(
        sink.log_text()
            .contains("is a ReplacingMergeTree table, not the Distributed table"),
        "{}",
        sink.log_text()
    );
    assert_eq!(
        lines(
            &nodes()[0],
            &format!(
                "SELECT name, engine FROM system.tables WHERE database = 'default' \
                 AND name LIKE '{}%'",
                t.name
            )
        )
        .await,
        vec![format!("{}\tReplacingMergeTree", t.name)],
        "the plain table was changed, or objects were created beside it"
    );
    assert_eq!(
        lines(
            &nodes()[0],
            &format!("SELECT id, v FROM default.{}", t.name)
        )
        .await,
        vec!["1\tkept".to_string()]
    );

    // Once it is moved away, the same sink's group writes the cluster's layout.
    node1
        .query(&format!("DROP TABLE default.{}", t.name))
        .execute()
        .await
        .unwrap();
    let sink = cluster_sink(&t, 0, "sink2");
    converge(&t, &pg_rows(&t).await).await;
    assert_eq!(sink.stop(), 0);

    // The other way round: a sink that forgot --clickhouse-cluster meets the Distributed tables
    // (the seed's, which every sink makes at start, first) and exits with what to do.
    let mut plain = Relay::start(
        &format!("{}_plain", t.name),
        &[
            "sink",
            "--topic",
            &t.name,
            "--group",
            &format!("{}_plain", t.name),
            "--dlq-topic",
            &format!("{}.sink-dlq", t.name),
        ],
        // The stack's settings name the cluster; set to nothing, the variable means none.
        &[("CDC_RELAY_CLICKHOUSE_CLUSTER", "")],
    );
    let status = plain.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{}", plain.log_text());
    assert!(
        plain
            .log_text()
            .contains("is a Distributed table: a sink with --clickhouse-cluster created it"),
        "{}",
        plain.log_text()
    );
    converge(&t, &pg_rows(&t).await).await;
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the cluster of `scripts/services up --cluster` (scripts/test runs it)"]
async fn uuid_and_numeric_keys_are_sharded_and_keep_their_sharding_through_a_column_change() {
    // ClickHouse 18.16's cityHash64 refuses UUID and Decimal: the Distributed table could not be
    // created, and the sink retried it forever. A column change re-creates that table: the
    // sharding expression must stay the one its rows were placed by.
    let t = AnyTable::new(
        "clusteruuid",
        "CREATE TABLE {t} (id uuid, n numeric(10, 2), v text, PRIMARY KEY (id, n))",
    )
    .await;
    let stream = t.start();
    let sink = cluster_sink(&t, 0, "sink");
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(60)).await;
    t.exec(
        "INSERT INTO {t} SELECT md5(g::text)::uuid, g / 4.0, 'v' || g FROM generate_series(1, 200) g",
    )
    .await;
    let count = |url: String, sql: String| async move {
        try_lines(&url, &sql)
            .await
            .ok()
            .and_then(|l| l.first().and_then(|n| n.parse::<u64>().ok()))
    };
    let nodes = nodes();
    let view = format!("SELECT count() FROM default.{}_current", t.name);
    let shard_rows = || async {
        let mut per_shard = Vec::new();
        for url in nodes.iter().step_by(2) {
            let sql = format!("SELECT count() FROM default.{}_local FINAL", t.name);
            per_shard.push(count(url.clone(), sql).await.unwrap_or(0));
        }
        per_shard
    };
    eventually(
        "200 rows over both shards",
        Duration::from_secs(60),
        || async {
            let per_shard = shard_rows().await;
            (per_shard.iter().sum::<u64>() == 200 && per_shard.iter().all(|&n| n > 0)).then_some(())
        },
    )
    .await;
    assert_eq!(count(nodes[0].clone(), view.clone()).await, Some(200));
    let engine_sql = format!(
        "SELECT engine_full FROM system.tables WHERE database = 'default' AND name = '{}'",
        t.name
    );
    let before = lines(&nodes[0], &engine_sql).await;
    assert!(before[0].contains("toString"), "{before:?}");

    // New versions of existing keys, written through the re-created Distributed table: on
    // another shard than their first versions if the expression changed.
    t.exec(
        "ALTER TABLE {t} ADD COLUMN w int; \
         INSERT INTO {t} SELECT md5(g::text)::uuid, g / 4.0, 'w' || g, g FROM generate_series(201, 210) g; \
         UPDATE {t} SET w = -1 WHERE n < 10",
    )
    .await;
    eventually("the new rows and versions", Duration::from_secs(60), || {
        let (url, name) = (nodes[0].clone(), t.name.clone());
        async move {
            let sql =
                format!("SELECT countIf(w > 200), countIf(w = -1) FROM default.{name}_current");
            let got = try_lines(&url, &sql).await.ok()?;
            (got.first().map(String::as_str) == Some("10\t39")).then_some(())
        }
    })
    .await;
    assert_eq!(count(nodes[0].clone(), view).await, Some(210));
    assert_eq!(lines(&nodes[0], &engine_sql).await, before);
    assert_eq!(
        shard_rows().await.iter().sum::<u64>(),
        210,
        "a key on two shards"
    );
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}
