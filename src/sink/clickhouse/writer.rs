//! Inserts batches of rows. An insert is all or nothing for the sink: either ClickHouse confirmed it,
//! or the batch is retried whole (a retried batch that had in fact landed only adds versions that
//! ReplacingMergeTree collapses).

use super::{ClickHouseConfig, SinkError, UserLoginRow};

#[derive(Clone)]
pub struct ClickHouseWriter {
    client: clickhouse::Client,
    cfg: ClickHouseConfig,
}

impl ClickHouseWriter {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        ClickHouseWriter {
            client: cfg.client(),
            cfg: cfg.clone(),
        }
    }

    pub async fn insert(&self, rows: &[UserLoginRow]) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let err = |source| SinkError::Client {
            url: self.cfg.url.clone(),
            context: format!(
                "inserting {} rows into {}",
                rows.len(),
                self.cfg.qualified_table()
            ),
            source,
        };
        let mut insert = self
            .client
            .insert::<UserLoginRow>(&self.cfg.table)
            .await
            .map_err(err)?;
        for row in rows {
            insert.write(row).await.map_err(err)?;
        }
        insert.end().await.map_err(err)
    }

    /// Stored rows of these ids with a `_version` below `below` and at or above the truncate
    /// watermark (to complete updates that left TOASTed columns out; [`fill_from_stored`] picks).
    pub async fn rows_below(
        &self,
        ids: &[i64],
        below: u64,
    ) -> Result<Vec<UserLoginRow>, SinkError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.client
            // Numbers only, so formatting them in is safe; 18.16 cannot bind an array to IN.
            .query(&format!(
                "SELECT ?fields FROM {} WHERE id IN ({}) AND _version < {below} \
                 AND _version >= (SELECT max(version) FROM {})",
                self.cfg.qualified_table(),
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
                self.cfg.qualified_truncates(),
            ))
            .fetch_all()
            .await
            .map_err(|source| SinkError::Client {
                url: self.cfg.url.clone(),
                context: "reading earlier rows for unchanged TOAST columns".into(),
                source,
            })
    }

    /// Records a truncate: every row with a `_version` below `version` is gone, whenever it
    /// arrives (the view filters on the highest recorded version). Recording it twice is harmless.
    pub async fn truncate_before(&self, version: u64) -> Result<(), SinkError> {
        self.client
            .query(&format!(
                "INSERT INTO {} (version) VALUES ({version})",
                self.cfg.qualified_truncates()
            ))
            .execute()
            .await
            .map_err(|source| SinkError::Client {
                url: self.cfg.url.clone(),
                context: "recording a truncate".into(),
                source,
            })
    }

    /// The highest recorded truncate version (0 when there was none).
    pub async fn truncate_watermark(&self) -> Result<u64, SinkError> {
        self.client
            .query(&format!(
                "SELECT max(version) FROM {}",
                self.cfg.qualified_truncates()
            ))
            .fetch_one()
            .await
            .map_err(|source| SinkError::Client {
                url: self.cfg.url.clone(),
                context: "reading the truncate watermark".into(),
                source,
            })
    }
}

/// A row whose update left TOASTed columns out, to be completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfilled {
    /// Its position in the batch.
    pub idx: usize,
    pub cols: Vec<String>,
    /// The id whose earlier state holds the values: its own, or after a key update the id it moved
    /// from.
    pub from: i64,
}

/// Whether `cand` (at batch position `cand_idx`) is an earlier state of `u`'s row: a stored row of
/// the id it takes its values from with a lower version, or the same version (one transaction)
/// earlier on the partition. A delete holds no values.
fn is_earlier(cand: &UserLoginRow, cand_idx: usize, u: &Unfilled, row: &UserLoginRow) -> bool {
    cand.id == u.from
        && cand._deleted == 0
        && (cand._version < row._version || (cand._version == row._version && cand_idx < u.idx))
}

