//! `cdc-relay sink` writing any table from the schemas its messages name (columns form, the
//! `cdc_relay.schema` header, records in `<topic>.schemas`), against the real Kafka and ClickHouse
//! 18.16: what each table's current view holds, row by row.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use cdc_relay::event::{schemas_topic, SCHEMA_HEADER};
use cdc_relay::types::{to_json, ColumnSchema, PgType, RelationSchema};
use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

fn col(
    name: &str,
    oid: u32,
    typmod: i32,
    type_name: &str,
    nullable: bool,
    attnum: i16,
) -> ColumnSchema {
    ColumnSchema {
        attnum: Some(attnum),
        ..ColumnSchema::builtin(name, oid, typmod, type_name, nullable)
    }
}

fn rel(table: &str, columns: Vec<ColumnSchema>, key: Vec<usize>) -> RelationSchema {
    RelationSchema {
        schema: "public".into(),
        table: table.into(),
        columns,
        key,
    }
}

/// A sink test's topic (with its schemas topic), group, dead-letter topic and seed table name.
struct Setup {
    name: String,
}

impl Setup {
    async fn new(prefix: &str) -> Setup {
        let s = Setup {
            name: unique(prefix),
        };
        let admin: AdminClient<DefaultClientContext> = kafka_config().create().unwrap();
        let data = NewTopic::new(&s.name, 3, TopicReplication::Fixed(1));
        let schemas_name = schemas_topic(&s.name);
        let schemas = NewTopic::new(&schemas_name, 1, TopicReplication::Fixed(1))
            .set("cleanup.policy", "compact");
        admin
            .create_topics([&data, &schemas], &AdminOptions::new())
            .await
            .unwrap();
        s
    }

    fn table(&self, t: &str) -> String {
        format!("{}_{t}", self.name)
    }

    fn start(&self) -> Relay {
        let dlq = format!("{}_dlq", self.name);
        Relay::start(
            &self.name,
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
                "--batch-rows",
                "2000",
            ],
            &[],
        )
    }

    /// Writes the schema record, as the stream does before its first message.
    async fn schema(&self, r: &RelationSchema) -> String {
        let id = r.id();
        let producer: FutureProducer = kafka_config().create().unwrap();
        let value = serde_json::to_vec(r).unwrap();
        producer
            .send(
                FutureRecord::to(&schemas_topic(&self.name))
                    .key(&id)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        id
    }

    /// Produces messages (key, value) naming schema `id`, in order, on one partition per key.
    async fn produce(&self, id: &str, messages: &[(&str, Value)]) {
        let producer: FutureProducer = kafka_config().set("linger.ms", "5").create().unwrap();
        let mut acks = Vec::new();
        for (key, value) in messages {
            let payload = serde_json::to_vec(value).unwrap();
            let headers = OwnedHeaders::new().insert(Header {
                key: SCHEMA_HEADER,
                value: Some(id),
            });
            let r = FutureRecord::to(&self.name)
                .key(*key)
                .payload(&payload)
                .headers(headers)
                // One partition: the messages' order is the test's.
                .partition(0);
            acks.push(producer.send_result(r).unwrap());
        }
        for a in acks {
            a.await.unwrap().unwrap();
        }
    }
}

/// The `_current` view of `table`, ordered by `order`, each row as column → JSON text as
/// ClickHouse prints it (strings re-serialised, so escapes compare equal).
fn row(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), canon(v)))
        .collect()
}

