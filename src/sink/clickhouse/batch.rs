//! What a batch does to its rows before they are inserted, for the seed's rows and for any table's
//! alike: complete updates that left unchanged TOASTed columns out, and keep one row of each
//! (key, version). One implementation over [`VersionedRow`], so both shapes get the same semantics.

use std::collections::HashMap;
use std::hash::Hash;

use super::row::SeedRow;

/// What the batch functions need of a row.
pub trait VersionedRow {
    /// The primary key: compared for equality only.
    type Key: Eq + Hash + Clone;
    fn key(&self) -> &Self::Key;
    fn version(&self) -> u64;
    /// A delete holds no values to fill from.
    fn deleted(&self) -> bool;
    /// Takes the named columns' values from `from`, an earlier state of the row.
    fn copy_columns(&mut self, from: &Self, cols: &[String]);
}

impl VersionedRow for SeedRow {
    type Key = i64;
    fn key(&self) -> &i64 {
        &self.row.id
    }
    fn version(&self) -> u64 {
        self.row._version
    }
    fn deleted(&self) -> bool {
        self.row._deleted != 0
    }
    fn copy_columns(&mut self, from: &Self, cols: &[String]) {
        for c in cols {
            match c.as_str() {
                "username" => self.row.username = from.row.username.clone(),
                "event_type" => self.row.event_type = from.row.event_type.clone(),
                "event_time" => {
                    self.row.event_time = from.row.event_time;
                    self.row.event_time_us = from.row.event_time_us;
                }
                // A column a user added (its ClickHouse name).
                added => {
                    self.extra.retain(|(n, _)| &**n != added);
                    if let Some(cell) = from.extra.iter().find(|(n, _)| &**n == added) {
                        self.extra.push(cell.clone());
                    }
                }
            }
        }
    }
}

/// A row whose update left TOASTed columns out, to be completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfilled<K = i64> {
    /// Its position in the batch.
    pub idx: usize,
    pub cols: Vec<String>,
    /// The key whose earlier state holds the values: its own, or after a key update the key it
    /// moved from.
    pub from: K,
}

/// Whether `cand` (at batch position `cand_idx`) is an earlier state of `u`'s row: a row of the key
/// it takes its values from with a lower version, or the same version (one transaction) earlier on
/// the partition. A delete holds no values.
fn is_earlier<R: VersionedRow>(cand: &R, cand_idx: usize, u: &Unfilled<R::Key>, row: &R) -> bool {
    cand.key() == &u.from
        && !cand.deleted()
        && (cand.version() < row.version() || (cand.version() == row.version() && cand_idx < u.idx))
}

/// Completes rows whose update did not carry some TOASTed columns from the newest earlier change
/// of the same key (or the key it moved from) in the batch, ignoring rows below the truncate
/// `watermark`; returns those with no such row, to be completed from the table
/// ([`fill_from_stored`]).
pub fn fill_from_batch<R: VersionedRow>(
    rows: &mut [R],
    mut unfilled: Vec<Unfilled<R::Key>>,
    watermark: u64,
) -> Vec<Unfilled<R::Key>> {
    // Oldest change first, so a row that is itself completed is complete before it is copied from.
    unfilled.sort_by_key(|u| (rows[u.idx].version(), u.idx));
    let mut rest = Vec::new();
    for u in unfilled {
        let best = rows
            .iter()
            .enumerate()
            .filter(|(i, r)| r.version() >= watermark && is_earlier(*r, *i, &u, &rows[u.idx]))
            .max_by_key(|(i, r)| (r.version(), *i))
            .map(|(i, _)| i);
        match best {
            Some(prev) => copy_within(rows, prev, u.idx, &u.cols),
            None => rest.push(u),
        }
    }
    rest
}

/// `rows[to]` takes `cols` from `rows[from]` (never the same row: a row is not earlier than itself).
fn copy_within<R: VersionedRow>(rows: &mut [R], from: usize, to: usize, cols: &[String]) {
    if from < to {
        let (a, b) = rows.split_at_mut(to);
        b[0].copy_columns(&a[from], cols);
    } else if from > to {
        let (a, b) = rows.split_at_mut(from);
        a[to].copy_columns(&b[0], cols);
    }
}

