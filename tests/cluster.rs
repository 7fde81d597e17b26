//! The relay on a Kafka cluster and a replicated, sharded ClickHouse (issue #16), on the stack
//! `scripts/services up --cluster` starts: 3 KRaft brokers, ClickHouse cluster `cdc_relay` of 2
//! shards x 2 replicas over ZooKeeper. These tests need that stack, so they are `#[ignore]`d in the
//! single-node run; scripts/test runs them with `--ignored` once the cluster is up.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

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

/// Replicas of each partition of `topic`, and its `min.insync.replicas`.
async fn topic_settings(topic: &str) -> (Vec<usize>, String) {
    let consumer: BaseConsumer = kafka_config().create().unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let replicas = md.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.replicas().len())
        .collect();
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
        .and_then(|e| e.value.clone())
        .unwrap_or_default();
    (replicas, min_isr)
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
/// shard), by id.
async fn local_rows(url: &str, table: &str) -> BTreeMap<i64, String> {
    lines(
        url,
        &format!(
            "SELECT id, v FROM default.{table}_local FINAL WHERE _deleted = 0 \
             AND _version >= (SELECT max(version) FROM default.{table}_truncates)"
        ),
    )
    .await
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

/// Each shard's two replicas hold the same rows; no id is on both shards; together they are
/// exactly `want`; and the current-rows view, read through each node, is `want` too, each id once.
async fn assert_every_replica_holds(t: &AnyTable, want: &BTreeMap<i64, String>) {
    let nodes = nodes();
    let mut shards: Vec<BTreeMap<i64, String>> = Vec::new();
    for pair in nodes.chunks(2) {
        let a = local_rows(&pair[0], &t.name).await;
        let b = local_rows(&pair[1], &t.name).await;
        assert_eq!(
            a, b,
            "the replicas {} and {} of one shard differ",
            pair[0], pair[1]
        );
        shards.push(a);
    }
    let both: BTreeSet<&i64> = shards[0]
        .keys()
        .filter(|k| shards[1].contains_key(k))
        .collect();
    assert!(both.is_empty(), "ids on both shards: {both:?}");
    assert!(
        !shards[0].is_empty() && !shards[1].is_empty() || want.len() < 2,
        "one shard holds every row: the Distributed table does not shard ({} / {})",
        shards[0].len(),
        shards[1].len()
    );
    let union: BTreeMap<i64, String> = shards.into_iter().flatten().collect();
    assert_eq!(&union, want, "the shards together differ from PostgreSQL");
    for url in &nodes {
        let view = lines(
            url,
            &format!("SELECT id, v FROM default.{}_current", t.name),
        )
        .await;
        let ids: BTreeSet<i64> = view
            .iter()
            .map(|l| l.split_once('\t').unwrap().0.parse().unwrap())
            .collect();
        assert_eq!(view.len(), ids.len(), "an id twice in the view on {url}");
        assert_eq!(view.len(), want.len(), "the view on {url}");
    }
}

/// Polls until every replica holds `want` (replication within a shard is asynchronous), then
/// asserts it.
async fn converge(t: &AnyTable, want: &BTreeMap<i64, String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut all = true;
        for url in nodes() {
            // Until the sink created them, the tables do not exist.
            let rows = try_lines(
                &url,
                &format!("SELECT count() FROM default.{}_current", t.name),
            )
            .await
            .unwrap_or_default();
            all &= rows.first().map(String::as_str) == Some(&want.len().to_string())
                && local_rows(&url, &t.name)
                    .await
                    .keys()
                    .all(|k| want.contains_key(k));
        }
        if all || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_every_replica_holds(t, want).await;
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
    let relay = t.start();
    let cluster = cluster();
    let dlq = format!("{}.sink-dlq", t.name);
    let sink = Relay::start(
        &format!("{}_sink", t.name),
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
        ],
        &[],
    );
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

    // A truncate hides every earlier row on every node; rows after it show.
    t.exec("TRUNCATE {t}; INSERT INTO {t} SELECT g, 'after' || g FROM generate_series(1, 50) g")
        .await;
    let want = pg_rows(&t).await;
    assert_eq!(want.len(), 50);
    converge(&t, &want).await;

    assert_eq!(relay.stop(), 0);
    assert_eq!(sink.stop(), 0);
    t.drop().await;
}
