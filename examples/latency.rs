//! End-to-end latency probe for scripts/bench: inserts rows into PostgreSQL at a steady rate and
//! measures, per row, the time from its commit until it is visible in the ClickHouse current view.
//!
//!   cargo run --release --example latency -- TABLE RATE SECONDS
//!
//! Reads CDC_RELAY_PG_URL, CDC_RELAY_CLICKHOUSE_URL/USER/PASSWORD. Prints p50/p95/p99/max in ms.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let table = args.get(1).expect("TABLE").clone();
    let rate: u64 = args.get(2).map(|r| r.parse().unwrap()).unwrap_or(5000);
    let seconds: u64 = args.get(3).map(|r| r.parse().unwrap()).unwrap_or(60);
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));

    let (pg, conn) = tokio_postgres::connect(&env("CDC_RELAY_PG_URL"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let ch = clickhouse::Client::default()
        .with_url(env("CDC_RELAY_CLICKHOUSE_URL"))
        .with_user(env("CDC_RELAY_CLICKHOUSE_USER"))
        .with_password(env("CDC_RELAY_CLICKHOUSE_PASSWORD"))
        .with_validation(false);

    // Writer: one transaction every 10 ms with rate/100 rows; remembers each commit's time by id range.
    let per_tick = (rate / 100).max(1);
    let insert = pg
        .prepare(&format!(
            "INSERT INTO {table} (username, event_type, event_time) \
             SELECT 'lat' || g, 'login', clock_timestamp() FROM generate_series(1, $1::int) g RETURNING id"
        ))
        .await
        .unwrap();
    let committed = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<i64, Instant>::new()));
    let writer = {
        let committed = committed.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let end = Instant::now() + Duration::from_secs(seconds);
            while Instant::now() < end {
                tick.tick().await;
                let rows = pg.query(&insert, &[&(per_tick as i32)]).await.unwrap();
                let now = Instant::now();
                let mut c = committed.lock().unwrap();
                for r in rows {
                    c.insert(r.get::<_, i32>(0) as i64, now);
                }
            }
        })
    };

    // Reader: polls ClickHouse for rows it has not seen yet. Partitions are inserted independently,
    // so rows become visible out of id order: ask from the oldest id still unseen.
    let mut latencies: Vec<f64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds + 30);
    loop {
        let lowest = committed.lock().unwrap().keys().min().copied();
        let ids: Vec<u64> = match lowest {
            Some(low) => ch
                .query(&format!("SELECT id FROM {table}_current WHERE id >= ?"))
                .bind(low as u64)
                .fetch_all()
                .await
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let now = Instant::now();
        {
            let mut c = committed.lock().unwrap();
            for id in &ids {
                if let Some(t) = c.remove(&(*id as i64)) {
                    latencies.push(now.duration_since(t).as_secs_f64() * 1000.0);
                }
            }
            if writer.is_finished() && c.is_empty() {
                break;
            }
        }
        if Instant::now() > deadline {
            eprintln!(
                "gave up waiting; {} rows never seen",
                committed.lock().unwrap().len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "latency rows={} p50_ms={:.0} p95_ms={:.0} p99_ms={:.0} max_ms={:.0}",
        latencies.len(),
        pct(0.50),
        pct(0.95),
        pct(0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
}
