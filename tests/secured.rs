//! The pipeline against secured services: Kafka through a SASL_SSL listener (SCRAM users, a
//! certificate from the local CA) and ClickHouse over https, as `scripts/services` sets them up.
//! Wrong passwords and wrong CAs must fail fast with the reason, never with the secret.

mod common;

use std::time::Duration;

use common::*;

/// The flags that reach Kafka through the SASL_SSL listener with `mechanism`.
fn kafka_sasl_args(mechanism: &str, password_file: &str, ca_file: &str) -> Vec<String> {
    [
        "--kafka-brokers",
        &env("CDC_RELAY_TEST_KAFKA_SASL_BROKERS"),
        "--kafka-security-protocol",
        "sasl_ssl",
        "--kafka-sasl-mechanism",
        mechanism,
        "--kafka-sasl-username",
        "cdc",
        "--kafka-sasl-password-file",
        password_file,
        "--kafka-ssl-ca-file",
        ca_file,
    ]
    .map(String::from)
    .to_vec()
}

fn stream_args(name: &str, kafka: &[String]) -> Vec<String> {
    let mut a: Vec<String> = common::stream_args(name, &["--heartbeat-interval", "1"])
        .into_iter()
        .map(String::from)
        .collect();
    a.extend_from_slice(kafka);
    a
}

fn sink_args(name: &str, kafka: &[String], ca_file: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "sink",
        "--topic",
        name,
        "--group",
        name,
        "--clickhouse-table",
        name,
        "--dlq-topic",
        &format!("{name}_dlq"),
        "--clickhouse-url",
        &env("CDC_RELAY_TEST_CLICKHOUSE_HTTPS_URL"),
        "--clickhouse-ca-file",
        ca_file,
    ]
    .map(String::from)
    .to_vec();
    a.extend_from_slice(kafka);
    a
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn stream_and_sink_over_sasl_ssl_and_https_deliver_every_row_once() {
    let name = unique("sec_e2e");
    let pg = pg().await;
    create_table(&pg, &name).await;
    // Unsent before the slot exists: the backfill must carry these over the secured listener too.
    pg.batch_execute(&format!(
        "INSERT INTO {name} (username, event_type, event_time)
         SELECT 'early' || g, 'login', timestamp '2026-01-01' + g * interval '1 s' FROM generate_series(1, 100) g"
    ))
    .await
    .unwrap();
    let ca = env("CDC_RELAY_TEST_CA_FILE");
    let password_file = env("CDC_RELAY_TEST_KAFKA_SASL_PASSWORD_FILE");
    let password = std::fs::read_to_string(&password_file).unwrap();
    let password = password.trim();

    let stream = Relay::start(
        &format!("{name}_stream"),
        &refs(&stream_args(
            &name,
            &kafka_sasl_args("SCRAM-SHA-512", &password_file, &ca),
        )),
        &[],
    );
    let sink = Relay::start(
        &format!("{name}_sink"),
        &refs(&sink_args(
            &name,
            &kafka_sasl_args("SCRAM-SHA-256", &password_file, &ca),
            &ca,
        )),
        &[],
    );
    wait_slot_streaming(&pg, &name, Duration::from_secs(60)).await;
    pg.batch_execute(&format!(
        "INSERT INTO {name} (username, event_type, event_time)
         SELECT 'late' || g, 'logout', timestamp '2026-02-01' + g * interval '1 s' FROM generate_series(1, 50) g"
    ))
    .await
    .unwrap();

    // Read back over plain http: what the https sink wrote, row by row.
    let ch = clickhouse(&env("CDC_RELAY_CLICKHOUSE_URL"));
    let sql = format!("SELECT id, username FROM {name}_current ORDER BY id");
    let rows: Vec<(u64, Option<String>)> = eventually(
        "150 rows in ClickHouse",
        Duration::from_secs(90),
        || async {
            let rows: Vec<(u64, Option<String>)> =
                ch.query(&sql).fetch_all().await.unwrap_or_default();
            (rows.len() >= 150).then_some(rows)
        },
    )
    .await;
    let expected: Vec<(u64, Option<String>)> = (1..=150)
        .map(|id| {
            let user = if id <= 100 {
                format!("early{id}")
            } else {
                format!("late{}", id - 100)
            };
            (id, Some(user))
        })
        .collect();
    assert_eq!(rows, expected);
    let raw: u64 = ch
        .query(&format!("SELECT count() FROM {name} FINAL"))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(raw, 150, "no duplicates after collapsing");
    // The ledger follows Kafka's acknowledgements in batches, so it may trail ClickHouse a little.
    eventually("every row marked sent", Duration::from_secs(30), || async {
        let unsent: i64 = pg
            .query_one(
                &format!("SELECT count(*) FROM {name} WHERE NOT sent_to_kafka"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (unsent == 0).then_some(())
    })
    .await;

    let (stream_log, sink_log) = (stream.log_text(), sink.log_text());
    assert_eq!(stream.stop(), 0);
    assert_eq!(sink.stop(), 0);
    for log in [&stream_log, &sink_log] {
        assert!(
            !log.contains(password),
            "the SASL password leaked into a log"
        );
    }
    drop_pipeline(&pg, &name).await;
}

#[tokio::test]
async fn wrong_passwords_and_wrong_cas_are_refused_with_the_reason_and_without_the_secret() {
    let name = unique("sec_bad");
    let pg = pg().await;
    create_table(&pg, &name).await;
    let ca = env("CDC_RELAY_TEST_CA_FILE");
    let other_ca = env("CDC_RELAY_PG_OTHER_CA_FILE");
    let good_password = env("CDC_RELAY_TEST_KAFKA_SASL_PASSWORD_FILE");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".local/test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let wrong_password = dir.join(format!("{name}.password"));
    std::fs::write(&wrong_password, "not-the-Password-42\n").unwrap();
    let wrong_password = wrong_password.display().to_string();

    let run = |args: Vec<String>| {
        let started = std::time::Instant::now();
        let out = relay(&refs(&args), &[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr, started.elapsed())
    };

    // A wrong SASL password: refused within the probe's timeout, saying authentication failed.
    let (code, stderr, took) = run(stream_args(
        &name,
        &kafka_sasl_args("SCRAM-SHA-256", &wrong_password, &ca),
    ));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("Authentication failed"), "{stderr}");
    assert!(!stderr.contains("not-the-Password-42"), "{stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {stderr}");

    // The broker's certificate from a CA we were not told to trust.
    let (code, stderr, _) = run(stream_args(
        &name,
        &kafka_sasl_args("SCRAM-SHA-256", &good_password, &other_ca),
    ));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    // ClickHouse over https with the wrong CA: the sink names the certificate problem.
    let kafka = vec![
        "--kafka-brokers".to_string(),
        env("CDC_RELAY_KAFKA_BROKERS"),
    ];
    let (code, stderr, _) = run(sink_args(&name, &kafka, &other_ca));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");

    // SASL without a user name is a configuration error (exit 2), found before any connection.
    let mut no_user = stream_args(
        &name,
        &kafka_sasl_args("SCRAM-SHA-256", &good_password, &ca),
    );
    let at = no_user
        .iter()
        .position(|a| a == "--kafka-sasl-username")
        .unwrap();
    no_user.drain(at..at + 2);
    let (code, stderr, _) = run(no_user);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--kafka-sasl-username"), "{stderr}");
    drop_pipeline(&pg, &name).await;
}