async fn wait_rows(
    table: &str,
    columns: &str,
    order: &str,
    expected: &[HashMap<String, String>],
    log: &Relay,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = clickhouse_current(table, columns, order).await;
        if got == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{table}_current is\n{got:#?}\nexpected\n{expected:#?}\nlog: {}",
            log.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn msg(op: &str, version: u64, columns: Value) -> Value {
    json!({"op": op, "lsn": format!("0/{version:X}"), "version": version, "columns": columns})
}

fn with(mut m: Value, field: &str, value: Value) -> Value {
    m[field] = value;
    m
}

#[tokio::test(flavor = "multi_thread")]
async fn integer_uuid_and_composite_keys_with_updates_key_changes_toast_deletes_and_truncates() {
    let s = Setup::new("tables").await;
    let ints = s.table("ints");
    let r_int = rel(
        &ints,
        vec![
            col("id", 20, -1, "bigint", false, 1),
            col("name", 25, -1, "text", true, 2),
            col("big", 25, -1, "text", true, 3),
        ],
        vec![0],
    );
    let uuids = s.table("uuids");
    let r_uuid = rel(
        &uuids,
        vec![
            col("id", 2950, -1, "uuid", false, 1),
            col("doc", 3802, -1, "jsonb", true, 2),
            col("tags", 1009, -1, "text[]", true, 3),
        ],
        vec![0],
    );
    let comp = s.table("comp");
    let r_comp = rel(
        &comp,
        vec![
            col("tenant", 23, -1, "integer", false, 1),
            col("code", 25, -1, "text", false, 2),
            col("amount", 1700, (10 << 16) + 2 + 4, "numeric(10,2)", true, 3),
            col("note", 25, -1, "text", true, 4),
        ],
        vec![0, 1],
    );
    let (id_int, id_uuid, id_comp) = (
        s.schema(&r_int).await,
        s.schema(&r_uuid).await,
        s.schema(&r_comp).await,
    );
    let u1 = "9b2f0c4e-1111-4a5b-8c6d-000000000001";
    let u2 = "9b2f0c4e-2222-4a5b-8c6d-000000000002";
    s.produce(
        &id_int,
        &[
            (
                "1",
                msg("insert", 10, json!({"id": 1, "name": "a", "big": "B1"})),
            ),
            (
                "2",
                msg("insert", 11, json!({"id": 2, "name": "b", "big": "B2"})),
            ),
            (
                "1",
                with(
                    msg("update", 12, json!({"id": 1, "name": "a2", "big": null})),
                    "unchanged",
                    json!(["big"]),
                ),
            ),
            // Key change 2 -> 3 in one transaction: the delete of 2, then 3 with `big` left out.
            (
                "2",
                msg("delete", 13, json!({"id": 2, "name": null, "big": null})),
            ),
            (
                "3",
                with(
                    with(
                        msg("update", 13, json!({"id": 3, "name": "b3", "big": null})),
                        "unchanged",
                        json!(["big"]),
                    ),
                    "moved_from",
                    json!(2),
                ),
            ),
            (
                "4",
                msg("insert", 14, json!({"id": 4, "name": "d", "big": "B4"})),
            ),
            (
                "4",
                msg("delete", 15, json!({"id": 4, "name": null, "big": null})),
            ),
        ],
    )
    .await;
    s.produce(
        &id_uuid,
        &[
            (
                u1,
                msg(
                    "insert",
                    20,
                    json!({"id": u1, "doc": {"k": [1, null]}, "tags": ["x", null]}),
                ),
            ),
            (
                u2,
                msg("insert", 21, json!({"id": u2, "doc": null, "tags": null})),
            ),
            (
                u1,
                msg("update", 22, json!({"id": u1, "doc": {"k": 2}, "tags": []})),
            ),
            ("", msg("truncate", 30, json!({}))),
            (
                u2,
                msg(
                    "insert",
                    31,
                    json!({"id": u2, "doc": "s", "tags": ["after"]}),
                ),
            ),
        ],
    )
    .await;
    let k = |t: i32, c: &str| json!({"tenant": t, "code": c}).to_string();
    s.produce(
        &id_comp,
        &[
            (
                &k(1, "a"),
                msg(
                    "insert",
                    40,
                    json!({"tenant": 1, "code": "a", "amount": "1.50", "note": "n1"}),
                ),
            ),
            (
                &k(1, "b"),
                msg(
                    "insert",
                    41,
                    json!({"tenant": 1, "code": "b", "amount": "-99999999.99", "note": "keep me"}),
                ),
            ),
            (
                &k(2, "a"),
                msg(
                    "insert",
                    42,
                    json!({"tenant": 2, "code": "a", "amount": null, "note": "n3"}),
                ),
            ),
            (
                &k(1, "b"),
                msg(
                    "delete",
                    43,
                    json!({"tenant": 1, "code": "b", "amount": null, "note": null}),
                ),
            ),
            (
                &k(3, "b"),
                with(
                    with(
                        msg(
                            "update",
                            43,
                            json!({"tenant": 3, "code": "b", "amount": "2.00", "note": null}),
                        ),
                        "unchanged",
                        json!(["note"]),
                    ),
                    "moved_from",
                    json!({"code": "b", "tenant": 1}),
                ),
            ),
            (
                &k(2, "a"),
                msg(
                    "delete",
                    44,
                    json!({"tenant": 2, "code": "a", "amount": null, "note": null}),
                ),
            ),
        ],
    )
    .await;
    let sink = s.start();
    wait_rows(
        &ints,
        "id, name, big, _version",
        "id",
        &[
            row(&[
                ("id", "1"),
                ("name", "\"a2\""),
                ("big", "\"B1\""),
                ("_version", "12"),
            ]),
            row(&[
                ("id", "3"),
                ("name", "\"b3\""),
                ("big", "\"B2\""),
                ("_version", "13"),
            ]),
        ],
        &sink,
    )
    .await;
    wait_rows(
        &uuids,
        "id, doc, tags",
        "id",
        &[row(&[
            ("id", &format!("\"{u2}\"")),
            ("doc", "\"\\\"s\\\"\""),
            ("tags", "[\"after\"]"),
        ])],
        &sink,
    )
    .await;
    wait_rows(
        &comp,
        "tenant, code, amount, note",
        "tenant, code",
        &[
            row(&[
                ("tenant", "1"),
                ("code", "\"a\""),
                ("amount", "1.50"),
                ("note", "\"n1\""),
            ]),
            row(&[
                ("tenant", "3"),
                ("code", "\"b\""),
                ("amount", "2.00"),
                ("note", "\"keep me\""),
            ]),
        ],
        &sink,
    )
    .await;
    // Now that those are stored: an update that leaves `big` out is completed from the table.
    s.produce(
        &id_int,
        &[(
            "3",
            with(
                msg("update", 50, json!({"id": 3, "name": "b4", "big": null})),
                "unchanged",
                json!(["big"]),
            ),
        )],
    )
    .await;
    wait_rows(
        &ints,
        "id, name, big, _version",
        "id",
        &[
            row(&[
                ("id", "1"),
                ("name", "\"a2\""),
                ("big", "\"B1\""),
                ("_version", "12"),
            ]),
            row(&[
                ("id", "3"),
                ("name", "\"b4\""),
                ("big", "\"B2\""),
                ("_version", "50"),
            ]),
        ],
        &sink,
    )
    .await;
    assert_eq!(sink.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_mid_stream_add_widen_and_drop_columns_without_a_restart() {
    let s = Setup::new("evolve").await;
    let t = s.table("t");
    let v1 = rel(
        &t,
        vec![
            col("id", 23, -1, "integer", false, 1),
            col("a", 23, -1, "integer", false, 2),
            col("c", 25, -1, "text", false, 3),
        ],
        vec![0],
    );
    let mut v2 = v1.clone();
    v2.columns[1] = col("a", 20, -1, "bigint", false, 2);
    v2.columns.push(col("d", 25, -1, "text", true, 4));
    let mut v3 = v2.clone();
    v3.columns.remove(2);
    let sink = s.start();
    let id1 = s.schema(&v1).await;
    s.produce(
        &id1,
        &[("1", msg("insert", 10, json!({"id": 1, "a": 5, "c": "c1"})))],
    )
    .await;
    wait_rows(
        &t,
        "id, a, c",
        "id",
        &[row(&[("id", "1"), ("a", "5"), ("c", "\"c1\"")])],
        &sink,
    )
    .await;
    let id2 = s.schema(&v2).await;
    s.produce(
        &id2,
        &[(
            "2",
            msg(
                "insert",
                11,
                json!({"id": 2, "a": 9_000_000_000_i64, "c": "c2", "d": "d2"}),
            ),
        )],
    )
    .await;
    let id3 = s.schema(&v3).await;
    s.produce(
        &id3,
        &[("3", msg("insert", 12, json!({"id": 3, "a": -1, "d": "d3"})))],
    )
    .await;
    wait_rows(
        &t,
        "id, a, c, d",
        "id",
        &[
            row(&[("id", "1"), ("a", "5"), ("c", "\"c1\""), ("d", "null")]),
            row(&[
                ("id", "2"),
                ("a", "9000000000"),
                ("c", "\"c2\""),
                ("d", "\"d2\""),
            ]),
            row(&[("id", "3"), ("a", "-1"), ("c", "null"), ("d", "\"d3\"")]),
        ],
        &sink,
    )
    .await;
    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    let types: Vec<(String, String)> = ch
        .query("SELECT name, type FROM system.columns WHERE database = 'default' AND table = ? ORDER BY name")
        .bind(&t)
        .fetch_all()
        .await
        .unwrap();
    let types: HashMap<_, _> = types.into_iter().collect();
    assert_eq!(types["a"], "Int64");
    assert_eq!(
        types["c"], "Nullable(String)",
        "a dropped NOT NULL column becomes Nullable"
    );
    assert_eq!(types["d"], "Nullable(String)");
    assert_eq!(sink.stop(), 0);
}

fn dead_letters(topic: &str, expected: usize) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = kafka_config()
        .set("group.id", unique("dlq_reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while out.len() < expected && std::time::Instant::now() < deadline {
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
async fn an_unsafe_change_goes_to_the_dead_letter_topic_while_other_tables_keep_flowing() {
    let s = Setup::new("unsafe").await;
    let (bad, good) = (s.table("bad"), s.table("good"));
    let v1 = rel(
        &bad,
        vec![
            col("id", 23, -1, "integer", false, 1),
            col("s", 25, -1, "text", true, 2),
        ],
        vec![0],
    );
    let mut v2 = v1.clone();
    v2.columns[1] = col("s", 23, -1, "integer", true, 2);
    let other = rel(&good, vec![col("id", 23, -1, "integer", false, 1)], vec![0]);
    let sink = s.start();
    let (id1, id_other) = (s.schema(&v1).await, s.schema(&other).await);
    s.produce(
        &id1,
        &[("1", msg("insert", 1, json!({"id": 1, "s": "text"})))],
    )
    .await;
    wait_rows(
        &bad,
        "id, s",
        "id",
        &[row(&[("id", "1"), ("s", "\"text\"")])],
        &sink,
    )
    .await;
    let id2 = s.schema(&v2).await;
    s.produce(&id2, &[("2", msg("insert", 2, json!({"id": 2, "s": 7})))])
        .await;
    s.produce(&id_other, &[("9", msg("insert", 3, json!({"id": 9})))])
        .await;
    wait_rows(&good, "id", "id", &[row(&[("id", "9")])], &sink).await;
    let errors = dead_letters(&format!("{}_dlq", s.name), 1);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains(&bad)
            && errors[0].contains("column s")
            && errors[0].contains("Nullable(String)")
            && errors[0].contains("integer"),
        "{}",
        errors[0]
    );
    wait_rows(
        &bad,
        "id, s",
        "id",
        &[row(&[("id", "1"), ("s", "\"text\"")])],
        &sink,
    )
    .await;
    assert!(sink.log_text().contains("schema change refused"));
    assert_eq!(sink.stop(), 0);
    // `status` names the refusal (its PostgreSQL part needs a table; any will do).
    let pg_table = Table::new("unsafest").await;
    let dlq = format!("{}_dlq", s.name);
    let out = relay(
        &[
            "status",
            "--json",
            "--table",
            &pg_table.name,
            "--slot",
            &pg_table.name,
            "--publication",
            &pg_table.name,
            "--topic",
            &s.name,
            "--group",
            &s.name,
            "--dlq-topic",
            &dlq,
        ],
        &[],
    )
    .output()
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let refused = v["kafka"]["refused_schema_changes"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{v:#}");
    assert_eq!(refused[0]["dead_letters"], 1);
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&bad) && r.contains("column s")),
        "{v:#}"
    );
    pg_table.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_round_trips_into_clickhouse_18_16() {
    let s = Setup::new("types").await;
    let t = s.table("all");
    let mut cols = vec![
        col("id", 20, -1, "bigint", false, 1),
        col("num", 1700, (10 << 16) + 2 + 4, "numeric(10,2)", true, 2),
        col("num_any", 1700, -1, "numeric", true, 3),
        col("f_nan", 701, -1, "double precision", true, 4),
        col("f_inf", 700, -1, "real", true, 5),
        col("f_ninf", 701, -1, "double precision", true, 6),
        col("f", 701, -1, "double precision", true, 7),
        col("b", 16, -1, "boolean", true, 8),
        col("txt", 25, -1, "text", true, 9),
        col("vc", 1043, 24, "character varying(20)", true, 10),
        col("ch", 1042, 9, "character(5)", true, 11),
        col("u", 2950, -1, "uuid", true, 12),
        col("d", 1082, -1, "date", true, 13),
        col("tm", 1083, -1, "time without time zone", true, 14),
        col("tmz", 1266, -1, "time with time zone", true, 15),
        col("ts", 1114, -1, "timestamp without time zone", true, 16),
        col("tsz", 1184, -1, "timestamp with time zone", true, 17),
        col("iv", 1186, -1, "interval", true, 18),
        col("by", 17, -1, "bytea", true, 19),
        col("js", 114, -1, "json", true, 20),
        col("jb", 3802, -1, "jsonb", true, 21),
        col("ia", 1007, -1, "integer[]", true, 22),
        col("ta", 1009, -1, "text[]", true, 23),
        col("ip", 869, -1, "inet", true, 25),
        col("m", 790, -1, "money", true, 26),
        col("n38", 1700, (38 << 16) + 10 + 4, "numeric(38,10)", true, 27),
    ];
    let mut mood = col("e", 99999, -1, "mood", true, 24);
    mood.kind = PgType::Enum {
        name: "mood".into(),
    };
    cols.insert(23, mood);
    let r = rel(&t, cols, vec![0]);
    // (column, PostgreSQL text, what ClickHouse 18.16 gives back as JSON)
    let cases: &[(&str, &str, &str)] = &[
        ("id", "9007199254740993", "9007199254740993"),
        ("num", "-12345678.90", "-12345678.90"),
        (
            "num_any",
            "123456789012345678901234567890.123456789",
            "\"123456789012345678901234567890.123456789\"",
        ),
        ("f_nan", "NaN", "\"nan\""),
        ("f_inf", "Infinity", "\"inf\""),
        ("f_ninf", "-Infinity", "\"-inf\""),
        ("f", "0.1", "0.1"),
        ("b", "t", "1"),
        (
            "txt",
            "héllo \"q\" /slash\ttab",
            "\"héllo \\\"q\\\" /slash\\ttab\"",
        ),
        ("vc", "varchar", "\"varchar\""),
        ("ch", "ab   ", "\"ab   \""),
        (
            "u",
            "9b2f0c4e-1111-4a5b-8c6d-000000000001",
            "\"9b2f0c4e-1111-4a5b-8c6d-000000000001\"",
        ),
        ("d", "2024-02-29", "\"2024-02-29\""),
        ("tm", "12:34:56.789", "\"12:34:56.789\""),
        ("tmz", "12:34:56+02", "\"12:34:56+02\""),
        ("ts", "2024-01-01 12:00:00.123456", "1704110400123456"),
        ("tsz", "2024-01-01 12:00:00+02", "1704103200000000"),
        (
            "iv",
            "1 year 2 mons 3 days 04:05:06",
            "\"1 year 2 mons 3 days 04:05:06\"",
        ),
        ("by", "\\x00ff10", "\"00ff10\""),
        (
            "js",
            "{\"b\": 1, \"a\": [1, 2]}",
            "\"{\\\"a\\\":[1,2],\\\"b\\\":1}\"",
        ),
        (
            "jb",
            "{\"a\": [1, 2], \"b\": 1}",
            "\"{\\\"a\\\":[1,2],\\\"b\\\":1}\"",
        ),
        ("ia", "{1,NULL,3}", "[1,null,3]"),
        ("ta", "{a,NULL,\"b c\"}", "[\"a\",null,\"b c\"]"),
        ("e", "happy", "\"happy\""),
        ("ip", "192.168.0.1/24", "\"192.168.0.1/24\""),
        ("m", "$1,234.50", "\"$1,234.50\""),
        (
            "n38",
            "-1234567890123456789012345678.0123456789",
            "-1234567890123456789012345678.0123456789",
        ),
    ];
    let mut columns = serde_json::Map::new();
    for (name, text, _) in cases {
        let kind = &r.columns.iter().find(|c| c.name == *name).unwrap().kind;
        columns.insert(
            name.to_string(),
            to_json(kind, text).unwrap_or_else(|e| panic!("{name}: {e}")),
        );
    }
    let id = s.schema(&r).await;
    s.produce(
        &id,
        &[("9007199254740993", msg("insert", 1, Value::Object(columns)))],
    )
    .await;
    let sink = s.start();
    let names: Vec<&str> = cases.iter().map(|(n, _, _)| *n).collect();
    let expected = row(&cases.iter().map(|(n, _, v)| (*n, *v)).collect::<Vec<_>>());
    wait_rows(
        &t,
        &names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", "),
        "id",
        &[expected],
        &sink,
    )
    .await;
    assert_eq!(sink.stop(), 0);
}
