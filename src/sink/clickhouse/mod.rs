//! The ClickHouse sink: picks DDL for the server's version, creates or checks the table and its
//! current-rows view, turns change events into rows and inserts batches. Knows nothing of Kafka: it
//! takes [`crate::event::ChangeEvent`]s and says when they are stored.

pub mod batch;
pub mod cluster;
pub mod config;
pub mod evolve;
pub mod identity;
pub mod row;
pub mod schema;
pub mod seed_columns;
pub mod table;
pub mod tables;
pub mod verify;
pub mod writer;

pub use config::ClickHouseConfig;
pub use row::{SeedRow, UserLoginRow};
pub use schema::ServerVersion;
pub use writer::ClickHouseWriter;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("ClickHouse at {url} ({context}): {}", crate::error_chain::with_causes(.source))]
    Client {
        url: String,
        context: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("ClickHouse table {table}: column {column} {reason}. Drop or rename the table, or point --clickhouse-table elsewhere, so the sink can create it")]
    Schema {
        table: String,
        column: String,
        reason: String,
    },
    #[error("the ClickHouse insert task failed: {0}; nothing after the last committed offset was committed, the next start reads it again")]
    InsertTask(String),
    #[error("ClickHouse server version {0:?} is not understood")]
    Version(String),
    #[error("ClickHouse answered what the sink cannot read: {0}")]
    Output(String),
    #[error(transparent)]
    Layout(#[from] cluster::LayoutError),
}

impl SinkError {
    /// What no retry mends: an existing table of the other layout, for the operator to move or
    /// the flag to change. The sink stops with it (exit code 2) rather than wait forever.
    pub fn needs_operator(&self) -> bool {
        matches!(self, SinkError::Layout(_))
    }

    /// Network trouble and timeouts pass; a refused login or a bad query does not.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Client { source, .. } => match source {
                // A refused certificate does not get better by waiting; a refused connection may.
                clickhouse::error::Error::Network(e) => !crate::tls::is_tls_failure(e.as_ref()),
                clickhouse::error::Error::TimedOut => true,
                // Server-side trouble that passes: too many parts/queries, memory, shutting down.
                clickhouse::error::Error::BadResponse(text) => [
                    "Code: 252",
                    "Code: 202",
                    "Code: 241",
                    "Code: 242",
                    "Code: 210",
                    "Code: 209",
                    // A cluster with a node or ZooKeeper restarting: no replica of a shard
                    // reachable, no ZooKeeper session, an insert whose fate a shard did not
                    // report, an ON CLUSTER DDL still waiting for a node that is down.
                    "Code: 279",
                    "Code: 225",
                    "Code: 999",
                    "Code: 319",
                    "Code: 159",
                    // A Distributed table being re-created after a column change (cluster.rs);
                    // a server killed in the middle of an answer.
                    "Code: 60,",
                    "Code: 60.",
                    "Code: 32,",
                    "Code: 32.",
                ]
                .iter()
                .any(|c| text.contains(c)),
                _ => false,
            },
            _ => false,
        }
    }
}
