//! `cdc-relay verify` on the real services: a clean pipeline verifies equal (also under load),
//! drift made in ClickHouse and in Kafka is found with the right keys, and `--repair` mends it.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// `verify`'s settings for the pipeline whose table, slot, publication, topic and group are all
/// `name`, its ClickHouse table (the seed's, or a seed-shaped one's name) `ch_table`, then `extra`.
fn pipeline(name: &str, ch_table: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--table", name, "--slot", name, "--publication", name]
        .into_iter()
        .chain([
            "--topic",
            name,
            "--group",
            name,
            "--clickhouse-table",
            ch_table,
        ])
        .map(String::from)
        .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `sink` of topic `name` in group `name`, the seed's shape into `ch_table`.
fn start_sink(name: &str, ch_table: &str, log_suffix: &str) -> Relay {
    let dlq = format!("{name}.dlq");
    Relay::start(
        &format!("{name}_sink{log_suffix}"),
        &[
            "sink",
            "--group",
            name,
            "--topic",
            name,
            "--clickhouse-table",
            ch_table,
            "--dlq-topic",
            &dlq,
        ],
        &[],
    )
}

/// Runs `verify` and returns its exit code and its JSON report (`null` when it printed none).
fn verify(args: &[String]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["verify", "--json"];
    all.extend(args.iter().map(String::as_str));
    let out = relay(&all, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), report, stderr)
}

