//! `cdc-relay verify`: whether ClickHouse's current view of each table holds exactly what
//! PostgreSQL holds, and which keys differ if not.
//!
//! Three reads, each at a consistent point: PostgreSQL is read in one snapshot, and ClickHouse
//! only once the slot has confirmed the snapshot's WAL position and the sink's group has committed
//! every message Kafka then held, so every change the snapshot saw is in ClickHouse.
//!
//! 1. Both servers sum every bucket of about 1000 rows (a count and a hash sum): the only read of
//!    a clean table, and nothing but the sums leaves the servers.
//! 2. The buckets that differ are read as (key text, row hash) on both sides, at a new point.
//! 3. The keys that differ are read once more at a third point, and only those that differ again
//!    are reported: ClickHouse may already hold a change PostgreSQL's snapshot did not see, so a key
//!    written just then differs once, but not twice.

mod compare;
mod metrics;
pub mod plan;
mod repair;
mod report;

use std::time::{Duration, Instant};

use tokio::sync::watch;

use self::compare::{diff_rows, differing_buckets, Buckets, RowDiff};
use self::metrics::VerifyMetrics;
use self::plan::TablePlan;
use self::report::{Report, TableReport};
use crate::commands::Error;
use crate::config::VerifyArgs;
use crate::event::Lsn;
use crate::kafka::{inspect, KafkaConnection};
use crate::sink::clickhouse::table::TableNames;
use crate::sink::clickhouse::tables::clickhouse_table_name;
use crate::sink::clickhouse::verify::ViewReader;
use crate::sink::clickhouse::ClickHouseConfig;
use crate::source::postgres::backfill::describe_table;
use crate::source::postgres::relation::RelationShape;
use crate::source::postgres::verify as pg;
use crate::source::postgres::{catalog, PublishOps, SourceConfig, TableSpec};
use crate::types::ServerCaps;

/// Most rows read from each side in one statement while narrowing down.
const ROWS_PER_READ: f64 = 200_000.0;
/// Keys per statement when re-reading keys.
const KEYS_PER_READ: usize = 1000;
/// Most rows of differing buckets read row by row in one run (held from PostgreSQL while
/// ClickHouse catches up): memory stays bounded however far the sides are apart.
const MAX_ROWS_READ: u64 = 500_000;
/// Most differing keys read again by key (more: their buckets are read again).
const KEYS_BY_KEY: usize = 5000;
/// Most buckets cut into finer ones per table (each cut is one more read of that bucket).
const MAX_CUTS: usize = 20;

/// Exit code: 0 equal, 1 drift (`Ok`); errors are 2 (main.rs).
pub async fn run(args: VerifyArgs, shutdown: watch::Receiver<bool>) -> Result<i32, Error> {
    let mut ctx = Verifier::connect(&args, shutdown).await?;
    super::serve_metrics(&ctx.metrics.registry, args.metrics_addr).await?;
    let mut report = ctx.verify_all().await?;
    if args.repair && !report.equal() {
        let sent = repair::send_again(&ctx, &report).await?;
        let first = report;
        report = ctx.verify_all().await?;
        report.repaired = Some(report::Repaired {
            sent,
            before: Box::new(first),
        });
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report.render());
    }
    Ok(if report.equal() { 0 } else { 1 })
}

/// Everything the three reads need.
pub(crate) struct Verifier {
    args: VerifyArgs,
    cfg: SourceConfig,
    sql: tokio_postgres::Client,
    ch: ViewReader,
    ch_cfg: ClickHouseConfig,
    caps: ServerCaps,
    kafka: KafkaConnection,
    topics: Vec<String>,
    publication_ops: Option<Vec<&'static str>>,
    shutdown: watch::Receiver<bool>,
    metrics: VerifyMetrics,
    /// ClickHouse's versions are positions of this server's WAL (see `verify`).
    versions_trusted: bool,
}

/// One table as it is read.
pub(crate) struct Subject {
    shape: RelationShape,
    columns: Vec<String>,
    plan: TablePlan,
    topic: String,
}

