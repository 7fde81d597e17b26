//! Turns a `user_logins` row, as pgoutput or the backfill query delivers it (text values), into a
//! [`ChangeEvent`]. Both paths go through [`RowText`] so a row reads the same whichever way it came.

use crate::event::{
    format_event_time, parse_event_time, ChangeEvent, Lsn, Op, Row, RowKey, SeedRow,
};

use super::pgoutput::{Relation, Value};
use super::SourceError;

/// The column values of one row, as text; `None` is SQL NULL.
#[derive(Debug, Default)]
pub struct RowText<'a> {
    pub id: Option<&'a str>,
    pub username: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub event_time: Option<&'a str>,
    /// Columns PostgreSQL did not send (unchanged TOAST).
    pub unchanged: Vec<&'static str>,
}

/// Where the columns the event needs sit in a relation's column list.
#[derive(Debug, Clone)]
pub struct TableShape {
    id: usize,
    username: Option<usize>,
    event_type: Option<usize>,
    event_time: Option<usize>,
}

impl TableShape {
    pub fn of(relation: &Relation) -> Result<Self, SourceError> {
        let find = |name: &str| relation.columns.iter().position(|c| c.name == name);
        let id = find("id").ok_or_else(|| SourceError::Schema {
            table: format!("{}.{}", relation.namespace, relation.name),
            reason: "the replication stream carries no `id` column".into(),
        })?;
        Ok(TableShape {
            id,
            username: find("username"),
            event_type: find("event_type"),
            event_time: find("event_time"),
        })
    }

    /// The primary key's value in a tuple.
    pub fn key<'a>(&self, values: &'a [Value]) -> Option<&'a Value> {
        values.get(self.id)
    }

    /// The primary key as text, when the tuple has it.
    pub fn key_text<'a>(&self, values: &'a [Value]) -> Option<&'a str> {
        self.key(values).and_then(Value::as_text)
    }

    /// The tuple as JSON text for a dead letter: each column's text (lossy UTF-8), `null`, or
    /// `"(unchanged)"`, so an operator can see what could not be relayed.
    pub fn describe(&self, values: &[Value]) -> String {
        let mut row = serde_json::Map::new();
        let names = [
            ("id", Some(self.id)),
            ("username", self.username),
            ("event_type", self.event_type),
            ("event_time", self.event_time),
        ];
        for (name, idx) in names {
            let v = match idx.and_then(|i| values.get(i)) {
                None | Some(Value::Null) => serde_json::Value::Null,
                Some(Value::UnchangedToast) => "(unchanged)".into(),
                Some(Value::Text(b) | Value::Binary(b)) => {
                    String::from_utf8_lossy(b).into_owned().into()
                }
            };
            row.insert(name.to_string(), v);
        }
        serde_json::Value::Object(row).to_string()
    }

    /// Reads a tuple. Non-text values cannot occur (the stream is started in text mode) and are
    /// reported instead of being misread.
    pub fn row<'a>(&self, values: &'a [Value]) -> Result<RowText<'a>, SourceError> {
        let mut row = RowText::default();
        let mut get =
            |idx: Option<usize>, name: &'static str| -> Result<Option<&'a str>, SourceError> {
                let Some(idx) = idx else { return Ok(None) };
                match values.get(idx) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::UnchangedToast) => {
                        row.unchanged.push(name);
                        Ok(None)
                    }
                    Some(v @ Value::Text(_)) => {
                        v.as_text().map(Some).ok_or_else(|| SourceError::Value {
                            column: name,
                            reason: "text value is not UTF-8".into(),
                        })
                    }
                    Some(Value::Binary(_)) => Err(SourceError::Value {
                        column: name,
                        reason: "binary value in a text-mode stream".into(),
                    }),
                }
            };
        let id = get(Some(self.id), "id")?;
        let username = get(self.username, "username")?;
        let event_type = get(self.event_type, "event_type")?;
        let event_time = get(self.event_time, "event_time")?;
        row.id = id;
        row.username = username;
        row.event_type = event_type;
        row.event_time = event_time;
        Ok(row)
    }
}

/// Builds the event for one row change. `version` orders changes of the same id (see event.rs).
pub fn change_event(
    op: Op,
    row: &RowText<'_>,
    lsn: Lsn,
    version: u64,
) -> Result<ChangeEvent, SourceError> {
    let id = row
        .id
        .ok_or(SourceError::Value {
            column: "id",
            reason: "NULL primary key".into(),
        })?
        .parse::<i64>()
        .map_err(|e| SourceError::Value {
            column: "id",
            reason: e.to_string(),
        })?;
    let (timestamp, event_time) = match row.event_time {
        None => (None, None),
        Some(text) => match parse_event_time(text).map_err(|e| SourceError::Value {
            column: "event_time",
            reason: e.to_string(),
        })? {
            Some(us) => (Some(us as f64 / 1e6), Some(format_event_time(us))),
            None => (None, Some(text.to_string())),
        },
    };
    Ok(ChangeEvent {
        key: Some(RowKey::Int(id)),
        op,
        row: Row::Seed(SeedRow {
            user: row.username.map(str::to_string),
            event: row.event_type.map(str::to_string),
            timestamp,
            event_time,
            extra: Vec::new(),
        }),
        lsn: lsn.to_string(),
        version,
        unchanged: row.unchanged.iter().map(|s| s.to_string()).collect(),
        moved_from: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_seed_fields() {
        let row = RowText {
            id: Some("3"),
            username: Some("user3"),
            event_type: Some("login"),
            event_time: Some("2023-01-01 00:00:00.000001"),
            unchanged: vec![],
        };
        let e = change_event(Op::Insert, &row, Lsn(0x100), 0x100).unwrap();
        assert_eq!(e.id(), Some(3));
        let seed = e.seed().unwrap();
        assert_eq!(seed.user.as_deref(), Some("user3"));
        assert_eq!(seed.timestamp, Some(1_672_531_200.000_001));
        assert_eq!(
            seed.event_time.as_deref(),
            Some("2023-01-01T00:00:00.000001")
        );
        assert_eq!(e.lsn, "0/100");
        let bad = RowText {
            id: Some("x"),
            ..Default::default()
        };
        assert!(change_event(Op::Insert, &bad, Lsn(1), 1).is_err());
    }
}
