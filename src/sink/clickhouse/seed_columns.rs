//! Columns a user added to the seed's table (`user_logins`). Its messages keep the seed's form, with
//! the added columns under `columns`; the ClickHouse table keeps the seed's layout (which earlier
//! releases and the seed's readers rely on) and gains one column per added one, planned like any
//! table's ([`super::evolve`]): `ADD COLUMN` with PostgreSQL's default for the rows already there,
//! widening, renames, and a refusal for what cannot be converted.

use std::collections::HashMap;
use std::sync::Arc;

use crate::event::Columns;
use crate::types::{clickhouse_json_text, RelationSchema, ServerCaps};

use super::evolve::{plan, Change, Refusal, Stored};
use super::schema::ServerVersion;
use super::table::{column_type, is_meta, Column, GenericRowError, TableNames};
use super::tables::{Applied, ApplyOutcome, GenericWriter};
use super::{schema, ClickHouseConfig, SinkError};

/// The seed's columns whose values travel under the seed's own field names.
const SEED_SOURCE: [&str; 3] = ["username", "event_type", "event_time"];

/// The seed layout's ClickHouse columns besides `id` and the sink's underscored ones: an added
/// column of one of these names would collide.
const SEED_FIXED: [&str; 5] = [
    "username",
    "event_type",
    "event_time",
    "event_time_us",
    "op",
];

/// How one schema's added columns are written.
#[derive(Debug, Clone)]
pub struct AddedColumns {
    /// By PostgreSQL name.
    columns: HashMap<String, Column>,
    caps: ServerCaps,
}

/// An added column's cells of one row, and its unchanged columns as ClickHouse names.
pub type AddedCells = (Vec<(Arc<str>, String)>, Vec<String>);

impl AddedColumns {
    /// The cells of `extra` (a message's `columns`), leaving out unchanged TOAST values; and
    /// `unchanged` with each added column under its ClickHouse name (seed columns as they are).
    pub fn cells(
        &self,
        extra: &Columns,
        unchanged: &[String],
    ) -> Result<AddedCells, GenericRowError> {
        let caps = self.caps;
        let column = |name: &str| {
            self.columns
                .get(name)
                .ok_or_else(|| GenericRowError::UnknownColumn {
                    table: "the seed's table".into(),
                    column: name.to_string(),
                })
        };
        let mut cells = Vec::with_capacity(extra.len());
        for (name, value) in extra {
            let col = column(name)?;
            if value.is_null() && unchanged.iter().any(|u| u == name) {
                continue;
            }
            let text =
                clickhouse_json_text(&col.kind, value, caps).map_err(|e| e.in_column(name))?;
            cells.push((col.ch_name.clone(), text));
        }
        let unchanged = unchanged
            .iter()
            .map(|u| {
                if SEED_SOURCE.contains(&u.as_str()) {
                    Ok(u.clone())
                } else {
                    column(u).map(|c| c.ch_name.to_string())
                }
            })
            .collect::<Result<_, _>>()?;
        Ok((cells, unchanged))
    }
}

/// Whether a column of the seed's ClickHouse table (or named in a seed row's `unchanged`) is one
/// a user added: not the seed layout's, not `id`, not the sink's own.
pub fn is_added(ch_name: &str) -> bool {
    !SEED_FIXED.contains(&ch_name) && ch_name != "id" && !is_meta(ch_name)
}

/// `rel` without the seed's columns: the key and the added columns, as [`plan`] takes them.
fn added_only(rel: &RelationSchema) -> RelationSchema {
    let mut out = RelationSchema {
        schema: rel.schema.clone(),
        table: rel.table.clone(),
        columns: Vec::new(),
        key: Vec::new(),
    };
    for (i, c) in rel.columns.iter().enumerate() {
        if SEED_SOURCE.contains(&c.name.as_str()) && !rel.key.contains(&i) {
            continue;
        }
        if rel.key.contains(&i) {
            out.key.push(out.columns.len());
        }
        out.columns.push(c.clone());
    }
    out
}