impl Verifier {
    async fn connect(args: &VerifyArgs, shutdown: watch::Receiver<bool>) -> Result<Self, Error> {
        let cfg = super::source_config(&args.postgres, PublishOps(vec![]))?;
        let topics = super::table_topics(&cfg, &args.kafka)?;
        let sql = cfg.connect_sql().await?;
        pg::prepare_session(&sql).await?;
        let ch_cfg = super::clickhouse_from_args(&args.clickhouse)?;
        let ch = ViewReader::new(&ch_cfg);
        let version = ch.version().await?;
        let caps = ServerCaps::from_version(&version.to_string()).unwrap_or(ServerCaps::LEGACY);
        let kafka =
            super::kafka_connection(&args.kafka.kafka_brokers, &args.kafka.security).await?;
        let publication_ops = pg::publication_ops(&sql, &cfg.publication).await?;
        tracing::info!(clickhouse = %version, tables = %cfg.table_names(), "verifying");
        Ok(Verifier {
            args: args.clone(),
            cfg,
            sql,
            ch,
            ch_cfg,
            caps,
            kafka,
            topics,
            publication_ops,
            shutdown,
            metrics: VerifyMetrics::new(),
            versions_trusted: true,
        })
    }

    async fn verify_all(&mut self) -> Result<Report, Error> {
        let mut tables = Vec::new();
        for i in 0..self.cfg.tables.len() {
            let subject = self.subject(i).await?;
            tables.push(self.verify(&subject).await?);
        }
        Ok(Report {
            tables,
            repaired: None,
        })
    }

    pub(crate) async fn subject(&self, i: usize) -> Result<Subject, Error> {
        let mut spec = self.cfg.tables[i].clone();
        spec.ledger_column = ledger_column(&self.sql, &spec).await?;
        let (shape, tuple) = describe_table(&self.sql, &spec).await?;
        let view = if shape.is_seed_shape() {
            TableNames::new(&self.ch_cfg.database, &self.ch_cfg.view_name())
        } else {
            TableNames::new(
                &self.ch_cfg.database,
                &format!("{}_current", clickhouse_table_name(shape.schema())),
            )
        };
        let view_columns = self.ch.columns(&view).await?;
        if view_columns.is_empty() {
            return Err(Error::Config(format!(
                "{}: ClickHouse has no view {}: has `cdc-relay sink` created it (it does on the table's first message)? For the seed's table, --clickhouse-table names it",
                spec.name(),
                view.qualified()
            )));
        }
        let plan = TablePlan::new(&shape, view, &view_columns, self.caps).map_err(Error::Config)?;
        Ok(Subject {
            shape,
            columns: tuple.into_iter().map(|c| c.name).collect(),
            plan,
            topic: self.topics[i].clone(),
        })
    }

