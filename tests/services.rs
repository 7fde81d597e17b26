//! The local services are real: each is exercised through the crate the product uses for it.

mod common;

use std::time::Duration;

use clickhouse::Row;
use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use serde::{Deserialize, Serialize};

#[tokio::test]
async fn postgres_logs_in_with_a_password_and_has_logical_wal() {
    let url = env("CDC_RELAY_PG_URL");
    let client = pg_url(&url).await;
    let wal: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal, "logical");
    let method: String = client
        .query_one("SELECT current_setting('password_encryption')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(method, "scram-sha-256");
    // A wrong password is refused: authentication is real, not trust.
    let bad = url.replacen("://cdc:", "://cdc:wrong", 1);
    assert!(tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_creates_produces_consumes_and_commits() {
    let topic = unique("svc_topic");
    let admin: AdminClient<DefaultClientContext> = kafka_config().create().unwrap();
    let res = admin
        .create_topics(
            [&NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(res[0].is_ok(), "{res:?}");

    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for i in 0..30 {
        let key = format!("k{i}");
        let payload = format!("v{i}");
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
    }

    let group = unique("svc_group");
    let consumer: StreamConsumer = kafka_config()
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut partitions = std::collections::BTreeSet::new();
    while seen.len() < 30 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("message within 30s")
            .unwrap();
        seen.insert(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
        partitions.insert(m.partition());
        consumer.commit_message(&m, CommitMode::Sync).unwrap();
    }
    assert_eq!(seen.len(), 30);
    assert_eq!(partitions.len(), 3, "30 keys spread over 3 partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let total: i64 = committed
        .elements()
        .iter()
        .map(|e| e.offset().to_raw().unwrap_or(0))
        .sum();
    assert_eq!(total, 30, "committed offsets cover every message");
}

#[derive(Debug, Row, Serialize, Deserialize)]
struct Versioned {
    id: u64,
    name: String,
    ver: u64,
}

#[tokio::test]
async fn clickhouse_replacing_merge_tree_keeps_the_newest_version() {
    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    let table = unique("svc_rmt");
    ch.query(&format!(
        "CREATE TABLE {table} (id UInt64, name String, ver UInt64) ENGINE = ReplacingMergeTree(ver) ORDER BY id"
    ))
    .execute()
    .await
    .unwrap();
    for (name, ver) in [("new", 2u64), ("old", 1u64)] {
        let mut insert = ch.insert::<Versioned>(&table).await.unwrap();
        insert
            .write(&Versioned {
                id: 1,
                name: name.into(),
                ver,
            })
            .await
            .unwrap();
        insert.end().await.unwrap();
    }
    let rows = ch
        .query(&format!("SELECT ?fields FROM {table} FINAL"))
        .fetch_all::<Versioned>()
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].name.as_str(), rows[0].ver), ("new", 2));
    let raw: u64 = ch
        .query(&format!("SELECT count() FROM {table}"))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(raw, 2, "both versions stored until merged");
    ch.query(&format!("DROP TABLE {table}"))
        .execute()
        .await
        .unwrap();
}