fn keys(report: &serde_json::Value, kind: &str) -> Vec<String> {
    report["tables"][0][kind]["examples"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

async fn ch_exec(sql: &str) {
    clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"))
        .query(sql)
        .execute()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn ch_u64(sql: &str) -> u64 {
    clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"))
        .query(sql)
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

/// Every type of the type mapping, NULLs, NaN, infinities, padding, a TOASTed value.
const EVERY_TYPE: &str = "CREATE TYPE {t}_mood AS ENUM ('happy', 'sad'); \
    CREATE DOMAIN {t}_pos AS integer CHECK (VALUE > 0); \
    CREATE TABLE {t} (id bigint PRIMARY KEY, i2 smallint, i4 integer NOT NULL, n numeric, \
      n2 numeric(10,2), n18 numeric(18,4), f4 real, f8 double precision, b boolean, tx text, \
      vc varchar(5), ch char(3), u uuid, d date, tm time, tz timetz, ts timestamp, tstz timestamptz, \
      iv interval, by bytea, jb jsonb, ai integer[], at text[], af float8[], ab boolean[], \
      an numeric(6,2)[], ats timestamptz[], m {t}_mood, dom {t}_pos, ip inet, cd cidr, mac macaddr, \
      big text)";

const EVERY_TYPE_ROWS: &str = "INSERT INTO {t} \
    SELECT g, (g % 30000)::smallint - 15000, g, (g * 1.25)::numeric, (g / 7.0)::numeric(10,2), \
      CASE WHEN g % 5 = 0 THEN 100 ELSE g / 3.0 END, \
      CASE g % 4 WHEN 0 THEN 'NaN'::real WHEN 1 THEN 'Infinity' ELSE g / 3.0 END, \
      CASE g % 5 WHEN 0 THEN '-Infinity'::float8 WHEN 1 THEN -0.0 ELSE 1.0 / g END, g % 2 = 0, \
      CASE WHEN g % 9 = 0 THEN NULL ELSE 'row ' || g || E' \\t \"q\" ü \\\\ ''' END, \
      left(g::text, 5), left(g::text, 2), md5(g::text)::uuid, \
      CASE WHEN g % 100 = 0 THEN 'infinity'::date ELSE date '2024-02-29' + g END, \
      time '00:00:00.000001' + g * interval '1 second', '10:00:00+05:30', \
      CASE g % 50 WHEN 0 THEN 'infinity'::timestamp WHEN 1 THEN '-infinity' \
        ELSE timestamp '2024-01-01 10:00:00.123456' + g * interval '1 hour 1 microsecond' END, \
      timestamptz '1969-12-31 23:59:59.5+05:30' + g * interval '1 day', \
      g * interval '1 day 1 second', decode(lpad(to_hex(g), 8, '0'), 'hex'), \
      jsonb_build_object('g', g), ARRAY[g, NULL, -g], ARRAY['a b', NULL, g::text], \
      ARRAY[g / 3.0, 'NaN'], ARRAY[true, NULL], ARRAY[1.50, g % 100]::numeric(6,2)[], \
      ARRAY[timestamptz '2020-01-01 00:00:00+00' + g * interval '1 minute'], \
      CASE WHEN g % 2 = 0 THEN 'happy' ELSE 'sad' END::{t}_mood, g, '192.168.0.1/24', \
      '10.0.0.0/8', '08:00:2b:01:02:03', CASE WHEN g = 7 THEN repeat('x', 100000) END \
    FROM generate_series(1, 3000) AS g; \
    INSERT INTO {t} (id, i4) VALUES (-9223372036854775808, 0), (9223372036854775807, 1);";

#[tokio::test]
async fn every_type_verifies_equal_then_clickhouse_drift_is_found_by_key_and_repaired() {
    let t = AnyTable::new("verall", EVERY_TYPE).await;
    let stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let seed_table = format!("{}_seed", t.name);
    let sink = start_sink(&t.name, &seed_table, "");
    t.exec(EVERY_TYPE_ROWS).await;
    let view = format!("default.{}_current", t.name);
    eventually(
        "every row in ClickHouse",
        Duration::from_secs(90),
        || async { (ch_u64(&format!("SELECT count() FROM {view}")).await == 3002).then_some(()) },
    )
    .await;
    let args = pipeline(&t.name, &seed_table, &[]);
    let (code, report, log) = verify(&args);
    assert_eq!(code, 0, "{report:#}\n{log}");
    let table = &report["tables"][0];
    assert_eq!(table["postgres_rows"], 3002, "{report:#}");
    assert_eq!(table["clickhouse_rows"], 3002, "{report:#}");
    assert!(table["buckets"].as_u64().unwrap() >= 3, "{report:#}");
    let not_compared = table["not_compared"].to_string();
    assert!(not_compared.contains("jb (jsonb)"), "{report:#}");
    assert_eq!(
        table["not_compared"].as_array().unwrap().len(),
        1,
        "{report:#}"
    );

    // Drift made in ClickHouse: a row gone (a delete PostgreSQL never made), a value changed, a
    // row PostgreSQL never had; each as the sink would write it, with a newer version.
    let raw = format!("default.{}", t.name);
    let v = ch_u64(&format!("SELECT max(_version) FROM {raw}")).await + 1;
    ch_exec(&format!(
        "INSERT INTO {raw} (id, i4, _op, _lsn, _version, _deleted) VALUES (5, 5, 'delete', '0/0', {v}, 1)"
    ))
    .await;
    ch_exec(&format!(
        "INSERT INTO {raw} (id, i4, tx, _op, _lsn, _version, _deleted) VALUES (2001, 2001, 'changed', 'update', '0/0', {v}, 0)"
    ))
    .await;
    ch_exec(&format!(
        "INSERT INTO {raw} (id, i4, _op, _lsn, _version, _deleted) VALUES (777777, 1, 'insert', '0/0', 1, 0)"
    ))
    .await;
    let (code, report, log) = verify(&args);
    assert_eq!(code, 1, "{report:#}\n{log}");
    assert_eq!(keys(&report, "missing"), vec!["5"], "{report:#}");
    assert_eq!(keys(&report, "mismatched"), vec!["2001"], "{report:#}");
    assert_eq!(keys(&report, "extra"), vec!["777777"], "{report:#}");
    // Only the buckets of those keys were read row by row.
    let differing = report["tables"][0]["differing_buckets"].as_u64().unwrap();
    assert!((1..=3).contains(&differing), "{report:#}");

    let mut with_repair = args.clone();
    with_repair.push("--repair".into());
    let (code, report, log) = verify(&with_repair);
    assert_eq!(code, 0, "{report:#}\n{log}");
    assert_eq!(report["repaired"]["sent"], 3, "{report:#}");
    assert_eq!(
        keys(&report["repaired"]["before"], "missing"),
        vec!["5"],
        "{report:#}"
    );
    // What the repair wrote is the row itself: the values PostgreSQL holds.
    let big = ch_u64(&format!(
        "SELECT ifNull(toUInt64(length(tx)), 0) FROM {view} WHERE id = 2001"
    ))
    .await;
    assert_eq!(big as usize, "row 2001 \t \"q\" ü \\ '".len());
    assert_eq!(
        ch_u64(&format!("SELECT count() FROM {view} WHERE id = 777777")).await,
        0
    );
    let (code, report, log) = verify(&args);
    assert_eq!(code, 0, "{report:#}\n{log}");

    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

/// The group's committed offsets moved to the end of every partition: whatever the sink had not
/// consumed is lost to it, as if Kafka had deleted it (retention) before the sink read it.
fn skip_to_end(topic: &str, group: &str) {
    let c: BaseConsumer = kafka_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        let (_, high) = c
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))
            .unwrap();
    }
    c.commit(&tpl, rdkafka::consumer::CommitMode::Sync).unwrap();
}

#[tokio::test]
async fn the_seed_table_verifies_equal_under_load_and_messages_lost_in_kafka_are_found_and_repaired(
) {
    let t = Table::new("verseed").await;
    let name = t.name.clone();
    let stream = Relay::start(&name, &stream_args(&name, &[]), &[]);
    wait_slot_streaming(&t.pg, &name, Duration::from_secs(30)).await;
    let sink = start_sink(&name, &name, "");
    t.exec(&format!(
        "INSERT INTO {name} (username, event_type, event_time) \
         SELECT 'user' || g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'login' END, \
           timestamp '2024-01-01' + g * interval '1.000001 second' FROM generate_series(1, 20000) g; \
         INSERT INTO {name} (username, event_type, event_time) VALUES \
           ('late', 'login', 'infinity'), ('early', 'login', '-infinity'), (NULL, NULL, NULL)"
    ))
    .await;
    t.wait_all_sent(Duration::from_secs(60)).await;

    // A steady load while verify runs: every change in flight at one of its reads must be found
    // equal when read again, never reported.
    let load = {
        let pg = pg().await;
        let name = name.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                pg.batch_execute(&format!(
                    "INSERT INTO {name} (username, event_type, event_time) \
                     SELECT 'load{i}', 'logout', now() FROM generate_series(1, 10)"
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let args = pipeline(&name, &name, &[]);
    let (code, report, log) = verify(&args);
    assert!(!load.is_finished(), "the load ended before verify did");
    assert_eq!(code, 0, "{report:#}\n{log}");
    assert!(
        report["tables"][0]["postgres_rows"].as_u64().unwrap() >= 20000,
        "{report:#}"
    );
    load.await.unwrap();

    // Messages lost before the sink: produced while it is down, then skipped.
    assert_eq!(sink.stop(), 0);
    let before: i64 = t.count("true").await;
    t.exec(&format!(
        "INSERT INTO {name} (username, event_type, event_time) \
         SELECT 'lost' || g, 'login', now() FROM generate_series(1, 20) g"
    ))
    .await;
    t.wait_all_sent(Duration::from_secs(60)).await;
    skip_to_end(&name, &name);
    let lost: Vec<String> =
        t.pg.query(
            &format!("SELECT id::int8 FROM {name} WHERE username LIKE 'lost%' ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0).to_string())
        .collect();
    assert_eq!(lost.len(), 20);
    assert_eq!(t.count("true").await, before + 20);
    let sink = start_sink(&name, &name, "2");
    let mut show_all = args.clone();
    show_all.extend(["--examples".into(), "100".into()]);
    let (code, report, log) = verify(&show_all);
    assert_eq!(code, 1, "{report:#}\n{log}");
    assert_eq!(keys(&report, "missing"), lost, "{report:#}");
    assert_eq!(report["tables"][0]["mismatched"]["count"], 0, "{report:#}");
    assert_eq!(report["tables"][0]["extra"]["count"], 0, "{report:#}");

    let mut with_repair = args.clone();
    with_repair.push("--repair".into());
    let (code, report, log) = verify(&with_repair);
    assert_eq!(code, 0, "{report:#}\n{log}");
    assert_eq!(report["repaired"]["sent"], 20, "{report:#}");
    let current = ch_u64(&format!(
        "SELECT count() FROM default.{name}_current WHERE username LIKE 'lost%'"
    ))
    .await;
    assert_eq!(current, 20);

    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

#[tokio::test]
async fn verify_says_what_is_wrong_with_exit_2_when_the_pipeline_is_not_there() {
    let t = Table::new("vernone").await;
    let name = t.name.clone();
    // No slot yet: verify cannot know what has been delivered.
    let (code, _, log) = verify(&pipeline(&name, &name, &[]));
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains(&format!("{name}_current")) || log.contains("does not exist"),
        "{log}"
    );
    t.drop().await;
}

/// The canonical text of every type is the same in PostgreSQL and in a current ClickHouse (26.9,
/// embedded in chdb-core): the rows of EVERY_TYPE go the sink's way (message JSON, read back,
/// `JSONEachRow` into the table the sink creates on 26.9), and each row's hash must equal
/// PostgreSQL's. 18.16 is covered by the tests above, through the real pipeline.
#[tokio::test]
async fn every_types_row_hash_is_postgresqls_on_current_clickhouse() {
    use cdc_relay::commands::verify::plan::TablePlan;
    use cdc_relay::event::{ChangeEvent, Lsn, Op};
    use cdc_relay::sink::clickhouse::evolve::plan;
    use cdc_relay::sink::clickhouse::schema::ServerVersion;
    use cdc_relay::sink::clickhouse::table::*;
    use cdc_relay::source::postgres::backfill::describe_table;
    use cdc_relay::source::postgres::verify::{row_hashes, rows_as_text};
    use cdc_relay::source::postgres::TableSpec;
    use cdc_relay::types::ServerCaps;
    use serde_json::json;

    let t = AnyTable::new("verchdb", EVERY_TYPE).await;
    t.exec(EVERY_TYPE_ROWS).await;
    let spec = TableSpec::parse(&t.name).unwrap();
    let (shape, tuple) = describe_table(&t.pg, &spec).await.unwrap();
    let rel = shape.schema();
    let version = ServerVersion {
        major: 26,
        minor: 9,
    };
    let caps = caps_of(version);
    let names = TableNames::new("verify", &t.name);
    let state = plan(&names, &[], rel, &[], version).unwrap().state;
    let columns: Vec<String> = tuple.iter().map(|c| c.name.clone()).collect();
    let texts = rows_as_text(&t.pg, &spec.qualified(), &columns, "true")
        .await
        .unwrap();
    let rows: Vec<_> = texts
        .iter()
        .map(|values| {
            let event = shape.event(Op::Insert, values, Lsn(1), 1).unwrap();
            // As the sink reads it off the topic.
            let event = ChangeEvent::from_json(&event.to_json()).unwrap();
            state.row(event).unwrap().row
        })
        .collect();
    let (cols, body) = insert_body(&rows);
    let cols: Vec<String> = cols.iter().map(|c| format!("`{c}`")).collect();
    let user: Vec<(String, String)> = rel
        .columns
        .iter()
        .map(|c| (c.name.clone(), c.name.clone()))
        .collect();
    let view_columns: Vec<(String, String)> = (0..rel.columns.len())
        .map(|i| (rel.columns[i].name.clone(), column_type(rel, i, caps)))
        .collect();
    let view = TableNames::new("verify", &format!("{}_current", t.name));
    let tp = TablePlan::new(&shape, view.clone(), &view_columns, ServerCaps::CURRENT).unwrap();
    assert_eq!(tp.not_compared.len(), 1, "{:?}", tp.not_compared);
    let mut expected: Vec<(String, u64)> =
        row_hashes(&t.pg, &tp.pg_table, &tp.pg_key, &tp.pg_hash, "true")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, h)| (k.bytes().map(|b| format!("{b:02X}")).collect(), h))
            .collect();
    expected.sort();
    let expected_tsv: String = expected
        .iter()
        .map(|(k, h)| format!("{k}\t{h}\n"))
        .collect();
    assert_eq!(expected.len(), 3002);
    let steps = vec![
        json!({"kind":"sql","sql":"CREATE DATABASE IF NOT EXISTS verify"}),
        json!({"kind":"sql","sql":create_table_sql(&names, rel, version)}),
        json!({"kind":"sql","sql":create_truncates_sql(&names)}),
        json!({"kind":"sql","sql":create_view_sql(&names, &user)}),
        json!({"kind":"sql","what":"the rows, as the sink inserts them","sql":format!("INSERT INTO {} ({}) FORMAT JSONEachRow {}", names.qualified(), cols.join(", "), String::from_utf8(body).unwrap())}),
        json!({"kind":"sql","what":"every row's hash is PostgreSQL's",
            "sql":format!("SELECT hex({}) AS k, {} FROM {} ORDER BY k FORMAT TSV", tp.ch_key, tp.ch_hash, view.qualified()),
            "expect_tsv": expected_tsv}),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".local/test-logs")
        .join(&t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("steps.json");
    std::fs::write(&manifest, serde_json::to_vec_pretty(&steps).unwrap()).unwrap();
    let out = std::process::Command::new(env("CDC_RELAY_CHDB_PYTHON"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/chdb/check_sink_sql.py"
        ))
        .arg(&manifest)
        .arg(dir.join("chdb"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout.chars().take(6000).collect::<String>(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    t.drop().await;
}

/// ClickHouse far ahead of PostgreSQL (a table truncated or restored there only): the one bucket
/// that holds the difference is too large to read, so it is cut into finer ones, of which as many
/// are read as a run may hold (500,000 rows) and the rest are counted.
#[tokio::test]
async fn rows_only_clickhouse_has_beyond_what_a_run_holds_are_counted_not_read() {
    let t = Table::new("verbig").await;
    let name = t.name.clone();
    let stream = Relay::start(&name, &stream_args(&name, &[]), &[]);
    wait_slot_streaming(&t.pg, &name, Duration::from_secs(30)).await;
    let sink = start_sink(&name, &name, "");
    t.exec(&format!(
        "INSERT INTO {name} (username, event_type, event_time) \
         SELECT 'user' || g, 'login', now() FROM generate_series(1, 1000) g"
    ))
    .await;
    t.wait_all_sent(Duration::from_secs(60)).await;
    let view = format!("default.{name}_current");
    eventually(
        "every row in ClickHouse",
        Duration::from_secs(60),
        || async { (ch_u64(&format!("SELECT count() FROM {view}")).await == 1000).then_some(()) },
    )
    .await;
    ch_exec(&format!(
        "INSERT INTO default.{name} (id, username, op, _lsn, _version, _deleted) \
         SELECT number + 100000, 'ghost', 'insert', '0/0', 1, 0 FROM system.numbers LIMIT 600000"
    ))
    .await;
    let (code, report, log) = verify(&pipeline(&name, &name, &[]));
    assert_eq!(code, 1, "{report:#}\n{log}");
    let table = &report["tables"][0];
    assert_eq!(table["postgres_rows"], 1000, "{report:#}");
    assert_eq!(table["clickhouse_rows"], 601000, "{report:#}");
    assert_eq!(table["extra"]["count"], 500000, "{report:#}");
    assert_eq!(table["extra"]["examples"][0], "100000", "{report:#}");
    assert_eq!(table["missing"]["count"], 0, "{report:#}");
    assert_eq!(table["unread_buckets"], 100, "{report:#}");
    assert!(
        table["notes"].to_string().contains("(100000 rows)"),
        "{report:#}"
    );
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

/// Updates, deletes and inserts under way while verify runs, through `--exactly-once` (whose
/// transaction markers the sink's committed offsets never pass): equal, and no wait runs out.
#[tokio::test]
async fn a_table_under_updates_and_deletes_through_exactly_once_verifies_equal() {
    let t = AnyTable::new(
        "verload",
        "CREATE TABLE {t} (k text PRIMARY KEY, n integer NOT NULL, f double precision, note text)",
    )
    .await;
    let mut args = stream_args(&t.name, &["--ops", "insert,update,delete,truncate"]);
    args.push("--exactly-once");
    let stream = Relay::start(&t.name, &args, &[]);
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let seed_table = format!("{}_seed", t.name);
    let sink = start_sink(&t.name, &seed_table, "");
    t.exec(
        "INSERT INTO {t} SELECT 'k' || g, g, g / 7.0, repeat('n', g % 50) FROM generate_series(1, 5000) g",
    )
    .await;
    let view = format!("default.{}_current", t.name);
    eventually(
        "every row in ClickHouse",
        Duration::from_secs(90),
        || async { (ch_u64(&format!("SELECT count() FROM {view}")).await == 5000).then_some(()) },
    )
    .await;
    let load = {
        let pg = pg().await;
        let name = t.name.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                // k1 is updated all the time: in flight at every point verify reads.
                pg.batch_execute(&format!(
                    "UPDATE {name} SET n = n + 1, f = f * 1.5 WHERE k = 'k{}'; \
                     DELETE FROM {name} WHERE k = 'k{}'; \
                     INSERT INTO {name} VALUES ('new{i}', {i}, {i} / 3.0, 'x'); \
                     UPDATE {name} SET n = n + 1 WHERE k = 'k1'",
                    2 + (i * 7) % 4999,
                    2 + (i * 13 + 1) % 4999
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let (code, report, log) = verify(&pipeline(&t.name, &seed_table, &["--wait-secs", "60"]));
    assert!(!load.is_finished(), "the load ended before verify did");
    assert_eq!(code, 0, "{report:#}\n{log}");
    load.await.unwrap();
    // And once the load is over, equal again with every change counted.
    let (code, report, log) = verify(&pipeline(&t.name, &seed_table, &[]));
    assert_eq!(code, 0, "{report:#}\n{log}");
    let rows: i64 =
        t.pg.query_one(&format!("SELECT count(*) FROM {}", t.name), &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(report["tables"][0]["postgres_rows"], rows);
    assert_eq!(report["tables"][0]["clickhouse_rows"], rows);
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

/// ClickHouse 18.16 reads some doubles one ulp off; verify allows exactly that: a double one ulp
/// below 2.5 (across the bits its first passes leave out) is equal, two ulps below is drift.
#[tokio::test]
async fn a_double_one_ulp_off_is_equal_and_two_ulps_off_is_drift() {
    let t = AnyTable::new(
        "verulp",
        "CREATE TABLE {t} (id bigint PRIMARY KEY, f double precision, g double precision)",
    )
    .await;
    let stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let seed_table = format!("{}_seed", t.name);
    let sink = start_sink(&t.name, &seed_table, "");
    t.exec("INSERT INTO {t} VALUES (1, 2.5, 1), (2, 2.5, NULL), (3, 2.857142857142857, 2)")
        .await;
    let view = format!("default.{}_current", t.name);
    eventually(
        "every row in ClickHouse",
        Duration::from_secs(60),
        || async { (ch_u64(&format!("SELECT count() FROM {view}")).await == 3).then_some(()) },
    )
    .await;
    let raw = format!("default.{}", t.name);
    let v = ch_u64(&format!("SELECT max(_version) FROM {raw}")).await + 1;
    ch_exec(&format!(
        "INSERT INTO {raw} (id, f, g, _op, _lsn, _version, _deleted) VALUES \
         (1, 2.4999999999999996, 1, 'update', '0/0', {v}, 0), \
         (2, 2.499999999999999, NULL, 'update', '0/0', {v}, 0)"
    ))
    .await;
    let (code, report, log) = verify(&pipeline(&t.name, &seed_table, &[]));
    assert_eq!(code, 1, "{report:#}\n{log}");
    assert_eq!(keys(&report, "mismatched"), vec!["2"], "{report:#}");
    assert!(log.contains("one ulp allowed"), "{log}");
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}

/// A composite key whose order is not the columns' (tenant, code over columns code, tenant): found
/// by key, read again through the key's index, and repaired (the extra key's delete built from it).
#[tokio::test]
async fn a_composite_key_out_of_column_order_is_found_and_repaired() {
    let t = AnyTable::new(
        "vercomp",
        "CREATE TABLE {t} (code text, note text, tenant integer, PRIMARY KEY (tenant, code))",
    )
    .await;
    let stream = t.start();
    wait_slot_streaming(&t.pg, &t.name, Duration::from_secs(30)).await;
    let seed_table = format!("{}_seed", t.name);
    let sink = start_sink(&t.name, &seed_table, "");
    t.exec(
        "INSERT INTO {t} SELECT 'c' || (g % 100), 'note ' || g, g / 100 FROM generate_series(0, 2999) g",
    )
    .await;
    let view = format!("default.{}_current", t.name);
    eventually(
        "every row in ClickHouse",
        Duration::from_secs(60),
        || async { (ch_u64(&format!("SELECT count() FROM {view}")).await == 3000).then_some(()) },
    )
    .await;
    let raw = format!("default.{}", t.name);
    let v = ch_u64(&format!("SELECT max(_version) FROM {raw}")).await + 1;
    ch_exec(&format!(
        "INSERT INTO {raw} (code, note, tenant, _op, _lsn, _version, _deleted) VALUES \
         ('c5', '', 3, 'delete', '0/0', {v}, 1), \
         ('c7', 'changed', 4, 'update', '0/0', {v}, 0), \
         ('it''s', 'ghost', 99, 'insert', '0/0', 1, 0)"
    ))
    .await;
    let args = pipeline(&t.name, &seed_table, &[]);
    let (code, report, log) = verify(&args);
    assert_eq!(code, 1, "{report:#}\n{log}");
    // Key fields in the table's column order: (code, tenant).
    assert_eq!(keys(&report, "missing"), vec!["(c5, 3)"], "{report:#}");
    assert_eq!(keys(&report, "mismatched"), vec!["(c7, 4)"], "{report:#}");
    assert_eq!(keys(&report, "extra"), vec!["(it's, 99)"], "{report:#}");
    let mut with_repair = args.clone();
    with_repair.push("--repair".into());
    let (code, report, log) = verify(&with_repair);
    assert_eq!(code, 0, "{report:#}\n{log}");
    assert_eq!(report["repaired"]["sent"], 3, "{report:#}");
    assert_eq!(
        ch_u64(&format!("SELECT count() FROM {view} WHERE tenant = 99")).await,
        0
    );
    assert_eq!(sink.stop(), 0);
    assert_eq!(stream.stop(), 0);
    t.drop().await;
}
