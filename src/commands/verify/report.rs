//! What `verify` found, as a table for people and as JSON (`--json`).

use serde::Serialize;

use super::compare::RowDiff;
use super::plan::TablePlan;

#[derive(Debug, Serialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    /// Set by `--repair`: what was sent again, and the report before it (this one is after).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Repaired>,
}

#[derive(Debug, Serialize)]
pub struct Repaired {
    /// Messages produced: rows read again, deletes of extra keys.
    pub sent: u64,
    pub before: Box<Report>,
}

/// Keys of one kind of difference: how many, and the first of them.
#[derive(Debug, Default, Serialize)]
pub struct Keys {
    pub count: usize,
    pub examples: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TableReport {
    pub table: String,
    pub clickhouse_view: String,
    pub postgres_rows: u64,
    pub clickhouse_rows: u64,
    pub buckets: usize,
    pub differing_buckets: usize,
    /// In PostgreSQL, not in ClickHouse.
    pub missing: Keys,
    /// In ClickHouse, not in PostgreSQL (deletes that never arrived, rows that should not be).
    pub extra: Keys,
    /// Same key, different values.
    pub mismatched: Keys,
    /// Columns whose values are not compared, and why.
    pub not_compared: Vec<String>,
    /// Columns of the PostgreSQL table the view lacks: drift in the table's shape.
    pub absent_columns: Vec<String>,
    /// Differences seen while narrowing down that were gone when read again (changes in flight).
    pub in_flight: usize,
    /// Differing buckets too large to read row by row in this run (see `notes`).
    pub unread_buckets: usize,
    pub notes: Vec<String>,
    pub seconds: f64,
    /// Every differing key, for `--repair` (at most `MAX_KEYS`).
    #[serde(skip)]
    pub diff: RowDiff,
}

impl TableReport {
    pub fn new(
        plan: &TablePlan,
        pg: &[(i64, u64, u64)],
        ch: &[(i64, u64, u64)],
        differing_buckets: usize,
    ) -> Self {
        TableReport {
            table: plan.name.clone(),
            clickhouse_view: plan.view.qualified(),
            postgres_rows: pg.iter().map(|b| b.1).sum(),
            clickhouse_rows: ch.iter().map(|b| b.1).sum(),
            buckets: pg.len().max(ch.len()),
            differing_buckets,
            missing: Keys::default(),
            extra: Keys::default(),
            mismatched: Keys::default(),
            not_compared: plan.not_compared.clone(),
            absent_columns: plan.absent.clone(),
            in_flight: 0,
            unread_buckets: 0,
            notes: Vec::new(),
            seconds: 0.0,
            diff: RowDiff::default(),
        }
    }

    /// `total`: differences the second read found (the kept ones may be fewer).
    pub fn set_diff(&mut self, mut diff: RowDiff, total: usize, examples: usize) {
        diff.sort();
        let keys = |v: &[String]| Keys {
            count: v.len(),
            examples: v.iter().take(examples).map(|k| display_key(k)).collect(),
        };
        self.missing = keys(&diff.missing);
        self.extra = keys(&diff.extra);
        self.mismatched = keys(&diff.mismatched);
        self.in_flight = total.saturating_sub(diff.len());
        self.diff = diff;
    }

    pub fn is_equal(&self) -> bool {
        // Buckets that differed only by changes in flight leave no key behind.
        self.diff.is_empty() && self.absent_columns.is_empty() && self.unread_buckets == 0
    }
}

/// A key text for people: an integer as it is, key fields (`3:abc4:2024`) as `(abc, 2024)`.
fn display_key(key: &str) -> String {
    if key.parse::<i64>().is_ok() {
        return key.to_string();
    }
    match crate::types::canonical::split_fields(key) {
        Some(fields) if fields.len() == 1 => fields[0].unwrap_or("NULL").to_string(),
        Some(fields) => format!(
            "({})",
            fields
                .iter()
                .map(|f| f.unwrap_or("NULL"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => key.to_string(),
    }
}

impl Report {
    pub fn equal(&self) -> bool {
        self.tables.iter().all(TableReport::is_equal)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(r) = &self.repaired {
            out.push_str("before --repair:\n");
            out.push_str(&r.before.render());
            out.push_str(&format!(
                "\nrepair: sent {} messages again; verified again:\n",
                r.sent
            ));
        }
        for t in &self.tables {
            out.push_str(&format!(
                "{}  →  {}\n  rows: postgres {}, clickhouse {} ({} buckets, {} differed, {:.1} s)\n",
                t.table,
                t.clickhouse_view,
                t.postgres_rows,
                t.clickhouse_rows,
                t.buckets,
                t.differing_buckets,
                t.seconds
            ));
            for (what, keys) in [
                ("missing in ClickHouse", &t.missing),
                ("extra in ClickHouse", &t.extra),
                ("mismatched", &t.mismatched),
            ] {
                out.push_str(&format!("  {what:<22} {}", keys.count));
                if !keys.examples.is_empty() {
                    out.push_str(&format!("  e.g. {}", keys.examples.join(", ")));
                }
                out.push('\n');
            }
            if t.in_flight > 0 {
                out.push_str(&format!(
                    "  changes in flight      {} (differed once, equal when read again)\n",
                    t.in_flight
                ));
            }
            for c in &t.absent_columns {
                out.push_str(&format!("  column {c}: not in the ClickHouse view\n"));
            }
            for c in &t.not_compared {
                out.push_str(&format!("  not compared: {c}\n"));
            }
            for n in &t.notes {
                out.push_str(&format!("  note: {n}\n"));
            }
        }
        out.push_str(if self.equal() {
            "verdict: equal\n"
        } else {
            "verdict: DRIFT\n"
        });
        out
    }
}