/// Completes rows from the stored row of the key they take their values from with the greatest
/// version strictly below theirs (`stored` holds only rows at or above the truncate watermark);
/// columns with no such row stay as they are (NULL).
pub fn fill_from_stored<R: VersionedRow>(rows: &mut [R], rest: &[Unfilled<R::Key>], stored: &[R]) {
    for u in rest {
        let version = rows[u.idx].version();
        if let Some(prev) = stored
            .iter()
            .filter(|r| r.key() == &u.from && !r.deleted() && r.version() < version)
            .max_by_key(|r| r.version())
        {
            rows[u.idx].copy_columns(prev, &u.cols);
        }
    }
}

/// Keeps, of rows with the same key and the same version, only the last (the latest change of one
/// transaction): ClickHouse does not say which of equal versions in one insert survives.
pub fn keep_last_of_equal_versions<R: VersionedRow>(rows: &mut Vec<R>) {
    let keep: Vec<bool> = {
        let mut last: HashMap<(&R::Key, u64), usize> = HashMap::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            last.insert((r.key(), r.version()), i);
        }
        if last.len() == rows.len() {
            return;
        }
        rows.iter()
            .enumerate()
            .map(|(i, r)| last[&(r.key(), r.version())] == i)
            .collect()
    };
    let mut i = 0;
    rows.retain(|_| {
        let k = keep[i];
        i += 1;
        k
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::clickhouse::UserLoginRow;

    fn row(id: i64, version: u64, user: Option<&str>, event: &str) -> SeedRow {
        SeedRow::plain(UserLoginRow {
            id,
            username: user.map(str::to_string),
            event_type: Some(event.into()),
            event_time: None,
            event_time_us: None,
            op: "update".into(),
            _lsn: "0/1".into(),
            _version: version,
            _deleted: 0,
        })
    }

    fn users(rows: &[SeedRow]) -> Vec<Option<&str>> {
        rows.iter().map(|r| r.row.username.as_deref()).collect()
    }

    #[test]
    fn fills_from_the_newest_earlier_change_in_the_batch() {
        let username = || vec!["username".to_string()];
        let mut rows = vec![
            row(1, 10, Some("a"), "x"),
            row(1, 30, Some("c"), "x"), // a later change, delivered before (a re-read)
            row(1, 20, None, "y"),      // fill from 10, not 30
            row(2, 5, Some("b1"), "x"),
            row(2, 5, None, "y"), // same transaction, earlier on the partition: fill from it
            row(3, 7, None, "y"), // nothing earlier in the batch
            row(4, 9, Some("old"), "x"),
            row(4, 12, None, "y"), // 9 is at the watermark 9: still there
        ];
        let unchanged = [2, 4, 5, 7]
            .map(|i| Unfilled {
                idx: i,
                cols: username(),
                from: rows[i].row.id,
            })
            .to_vec();
        let rest = fill_from_batch(&mut rows[..6], unchanged[..3].to_vec(), 0);
        assert_eq!(rest.iter().map(|u| u.idx).collect::<Vec<_>>(), vec![5]);
        let rest = fill_from_batch(&mut rows, unchanged[3..].to_vec(), 9);
        assert!(rest.is_empty());
        assert_eq!(users(&rows)[2], Some("a"));
        assert_eq!(users(&rows)[4], Some("b1"));
        assert_eq!(users(&rows)[7], Some("old"));

        let mut rows = vec![row(4, 9, Some("old"), "x"), row(4, 12, None, "y")];
        let one = Unfilled {
            idx: 1,
            cols: username(),
            from: 4,
        };
        let rest = fill_from_batch(&mut rows, vec![one], 10);
        assert_eq!(rest.len(), 1, "a row below the watermark is not a source");
        assert_eq!(rows[1].row.username, None);
    }

    #[test]
    fn a_filled_row_is_complete_before_a_later_one_copies_it() {
        let username = || vec!["username".to_string()];
        // Positions out of version order: 20 must be completed from 10 before 25 copies 20.
        let mut rows = vec![
            row(1, 25, None, "z"),
            row(1, 20, None, "y"),
            row(1, 10, Some("a"), "x"),
        ];
        let unfilled = |idx| Unfilled {
            idx,
            cols: username(),
            from: 1,
        };
        let rest = fill_from_batch(&mut rows, vec![unfilled(0), unfilled(1)], 0);
        assert!(rest.is_empty());
        assert_eq!(users(&rows), vec![Some("a"), Some("a"), Some("a")]);
    }

    #[test]
    fn fills_from_the_greatest_stored_version_below_the_row() {
        let stored = vec![
            row(1, 10, Some("a"), "x"),
            row(1, 30, Some("c"), "x"),
            row(1, 20, Some("self"), "x"), // the row itself, stored before a re-read
            row(2, 3, Some("b"), "x"),
        ];
        let mut rows = vec![row(1, 20, None, "y"), row(2, 1, None, "y")];
        let unfilled = |idx, from| Unfilled {
            idx,
            cols: vec!["username".to_string()],
            from,
        };
        fill_from_stored(&mut rows, &[unfilled(0, 1), unfilled(1, 2)], &stored);
        assert_eq!(users(&rows), vec![Some("a"), None]);
    }

    #[test]
    fn a_moved_row_is_filled_from_the_id_it_moved_from_never_from_a_delete() {
        let mut deleted = row(1, 40, None, "delete");
        deleted.row._deleted = 1;
        // Key update 1 -> 2 in one transaction (version 40): the delete of 1, then 2 with the
        // username left out.
        let mut rows = vec![row(1, 30, Some("big"), "x"), deleted, row(2, 40, None, "y")];
        let u = Unfilled {
            idx: 2,
            cols: vec!["username".to_string()],
            from: 1,
        };
        assert!(fill_from_batch(&mut rows, vec![u.clone()], 0).is_empty());
        assert_eq!(rows[2].row.username.as_deref(), Some("big"));
        let (stored, mut rows) = (
            vec![row(1, 30, Some("big"), "x")],
            vec![row(2, 40, None, "y")],
        );
        fill_from_stored(&mut rows, &[Unfilled { idx: 0, ..u }], &stored);
        assert_eq!(rows[0].row.username.as_deref(), Some("big"));
    }

    #[test]
    fn an_added_column_is_filled_like_the_seed_columns() {
        let cell = |v: &str| (std::sync::Arc::from("note"), v.to_string());
        let mut earlier = row(1, 10, Some("a"), "x");
        earlier.extra = vec![cell(r#""big""#)];
        let mut later = row(1, 20, Some("a"), "y");
        later.extra = vec![cell("null")];
        let mut rows = vec![earlier, later];
        let u = Unfilled {
            idx: 1,
            cols: vec!["note".to_string()],
            from: 1,
        };
        assert!(fill_from_batch(&mut rows, vec![u], 0).is_empty());
        assert_eq!(rows[1].extra, vec![cell(r#""big""#)]);
    }

    #[test]
    fn keeps_the_last_of_equal_versions_of_one_id() {
        let mut rows = vec![
            row(1, 5, Some("first"), "x"),
            row(2, 5, Some("other id"), "x"),
            row(1, 6, Some("newer version"), "x"),
            row(1, 5, Some("second"), "x"),
            row(1, 5, Some("last"), "x"),
        ];
        keep_last_of_equal_versions(&mut rows);
        assert_eq!(
            users(&rows),
            vec![Some("other id"), Some("newer version"), Some("last")]
        );
        let mut distinct = vec![row(1, 1, Some("a"), "x"), row(1, 2, Some("b"), "x")];
        keep_last_of_equal_versions(&mut distinct);
        assert_eq!(distinct.len(), 2);
    }
}
