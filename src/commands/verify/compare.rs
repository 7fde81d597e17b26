//! How `verify` narrows a difference down: the table is cut into buckets of about
//! [`ROWS_PER_BUCKET`] rows, both servers sum each bucket, and only the buckets that differ are
//! read row by row (a key text and a hash per row). No row leaves either server for a clean table.

use std::collections::HashMap;

use super::plan::TablePlan;
use crate::types::canonical;

/// Rows per bucket aimed at: what a differing bucket costs to read row by row.
pub const ROWS_PER_BUCKET: f64 = 1000.0;

/// How rows are put into buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buckets {
    /// An integer key in PostgreSQL's `[base, max]` at the first read: `(key - base) / width`,
    /// `0 .. count`; keys below go to bucket -1 and keys above to `count`, so rows that only
    /// ClickHouse has (or PostgreSQL gained since) never make more buckets than that. A bucket is a
    /// key range, which PostgreSQL reads through the primary key's index.
    Range {
        base: i64,
        max: i64,
        width: i64,
        count: i64,
    },
    /// Any other key: a hash of its text modulo `count` (a bucket is read by a full scan).
    Hash { count: u64 },
}

impl Buckets {
    /// For an integer key in `[min, max]`, about `rows` rows.
    pub fn for_int_key(min: i64, max: i64, rows: f64) -> Buckets {
        let span = i128::from(max) - i128::from(min) + 1;
        if span > i128::from(i64::MAX) || max < min {
            return Buckets::for_rows(rows);
        }
        let buckets = (rows.max(1.0) / ROWS_PER_BUCKET).ceil().max(1.0) as i128;
        let width = ((span + buckets - 1) / buckets).max(1);
        Buckets::Range {
            base: min,
            max,
            width: width as i64,
            count: ((span + width - 1) / width) as i64,
        }
    }

    pub fn for_rows(rows: f64) -> Buckets {
        Buckets::Hash {
            count: (rows.max(1.0) / ROWS_PER_BUCKET).ceil().max(1.0) as u64,
        }
    }

    pub fn pg_sql(&self, plan: &TablePlan) -> String {
        match (*self, &plan.int_key) {
            (
                Buckets::Range {
                    base,
                    max,
                    width,
                    count,
                },
                Some((key, _)),
            ) => format!(
                "CASE WHEN {key} < {base} THEN -1 WHEN {key} > {max} THEN {count} \
                 ELSE (({key})::bigint - ({base})::bigint) / {width} END"
            ),
            (Buckets::Hash { count }, _) => canonical::pg_hash_bucket(&plan.pg_key, count),
            // Ranges are made for integer keys only.
            (Buckets::Range { .. }, None) => "0".into(),
        }
    }

    pub fn ch_sql(&self, plan: &TablePlan) -> String {
        match (*self, &plan.int_key) {
            (
                Buckets::Range {
                    base,
                    max,
                    width,
                    count,
                },
                Some((_, key)),
            ) => format!(
                "multiIf(toInt64({key}) < toInt64({base}), toInt64(-1), toInt64({key}) > toInt64({max}), toInt64({count}), toInt64(intDiv(toInt64({key}) - toInt64({base}), {width})))"
            ),
            (Buckets::Hash { count }, _) => canonical::ch_hash_bucket(&plan.ch_key, count),
            (Buckets::Range { .. }, None) => "0".into(),
        }
    }

    /// The keys of bucket `b` of a range.
    pub fn key_range(base: i64, max: i64, width: i64, count: i64, b: i64) -> (i64, i64) {
        if b < 0 {
            return (i64::MIN, base.saturating_sub(1));
        }
        if b >= count {
            return (max.saturating_add(1), i64::MAX);
        }
        let lo = i128::from(base) + i128::from(b) * i128::from(width);
        let hi = (lo + i128::from(width) - 1).min(i128::from(max));
        (lo as i64, hi as i64)
    }

    /// PostgreSQL's condition for the rows of `buckets`.
    pub fn pg_filter(&self, plan: &TablePlan, buckets: &[i64]) -> String {
        match (self, &plan.int_key) {
            (
                &Buckets::Range {
                    base,
                    max,
                    width,
                    count,
                },
                Some((key, _)),
            ) => buckets
                .iter()
                .map(|&b| {
                    let (lo, hi) = Buckets::key_range(base, max, width, count, b);
                    format!("({key} BETWEEN {lo} AND {hi})")
                })
                .collect::<Vec<_>>()
                .join(" OR "),
            _ => format!("({}) IN ({})", self.pg_sql(plan), list(buckets)),
        }
    }

    /// ClickHouse's condition for the rows of `buckets`.
    pub fn ch_filter(&self, plan: &TablePlan, buckets: &[i64]) -> String {
        format!("({}) IN ({})", self.ch_sql(plan), list(buckets))
    }
}

