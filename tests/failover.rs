//! PostgreSQL 17+ failover slots: the relay streams through a multi-host URL from a primary whose
//! physical standby synchronizes the slot; the primary stops, the standby is promoted, and the
//! relay goes on from the promoted server by itself with nothing lost.
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
    insert(&table.pg, &name, "before", 20).await;
    let relay_url = env("CDC_RELAY_PG_FAILOVER_RELAY_URL");
    let relay = Relay::start(
        &name,
        &stream_args(&name, &["--heartbeat-interval", "1"]),
        &[("CDC_RELAY_PG_URL", relay_url.as_str())],
    );
    wait_slot_streaming(&table.pg, &name, Duration::from_secs(30)).await;
    insert(&table.pg, &name, "streamed", 30).await;
    table.wait_all_sent(Duration::from_secs(30)).await;
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

    // Rows committed just before the switch: the standby has them (a fast shutdown sends all
    // WAL), but maybe not the slot position or the ledger marks past them.
    insert(&table.pg, &name, "last", 10).await;
    pg_ctl(
        &env("CDC_RELAY_PG_PRIMARY_DATA"),
        &["-m", "fast", "-w", "stop"],
    );
    pg_ctl(&env("CDC_RELAY_PG_STANDBY_DATA"), &["-w", "promote"]);
    let promoted = pg_url(&standby_url).await;
    insert(&promoted, &name, "after", 25).await;

    // The relay finds the promoted server on its own and marks every row sent there.
    let table = Table {
        name: name.clone(),
        pg: promoted,
    };
    table.wait_all_sent(Duration::from_secs(90)).await;
    let ids = table.ids().await;
    assert_eq!(ids.len(), 85);
    let msgs = read_topic(
        &name,
        ids.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let got: BTreeSet<i64> = msgs.iter().filter_map(|m| m.value["id"].as_i64()).collect();
    let missing: Vec<_> = ids.difference(&got).collect();
    assert!(missing.is_empty(), "rows missing from Kafka: {missing:?}");
    assert_eq!(got, ids, "Kafka holds ids the table does not");
    let log = relay.log_text();
    assert!(
        log.contains("another server or timeline"),
        "the relay did not notice the switch: {log}"
    );
    let code = relay.stop();
    assert_eq!(code, 0);
    println!(
        "failover: {} rows, {} messages ({} duplicates re-sent after the switch), {:.1}s",
        ids.len(),
        msgs.len(),
        msgs.len() - ids.len(),
        t0.elapsed().as_secs_f64()
    );
    table.drop().await;
}