/// The statements that bring the seed's table to `rel`'s added columns, and how its rows are
/// written then. `existing`: the ClickHouse table's columns.
pub fn plan_added(
    names: &TableNames,
    existing: &[Stored],
    rel: &RelationSchema,
    history: &[Arc<RelationSchema>],
    version: ServerVersion,
) -> Result<(Vec<Change>, AddedColumns, ViewColumns), Refusal> {
    let ours = added_only(rel);
    if let Some(c) = ours
        .columns
        .iter()
        .enumerate()
        .find(|(i, c)| !ours.key.contains(i) && SEED_FIXED.contains(&c.name.as_str()))
        .map(|(_, c)| c)
    {
        return Err(Refusal {
            table: names.qualified(),
            column: c.name.clone(),
            old: "a column of the seed's layout".into(),
            new: c.type_name.clone(),
            why:
                "the seed's table keeps this name for its own column; rename the PostgreSQL column"
                    .into(),
        });
    }
    let caps = super::table::caps_of(version);
    // The key column is the seed's `id`, whose type (Int64, or UInt64 in tables of earlier
    // releases) the seed's own check governs: plan it as what the schema wants.
    let key_type = ours.key.first().map(|&k| column_type(&ours, k, caps));
    let key = ours.key.first().map(|&k| &ours.columns[k]);
    let existing: Vec<Stored> = existing
        .iter()
        .filter(|s| !SEED_FIXED.contains(&s.name.as_str()))
        .map(|s| match (key, &key_type) {
            // The seed's own `id`: no comment is written on the seed's columns.
            (Some(k), Some(kt)) if k.name == s.name => Stored {
                ty: kt.clone(),
                attnum: k.attnum,
                ..s.clone()
            },
            _ => s.clone(),
        })
        .collect();
    let key_name = key.map(|k| k.name.clone());
    let history: Vec<Arc<RelationSchema>> =
        history.iter().map(|h| Arc::new(added_only(h))).collect();
    let p = plan(names, &existing, &ours, &history, version)?;
    let mut columns = p.state.columns.clone();
    if let Some(k) = &key_name {
        columns.remove(k);
    }
    let view = p.view.into_iter().filter(|(s, _)| is_added(s)).collect();
    Ok((p.changes, AddedColumns { columns, caps }, view))
}

/// The added columns the current-rows view shows: (storage column, name shown).
pub type ViewColumns = Vec<(String, String)>;

/// What became of a schema for the seed's table.
pub type SeedApplied = Applied<AddedColumns>;

/// The seed's table's added columns at run time: each schema applied once per process, before its
/// first row is written.
pub struct SeedTable {
    writer: GenericWriter,
    cfg: ClickHouseConfig,
    version: ServerVersion,
    applied: HashMap<String, SeedApplied>,
}

impl SeedTable {
    pub fn new(cfg: &ClickHouseConfig, version: ServerVersion) -> Self {
        SeedTable {
            writer: GenericWriter::new(cfg),
            cfg: cfg.clone(),
            version,
            applied: HashMap::new(),
        }
    }

    pub fn applied(&self, id: &str) -> Option<&SeedApplied> {
        self.applied.get(id)
    }