fn list(values: &[i64]) -> String {
    values
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Buckets whose count or hash differ, or that only one side has, in order.
pub fn differing_buckets(pg: &[(i64, u64, u64)], ch: &[(i64, u64, u64)]) -> Vec<i64> {
    let pg: HashMap<i64, (u64, u64)> = pg.iter().map(|&(b, n, h)| (b, (n, h))).collect();
    let ch: HashMap<i64, (u64, u64)> = ch.iter().map(|&(b, n, h)| (b, (n, h))).collect();
    let mut out: Vec<i64> = pg
        .keys()
        .chain(ch.keys())
        .filter(|b| pg.get(b) != ch.get(b))
        .copied()
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// What differs between two sets of (key text, row hash).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowDiff {
    /// In PostgreSQL, not in ClickHouse.
    pub missing: Vec<String>,
    /// In ClickHouse, not in PostgreSQL.
    pub extra: Vec<String>,
    /// In both, with different values.
    pub mismatched: Vec<String>,
    /// Keys left out because ClickHouse already holds a change made after the snapshot.
    pub newer: usize,
}

impl RowDiff {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.mismatched.is_empty()
    }

    pub fn len(&self) -> usize {
        self.missing.len() + self.extra.len() + self.mismatched.len()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.missing
            .iter()
            .chain(&self.extra)
            .chain(&self.mismatched)
    }

    /// Keeps only the keys `earlier` also found different: a difference seen once may be a
    /// change in flight between the two reads, one seen at two consistent points is not.
    pub fn also_in(self, earlier: &RowDiff) -> RowDiff {
        let seen: std::collections::HashSet<&String> = earlier.keys().collect();
        let keep = |v: Vec<String>| v.into_iter().filter(|k| seen.contains(k)).collect();
        RowDiff {
            missing: keep(self.missing),
            extra: keep(self.extra),
            mismatched: keep(self.mismatched),
            newer: self.newer,
        }
    }

    pub fn extend(&mut self, other: RowDiff) {
        self.missing.extend(other.missing);
        self.extra.extend(other.extra);
        self.mismatched.extend(other.mismatched);
        self.newer += other.newer;
    }

    /// Sorted: integer keys by value, others by text.
    pub fn sort(&mut self) {
        for v in [&mut self.missing, &mut self.extra, &mut self.mismatched] {
            v.sort_by(|a, b| match (a.parse::<i64>(), b.parse::<i64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.cmp(b),
            });
        }
    }
}

/// Compares the rows of the same buckets read from both sides: PostgreSQL's (key, hash) in a
/// snapshot at `at`, ClickHouse's (key, hash, version) read after it. A ClickHouse row whose
/// version is above `at` holds a change the snapshot could not see (a key updated again and again
/// is in flight at every point): it is left out, not drift.
pub fn diff_rows(pg: Vec<(String, u64)>, ch: Vec<(String, u64, u64)>, at: u64) -> RowDiff {
    let mut diff = RowDiff::default();
    let mut newer = std::collections::HashSet::new();
    let mut ch: HashMap<String, u64> = ch
        .into_iter()
        .filter_map(|(k, h, version)| {
            if version > at {
                newer.insert(k);
                None
            } else {
                Some((k, h))
            }
        })
        .collect();
    diff.newer = newer.len();
    for (key, hash) in pg {
        match ch.remove(&key) {
            None if !newer.contains(&key) => diff.missing.push(key),
            None => {}
            Some(h) if h != hash => diff.mismatched.push(key),
            Some(_) => {}
        }
    }
    diff.extra.extend(ch.into_keys());
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_range_holds_exactly_the_keys_of_its_bucket() {
        for (min, max, rows) in [(1, 10_000, 10_000.0), (-50, 70, 3.0), (5, 5, 1.0)] {
            let Buckets::Range {
                base,
                max,
                width,
                count,
            } = Buckets::for_int_key(min, max, rows)
            else {
                panic!("not a range");
            };
            for key in [
                min - 20,
                min - 1,
                min,
                min + 1,
                max - 1,
                max,
                max + 1,
                max + 5000,
            ] {
                let b = if key < base {
                    -1
                } else if key > max {
                    count
                } else {
                    (key - base) / width
                };
                assert!((-1..=count).contains(&b));
                let (lo, hi) = Buckets::key_range(base, max, width, count, b);
                assert!(lo <= key && key <= hi, "{key} in bucket {b} [{lo}, {hi}]");
            }
        }
    }

    #[test]
    fn widths_cover_the_range_in_about_a_thousand_rows_each() {
        assert_eq!(
            Buckets::for_int_key(1, 10_000_000, 10_000_000.0),
            Buckets::Range {
                base: 1,
                max: 10_000_000,
                width: 1000,
                count: 10_000,
            }
        );
        assert_eq!(
            Buckets::for_int_key(5, 5, -1.0),
            Buckets::Range {
                base: 5,
                max: 5,
                width: 1,
                count: 1
            }
        );
        // A range wider than i64, or none (an empty table), falls back to hashing.
        assert!(matches!(
            Buckets::for_int_key(i64::MIN, i64::MAX, 10.0),
            Buckets::Hash { .. }
        ));
    }

    #[test]
    fn rows_classify_by_key_and_hash() {
        let pg = vec![
            ("1".into(), 10),
            ("2".into(), 20),
            ("3".into(), 30),
            ("5".into(), 50),
        ];
        let ch = vec![
            ("2".into(), 20, 7),
            ("3".into(), 31, 7),
            ("4".into(), 40, 7),
            ("5".into(), 51, 9),
        ];
        let d = diff_rows(pg, ch, 8);
        assert_eq!(d.missing, vec!["1"]);
        assert_eq!(d.mismatched, vec!["3"]);
        assert_eq!(d.extra, vec!["4"]);
        // Changed after the snapshot: neither mismatched nor missing.
        assert_eq!(d.newer, 1);
        let later = RowDiff {
            missing: vec!["1".into(), "9".into()],
            ..Default::default()
        };
        assert_eq!(later.also_in(&d).missing, vec!["1"]);
        assert_eq!(
            differing_buckets(&[(0, 1, 5), (1, 2, 6)], &[(1, 2, 6), (2, 1, 1)]),
            vec![0, 2]
        );
    }
}
