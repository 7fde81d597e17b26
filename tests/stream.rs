//! `cdc-relay stream` against the real PostgreSQL and Kafka: what reaches the topic, what the ledger
//! says, and what survives stops and crashes.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;

/// One test's private table, slot, publication and topic (all named alike).
struct Pipeline {
    name: String,
    pg: tokio_postgres::Client,
}

impl Pipeline {
    async fn new(prefix: &str) -> Pipeline {
        let name = unique(prefix);
        let pg = pg().await;
        create_table(&pg, &name).await;
        Pipeline { name, pg }
    }

    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = stream_args(&self.name, &["--heartbeat-interval", "1"]);
        a.extend_from_slice(extra);
        a
    }

    fn start(&self, extra: &[&str]) -> Relay {
        Relay::start(&self.name, &self.args(extra), &[])
    }

    async fn exec(&self, sql: &str) {
        self.pg
            .batch_execute(&sql.replace("{t}", &self.name))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn count(&self, where_: &str) -> i64 {
        self.pg
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE {where_}", self.name),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn wait_all_sent(&self, expected: i64, timeout: Duration) {
        eventually("rows marked sent_to_kafka", timeout, || async {
            (self.count("sent_to_kafka").await == expected).then_some(())
        })
        .await;
    }

    fn read(&self, expected: usize, settle: Duration) -> Vec<Received> {
        read_topic(&self.name, expected, Duration::from_secs(60), settle)
    }

    async fn slot_confirmed(&self) -> String {
        self.pg
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until the slot exists and a walsender streams it.
    async fn wait_streaming(&self) {
        wait_slot_streaming(&self.pg, &self.name, Duration::from_secs(30)).await;
    }

    async fn drop(self) {
        drop_pipeline(&self.pg, &self.name).await;
    }
}

fn ids(msgs: &[Received]) -> BTreeSet<i64> {
    msgs.iter().filter_map(|m| m.value["id"].as_i64()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_rows_reach_kafka_with_the_seed_fields_and_are_marked_sent() {
    let p = Pipeline::new("st_seed").await;
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sql/postgres/seed-data.sql"
    ))
    .unwrap();
    p.exec(&seed.replace("user_logins", "{t}")).await;
    let expected: HashMap<i64, (String, String, f64)> = p
        .pg
        .query(
            &format!("SELECT id::int8, username, event_type, extract(epoch FROM event_time)::float8 FROM {}", p.name),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    assert_eq!(expected.len(), 3);

    let relay = p.start(&[]);
    p.wait_all_sent(3, Duration::from_secs(30)).await;
    let msgs = p.read(3, Duration::from_secs(1));
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    for m in &msgs {
        let id = m.value["id"].as_i64().unwrap();
        let (user, event, ts) = &expected[&id];
        assert_eq!(m.key.as_deref(), Some(id.to_string().as_str()));
        assert_eq!(m.value["user"], *user);
        assert_eq!(m.value["event"], *event);
        let got = m.value["timestamp"].as_f64().unwrap();
        assert!((got - ts).abs() < 1e-6, "timestamp {got} vs {ts}");
        assert_eq!(m.value["op"], "snapshot");
        assert!(m.value["lsn"].as_str().unwrap().contains('/'));
        assert!(m.value["version"].is_u64());
    }
    assert_eq!(p.count("NOT sent_to_kafka").await, 0);
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn live_inserts_arrive_and_rolled_back_rows_never_do() {
    let p = Pipeline::new("st_live").await;
    let relay = p.start(&[]);
    // Rows below come through the stream, not the backfill.
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'u' || g, 'login', now() FROM generate_series(1, 50) g").await;
    p.exec("BEGIN; INSERT INTO {t} (username, event_type, event_time) SELECT 'rolled', 'back', now() FROM generate_series(1, 20); ROLLBACK").await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) VALUES ('last', 'logout', now())")
        .await;
    p.wait_all_sent(51, Duration::from_secs(30)).await;
    let msgs = p.read(51, Duration::from_secs(2));
    let got = ids(&msgs);
    let want: BTreeSet<i64> =
        p.pg.query(&format!("SELECT id::int8 FROM {}", p.name), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(got, want);
    assert_eq!(msgs.len(), 51, "no duplicates");
    assert!(msgs.iter().all(|m| m.value["user"] != "rolled"));
    assert!(msgs.iter().all(|m| m.value["op"] == "insert"));
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn user_updates_and_deletes_flow_but_ledger_updates_do_not() {
    let p = Pipeline::new("st_ops").await;
    publish(&p.pg, &p.name, "insert, update, delete").await;
    let relay = p.start(&["--ops", "insert,update,delete"]);
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'u' || g, 'login', now() FROM generate_series(1, 10) g").await;
    p.wait_all_sent(10, Duration::from_secs(30)).await;
    p.exec("UPDATE {t} SET event_type = 'logout' WHERE id <= 3")
        .await;
    p.exec("DELETE FROM {t} WHERE id = 10").await;
    p.wait_all_sent(9, Duration::from_secs(30)).await;
    // 10 inserts + 3 updates + 1 delete; the ledger's 10 + 3 updates must not appear.
    let msgs = p.read(14, Duration::from_secs(3));
    let mut ops: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        *ops.entry(m.value["op"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(ops.get("insert"), Some(&10), "{ops:?}");
    assert_eq!(ops.get("update"), Some(&3), "{ops:?}");
    assert_eq!(ops.get("delete"), Some(&1), "{ops:?}");
    assert_eq!(msgs.len(), 14);
    let updates: BTreeSet<i64> = msgs
        .iter()
        .filter(|m| m.value["op"] == "update")
        .map(|m| m.value["id"].as_i64().unwrap())
        .collect();
    assert_eq!(updates, BTreeSet::from([1, 2, 3]));
    assert!(msgs
        .iter()
        .filter(|m| m.value["op"] == "update")
        .all(|m| m.value["event"] == "logout"));
    // Versions order the changes of one row.
    for id in 1..=3 {
        let v: Vec<u64> = msgs
            .iter()
            .filter(|m| m.value["id"] == id)
            .map(|m| m.value["version"].as_u64().unwrap())
            .collect();
        assert_eq!(v.len(), 2);
        assert!(v[0] < v[1], "versions of id {id}: {v:?}");
    }
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clean_stop_then_start_replays_nothing_acknowledged() {
    let p = Pipeline::new("st_restart").await;
    let relay = p.start(&[]);
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'a' || g, 'login', now() FROM generate_series(1, 200) g").await;
    p.wait_all_sent(200, Duration::from_secs(30)).await;
    assert_eq!(relay.stop(), 0, "clean stop exits 0");
    let confirmed_after_stop = p.slot_confirmed().await;

    // Rows written while the relay is down come through the stream on the next start.
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'b' || g, 'login', now() FROM generate_series(1, 100) g").await;
    let relay = p.start(&[]);
    p.wait_all_sent(300, Duration::from_secs(30)).await;
    let msgs = p.read(300, Duration::from_secs(3));
    let counts = by_key(&msgs);
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "replayed after a clean stop: {dups:?}");
    assert_eq!(ids(&msgs).len(), 300);
    assert_ne!(confirmed_after_stop, "0/0");
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_100k_load_loses_nothing() {
    let p = Pipeline::new("st_kill").await;
    let relay = p.start(&[]);
    let loader_pg = pg().await;
    let table = p.name.clone();
    let loader = tokio::spawn(async move {
        for _ in 0..100 {
            loader_pg
                .batch_execute(&format!(
                    "INSERT INTO {table} (username, event_type, event_time) SELECT 'k' || g, 'login', clock_timestamp() FROM generate_series(1, 1000) g"
                ))
                .await
                .unwrap();
        }
    });
    // Kill once part of the load is through.
    eventually("some rows sent", Duration::from_secs(60), || async {
        (p.count("sent_to_kafka").await > 10_000).then_some(())
    })
    .await;
    relay.kill9();
    loader.await.unwrap();
    let relay = p.start(&[]);
    p.wait_all_sent(100_000, Duration::from_secs(180)).await;
    let msgs = p.read(100_000, Duration::from_secs(3));
    let counts = by_key(&msgs);
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    println!("kill -9 during 100k load: {} messages, {} distinct ids, {duplicates} duplicates (unconfirmed tail)", msgs.len(), counts.len());
    assert_eq!(ids(&msgs).len(), 100_000, "every id reached Kafka");
    assert!(
        duplicates < 60_000,
        "duplicates only for the unconfirmed tail, got {duplicates}"
    );
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn values_round_trip_exactly() {
    let p = Pipeline::new("st_values").await;
    p.exec(
        "INSERT INTO {t} (id, username, event_type, event_time) VALUES \
         (1, 'Ünïcødé 名前 🚀', '', '2024-02-29 23:59:59.999999'), \
         (2, NULL, NULL, NULL), \
         (3, 'quote''s \"and\" back\\slash', E'tab\\tnew\\nline', '1999-12-31 00:00:00.000001'), \
         (4, 'old', 'login', '1900-01-01 00:00:00')",
    )
    .await;
    let relay = p.start(&[]);
    p.wait_all_sent(4, Duration::from_secs(30)).await;
    // And the same values once more through the stream rather than the backfill.
    p.exec(
        "INSERT INTO {t} (id, username, event_type, event_time) \
         SELECT id + 100, username, event_type, event_time FROM {t} WHERE id <= 4",
    )
    .await;
    p.wait_all_sent(8, Duration::from_secs(30)).await;
    let msgs = p.read(8, Duration::from_secs(2));
    assert_eq!(msgs.len(), 8);
    for m in &msgs {
        let id = m.value["id"].as_i64().unwrap() % 100;
        let v = &m.value;
        match id {
            1 => {
                assert_eq!(v["user"], "Ünïcødé 名前 🚀");
                assert_eq!(v["event"], "");
                assert_eq!(v["event_time"], "2024-02-29T23:59:59.999999");
                assert_eq!(v["timestamp"].as_f64().unwrap(), 1_709_251_199.999_999);
            }
            2 => {
                assert!(v["user"].is_null() && v["event"].is_null());
                assert!(v["timestamp"].is_null() && v["event_time"].is_null());
            }
            3 => {
                assert_eq!(v["user"], "quote's \"and\" back\\slash");
                assert_eq!(v["event"], "tab\tnew\nline");
                assert_eq!(v["event_time"], "1999-12-31T00:00:00.000001");
            }
            4 => {
                assert_eq!(v["event_time"], "1900-01-01T00:00:00");
                assert_eq!(v["timestamp"].as_f64().unwrap(), -2_208_988_800.0);
            }
            _ => panic!("unexpected id {id}"),
        }
    }
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_level_replica_is_a_clear_error_with_exit_code_2() {
    // A throwaway cluster with wal_level = replica, as the postgres OS user (initdb refuses root).
    let bin = env("CDC_RELAY_PG_BIN");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!(".local/{}", unique("pg_replica")));
    std::fs::create_dir_all(&dir).unwrap();
    let as_postgres = |args: &[&str]| {
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{args:?}");
    };
    std::process::Command::new("chown")
        .arg("postgres")
        .arg(&dir)
        .status()
        .unwrap();
    let data = dir.join("data");
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, "secret\n").unwrap();
    std::process::Command::new("chown")
        .arg("postgres")
        .arg(&pwfile)
        .status()
        .unwrap();
    as_postgres(&[
        &format!("{bin}/initdb"),
        "-D",
        data.to_str().unwrap(),
        "-U",
        "postgres",
        "--auth=scram-sha-256",
        &format!("--pwfile={}", pwfile.display()),
    ]);
    let port = 25432 + (std::process::id() % 1000) as u16;
    let opts = format!("-c wal_level=replica -c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}", dir.display());
    as_postgres(&[
        &format!("{bin}/pg_ctl"),
        "-D",
        data.to_str().unwrap(),
        "-o",
        &opts,
        "-w",
        "start",
    ]);
    let url = format!("postgres://postgres:secret@127.0.0.1:{port}/postgres");
    let out = relay(&["stream"], &[("CDC_RELAY_PG_URL", url.as_str())])
        .output()
        .unwrap();
    as_postgres(&[
        &format!("{bin}/pg_ctl"),
        "-D",
        data.to_str().unwrap(),
        "-m",
        "immediate",
        "stop",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("wal_level = replica"), "{stderr}");
    assert!(
        stderr.contains("wal_level = logical") && stderr.contains("restart PostgreSQL"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "the password leaked: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_walsender_is_reconnected_without_loss() {
    let p = Pipeline::new("st_reconnect").await;
    let relay = p.start(&[]);
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'a' || g, 'login', now() FROM generate_series(1, 100) g").await;
    p.wait_all_sent(100, Duration::from_secs(30)).await;
    // Terminating another role's backend takes a superuser (or pg_signal_backend).
    let admin = pg_url(&env("CDC_RELAY_PG_ADMIN_URL")).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&p.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'b' || g, 'login', now() FROM generate_series(1, 100) g").await;
    p.wait_all_sent(200, Duration::from_secs(60)).await;
    let msgs = p.read(200, Duration::from_secs(2));
    assert_eq!(ids(&msgs).len(), 200);
    assert!(
        relay.log_text().contains("reconnecting"),
        "the relay noticed and reconnected"
    );
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_move_the_slot_on_a_quiet_table_in_a_busy_database() {
    let p = Pipeline::new("st_quiet").await;
    let busy = unique("st_busy");
    p.exec(&format!("CREATE TABLE {busy} (x int, pad text)"))
        .await;
    let relay = p.start(&[]);
    p.wait_streaming().await;
    p.exec(&format!(
        "INSERT INTO {busy} SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g"
    ))
    .await;
    let target: String =
        p.pg.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
    eventually("confirmed position past the busy table's WAL", Duration::from_secs(30), || async {
        let ok: bool = p
            .pg
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&p.name, &target],
            )
            .await
            .unwrap()
            .get(0);
        ok.then_some(())
    })
    .await;
    assert_eq!(relay.stop(), 0);
    p.exec(&format!("DROP TABLE {busy}")).await;
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_stops_cleanly_and_confirms_what_was_sent() {
    let p = Pipeline::new("st_sigint").await;
    let relay = p.start(&[]);
    p.wait_streaming().await;
    // A position inside the insert's transaction: its commit, which the relay must confirm, is later.
    let lsn_in_insert = p
        .pg
        .simple_query(&format!(
            "BEGIN; INSERT INTO {} (username, event_type, event_time) SELECT 'a' || g, 'login', now() FROM generate_series(1, 1000) g; \
             SELECT pg_current_wal_insert_lsn()::text; COMMIT",
            p.name
        ))
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap();
    // Stop at once, possibly while the transaction is being read.
    unsafe_kill(relay.child.id(), "INT");
    let mut relay = relay;
    let status = relay.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", relay.log_text());
    let sent = p.count("sent_to_kafka").await;
    assert!(
        sent == 0 || sent == 1000,
        "a transaction is handled whole or not at all, got {sent}"
    );
    if sent == 1000 {
        let ok: bool = p
            .pg
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn AND NOT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&p.name, &lsn_in_insert],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ok, "the final position was confirmed before exit");
    }
    // Whatever the stop caught, the next start completes it without repeating anything.
    let relay = p.start(&[]);
    p.wait_all_sent(1000, Duration::from_secs(30)).await;
    let msgs = p.read(1000, Duration::from_secs(2));
    assert_eq!(msgs.len(), 1000, "no message twice across a clean stop");
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_slot_is_not_silently_replaced() {
    let p = Pipeline::new("st_dropped").await;
    let relay = p.start(&["--max-retained-wal-mb", "0"]);
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'a' || g, 'login', now() FROM generate_series(1, 10) g").await;
    p.wait_all_sent(10, Duration::from_secs(30)).await;
    assert_eq!(relay.stop(), 0);
    assert!(
        relay_log_contains(&p.name, "retains a lot of WAL"),
        "retention warning with a 0 MiB limit"
    );

    // Someone drops the slot; rows change meanwhile.
    p.pg.execute("SELECT pg_drop_replication_slot($1)", &[&p.name])
        .await
        .unwrap();
    p.exec("INSERT INTO {t} (username, event_type, event_time) SELECT 'b' || g, 'login', now() FROM generate_series(1, 5) g").await;
    p.exec("UPDATE {t} SET sent_to_kafka = FALSE WHERE id = 1")
        .await;

    let out = common::relay(&p.args(&[]), &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("already holds events") && stderr.contains("--recreate-slot"),
        "{stderr}"
    );

    // Told to, it creates a new slot and backfills everything still unsent.
    let relay = p.start(&["--recreate-slot"]);
    p.wait_all_sent(15, Duration::from_secs(30)).await;
    let msgs = p.read(16, Duration::from_secs(2));
    assert_eq!(ids(&msgs).len(), 15);
    assert_eq!(
        msgs.iter().filter(|m| m.value["id"] == 1).count(),
        2,
        "row 1 was reset to unsent and sent again"
    );
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}

fn relay_log_contains(name: &str, needle: &str) -> bool {
    let log = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!(".local/test-logs/{name}.log"));
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_come_from_files_and_never_show_in_logs_or_errors() {
    let p = Pipeline::new("st_secret").await;
    let url = env("CDC_RELAY_PG_RELAY_URL");
    let parsed: tokio_postgres::Config = url.parse().unwrap();
    let password = String::from_utf8(parsed.get_password().unwrap().to_vec()).unwrap();
    let bare = url.replacen(&format!(":{password}@"), "@", 1);
    assert!(!bare.contains(&password));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".local/test-config");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.pw", p.name));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let file_s = file.to_str().unwrap().to_string();

    let relay = Relay::start(
        &p.name,
        &p.args(&[]),
        &[
            ("CDC_RELAY_PG_URL", bare.as_str()),
            ("CDC_RELAY_PG_PASSWORD_FILE", file_s.as_str()),
        ],
    );
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) VALUES ('s', 'login', now())")
        .await;
    p.wait_all_sent(1, Duration::from_secs(30)).await;
    assert_eq!(relay.stop(), 0);
    assert!(
        !relay_log_contains(&p.name, &password),
        "the password appeared in the log"
    );

    // A wrong secret: a clear error that shows neither the wrong nor the right password.
    std::fs::write(&file, "not-the-password\n").unwrap();
    let out = common::relay(
        &p.args(&[]),
        &[
            ("CDC_RELAY_PG_URL", bare.as_str()),
            ("CDC_RELAY_PG_PASSWORD_FILE", file_s.as_str()),
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("not-the-password") && !stderr.contains(&password),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&file);
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn identifiers_with_quotes_and_spaces_work_and_cannot_inject() {
    let base = unique("st_ident");
    let table = format!("q\"t x_{base}");
    let publication = format!("pub\"x y_{base}");
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let owner = pg().await;
    owner
        .batch_execute(&format!(
            "CREATE TABLE {t} (id SERIAL PRIMARY KEY, username TEXT, event_type TEXT, event_time TIMESTAMP, sent_to_kafka BOOLEAN DEFAULT FALSE); \
             GRANT SELECT, UPDATE (sent_to_kafka) ON {t} TO cdc_relay; \
             CREATE PUBLICATION {p} FOR TABLE {t} WITH (publish = 'insert'); \
             INSERT INTO {t} (username, event_type, event_time) VALUES ('odd', 'login', now())",
            t = q(&table),
            p = q(&publication)
        ))
        .await
        .unwrap();
    let qualified = format!("public.{table}");
    let relay = Relay::start(
        &base,
        &[
            "stream",
            "--table",
            &qualified,
            "--slot",
            &base,
            "--publication",
            &publication,
            "--topic",
            &base,
        ],
        &[],
    );
    eventually(
        "the odd table's row sent",
        Duration::from_secs(30),
        || async {
            let n: i64 = owner
                .query_one(
                    &format!("SELECT count(*) FROM {} WHERE sent_to_kafka", q(&table)),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        read_topic(&base, 1, Duration::from_secs(30), Duration::from_secs(1)).len(),
        1
    );
    assert_eq!(relay.stop(), 0);

    // A name crafted to break out of quoting is just a table that does not exist.
    let victim = unique("st_victim");
    owner
        .batch_execute(&format!("CREATE TABLE {victim} (x int)"))
        .await
        .unwrap();
    let hostile = format!("public.x\"; DROP TABLE {victim}; --");
    let out = common::relay(
        &[
            "stream", "--table", &hostile, "--slot", &victim, "--topic", &victim,
        ],
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    let still: i64 = owner
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = $1",
            &[&victim],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1, "nothing was injected");

    let _ = owner
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('{base}'); DROP PUBLICATION {}; DROP TABLE {}; DROP TABLE {victim}",
            q(&publication),
            q(&table)
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_verify_full_against_the_local_ca_and_a_wrong_ca_is_refused() {
    let p = Pipeline::new("st_tls").await;
    let ca = env("CDC_RELAY_PG_CA_FILE");
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={ca}",
        env("CDC_RELAY_PG_RELAY_URL")
    );
    let relay = Relay::start(&p.name, &p.args(&[]), &[("CDC_RELAY_PG_URL", url.as_str())]);
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) VALUES ('tls', 'login', now())")
        .await;
    p.wait_all_sent(1, Duration::from_secs(30)).await;
    // The replication connection is encrypted (and the ledger's SQL session worked over TLS too).
    // Another role's sessions show in pg_stat_ssl to a superuser only.
    let admin = pg_url(&env("CDC_RELAY_PG_ADMIN_URL")).await;
    let ssl: bool = admin
        .query_one(
            "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid WHERE r.slot_name = $1",
            &[&p.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the walsender connection uses TLS");
    assert_eq!(relay.stop(), 0);

    // A certificate from another CA fails verification, with an error that says so.
    let wrong = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        env("CDC_RELAY_PG_RELAY_URL"),
        env("CDC_RELAY_PG_OTHER_CA_FILE")
    );
    let out = common::relay(&p.args(&[]), &[("CDC_RELAY_PG_URL", wrong.as_str())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    // verify-full without a CA file is a configuration error.
    let no_ca = format!("{}?sslmode=verify-full", env("CDC_RELAY_PG_RELAY_URL"));
    let out = common::relay(&p.args(&[]), &[("CDC_RELAY_PG_URL", no_ca.as_str())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sslrootcert"));
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_the_users_pg_options_reach_the_sql_and_the_replication_sessions() {
    let p = Pipeline::new("ops_opts").await;
    // The ledger's UPDATE fires this trigger, which records the relay session's settings (as a
    // SECURITY DEFINER function it may write the audit table; the settings are the caller's).
    p.exec(
        "CREATE TABLE {t}_seen (test text, tz text, datestyle text); \
         CREATE FUNCTION {t}_probe() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ BEGIN \
           INSERT INTO {t}_seen VALUES (current_setting('cdc_relay.test', true), \
             current_setting('TimeZone'), current_setting('DateStyle')); \
           RETURN NULL; END $$; \
         CREATE TRIGGER {t}_probe AFTER UPDATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {t}_probe()",
    )
    .await;
    let url = format!(
        "{}?options=-c%20cdc_relay.test%3Dfrom_url%20-c%20TimeZone%3DAsia/Tokyo%20-c%20client_min_messages%3Dlog",
        env("CDC_RELAY_PG_RELAY_URL")
    );
    let relay = Relay::start(&p.name, &p.args(&[]), &[("CDC_RELAY_PG_URL", url.as_str())]);
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) VALUES ('o1', 'login', '2024-05-01 12:00:00'), ('o2', 'login', '2024-05-01 12:00:01')")
        .await;
    p.wait_all_sent(2, Duration::from_secs(30)).await;
    let msgs = p.read(2, Duration::from_secs(1));
    assert_eq!(ids(&msgs).len(), 2, "{msgs:?}");
    assert!(msgs
        .iter()
        .any(|m| m.value["event_time"] == "2024-05-01T12:00:00"));
    // The SQL session: the user's setting is there, and the relay's TimeZone won over the user's.
    let seen: Vec<(Option<String>, String, String)> =
        p.pg.query(
            &format!("SELECT DISTINCT test, tz, datestyle FROM {}_seen", p.name),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0.as_deref(), Some("from_url"), "{seen:?}");
    assert_eq!(seen[0].1, "UTC", "{seen:?}");
    assert!(seen[0].2.starts_with("ISO"), "{seen:?}");
    // The replication session: with the user's client_min_messages=log the walsender sends its
    // LOG lines to the client, which logs them.
    assert_eq!(relay.stop(), 0);
    let log = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!(".local/test-logs/{}.log", p.name)),
    )
    .unwrap();
    assert!(
        log.contains("starting logical decoding for slot"),
        "the walsender did not get client_min_messages=log: {log}"
    );
    p.exec("DROP TABLE {t}_seen; DROP TRIGGER {t}_probe ON {t}; DROP FUNCTION {t}_probe()")
        .await;
    p.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_other_ops_than_the_publication_are_refused_by_stream_and_applied_by_setup() {
    let p = Pipeline::new("ops_pubops").await; // its publication publishes inserts
    let published = || async {
        let r =
            p.pg.query_one(
                "SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = $1",
                &[&p.name],
            )
            .await
            .unwrap();
        (
            r.get::<_, bool>(0),
            r.get::<_, bool>(1),
            r.get::<_, bool>(2),
        )
    };

    // The relay role could not alter it anyway; the owner's stream must not either.
    for url in [env("CDC_RELAY_PG_RELAY_URL"), env("CDC_RELAY_PG_URL")] {
        let out = common::relay(
            &p.args(&["--ops", "insert,update"]),
            &[("CDC_RELAY_PG_URL", url.as_str())],
        )
        .output()
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let stmt = format!(
            "ALTER PUBLICATION \"{}\" SET (publish = 'insert, update')",
            p.name
        );
        assert!(stderr.contains(&stmt), "{stderr}");
        assert!(
            stderr.contains("publishes insert, but --ops asks for insert, update"),
            "{stderr}"
        );
        assert!(
            stderr.contains("cdc-relay setup --ops insert,update"),
            "{stderr}"
        );
        assert_eq!(published().await, (true, false, false), "unchanged");
    }
    let slots: i64 =
        p.pg.query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "refused before anything was created");

    // setup changes it (as the table's owner: altering a publication takes ownership).
    let dlq = format!("{}_dlq", p.name);
    let owner = env("CDC_RELAY_PG_URL");
    let out = common::relay(
        &[
            "setup",
            "--table",
            &p.name,
            "--slot",
            &p.name,
            "--publication",
            &p.name,
            "--topic",
            &p.name,
            "--dlq-topic",
            &dlq,
            "--clickhouse-table",
            &p.name,
            "--ops",
            "insert,update",
        ],
        &[("CDC_RELAY_PG_URL", owner.as_str())],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(published().await, (true, true, false));

    // Now the stream with the same --ops starts, and updates flow.
    let relay = p.start(&["--ops", "insert,update"]);
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (username, event_type, event_time) VALUES ('p', 'login', now())")
        .await;
    p.wait_all_sent(1, Duration::from_secs(30)).await;
    p.exec("UPDATE {t} SET event_type = 'logout'").await;
    let msgs = p.read(2, Duration::from_secs(1));
    assert_eq!(
        msgs.iter()
            .map(|m| m.value["op"].clone())
            .collect::<Vec<_>>(),
        ["insert", "update"],
        "{msgs:?}"
    );
    assert_eq!(relay.stop(), 0);
    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    for stmt in [
        format!("DROP TABLE IF EXISTS {}_current", p.name),
        format!("DROP TABLE IF EXISTS {}", p.name),
    ] {
        ch.query(&stmt).execute().await.unwrap();
    }
    p.drop().await;
}

/// A proxied connection's switch: once set, nothing is forwarded any more.
type Hole = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// A TCP proxy in front of PostgreSQL that can black-hole a connection: stop forwarding both ways
/// while keeping both sockets open, which is how a peer that vanished without FIN or RST looks.
/// New connections are still accepted and forwarded.
struct Proxy {
    port: u16,
    /// Per connection: its local port towards PostgreSQL (PostgreSQL's `client_port`), its switch.
    conns: std::sync::Arc<std::sync::Mutex<Vec<(u16, Hole)>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let registry = conns.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let hole = Arc::new(AtomicBool::new(false));
                registry
                    .lock()
                    .unwrap()
                    .push((server.local_addr().unwrap().port(), hole.clone()));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Self::pipe(cr, sw, hole.clone()));
                tokio::spawn(Self::pipe(sr, cw, hole));
            }
        });
        Proxy { port, conns }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        hole: Hole,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if hole.load(std::sync::atomic::Ordering::SeqCst) {
                // Forward nothing, read nothing more, close nothing.
                std::future::pending::<()>().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    /// Black-holes the connection whose local port towards PostgreSQL is `port`.
    fn black_hole(&self, port: u16) -> bool {
        let conns = self.conns.lock().unwrap();
        let found = conns.iter().find(|(p, _)| *p == port);
        if let Some((_, hole)) = found {
            hole.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        found.is_some()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_a_half_open_replication_connection_is_detected_and_replaced() {
    let p = Pipeline::new("ops_halfopen").await;
    let url = env("CDC_RELAY_PG_RELAY_URL");
    let parsed: tokio_postgres::Config = url.parse().unwrap();
    let host = match &parsed.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("a TCP host, not {other:?}"),
    };
    let port = parsed.get_ports()[0];
    let proxy = Proxy::start(format!("{host}:{port}")).await;
    let proxied = url.replacen(
        &format!("@{host}:{port}/"),
        &format!("@127.0.0.1:{}/", proxy.port),
        1,
    );
    assert_ne!(proxied, url);
    let relay = Relay::start(
        &p.name,
        &p.args(&[]),
        &[("CDC_RELAY_PG_URL", proxied.as_str())],
    );
    p.wait_streaming().await;
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) SELECT g, 'a' || g, 'login', now() FROM generate_series(1, 10) g").await;
    p.wait_all_sent(10, Duration::from_secs(30)).await;

    // The walsender's client port is the proxy's side of the replication connection.
    let admin = pg_url(&env("CDC_RELAY_PG_ADMIN_URL")).await;
    let row = admin
        .query_one(
            "SELECT a.pid, a.client_port FROM pg_replication_slots r JOIN pg_stat_activity a ON a.pid = r.active_pid WHERE r.slot_name = $1",
            &[&p.name],
        )
        .await
        .unwrap();
    let (old_pid, client_port): (i32, i32) = (row.get(0), row.get(1));
    assert!(
        proxy.black_hole(client_port as u16),
        "the replication connection goes through the proxy"
    );
    let holed = std::time::Instant::now();
    p.exec("INSERT INTO {t} (id, username, event_type, event_time) SELECT g, 'b' || g, 'login', now() FROM generate_series(11, 20) g").await;

    let detected = eventually("the relay reconnects", Duration::from_secs(60), || async {
        relay
            .log_text()
            .contains("reconnecting")
            .then(|| holed.elapsed())
    })
    .await;
    p.wait_all_sent(20, Duration::from_secs(60).saturating_sub(holed.elapsed()))
        .await;
    let delivered = holed.elapsed();
    println!("half-open replication connection: reconnecting after {detected:?}, new rows in Kafka and marked sent after {delivered:?}");
    let log = relay.log_text();
    assert!(log.contains("no message from the server"), "{log}");
    let msgs = p.read(20, Duration::from_secs(2));
    assert_eq!(
        ids(&msgs),
        (1..=20).collect::<BTreeSet<i64>>(),
        "every row is in Kafka"
    );
    let new_pid: i32 = admin
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(new_pid, old_pid, "a new walsender streams the slot");
    assert_eq!(relay.stop(), 0);
    p.drop().await;
}
