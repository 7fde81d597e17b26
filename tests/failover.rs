//! PostgreSQL 17+ failover slots: the relay streams through a multi-host URL from a primary whose
//! physical standby synchronizes the slot; the primary is killed (immediate shutdown, no
//! checkpoint, as a crash), the standby is promoted, and the relay goes on from the promoted
//! server by itself with nothing lost. Updates and deletes on both sides of the switch prove no
//! stretch of WAL was skipped: unlike inserts, the backfill of unsent rows would not cover them.
//!
//! Needs the pair `CDC_RELAY_PG_MAJOR=17 CDC_RELAY_PG_STANDBY=1 scripts/services up` starts (its
//! env file, .local/services-pg17-standby.env, names CDC_RELAY_PG_STANDBY_URL); skipped without
//! it. It promotes the standby, so that `up` builds a new pair each time.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

fn pg_ctl(data: &str, args: &[&str]) {
    let status = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{}/pg_ctl", env("CDC_RELAY_PG_BIN")))
        .args(["-D", data])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run pg_ctl");
    assert!(status.success(), "pg_ctl -D {data} {args:?} failed");
}

async fn insert(pg: &tokio_postgres::Client, table: &str, tag: &str, n: i32) {
    pg.execute(
        &format!(
            "INSERT INTO {table} (username, event_type, event_time) \
             SELECT $1 || i, 'login', now() FROM generate_series(1, $2) i"
        ),
        &[&tag, &n],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_slot_survives_the_promotion_of_the_standby() {
    let Ok(standby_url) = std::env::var("CDC_RELAY_PG_STANDBY_URL") else {
        println!(
            "SKIPPED: CDC_RELAY_PG_STANDBY_URL is not set. Start a primary and a standby with \
             `CDC_RELAY_PG_MAJOR=17 CDC_RELAY_PG_STANDBY=1 scripts/services up` and load \
             .local/services-pg17-standby.env"
        );
        return;
    };
    let t0 = Instant::now();
    let table = Table::new("failover").await;
    let name = table.name.clone();
    let primary_admin = pg_url(&env("CDC_RELAY_PG_ADMIN_URL")).await;
    let standby_admin = pg_url(&env("CDC_RELAY_PG_STANDBY_ADMIN_URL")).await;

    // Rows from before the start (backfilled) and while streaming, all through the primary.
    publish(&table.pg, &name, "insert, update, delete").await;
    insert(&table.pg, &name, "before", 20).await;
    let relay_url = env("CDC_RELAY_PG_FAILOVER_RELAY_URL");
    let relay = Relay::start(
        &name,
        &stream_args(
            &name,
            &["--heartbeat-interval", "1", "--ops", "insert,update,delete"],
        ),
        &[("CDC_RELAY_PG_URL", relay_url.as_str())],
    );
    wait_slot_streaming(&table.pg, &name, Duration::from_secs(30)).await;
    insert(&table.pg, &name, "streamed", 30).await;
    table.wait_all_sent(Duration::from_secs(30)).await;
    table
        .exec("UPDATE {t} SET username = 'updated before' WHERE id BETWEEN 1 AND 5; DELETE FROM {t} WHERE id = 6")
        .await;
    let failover: bool = primary_admin
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failover, "the relay created the slot without failover");

    // The standby's synchronized copy of the slot has caught up with the primary's.
    let primary_confirmed: String = primary_admin
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    eventually(
        "the standby's synchronized slot",
        Duration::from_secs(60),
        || async {
            // The slot sync worker naps up to 30 s when nothing changed for a while; a reload
            // wakes it (it syncs right after), so the test need not wait out the nap.
            standby_admin
                .execute("SELECT pg_reload_conf()", &[])
                .await
                .unwrap();
            let n: i64 = standby_admin
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND synced \
                     AND confirmed_flush_lsn >= $2::text::pg_lsn",
                    &[&name, &primary_confirmed],
                )
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;

    // Rows committed just before the crash: the standby may have them (asynchronous
    // replication) or not; either way the relay cannot have sent any it lacks
    // (synchronized_standby_slots), and the slot position and ledger marks may lag behind them.
    insert(&table.pg, &name, "last", 10).await;
    pg_ctl(
        &env("CDC_RELAY_PG_PRIMARY_DATA"),
        &["-m", "immediate", "-w", "stop"],
    );
    pg_ctl(&env("CDC_RELAY_PG_STANDBY_DATA"), &["-w", "promote"]);
    let promoted = pg_url(&standby_url).await;
    insert(&promoted, &name, "after", 25).await;
    promoted
        .batch_execute(&format!(
            "UPDATE {name} SET username = 'updated after' WHERE id BETWEEN 11 AND 15; \
             DELETE FROM {name} WHERE id = 16"
        ))
        .await
        .unwrap();

    // The relay finds the promoted server on its own and marks every row sent there.
    let table = Table {
        name: name.clone(),
        pg: promoted,
    };
    table.wait_all_sent(Duration::from_secs(90)).await;
    let ids = table.ids().await;
    // 20 + 30 + 10 + 25 inserted, 2 deleted; only the 10 "last" rows may have died with the primary.
    let last = table.count("username LIKE 'last%'").await;
    assert_eq!(
        ids.len() as i64,
        83 - (10 - last),
        "{last} of the last 10 rows survived"
    );
    let msgs = read_topic(
        &name,
        ids.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let got: BTreeSet<i64> = msgs.iter().filter_map(|m| m.value["id"].as_i64()).collect();
    let missing: Vec<_> = ids.difference(&got).collect();
    assert!(missing.is_empty(), "rows missing from Kafka: {missing:?}");
    let deleted: BTreeSet<i64> = [6, 16].into();
    let extra: BTreeSet<i64> = got.difference(&ids).copied().collect();
    assert_eq!(extra, deleted, "Kafka holds ids the table does not");
    // The changes on each side of the switch came through the stream, in order per row.
    let last_of = |id: i64| {
        msgs.iter()
            .rfind(|m| m.value["id"].as_i64() == Some(id))
            .map(|m| (m.value["op"].clone(), m.value["user"].clone()))
    };
    // (A row whose ledger mark had not reached the standby is also backfilled again after the
    // switch, as `snapshot`, with its current value.)
    for (ids, user) in [(1..=5, "updated before"), (11..=15, "updated after")] {
        for id in ids {
            let (op, value) = last_of(id).expect("messages of the row");
            assert!(op == "update" || op == "snapshot", "id {id}: {op}");
            assert_eq!(value, user, "id {id}");
        }
    }
    for id in [6, 16] {
        assert_eq!(
            last_of(id).map(|(op, _)| op),
            Some("delete".into()),
            "id {id}"
        );
    }
    let log = relay.log_text();
    assert!(
        log.contains("another server or timeline"),
        "the relay did not notice the switch: {log}"
    );
    let code = relay.stop();
    assert_eq!(code, 0);
    println!(
        "failover: {} rows, {} messages, {:.1}s",
        ids.len(),
        msgs.len(),
        t0.elapsed().as_secs_f64()
    );
    table.drop().await;
}
