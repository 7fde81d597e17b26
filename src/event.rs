//! The change event and its wire format (JSON on Kafka), shared by `stream` and `sink`.
//!
//! This module knows neither PostgreSQL nor Kafka nor ClickHouse: the source builds [`ChangeEvent`]s,
//! the producer ships [`ChangeEvent::to_json`], the sink reads them back with [`ChangeEvent::from_json`].
//! docs/message-format.md is the reference for the format and carries its JSON Schema.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::types::datetime::{civil_from_days, days_from_civil};

mod wire;

/// The Kafka header that names the [`crate::types::RelationSchema`] of a change message by its
/// id ([`crate::types::RelationSchema::id`]); the record itself is in the schemas topic.
pub const SCHEMA_HEADER: &str = "cdc_relay.schema";

/// The compacted topic that holds the schema records of `topic`'s messages, keyed by schema id.
/// The stream writes a record (and waits for Kafka's acknowledgement) before the first message
/// that names it.
pub fn schemas_topic(topic: &str) -> String {
    format!("{topic}.schemas")
}

/// A PostgreSQL WAL position. Printed as PostgreSQL prints it (`16/B374D848`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EventError::Invalid(format!("not an LSN: {s:?}"));
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The row as read by the backfill (it existed, unsent, before the slot did).
    Snapshot,
    Insert,
    Update,
    Delete,
    /// The whole table was truncated; carries no row.
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// The primary key of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowKey {
    /// One integer column (smallint, integer, bigint). The ledger and the backfill key rows by it,
    /// and the seed's messages carry it as `id`.
    Int(i64),
    /// Any other key: one column's message value (a uuid or text as a string, a numeric as its
    /// exact text, …), or for a composite key an object of the key columns in key order.
    Json(serde_json::Value),
}

impl RowKey {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            RowKey::Int(i) => Some(*i),
            RowKey::Json(_) => None,
        }
    }

    /// The Kafka message key: a scalar key as its text (`42`, `9b2f…-…`), a composite key as
    /// compact JSON (`{"tenant":3,"id":"a"}`), so every change of a row lands in one partition.
    pub fn kafka_key(&self) -> String {
        match self {
            RowKey::Int(i) => i.to_string(),
            RowKey::Json(serde_json::Value::String(s)) => s.clone(),
            RowKey::Json(v) => v.to_string(),
        }
    }

    /// As it appears in a message (`moved_from`).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            RowKey::Int(i) => (*i).into(),
            RowKey::Json(v) => v.clone(),
        }
    }
}

/// A column's name and its value in the message (docs/type-mapping.md), in the table's order.
pub type Columns = Vec<(String, serde_json::Value)>;

/// The row a change carries, in one of the two message forms.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// The seed's form, for a table of the seed's shape (`user_logins`): its consumers keep
    /// reading `user`, `event` and `timestamp`.
    Seed(SeedRow),
    /// Every column under its PostgreSQL name (any other table).
    Columns(Columns),
}

/// The seed's fields. `timestamp` is epoch seconds as a float (as in the seed), and `event_time`
/// the same instant as text with full microsecond precision, which a float cannot promise for
/// every date.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeedRow {
    pub user: Option<String>,
    pub event: Option<String>,
    pub timestamp: Option<f64>,
    /// `YYYY-MM-DDTHH:MM:SS[.ffffff]` (no zone: the column is `timestamp without time zone`),
    /// or PostgreSQL's `infinity` / `-infinity`.
    pub event_time: Option<String>,
    /// Columns a user added to the seed's table, under their PostgreSQL names (`columns`; absent
    /// while there are none, so the seed's messages stay as they were).
    pub extra: Columns,
}

/// One change of one row, in the shape that travels on the topic (docs/message-format.md).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// The primary key; also the Kafka message key. Absent only for `truncate` (and, in the
    /// columns form as read back, where it is the key columns of `row`).
    pub key: Option<RowKey>,
    pub op: Op,
    pub row: Row,
    /// WAL position of the change (for `snapshot`, the position the row was read at).
    pub lsn: String,
    /// Orders the changes of one key: later change, larger or equal version. A streamed change
    /// carries its transaction's commit position (so changes order as their transactions
    /// committed); a `snapshot` row the position it was read at, so it wins over every change
    /// committed before the read and loses to every one after. Changes of one row inside one
    /// transaction share a version and keep their order on the partition. docs/message-format.md.
    pub version: u64,
    /// Columns whose value PostgreSQL did not send because it is TOASTed and unchanged by this update;
    /// their values are null and must not be read as NULL.
    pub unchanged: Vec<String>,
    /// json/jsonb columns whose value is JSON's `null` literal, not SQL NULL: their value in the
    /// message is `null` like a NULL's, and this list tells them apart.
    pub json_null: Vec<String>,
    /// For an `update` that changed the primary key: the old key (a `delete` of it comes just
    /// before). Columns listed in `unchanged` hold that row's values.
    pub moved_from: Option<RowKey>,
    /// The table's schema: not in the JSON value, its id travels as the [`SCHEMA_HEADER`]. `None`
    /// for events read back from a message.
    pub schema: Option<std::sync::Arc<crate::types::RelationSchema>>,
}

