//! The two JSON forms of a [`ChangeEvent`] (docs/message-format.md), written and read by hand so the
//! seed's form stays byte for byte what it was while the columns form carries any table.
//!
//! Seed form: `{"id","op","user","event","timestamp","event_time","lsn","version"[,"unchanged"]
//! [,"moved_from"][,"columns"]}`. Columns form: `{"op","lsn","version","columns"[,"unchanged"]
//! [,"moved_from"]}`. A reader tells them apart by the `user` field, which the seed form always has.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::{ChangeEvent, Columns, EventError, Op, Row, RowKey, SeedRow};

/// Serialises an event in its form.
pub(super) struct Out<'a>(pub &'a ChangeEvent);

/// `columns` as a JSON object, in the table's order.
struct ColumnsOut<'a>(&'a Columns);

impl Serialize for ColumnsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl Serialize for Out<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut map = s.serialize_map(None)?;
        match &e.row {
            Row::Seed(seed) => {
                if let Some(key) = &e.key {
                    map.serialize_entry("id", &key.to_json())?;
                }
                map.serialize_entry("op", &e.op)?;
                map.serialize_entry("user", &seed.user)?;
                map.serialize_entry("event", &seed.event)?;
                map.serialize_entry("timestamp", &seed.timestamp)?;
                map.serialize_entry("event_time", &seed.event_time)?;
                map.serialize_entry("lsn", &e.lsn)?;
                map.serialize_entry("version", &e.version)?;
                tail(&mut map, e)?;
                if !seed.extra.is_empty() {
                    map.serialize_entry("columns", &ColumnsOut(&seed.extra))?;
                }
            }
            Row::Columns(columns) => {
                map.serialize_entry("op", &e.op)?;
                map.serialize_entry("lsn", &e.lsn)?;
                map.serialize_entry("version", &e.version)?;
                map.serialize_entry("columns", &ColumnsOut(columns))?;
                tail(&mut map, e)?;
            }
        }
        map.end()
    }
}

fn tail<M: SerializeMap>(map: &mut M, e: &ChangeEvent) -> Result<(), M::Error> {
    if !e.unchanged.is_empty() {
        map.serialize_entry("unchanged", &e.unchanged)?;
    }
    if !e.json_null.is_empty() {
        map.serialize_entry("json_null", &e.json_null)?;
    }
    if let Some(from) = &e.moved_from {
        map.serialize_entry("moved_from", &from.to_json())?;
    }
    Ok(())
}

/// Every field of either form; which are present tells the form.
#[derive(Deserialize)]
struct In {
    #[serde(default)]
    id: Option<i64>,
    op: Op,
    /// `Some` when the field is there at all (the seed form), even as null.
    #[serde(default, deserialize_with = "present")]
    user: Option<Option<String>>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(default)]
    event_time: Option<String>,
    lsn: String,
    version: u64,
    #[serde(default)]
    unchanged: Vec<String>,
    #[serde(default)]
    json_null: Vec<String>,
    #[serde(default)]
    moved_from: Option<serde_json::Value>,
    #[serde(default)]
    columns: Option<ColumnsIn>,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A JSON object read into [`Columns`], keeping its order.
struct ColumnsIn(Columns);

impl<'de> Deserialize<'de> for ColumnsIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ColumnsIn;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of column values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<ColumnsIn, A::Error> {
                let mut columns = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(entry) = a.next_entry::<String, serde_json::Value>()? {
                    columns.push(entry);
                }
                Ok(ColumnsIn(columns))
            }
        }
        d.deserialize_map(V)
    }
}

fn key_of(value: serde_json::Value) -> RowKey {
    match value.as_i64() {
        Some(i) => RowKey::Int(i),
        None => RowKey::Json(value),
    }
}

pub(super) fn parse(bytes: &[u8]) -> Result<ChangeEvent, EventError> {
    let m: In = serde_json::from_slice(bytes)?;
    let columns = m.columns.map(|c| c.0);
    let row = match (m.user, columns) {
        (Some(user), extra) => Row::Seed(SeedRow {
            user,
            event: m.event,
            timestamp: m.timestamp,
            event_time: m.event_time,
            extra: extra.unwrap_or_default(),
        }),
        (None, Some(columns)) => Row::Columns(columns),
        (None, None) => {
            return Err(EventError::Invalid(
                "neither the seed's fields (user, event, timestamp) nor columns".into(),
            ))
        }
    };
    Ok(ChangeEvent {
        key: m.id.map(RowKey::Int),
        op: m.op,
        row,
        lsn: m.lsn,
        version: m.version,
        unchanged: m.unchanged,
        json_null: m.json_null,
        moved_from: m.moved_from.map(key_of),
        schema: None,
    })
}
