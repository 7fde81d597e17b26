//! `scripts/chaos --cluster`: the run on the stack of `scripts/services up --cluster` (3 KRaft
//! brokers, ClickHouse cluster of 2 shards x 2 replicas). Three sinks share the consumer group,
//! talking to the first replica of a shard (nodes 1, 3, 1); the faults are a broker and a ClickHouse replica
//! killed with -9 and started again, and kill -9 of the stream and of sinks; at the end every
//! replica of every shard is read on its own.

use std::collections::{BTreeMap, BTreeSet};

/// username, event_type, event_time in microseconds, as in the main comparison.
pub type Values = (Option<String>, Option<String>, Option<i64>);

/// Every ClickHouse node's URL; nodes 1, 2 are shard 1's replicas, 3, 4 shard 2's.
pub fn nodes() -> Vec<String> {
    super::env("CDC_RELAY_TEST_CLICKHOUSE_NODES")
        .split(',')
        .map(String::from)
        .collect()
}

pub fn client(url: &str) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(url)
        .with_user(super::env("CDC_RELAY_CLICKHOUSE_USER"))
        .with_password(super::env("CDC_RELAY_CLICKHOUSE_PASSWORD"))
        .with_validation(false)
}

/// The current rows one node holds itself, in its replica of its shard.
async fn local(url: &str, table: &str) -> Result<BTreeMap<u64, Values>, clickhouse::error::Error> {
    let rows: Vec<super::ChRow> = client(url)
        .query(&format!(
            "SELECT id, username, event_type, event_time_us FROM {table}_local FINAL \
             WHERE _deleted = 0 AND _version >= (SELECT max(version) FROM {table}_truncates)"
        ))
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.id, (r.username, r.event_type, r.event_time_us)))
        .collect())
}

/// What the replicas hold against PostgreSQL.
#[derive(Debug, Default)]
pub struct Replicas {
    /// Per node: rows missing, rows extra or different, against the PostgreSQL rows of its shard.
    pub missing: Vec<u64>,
    pub wrong: Vec<u64>,
    /// Ids on both shards.
    pub on_both_shards: u64,
    /// Per node: rows its current-rows view returns, and ids it returns twice.
    pub view_rows: Vec<u64>,
    pub view_doubled: u64,
    /// Rows per shard (replica 1's).
    pub shard_rows: Vec<usize>,
}

impl Replicas {
    pub fn ok(&self, expected: u64) -> bool {
        self.missing.iter().all(|&m| m == 0)
            && self.wrong.iter().all(|&w| w == 0)
            && self.on_both_shards == 0
            && self.view_doubled == 0
            && self.view_rows.iter().all(|&r| r == expected)
            && self.shard_rows.iter().all(|&r| r > 0)
    }
}

/// Reads every node: a shard's rows are those of PostgreSQL that replica 1 of that shard holds;
/// each replica must hold exactly them, the shards must not share an id, and together they must
/// be every PostgreSQL row.
pub async fn check(table: &str, pg: &std::collections::HashMap<u64, Values>) -> Replicas {
    let nodes = nodes();
    let mut out = Replicas::default();
    let mut held: Vec<BTreeMap<u64, Values>> = Vec::new();
    for url in &nodes {
        held.push(local(url, table).await.unwrap_or_default());
    }
    let shard_of = |node: usize| node / 2;
    let mut owner: BTreeMap<u64, usize> = BTreeMap::new();
    for (node, rows) in held.iter().enumerate() {
        for id in rows.keys() {
            if let Some(&other) = owner.get(id) {
                if shard_of(other) != shard_of(node) {
                    out.on_both_shards += 1;
                }
            } else {
                owner.insert(*id, node);
            }
        }
    }
    for (node, rows) in held.iter().enumerate() {
        // This shard's PostgreSQL rows: those any replica of the shard holds, and those no node
        // holds at all (missing everywhere counts against both replicas of shard 1).
        let shard = shard_of(node);
        let mine: BTreeSet<u64> = pg
            .keys()
            .filter(|id| owner.get(id).map_or(shard == 0, |&n| shard_of(n) == shard))
            .copied()
            .collect();
        out.missing
            .push(mine.iter().filter(|id| !rows.contains_key(id)).count() as u64);
        out.wrong.push(
            rows.iter()
                .filter(|(id, v)| pg.get(id) != Some(v) || !mine.contains(id))
                .count() as u64,
        );
    }
    out.shard_rows = held.iter().step_by(2).map(|r| r.len()).collect();
    for url in &nodes {
        let ids: Vec<u64> = client(url)
            .query(&format!("SELECT id FROM {table}_current"))
            .fetch_all()
            .await
            .unwrap_or_default();
        let distinct: BTreeSet<&u64> = ids.iter().collect();
        out.view_doubled += (ids.len() - distinct.len()) as u64;
        out.view_rows.push(ids.len() as u64);
    }
    out
}