/// Where a change stands in the stream's output, in the order the stream produces: its
/// transaction's commit position (for a backfilled row, its chunk's watermark) and its index there.
/// A restarted stream that replays changes drops those at or below the last committed checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeOrder {
    pub lsn: Lsn,
    pub index: u32,
}

/// The record `stream --exactly-once` commits with each Kafka transaction, in a compacted
/// checkpoint topic keyed by its transactional id: how far the committed output reaches, and the
/// backfilled rows it holds that the ledger may not have recorded yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCheckpoint {
    /// `X/Y` of [`ChangeOrder::lsn`].
    pub lsn: String,
    pub index: u32,
    /// Ranges `[lo, hi]` of ids of backfilled rows in committed transactions, not yet in the
    /// ledger when this checkpoint was written: of the stream's first table.
    #[serde(default)]
    pub backfill_unrecorded: Vec<[i64; 2]>,
    /// The table of [`Self::backfill_unrecorded`] (`schema.table`); absent in checkpoints of
    /// earlier releases, whose one table it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill_unrecorded_table: Option<String>,
    /// The same for the stream's other tables, by `schema.table`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub backfill_unrecorded_of: std::collections::BTreeMap<String, Vec<[i64; 2]>>,
}

/// Sorted, deduplicated ids as ranges `[lo, hi]` of consecutive ids.
fn id_ranges(mut ids: Vec<i64>) -> Vec<[i64; 2]> {
    ids.sort_unstable();
    ids.dedup();
    let mut ranges: Vec<[i64; 2]> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some(r) if r[1].checked_add(1) == Some(id) => r[1] = id,
            _ => ranges.push([id, id]),
        }
    }
    ranges
}

fn range_ids(ranges: &[[i64; 2]]) -> impl Iterator<Item = i64> + '_ {
    ranges
        .iter()
        .filter(|[lo, hi]| lo <= hi && hi - lo < 10_000_000)
        .flat_map(|[lo, hi]| *lo..=*hi)
}

impl StreamCheckpoint {
    /// `backfill_unrecorded`: (`schema.table`, id) of rows; those of `first` (the stream's first
    /// table) go where earlier releases kept them.
    pub fn new(
        order: ChangeOrder,
        backfill_unrecorded: impl IntoIterator<Item = (String, i64)>,
        first: &str,
    ) -> Self {
        let mut by_table: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
        for (table, id) in backfill_unrecorded {
            by_table.entry(table).or_default().push(id);
        }
        let first_ids = by_table.remove(first).unwrap_or_default();
        StreamCheckpoint {
            lsn: order.lsn.to_string(),
            index: order.index,
            backfill_unrecorded_table: (!first_ids.is_empty()).then(|| first.to_string()),
            backfill_unrecorded: id_ranges(first_ids),
            backfill_unrecorded_of: by_table
                .into_iter()
                .map(|(t, ids)| (t, id_ranges(ids)))
                .collect(),
        }
    }