    async fn verify(&mut self, s: &Subject) -> Result<TableReport, Error> {
        let started = Instant::now();
        let plan = &s.plan;
        tracing::info!(table = %plan.name, view = %plan.view.qualified(), "comparing bucket sums");
        tracing::debug!(postgres = %plan.pg_hash, clickhouse = %plan.ch_hash, "row hashes");

        // 1. Bucket sums at one point. The bounds only shape the buckets: read before it.
        self.metrics.pass.set(1);
        let rows = pg::rows_estimate(&self.sql, &plan.pg_table).await?;
        let buckets = match &plan.int_key {
            Some((key, _)) => {
                let (min, max) = pg::key_bounds(&self.sql, &plan.pg_table, key, "true").await?;
                Buckets::for_int_key(min.unwrap_or(0), max.unwrap_or(0), rows)
            }
            None => Buckets::for_rows(rows),
        };
        let (pg_sums, ch_sums) = self.compare_sums(s, &Region::whole(buckets)).await?;
        let differing = differing_buckets(&pg_sums, &ch_sums);
        let mut report = TableReport::new(plan, &pg_sums, &ch_sums, differing.len());
        // Versions are this server's WAL positions: one above its position now means ClickHouse
        // holds rows of another history (a restore, another server), and no row of it can be
        // taken for a change in flight.
        self.versions_trusted = true;
        if !differing.is_empty() {
            let newest = self.ch.max_version(&plan.view).await?;
            let now = pg::current_position(&self.sql).await?;
            if newest > now.0 {
                self.versions_trusted = false;
                report.notes.push(format!(
                    "ClickHouse holds versions up to {} above PostgreSQL's WAL position {now}: rows of another history (a restore? another server?); --repair cannot win over them: see docs/operations.md",
                    Lsn(newest)
                ));
            }
        }
        self.metrics.postgres_rows.add(report.postgres_rows);
        self.metrics.differing_buckets.set(differing.len() as i64);
        tracing::info!(
            table = %plan.name,
            postgres_rows = report.postgres_rows,
            clickhouse_rows = report.clickhouse_rows,
            buckets = pg_sums.len().max(ch_sums.len()),
            differing = differing.len(),
            "bucket sums compared"
        );
        if !differing.is_empty() {
            // A bucket too large to read row by row is cut into buckets of its own, down to
            // readable ones; what does not fit one run is counted, not read.
            let (read, unread) = self
                .narrow(s, Region::whole(buckets), &differing, &pg_sums, &ch_sums)
                .await?;
            if !unread.is_empty() {
                let rows: u64 = unread.iter().map(|u| u.1).sum();
                report.unread_buckets = unread.len();
                report.notes.push(format!(
                    "{} differing buckets ({rows} rows) were not read row by row: more than a run holds ({MAX_ROWS_READ} rows); the keys listed are those of the others. --repair, then verify again, goes on",
                    unread.len(),
                ));
            }
            self.metrics.pass.set(2);
            let (found, total, again) = self.diff_buckets(s, &read).await?;
            // 3. The differing keys once more, at a third: by key when they are few, else the
            // buckets that held them (a statement per thousand keys would scan the view as often).
            self.metrics.pass.set(3);
            let mut confirmed = if found.is_empty() {
                found
            } else if found.len() <= KEYS_BY_KEY {
                self.diff_keys(s, &found).await?.also_in(&found)
            } else {
                self.diff_buckets(s, &again).await?.0.also_in(&found)
            };
            if let Some(loose) = &plan.loose {
                if !confirmed.mismatched.is_empty() {
                    let equal = self
                        .equal_within_an_ulp(s, loose, &confirmed.mismatched)
                        .await?;
                    confirmed.mismatched.retain(|k| !equal.contains(k));
                }
            }
            report.set_diff(confirmed, total, self.args.examples);
        }
        report.seconds = started.elapsed().as_secs_f64();
        self.metrics.pass.set(0);
        self.metrics.tables_verified.inc();
        self.metrics.missing.set(report.missing.count as i64);
        self.metrics.extra.set(report.extra.count as i64);
        self.metrics.mismatched.set(report.mismatched.count as i64);
        let notes = self.notes(&report);
        report.notes.extend(notes);
        tracing::info!(table = %plan.name, equal = report.is_equal(), seconds = report.seconds, "verified");
        Ok(report)
    }