/// Completes rows whose update did not carry some TOASTed columns from the newest earlier change
/// of the same id (or the id it moved from) in the batch, ignoring rows below the truncate
/// `watermark`; returns those with no such row, to be completed from the table
/// ([`fill_from_stored`]).
pub fn fill_from_batch(
    rows: &mut [UserLoginRow],
    mut unfilled: Vec<Unfilled>,
    watermark: u64,
) -> Vec<Unfilled> {
    // Oldest change first, so a row that is itself completed is complete before it is copied from.
    unfilled.sort_by_key(|u| (rows[u.idx]._version, u.idx));
    let mut rest = Vec::new();
    for u in unfilled {
        let best = rows
            .iter()
            .enumerate()
            .filter(|(i, r)| r._version >= watermark && is_earlier(r, *i, &u, &rows[u.idx]))
            .max_by_key(|(i, r)| (r._version, *i))
            .map(|(i, _)| i);
        match best {
            Some(prev) => {
                let prev = rows[prev].clone();
                copy_columns(&mut rows[u.idx], &prev, &u.cols);
            }
            None => rest.push(u),
        }
    }
    rest
}

/// Completes rows from the stored row of the id they take their values from with the greatest
/// `_version` strictly below theirs (`stored` holds only rows at or above the truncate
/// watermark); columns with no such row stay NULL.
pub fn fill_from_stored(rows: &mut [UserLoginRow], rest: &[Unfilled], stored: &[UserLoginRow]) {
    for u in rest {
        let version = rows[u.idx]._version;
        if let Some(prev) = stored
            .iter()
            .filter(|r| r.id == u.from && r._deleted == 0 && r._version < version)
            .max_by_key(|r| r._version)
        {
            copy_columns(&mut rows[u.idx], prev, &u.cols);
        }
    }
}

/// Keeps, of rows with the same id and the same version, only the last (the latest change of one
/// transaction): ClickHouse does not say which of equal versions in one insert survives.
pub fn keep_last_of_equal_versions(rows: &mut Vec<UserLoginRow>) {
    let mut last = std::collections::HashMap::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        last.insert((r.id, r._version), i);
    }
    if last.len() == rows.len() {
        return;
    }
    let mut i = 0;
    rows.retain(|r| {
        let keep = last[&(r.id, r._version)] == i;
        i += 1;
        keep
    });
}

fn copy_columns(row: &mut UserLoginRow, from: &UserLoginRow, cols: &[String]) {
    for c in cols {
        match c.as_str() {
            "username" => row.username = from.username.clone(),
            "event_type" => row.event_type = from.event_type.clone(),
            "event_time" => {
                row.event_time = from.event_time;
                row.event_time_us = from.event_time_us;
            }
            _ => {}
        }
    }
}

impl ClickHouseWriter {
    /// Stored versions and current rows, for `cdc-relay status`.
    pub async fn counts(&self) -> Result<(u64, u64), SinkError> {
        let err = |source| SinkError::Client {
            url: self.cfg.url.clone(),
            context: "counting rows".into(),
            source,
        };
        let raw: u64 = self
            .client
            .query(&format!(
                "SELECT count() FROM {}",
                self.cfg.qualified_table()
            ))
            .fetch_one()
            .await
            .map_err(err)?;
        let current: u64 = self
            .client
            .query(&format!(
                "SELECT count() FROM {}",
                self.cfg.qualified_view()
            ))
            .fetch_one()
            .await
            .map_err(err)?;
        Ok((raw, current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, version: u64, user: Option<&str>, event: &str) -> UserLoginRow {
        UserLoginRow {
            id,
            username: user.map(str::to_string),
            event_type: Some(event.into()),
            event_time: None,
            event_time_us: None,
            op: "update".into(),
            _lsn: "0/1".into(),
            _version: version,
            _deleted: 0,
        }
    }

    fn users(rows: &[UserLoginRow]) -> Vec<Option<&str>> {
        rows.iter().map(|r| r.username.as_deref()).collect()
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
                from: rows[i].id,
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
        assert_eq!(rows[1].username, None);
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
        deleted._deleted = 1;
        // Key update 1 -> 2 in one transaction (version 40): the delete of 1, then 2 with the
        // username left out.
        let mut rows = vec![row(1, 30, Some("big"), "x"), deleted, row(2, 40, None, "y")];
        let u = Unfilled {
            idx: 2,
            cols: vec!["username".to_string()],
            from: 1,
        };
        assert!(fill_from_batch(&mut rows, vec![u.clone()], 0).is_empty());
        assert_eq!(rows[2].username.as_deref(), Some("big"));
        let (stored, mut rows) = (
            vec![row(1, 30, Some("big"), "x")],
            vec![row(2, 40, None, "y")],
        );
        fill_from_stored(&mut rows, &[Unfilled { idx: 0, ..u }], &stored);
        assert_eq!(rows[0].username.as_deref(), Some("big"));
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