    pub fn order(&self) -> Result<ChangeOrder, EventError> {
        Ok(ChangeOrder {
            lsn: self.lsn.parse()?,
            index: self.index,
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, EventError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// (`schema.table`, id) of every backfilled row the checkpoint names; `first` is the table
    /// of [`Self::backfill_unrecorded`].
    pub fn backfill_rows(&self, first: &str) -> Vec<(String, i64)> {
        // Named in the checkpoint, so a reordered --table cannot move them to another table.
        let table = self.backfill_unrecorded_table.as_deref().unwrap_or(first);
        let mut rows: Vec<(String, i64)> = range_ids(&self.backfill_unrecorded)
            .map(|id| (table.to_string(), id))
            .collect();
        for (table, ranges) in &self.backfill_unrecorded_of {
            rows.extend(range_ids(ranges).map(|id| (table.clone(), id)));
        }
        rows
    }
}

/// A change the stream could not relay (too large for the topic, a value it cannot encode). It goes
/// to the stream's dead-letter topic so the rows behind it keep moving (docs/message-format.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamDeadLetter {
    /// `schema.table`.
    pub table: String,
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// The Kafka key of a row whose key is not one integer (`id` is absent then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub lsn: String,
    pub version: u64,
    /// Why it could not be relayed.
    pub error: String,
    /// The row as JSON text, cut to what fits (`row_truncated` says so).
    pub row: Option<String>,
    #[serde(default)]
    pub row_truncated: bool,
}

impl StreamDeadLetter {
    /// The row's key, as far as the dead letter names it.
    pub fn row_key(&self) -> Option<RowKey> {
        self.id
            .map(RowKey::Int)
            .or_else(|| self.key.clone().map(|k| RowKey::Json(k.into())))
    }

    /// For an event that could not be produced: the event itself is the row.
    pub fn of_event(event: &ChangeEvent, table: &str, error: String) -> Self {
        StreamDeadLetter {
            table: table.to_string(),
            op: event.op,
            id: event.id(),
            key: event
                .key
                .as_ref()
                .filter(|k| k.as_int().is_none())
                .map(RowKey::kafka_key),
            lsn: event.lsn.clone(),
            version: event.version,
            error,
            row: Some(String::from_utf8_lossy(&event.to_json()).into_owned()),
            row_truncated: false,
        }
    }

    /// The JSON of the dead letter, no longer than `limit` bytes if the row can be cut to fit.
    pub fn to_json(&self, limit: usize) -> Vec<u8> {
        let full = serde_json::to_vec(self).unwrap_or_default();
        if full.len() <= limit {
            return full;
        }
        let mut cut = self.clone();
        cut.row_truncated = true;
        let row = self.row.as_deref().unwrap_or("");
        let overhead = full.len() - row.len() + 64;
        let mut keep = limit.saturating_sub(overhead).min(row.len());
        while !row.is_char_boundary(keep) {
            keep -= 1;
        }
        cut.row = Some(row[..keep].to_string());
        serde_json::to_vec(&cut).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("message is not a valid change event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("message is not a valid change event: {0}")]
    Invalid(String),
}

impl ChangeEvent {
    /// The integer key (the seed's `id`): what the ledger and the backfill key rows by.
    pub fn id(&self) -> Option<i64> {
        self.key.as_ref().and_then(RowKey::as_int)
    }

    /// The Kafka key ([`RowKey::kafka_key`]).
    pub fn key(&self) -> Option<String> {
        self.key.as_ref().map(RowKey::kafka_key)
    }

    /// The seed's fields, when the event is in the seed's form.
    pub fn seed(&self) -> Option<&SeedRow> {
        match &self.row {
            Row::Seed(s) => Some(s),
            Row::Columns(_) => None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain owned data with finite floats cannot fail.
        serde_json::to_vec(&wire::Out(self)).unwrap_or_default()
    }

    /// Parses and validates a message: an event that reaches the sink is internally consistent.
    /// In the columns form the key is not in the value (it is the message key and the key columns
    /// of the row, which only the table's schema names), so `key` stays `None` there.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EventError> {
        Self::from_json_with_time(bytes).map(|(event, _)| event)
    }

    /// [`Self::from_json`], also returning [`Self::event_time_micros`], which validating the
    /// event computed anyway (the sink needs both; parsing the time twice was a measurable cost).
    pub fn from_json_with_time(bytes: &[u8]) -> Result<(Self, Option<i64>), EventError> {
        let event = wire::parse(bytes)?;
        if event.op != Op::Truncate && event.key.is_none() && event.seed().is_some() {
            return Err(EventError::Invalid(format!(
                "op {} without id",
                event.op.as_str()
            )));
        }
        event.lsn.parse::<Lsn>()?;
        let micros = event.try_event_time_micros()?;
        Ok((event, micros))
    }

    /// Microseconds since the Unix epoch of `event_time` (falling back to `timestamp`);
    /// `None` for NULL or infinite times, and for the columns form.
    pub fn event_time_micros(&self) -> Option<i64> {
        self.try_event_time_micros().ok().flatten()
    }

    fn try_event_time_micros(&self) -> Result<Option<i64>, EventError> {
        let Some(seed) = self.seed() else {
            return Ok(None);
        };
        match &seed.event_time {
            Some(t) => parse_event_time(t),
            None => Ok(seed.timestamp.map(|s| (s * 1_000_000.0).round() as i64)),
        }
    }
}

/// Parses PostgreSQL's ISO text of a `timestamp` (with `T` or space between date and time, an
/// optional fraction and an optional ` BC`) into microseconds since the epoch.
/// `Ok(None)` is returned for `infinity` and `-infinity`.
pub fn parse_event_time(text: &str) -> Result<Option<i64>, EventError> {
    if text == "infinity" || text == "-infinity" {
        return Ok(None);
    }
    let bad = || EventError::Invalid(format!("not a timestamp: {text:?}"));
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    let (date, time) = text.split_once(['T', ' ']).ok_or_else(bad)?;
    let mut d = date.rsplitn(3, '-');
    let day: u32 = d.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let month: u32 = d.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let year: i64 = d.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let year = if bc { 1 - year } else { year };
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, frac),
        None => (time, ""),
    };
    let mut t = hms.split(':');
    let h: i64 = t.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let m: i64 = t.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let s: i64 = t.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    if t.next().is_some()
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || h > 24
        || m > 59
        || s > 60
        || frac.len() > 6
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || year.abs() > 300_000
    {
        return Err(bad());
    }
    let micros: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<i64>().map_err(|_| bad())? * 10i64.pow(6 - frac.len() as u32)
    };
    let days = days_from_civil(year, i64::from(month), i64::from(day));
    Ok(Some(
        ((days * 86_400 + h * 3_600 + m * 60 + s) * 1_000_000) + micros,
    ))
}

/// Formats microseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.ffffff` (proleptic Gregorian).
pub fn format_event_time(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(i128::from(days));
    let base = format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
    if frac == 0 {
        base
    } else {
        format!("{base}.{frac:06}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips() {
        let lsn = Lsn(0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), lsn);
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    #[test]
    fn timestamps_keep_microseconds() {
        let us = parse_event_time("2023-01-01 00:00:00.123456")
            .unwrap()
            .unwrap();
        assert_eq!(us, 1_672_531_200_123_456);
        assert_eq!(format_event_time(us), "2023-01-01T00:00:00.123456");
        assert_eq!(parse_event_time("1970-01-01T00:00:00").unwrap(), Some(0));
        assert_eq!(
            parse_event_time("1969-12-31 23:59:59.5").unwrap(),
            Some(-500_000)
        );
        assert_eq!(format_event_time(-500_000), "1969-12-31T23:59:59.500000");
        assert_eq!(parse_event_time("infinity").unwrap(), None);
        assert!(parse_event_time("2023-13-01 00:00:00").is_err());
        assert!(parse_event_time("yesterday").is_err());
        // The float the seed uses survives the JSON round trip to the microsecond.
        let f = us as f64 / 1e6;
        let back: f64 = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!((back * 1e6).round() as i64, us);
    }

    #[test]
    fn bc_dates_parse() {
        let us = parse_event_time("0001-01-01 00:00:00 BC").unwrap().unwrap();
        assert_eq!(format_event_time(us), "0000-01-01T00:00:00");
    }

    #[test]
    fn checkpoints_round_trip_with_id_ranges() {
        let order = ChangeOrder {
            lsn: Lsn(0x1_0000_0010),
            index: 3,
        };
        let rows = [5, 1, 2, 3, 9, 2].map(|id| ("public.t".to_string(), id));
        let cp = StreamCheckpoint::new(order, rows, "public.t");
        assert_eq!(cp.backfill_unrecorded, vec![[1, 3], [5, 5], [9, 9]]);
        // The first table's rows are where earlier releases wrote and read them.
        assert!(!String::from_utf8(cp.to_json())
            .unwrap()
            .contains("backfill_unrecorded_of"));
        let back = StreamCheckpoint::from_json(&cp.to_json()).unwrap();
        assert_eq!(back.backfill_rows("other.first")[0].0, "public.t");
        assert_eq!(back.order().unwrap(), order);
        let ids: Vec<i64> = back
            .backfill_rows("public.t")
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(ids, vec![1, 2, 3, 5, 9]);
        let two = StreamCheckpoint::new(
            order,
            [
                ("a.x".to_string(), 1),
                ("b.y".to_string(), 7),
                ("b.y".to_string(), 8),
            ],
            "a.x",
        );
        let back = StreamCheckpoint::from_json(&two.to_json()).unwrap();
        assert_eq!(
            back.backfill_rows("a.x"),
            vec![("a.x".into(), 1), ("b.y".into(), 7), ("b.y".into(), 8)]
        );
        assert!(
            order
                > ChangeOrder {
                    lsn: Lsn(0x1_0000_0010),
                    index: 2
                }
        );
        assert!(
            order
                < ChangeOrder {
                    lsn: Lsn(0x1_0000_0011),
                    index: 0
                }
        );
    }

    #[test]
    fn dead_letters_are_cut_to_fit() {
        let dl = StreamDeadLetter {
            table: "public.t".into(),
            op: Op::Insert,
            id: Some(1),
            key: None,
            lsn: "0/1".into(),
            version: 1,
            error: "too large".into(),
            row: Some("é".repeat(10_000)),
            row_truncated: false,
        };
        let json = dl.to_json(1000);
        assert!(json.len() <= 1000, "{}", json.len());
        let back: StreamDeadLetter = serde_json::from_slice(&json).unwrap();
        assert!(back.row_truncated && back.row.unwrap().starts_with("éé"));
        assert!(
            !serde_json::from_slice::<StreamDeadLetter>(&dl.to_json(1 << 20))
                .unwrap()
                .row_truncated
        );
    }

    #[test]
    fn json_round_trip_and_validation() {
        let e = ChangeEvent {
            key: Some(RowKey::Int(7)),
            op: Op::Insert,
            row: Row::Seed(SeedRow {
                user: Some("ü ser".into()),
                event: None,
                timestamp: Some(1.5),
                event_time: Some("1970-01-01T00:00:01.5".into()),
                extra: vec![],
            }),
            lsn: "0/16B3748".into(),
            version: 42,
            unchanged: vec![],
            json_null: vec![],
            moved_from: None,
            schema: None,
        };
        let json = e.to_json();
        // The seed's form, byte for byte as earlier releases wrote it.
        assert_eq!(
            String::from_utf8(json.clone()).unwrap(),
            r#"{"id":7,"op":"insert","user":"ü ser","event":null,"timestamp":1.5,"event_time":"1970-01-01T00:00:01.5","lsn":"0/16B3748","version":42}"#
        );
        assert_eq!(ChangeEvent::from_json(&json).unwrap(), e);
        assert!(ChangeEvent::from_json(b"not json").is_err());
        assert!(ChangeEvent::from_json(br#"{"op":"insert","user":null,"event":null,"timestamp":null,"event_time":null,"lsn":"0/1","version":1}"#).is_err());
        assert!(ChangeEvent::from_json(br#"{"id":"x","op":"insert"}"#).is_err());
        assert!(ChangeEvent::from_json(br#"{"op":"insert","lsn":"0/1","version":1}"#).is_err());
    }

    #[test]
    fn columns_form_keeps_the_table_order_and_every_value() {
        let columns: Columns = vec![
            ("tenant".into(), 3.into()),
            ("id".into(), "a-b".into()),
            ("op".into(), "a column named op".into()),
            ("n".into(), serde_json::json!("12345678901234567890.5")),
            ("doc".into(), serde_json::json!({"z": 1, "a": [null]})),
        ];
        let e = ChangeEvent {
            key: Some(RowKey::Json(serde_json::json!({"tenant": 3, "id": "a-b"}))),
            op: Op::Update,
            row: Row::Columns(columns.clone()),
            lsn: "0/10".into(),
            version: 16,
            unchanged: vec!["doc".into()],
            json_null: vec![],
            moved_from: Some(RowKey::Json(serde_json::json!({"tenant": 3, "id": "old"}))),
            schema: None,
        };
        let json = String::from_utf8(e.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"op":"update","lsn":"0/10","version":16,"columns":{"tenant":3,"id":"a-b","op":"a column named op","n":"12345678901234567890.5","doc":{"a":[null],"z":1}},"unchanged":["doc"],"moved_from":{"id":"old","tenant":3}}"#
        );
        assert_eq!(e.key().as_deref(), Some(r#"{"id":"a-b","tenant":3}"#));
        let back = ChangeEvent::from_json(json.as_bytes()).unwrap();
        assert_eq!(back.row, Row::Columns(columns));
        assert_eq!(back.key, None, "the key of the columns form is in its row");
        assert_eq!(back.moved_from, e.moved_from);
        assert_eq!(RowKey::Json("9b2f".into()).kafka_key(), "9b2f");
        assert_eq!(RowKey::Int(-4).kafka_key(), "-4");
    }

    #[test]
    fn columns_a_user_added_to_the_seed_table_follow_its_fields() {
        let e = ChangeEvent {
            key: Some(RowKey::Int(1)),
            op: Op::Insert,
            row: Row::Seed(SeedRow {
                extra: vec![("country".into(), "NL".into())],
                ..Default::default()
            }),
            lsn: "0/1".into(),
            version: 1,
            unchanged: vec![],
            json_null: vec![],
            moved_from: Some(RowKey::Int(0)),
            schema: None,
        };
        let json = String::from_utf8(e.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"id":1,"op":"insert","user":null,"event":null,"timestamp":null,"event_time":null,"lsn":"0/1","version":1,"moved_from":0,"columns":{"country":"NL"}}"#
        );
        assert_eq!(ChangeEvent::from_json(json.as_bytes()).unwrap(), e);
    }
}