    /// The differing rows of the buckets `read` names, how many differences there were, and the
    /// buckets (in groups) that had any.
    async fn diff_buckets(
        &mut self,
        s: &Subject,
        read: &[(Region, Vec<i64>)],
    ) -> Result<(RowDiff, usize, Vec<(Region, Vec<i64>)>), Error> {
        let plan = &s.plan;
        let per_read = ((ROWS_PER_READ / compare::ROWS_PER_BUCKET) as usize).max(1);
        let groups: Vec<(&Region, &[i64])> = read
            .iter()
            .flat_map(|(r, b)| b.chunks(per_read).map(move |g| (r, g)))
            .collect();
        tracing::info!(table = %plan.name, buckets = read.iter().map(|r| r.1.len()).sum::<usize>(), "reading the differing buckets row by row");
        // PostgreSQL's rows of every group in one snapshot, held as key → hash until ClickHouse
        // has caught up with it; a group at a time would need a point per group.
        let at = pg::begin_snapshot(&self.sql).await?;
        let mut pg_rows = Vec::with_capacity(groups.len());
        for (r, g) in &groups {
            pg_rows.push(
                pg::row_hashes(
                    &self.sql,
                    &plan.pg_table,
                    &plan.pg_key,
                    &plan.pg_hash,
                    &r.pg_filter(plan, g),
                )
                .await?,
            );
        }
        pg::end_snapshot(&self.sql).await?;
        self.wait_for(at, &s.topic).await?;
        let mut diff = RowDiff::default();
        let mut total = 0;
        let mut with_diffs = Vec::new();
        for ((r, g), pg_rows) in groups.iter().zip(pg_rows) {
            let ch_rows = self
                .ch
                .row_hashes(
                    &plan.view,
                    &plan.ch_key,
                    &plan.ch_hash,
                    &r.ch_filter(plan, g),
                )
                .await?;
            let d = diff_rows(pg_rows, ch_rows, self.newer_than(at));
            total += d.len() + d.newer;
            if !d.is_empty() {
                with_diffs.push(((*r).clone(), g.to_vec()));
            }
            diff.extend(d);
        }
        Ok((diff, total, with_diffs))
    }

    /// Which differing buckets of `region` to read row by row, in regions, while their rows fit
    /// [`MAX_ROWS_READ`]; one larger than that is cut into buckets of its own, compared at a new
    /// point (at most [`MAX_CUTS`] times a table); and the buckets left unread, with their rows.
    async fn narrow(
        &mut self,
        s: &Subject,
        region: Region,
        differing: &[i64],
        pg_sums: &[(i64, u64, u64)],
        ch_sums: &[(i64, u64, u64)],
    ) -> Result<(Vec<(Region, Vec<i64>)>, Vec<(i64, u64)>), Error> {
        let plan = &s.plan;
        let mut queue = std::collections::VecDeque::new();
        queue.push_back((region, sized(differing, pg_sums, ch_sums)));
        let (mut read, mut unread) = (Vec::new(), Vec::new());
        let (mut left, mut cuts) = (MAX_ROWS_READ, 0);
        while let Some((region, buckets)) = queue.pop_front() {
            let mut take = Vec::new();
            for (b, rows) in buckets {
                if rows <= left {
                    left -= rows;
                    take.push(b);
                } else if rows > MAX_ROWS_READ && cuts < MAX_CUTS {
                    cuts += 1;
                    let inner = region.cut(plan, b);
                    let buckets = self.cut_buckets(s, &inner, rows).await?;
                    let inner = Region { buckets, ..inner };
                    let (pg, ch) = self.compare_sums(s, &inner).await?;
                    let differing = differing_buckets(&pg, &ch);
                    tracing::info!(table = %plan.name, rows, buckets = pg.len().max(ch.len()), differing = differing.len(), "a bucket too large to read was cut");
                    queue.push_back((inner, sized(&differing, &pg, &ch)));
                } else {
                    unread.push((b, rows));
                }
            }
            if !take.is_empty() {
                read.push((region, take));
            }
        }
        Ok((read, unread))
    }

    /// Both servers' (bucket, rows, hash sum) of `region`: PostgreSQL in one snapshot, ClickHouse
    /// once it holds everything that snapshot saw.
    async fn compare_sums(
        &mut self,
        s: &Subject,
        region: &Region,
    ) -> Result<(Vec<(i64, u64, u64)>, Vec<(i64, u64, u64)>), Error> {
        let plan = &s.plan;
        let at = pg::begin_snapshot(&self.sql).await?;
        let pg = pg::bucket_sums(
            &self.sql,
            &plan.pg_table,
            &region.buckets.pg_sql(plan),
            &plan.pg_hash,
            &region.pg_where,
        )
        .await?;
        pg::end_snapshot(&self.sql).await?;
        self.wait_for(at, &s.topic).await?;
        let ch = self
            .ch
            .bucket_sums(
                &plan.view,
                &region.buckets.ch_sql(plan),
                &plan.ch_hash,
                &region.ch_where,
            )
            .await?;
        Ok((pg, ch))
    }