    /// Brings the table to `rel` (the caller stored every earlier row: a rename may move where
    /// they are written) and makes the current-rows view show every added column.
    pub async fn apply(
        &mut self,
        id: &str,
        rel: &RelationSchema,
        history: &[Arc<RelationSchema>],
    ) -> Result<ApplyOutcome, SinkError> {
        let names = TableNames::new(&self.cfg.database, &self.cfg.table)
            .with_cluster(self.cfg.cluster.clone());
        // Planned against the storage (on a cluster `<table>_local`; see `sync_distributed`).
        let existing = self.writer.stored_columns(&names.storage_names()).await?;
        let (changes, added, view_columns) =
            match plan_added(&names, &existing, rel, history, self.version) {
                Ok(p) => p,
                Err(refusal) => {
                    tracing::error!(error = %refusal, "schema change refused");
                    self.applied
                        .insert(id.to_string(), Applied::Refused(Arc::new(refusal)));
                    return Ok(ApplyOutcome {
                        changes: 0,
                        refused: true,
                    });
                }
            };
        for change in &changes {
            tracing::info!(table = %names.qualified(), change = ?change, "applying a schema change");
            self.writer
                .execute(&change.sql(&names), "changing a table's columns")
                .await?;
        }
        self.writer
            .sync_distributed(&names, &["id".to_string()])
            .await?;
        // The view's own columns, as system.columns lists them (a view is a table there).
        let view = TableNames::new(&self.cfg.database, &self.cfg.view_name());
        let shown: Vec<String> = self
            .writer
            .columns(&view)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let shows_all = view_columns.iter().all(|(_, label)| shown.contains(label));
        if !changes.is_empty() || !shows_all {
            // A view of 18.16 records its columns when created: re-created to show the new ones.
            self.writer
                .execute(
                    &schema::drop_view_sql(&self.cfg),
                    "dropping the current-rows view",
                )
                .await?;
            self.writer
                .execute(
                    &schema::create_view_with_sql(&self.cfg, &view_columns),
                    "creating the current-rows view",
                )
                .await?;
        }
        if !changes.is_empty() {
            // Other schemas' plans may no longer hold (a rename): planned again before their rows.
            self.applied.retain(|_, a| matches!(a, Applied::Refused(_)));
        }
        self.applied
            .insert(id.to_string(), Applied::Ready(Arc::new(added)));
        Ok(ApplyOutcome {
            changes: changes.len(),
            refused: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ColumnSchema;

    fn col(name: &str, (oid, type_name): (u32, &str), attnum: i16) -> ColumnSchema {
        let mut c = ColumnSchema::builtin(name, oid, -1, type_name, true);
        c.attnum = Some(attnum);
        c
    }

    const INT8: (u32, &str) = (20, "bigint");
    const INT4: (u32, &str) = (23, "integer");
    const TEXT: (u32, &str) = (25, "text");
    const TIMESTAMP: (u32, &str) = (1114, "timestamp without time zone");

    fn seed(extra: Vec<ColumnSchema>) -> RelationSchema {
        let mut columns = vec![
            col("id", INT8, 1),
            col("username", TEXT, 2),
            col("event_type", TEXT, 3),
            col("event_time", TIMESTAMP, 4),
        ];
        columns.extend(extra);
        RelationSchema {
            schema: "public".into(),
            table: "user_logins".into(),
            columns,
            key: vec![0],
        }
    }

    fn existing(extra: &[(&str, &str)]) -> Vec<Stored> {
        schema::COLUMNS
            .iter()
            .chain(extra)
            .map(|(n, t)| Stored::new(n, t))
            .chain([Stored::new("_ingested_at", "DateTime")])
            .collect()
    }

    fn v18() -> ServerVersion {
        ServerVersion::parse("18.16.1").unwrap()
    }

    #[test]
    fn an_added_column_is_added_with_postgres_default_and_written_under_its_name() {
        let names = TableNames::new("default", "user_logins");
        let mut country = col("country", TEXT, 6);
        country.missing = Some("NL".into());
        let rel = seed(vec![country]);
        let (changes, added, view) = plan_added(&names, &existing(&[]), &rel, &[], v18()).unwrap();
        assert_eq!(view, vec![("country".to_string(), "country".to_string())]);
        assert_eq!(
            changes,
            vec![Change::Add {
                column: "country".into(),
                ty: "Nullable(String)".into(),
                default: Some("'NL'".into()),
                attnum: Some(6),
            }]
        );
        let (cells, unchanged) = added
            .cells(
                &vec![("country".into(), serde_json::Value::Null)],
                &["username".into()],
            )
            .unwrap();
        assert_eq!(cells, vec![(Arc::from("country"), "null".to_string())]);
        assert_eq!(unchanged, vec!["username".to_string()]);
        // Once there, nothing more to do; a legacy UInt64 id is not a key type change.
        let mut legacy = existing(&[("country", "Nullable(String)")]);
        legacy[0].ty = "UInt64".into();
        let (changes, _, _) = plan_added(&names, &legacy, &rel, &[], v18()).unwrap();
        // An added column of an earlier release gets its attnum recorded; the seed's `id` not.
        assert_eq!(
            changes,
            vec![Change::Comment {
                column: "country".into(),
                attnum: 6
            }]
        );
        assert!(added.cells(&vec![("zz".into(), 1.into())], &[]).is_err());
    }

    #[test]
    fn a_column_named_like_the_seed_layout_is_refused_with_the_fix() {
        let names = TableNames::new("default", "user_logins");
        let rel = seed(vec![col("op", TEXT, 6)]);
        let refusal = plan_added(&names, &existing(&[]), &rel, &[], v18()).unwrap_err();
        assert!(refusal.to_string().contains("rename the PostgreSQL column"));
        let text_to_int = seed(vec![col("n", INT4, 6)]);
        assert!(plan_added(
            &names,
            &existing(&[("n", "Nullable(String)")]),
            &text_to_int,
            &[],
            v18()
        )
        .is_err());
    }
}
