//! One change event as a row of the ClickHouse table.

use std::sync::Arc;

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use crate::event::{self, ChangeEvent, Op};

/// The stored row. Field names are the column names (the insert names them explicitly).
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct UserLoginRow {
    /// `Int64`, like PostgreSQL's bigint. Tables of earlier releases have `UInt64`: the same bytes
    /// for every id >= 0, which is all that is written there (see [`RowError::NegativeId`]).
    pub id: i64,
    pub username: Option<String>,
    pub event_type: Option<String>,
    /// Seconds since the epoch, for a `DateTime` column: its range is 1970..2106, so times outside
    /// it are stored as NULL here and kept exactly in `event_time_us`.
    pub event_time: Option<u32>,
    /// Microseconds since the epoch: the exact value, whatever the date.
    pub event_time_us: Option<i64>,
    pub op: String,
    pub _lsn: String,
    pub _version: u64,
    pub _deleted: u8,
}

/// A seed row in a batch, with the columns a user added to the seed's table (ClickHouse column,
/// JSON text of the value; `null` for NULL). A column the message did not carry (an older schema,
/// a delete) is not listed, so the insert leaves it at its default.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRow {
    pub row: UserLoginRow,
    pub extra: Cells,
}

/// ClickHouse column and JSON text of its value, per column.
pub type Cells = Vec<(Arc<str>, String)>;

impl SeedRow {
    pub fn plain(row: UserLoginRow) -> Self {
        SeedRow {
            row,
            extra: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    #[error("id {0} is negative and the table's id column is UInt64 (created by an earlier cdc-relay release, which stored only ids >= 0); to store negative ids, point --clickhouse-table at a new table (the sink creates it with id Int64) and copy the rows over with INSERT INTO new SELECT * FROM old")]
    NegativeId(i64),
    #[error("op {0} carries no row")]
    NoRow(&'static str),
    #[error("the message is not in the seed's form (it has no user, event and timestamp fields)")]
    NotSeed,
}

impl UserLoginRow {
    /// The row of `event`, whose time in microseconds is already known; moves the strings out.
    pub fn from_parts(event: ChangeEvent, micros: Option<i64>) -> Result<Self, RowError> {
        let id = event.id().ok_or(RowError::NoRow(event.op.as_str()))?;
        let event::Row::Seed(seed) = event.row else {
            return Err(RowError::NotSeed);
        };
        let seconds = micros.and_then(|us| u32::try_from(us.div_euclid(1_000_000)).ok());
        Ok(UserLoginRow {
            id,
            username: seed.user,
            event_type: seed.event,
            event_time: seconds,
            event_time_us: micros,
            op: event.op.as_str().to_string(),
            _lsn: event.lsn,
            _version: event.version,
            _deleted: u8::from(event.op == Op::Delete),
        })
    }

    /// Refuses what the table cannot hold: a negative id in a table whose id is unsigned.
    pub fn check_storable(&self, unsigned_id: bool) -> Result<(), RowError> {
        if unsigned_id && self.id < 0 {
            return Err(RowError::NegativeId(self.id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_of(e: &ChangeEvent) -> Result<UserLoginRow, RowError> {
        UserLoginRow::from_parts(e.clone(), e.event_time_micros())
    }

    fn event(op: Op, id: Option<i64>) -> ChangeEvent {
        ChangeEvent {
            key: id.map(crate::event::RowKey::Int),
            op,
            row: event::Row::Seed(crate::event::SeedRow {
                user: Some("u".into()),
                event: None,
                timestamp: Some(1.000001),
                event_time: Some("1970-01-01T00:00:01.000001".into()),
                extra: vec![],
            }),
            lsn: "0/1".into(),
            version: 9,
            unchanged: vec![],
            json_null: vec![],
            moved_from: None,
            schema: None,
        }
    }

    #[test]
    fn maps_fields_and_deletes() {
        let row = row_of(&event(Op::Insert, Some(5))).unwrap();
        assert_eq!(
            (row.id, row.event_time, row.event_time_us),
            (5, Some(1), Some(1_000_001))
        );
        assert_eq!(row._deleted, 0);
        assert_eq!(row_of(&event(Op::Delete, Some(5))).unwrap()._deleted, 1);
        let negative = row_of(&event(Op::Insert, Some(-1))).unwrap();
        assert_eq!(negative.id, -1);
        assert_eq!(negative.check_storable(false), Ok(()));
        assert_eq!(negative.check_storable(true), Err(RowError::NegativeId(-1)));
        assert!(RowError::NegativeId(-1).to_string().contains("UInt64"));
        assert_eq!(
            row_of(&event(Op::Insert, Some(0)))
                .unwrap()
                .check_storable(true),
            Ok(())
        );
        assert!(row_of(&event(Op::Truncate, None)).is_err());
    }

    #[test]
    fn times_before_1970_keep_microseconds_only() {
        let mut e = event(Op::Insert, Some(1));
        if let event::Row::Seed(seed) = &mut e.row {
            seed.event_time = Some("1900-01-01T00:00:00".into());
        }
        let row = row_of(&e).unwrap();
        assert_eq!(row.event_time, None);
        assert_eq!(row.event_time_us, Some(-2_208_988_800_000_000));
    }
}