    /// The buckets to cut `inner` (about `rows` rows) into: a key range over the keys it holds on
    /// either side, or a finer hash.
    async fn cut_buckets(&self, s: &Subject, inner: &Region, rows: u64) -> Result<Buckets, Error> {
        let plan = &s.plan;
        match (&plan.int_key, inner.buckets) {
            (Some((pg_key, ch_key)), _) => {
                let (a, b) =
                    pg::key_bounds(&self.sql, &plan.pg_table, pg_key, &inner.pg_where).await?;
                let (c, d) = self
                    .ch
                    .key_bounds(&plan.view, ch_key, &inner.ch_where)
                    .await?;
                let min = [a, c].into_iter().flatten().min().unwrap_or(0);
                let max = [b, d].into_iter().flatten().max().unwrap_or(0);
                Ok(Buckets::for_int_key(min, max, rows as f64))
            }
            (None, Buckets::Hash { count }) => {
                // The rows of bucket b of `count` are those of the buckets c of count·k with
                // c mod count = b: k of them hold its rows.
                let k = (rows as f64 / compare::ROWS_PER_BUCKET).ceil().max(2.0) as u64;
                Ok(Buckets::Hash {
                    count: count.saturating_mul(k),
                })
            }
            (None, b) => Ok(b),
        }
    }

    /// `found`'s keys read again on both sides at a new point.
    async fn diff_keys(&mut self, s: &Subject, found: &RowDiff) -> Result<RowDiff, Error> {
        let plan = &s.plan;
        let keys: Vec<&String> = found.keys().collect();
        tracing::info!(table = %plan.name, keys = keys.len(), "re-reading the differing keys");
        let at = pg::begin_snapshot(&self.sql).await?;
        let mut pg_rows = Vec::new();
        for chunk in key_chunks(&keys) {
            pg_rows.extend(
                pg::row_hashes(
                    &self.sql,
                    &plan.pg_table,
                    &plan.pg_key,
                    &plan.pg_hash,
                    &pg_key_filter(plan, chunk),
                )
                .await?,
            );
        }
        pg::end_snapshot(&self.sql).await?;
        self.wait_for(at, &s.topic).await?;
        let mut ch_rows = Vec::new();
        for chunk in key_chunks(&keys) {
            ch_rows.extend(
                self.ch
                    .row_hashes(
                        &plan.view,
                        &plan.ch_key,
                        &plan.ch_hash,
                        &ch_key_filter(plan, chunk),
                    )
                    .await?,
            );
        }
        Ok(diff_rows(pg_rows, ch_rows, self.newer_than(at)))
    }

    /// The version above which a ClickHouse row is a change the snapshot at `at` could not see.
    fn newer_than(&self, at: Lsn) -> u64 {
        if self.versions_trusted {
            at.0
        } else {
            u64::MAX
        }
    }

    /// Of `keys`, those whose rows are equal but for doubles one ulp apart (ClickHouse 18.16 reads
    /// some that way), read at a new point.
    async fn equal_within_an_ulp(
        &mut self,
        s: &Subject,
        loose: &plan::Loose,
        keys: &[String],
    ) -> Result<std::collections::HashSet<String>, Error> {
        let plan = &s.plan;
        let keys: Vec<&String> = keys.iter().collect();
        let pg_exprs: Vec<String> = [plan.pg_key.clone(), loose.pg_rest.clone()]
            .into_iter()
            .chain(loose.columns.iter().map(|c| c.1.clone()))
            .collect();
        let ch_exprs: Vec<String> = [plan.ch_key.clone(), format!("toString({})", loose.ch_rest)]
            .into_iter()
            .chain(loose.columns.iter().map(|c| c.2.clone()))
            .collect();
        let at = pg::begin_snapshot(&self.sql).await?;
        let mut pg_rows = Vec::new();
        for chunk in key_chunks(&keys) {
            pg_rows.extend(
                pg::text_rows(
                    &self.sql,
                    &plan.pg_table,
                    &pg_exprs,
                    &pg_key_filter(plan, chunk),
                )
                .await?,
            );
        }
        pg::end_snapshot(&self.sql).await?;
        self.wait_for(at, &s.topic).await?;
        let mut ch_rows = std::collections::HashMap::new();
        for chunk in key_chunks(&keys) {
            for row in self
                .ch
                .text_rows(&plan.view, &ch_exprs, &ch_key_filter(plan, chunk))
                .await?
            {
                if let Some(Some(key)) = row.first() {
                    ch_rows.insert(key.clone(), row);
                }
            }
        }
        let mut equal = std::collections::HashSet::new();
        for row in pg_rows {
            let Some(Some(key)) = row.first() else {
                continue;
            };
            // The PostgreSQL hash is signed, ClickHouse's unsigned: the same 64 bits.
            let rest = row
                .get(1)
                .cloned()
                .flatten()
                .and_then(|h| h.parse::<i64>().ok());
            let Some(other) = ch_rows.get(key) else {
                continue;
            };
            let other_rest = other
                .get(1)
                .cloned()
                .flatten()
                .and_then(|h| h.parse::<u64>().ok());
            if rest.map(|h| h as u64) != other_rest || rest.is_none() {
                continue;
            }
            if row[2..]
                .iter()
                .zip(&other[2..])
                .all(|(a, b)| one_ulp_apart(a, b))
            {
                equal.insert(key.clone());
            }
        }
        tracing::info!(table = %plan.name, keys = keys.len(), equal = equal.len(), "doubles compared again, one ulp allowed");
        Ok(equal)
    }

    /// Waits until ClickHouse holds every change committed at or below `at`: the slot confirmed
    /// it (Kafka acknowledged it), then the sink's group committed every message Kafka held then.
    async fn wait_for(&mut self, at: Lsn, topic: &str) -> Result<(), Error> {
        if self.args.no_wait {
            return Ok(());
        }
        let started = Instant::now();
        let deadline = started + self.args.wait_secs;
        let slot = self.cfg.slot.clone();
        let mut last_heartbeat: Option<Instant> = None;
        loop {
            self.check_shutdown()?;
            if last_heartbeat.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                // The stream confirms a quiet slot's position when this comes back to it.
                catalog::emit_heartbeat(&self.sql).await?;
                last_heartbeat = Some(Instant::now());
            }
            match pg::confirmed_position(&self.sql, &slot).await? {
                None => {
                    return Err(Error::Config(format!(
                        "replication slot {slot} does not exist: verify compares what the stream has delivered, so run `cdc-relay stream` first (or pass --no-wait to compare what ClickHouse holds now)"
                    )))
                }
                Some(confirmed) if confirmed >= at => break,
                Some(confirmed) if Instant::now() > deadline => {
                    return Err(Error::Config(format!(
                        "the slot {slot} has confirmed {confirmed}, not yet {at} where the verify snapshot stands, after {:?}: is `cdc-relay stream` running? (--wait-secs waits longer; --no-wait compares what ClickHouse holds now)",
                        self.args.wait_secs
                    )))
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let (connection, topic_name) = (self.kafka.clone(), topic.to_string());
        let highs = blocking(move || inspect::high_watermarks(&connection, &topic_name)).await?;
        loop {
            self.check_shutdown()?;
            let (connection, topic_name, group, highs) = (
                self.kafka.clone(),
                topic.to_string(),
                self.args.group.clone(),
                highs.clone(),
            );
            let behind =
                blocking(move || inspect::behind(&connection, &topic_name, &group, &highs)).await?;
            if behind.is_empty() {
                self.metrics.waited.record(started.elapsed());
                return Ok(());
            }
            if Instant::now() > deadline {
                let parts: Vec<String> = behind
                    .iter()
                    .map(|(p, at, high)| {
                        format!(
                            "p{p} committed {} of {high}",
                            at.map_or("nothing".into(), |o| o.to_string())
                        )
                    })
                    .collect();
                return Err(Error::Config(format!(
                    "consumer group {} has not consumed {topic} up to where the verify snapshot stands after {:?} ({}): is `cdc-relay sink` running with --group {}?",
                    self.args.group,
                    self.args.wait_secs,
                    parts.join(", "),
                    self.args.group
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn check_shutdown(&self) -> Result<(), Error> {
        if *self.shutdown.borrow() {
            return Err(Error::Config("verify interrupted".into()));
        }
        Ok(())
    }

    /// What a reader of the report should know about this table's comparison.
    fn notes(&self, report: &TableReport) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(ops) = &self.publication_ops {
            let missing: Vec<&str> = ["update", "delete", "truncate"]
                .into_iter()
                .filter(|op| !ops.contains(op))
                .collect();
            if !missing.is_empty() && !report.is_equal() {
                notes.push(format!(
                    "publication {} does not publish {}: such changes in PostgreSQL are not relayed and show here as drift (--ops)",
                    self.cfg.publication,
                    missing.join(", ")
                ));
            }
        }
        if self.args.no_wait && !report.is_equal() {
            notes.push(
                "--no-wait: changes still on their way to ClickHouse count as differences".into(),
            );
        }
        notes
    }
}

/// Two doubles' bits (signed integers' text, `NaN`, or NULL) at most one ulp apart.
fn one_ulp_apart(a: &Option<String>, b: &Option<String>) -> bool {
    match (a.as_deref(), b.as_deref()) {
        (None, None) => true,
        (Some(x), Some(y)) if x == y => true,
        (Some(x), Some(y)) => match (x.parse::<i64>(), y.parse::<i64>()) {
            // Same sign: adjacent doubles are adjacent integers.
            (Ok(x), Ok(y)) => (x < 0) == (y < 0) && x.abs_diff(y) <= 1,
            _ => false,
        },
        _ => false,
    }
}

/// Each of `differing` with its rows (the larger side's).
fn sized(differing: &[i64], pg: &[(i64, u64, u64)], ch: &[(i64, u64, u64)]) -> Vec<(i64, u64)> {
    let mut size: std::collections::HashMap<i64, u64> = std::collections::HashMap::new();
    for &(b, rows, _) in pg.iter().chain(ch) {
        let n = size.entry(b).or_default();
        *n = (*n).max(rows);
    }
    differing
        .iter()
        .map(|&b| (b, size.get(&b).copied().unwrap_or(0)))
        .collect()
}

/// Part of a table and how it is cut into buckets: the whole table, or one bucket of a coarser
/// cut (its conditions on each side).
#[derive(Debug, Clone)]
pub(crate) struct Region {
    buckets: Buckets,
    pg_where: String,
    ch_where: String,
}

impl Region {
    fn whole(buckets: Buckets) -> Self {
        Region {
            buckets,
            pg_where: "true".into(),
            ch_where: "1".into(),
        }
    }

    /// Bucket `b` of this region, to be cut again (its `buckets` are replaced).
    fn cut(&self, plan: &TablePlan, b: i64) -> Region {
        Region {
            buckets: self.buckets,
            pg_where: format!(
                "({}) AND ({})",
                self.pg_where,
                self.buckets.pg_filter(plan, &[b])
            ),
            ch_where: format!(
                "({}) AND ({})",
                self.ch_where,
                self.buckets.ch_filter(plan, &[b])
            ),
        }
    }

    fn pg_filter(&self, plan: &TablePlan, buckets: &[i64]) -> String {
        format!(
            "({}) AND ({})",
            self.pg_where,
            self.buckets.pg_filter(plan, buckets)
        )
    }

    fn ch_filter(&self, plan: &TablePlan, buckets: &[i64]) -> String {
        format!(
            "({}) AND ({})",
            self.ch_where,
            self.buckets.ch_filter(plan, buckets)
        )
    }
}

/// The ledger column if the table has it (as the stream decides).
async fn ledger_column(
    sql: &tokio_postgres::Client,
    spec: &TableSpec,
) -> Result<Option<String>, Error> {
    let Some(column) = spec.ledger_column.clone() else {
        return Ok(None);
    };
    let row = sql
        .query_opt(
            "SELECT 1 FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = $2 AND attnum > 0 AND NOT attisdropped",
            &[&spec.qualified(), &column],
        )
        .await
        .map_err(crate::source::postgres::SourceError::sql(format!(
            "reading the columns of {}",
            spec.name()
        )))?;
    Ok(row.map(|_| column))
}

/// `key IN (…)` of the integer keys among `keys` (the same SQL on both servers), or `none`.
fn int_key_filter(key: &str, keys: &[&String], none: &str) -> String {
    let ints: Vec<String> = keys
        .iter()
        .filter_map(|k| k.parse::<i64>().ok())
        .map(|k| k.to_string())
        .collect();
    if ints.is_empty() {
        return none.into();
    }
    format!("{key} IN ({})", ints.join(", "))
}

/// PostgreSQL's condition for rows with these key texts: by index for an integer key.
fn pg_key_filter(plan: &TablePlan, keys: &[&String]) -> String {
    match &plan.int_key {
        Some((key, _)) => int_key_filter(key, keys, "false"),
        // By the key columns, as literals of their types (the index serves it), when the key
        // texts are PostgreSQL's own.
        None if plan.key_is_pg_text => {
            let tuples: Vec<String> = keys
                .iter()
                .filter_map(|k| {
                    let fields = crate::types::canonical::split_fields(k)?;
                    let values: Option<Vec<String>> = fields
                        .iter()
                        .zip(&plan.pg_key_columns)
                        .map(|(f, (_, ty))| f.map(|v| format!("{}::{ty}", pg_string(v))))
                        .collect();
                    Some(format!("({})", values?.join(", ")))
                })
                .collect();
            if tuples.is_empty() {
                return "false".into();
            }
            let cols: Vec<&str> = plan
                .pg_key_columns
                .iter()
                .map(|(c, _)| c.as_str())
                .collect();
            format!("({}) IN ({})", cols.join(", "), tuples.join(", "))
        }
        None => format!(
            "({}) IN ({})",
            plan.pg_key,
            keys.iter()
                .map(|k| pg_string(k))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Keys in chunks of at most [`KEYS_PER_READ`] and about 100 KB of text, so that one statement
/// stays well inside ClickHouse's `max_query_size` (256 KiB).
fn key_chunks<'a, 'k>(keys: &'a [&'k String]) -> Vec<&'a [&'k String]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, k) in keys.iter().enumerate() {
        if i > start && (i - start >= KEYS_PER_READ || bytes + k.len() > 100_000) {
            out.push(&keys[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += k.len() + 8;
    }
    if start < keys.len() {
        out.push(&keys[start..]);
    }
    out
}

fn ch_key_filter(plan: &TablePlan, keys: &[&String]) -> String {
    match &plan.int_key {
        Some((_, key)) => int_key_filter(key, keys, "0"),
        None => format!(
            "({}) IN ({})",
            plan.ch_key,
            keys.iter()
                .map(|k| crate::sink::clickhouse::config::quote_string(k))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A PostgreSQL string literal (standard_conforming_strings: only quotes double).
pub(crate) fn pg_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::kafka::KafkaError> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Config(format!("a Kafka inspection task failed: {e}")))?
        .map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::one_ulp_apart;

    #[test]
    fn doubles_one_ulp_apart_are_equal_only_with_the_same_sign() {
        let s = |v: &str| Some(v.to_string());
        assert!(one_ulp_apart(
            &s("4613434758951284151"),
            &s("4613434758951284150")
        ));
        assert!(one_ulp_apart(&s("NaN"), &s("NaN")));
        assert!(one_ulp_apart(&None, &None));
        assert!(!one_ulp_apart(
            &s("4613434758951284151"),
            &s("4613434758951284149")
        ));
        // +0 and -0 are not neighbours by bits, nor is a value and NULL.
        assert!(!one_ulp_apart(&s("0"), &s("-9223372036854775808")));
        assert!(!one_ulp_apart(&s("1"), &None));
        assert!(!one_ulp_apart(&s("NaN"), &s("1")));
    }
}
