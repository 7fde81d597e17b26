//! The PostgreSQL side: preflight checks, publication and slot, the replication stream, the backfill
//! and the `sent_to_kafka` ledger. It produces [`crate::event::ChangeEvent`]s and takes
//! acknowledgements back as row ids and LSNs; it knows nothing of Kafka or ClickHouse.

pub mod backfill;
pub mod catalog;
pub mod client;
pub mod ledger;
pub mod origin;
pub mod pgoutput;
pub mod relation;
pub mod replication;
pub mod stream;
pub mod tls;
pub mod verify;

use std::str::FromStr;

use crate::event::Lsn;

pub use client::ReplicationError;
pub use pgoutput::DecodeError;

/// Prefix of the transactional logical decoding message written first in every ledger transaction,
/// so the stream can tell the relay's own `sent_to_kafka` updates from a user's and skip them.
pub const LEDGER_MESSAGE_PREFIX: &str = "cdc_relay.ledger";
/// Prefix of the non-transactional messages that move the slot forward on a quiet table.
pub const HEARTBEAT_MESSAGE_PREFIX: &str = "cdc_relay.heartbeat";
/// Prefix of the non-transactional message a backfill chunk writes after its read: when the stream
/// reaches it, every transaction the read could see has been streamed (see backfill.rs).
pub const WATERMARK_MESSAGE_PREFIX: &str = "cdc_relay.watermark";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to PostgreSQL at {endpoint}: {}. Check --pg-url / CDC_RELAY_PG_URL (and --pg-password-file), that the server runs, and that pg_hba.conf admits this user", pg_text(.source))]
    Connect {
        endpoint: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL has wal_level = {actual}; logical replication needs wal_level = logical. Set `wal_level = logical` in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL")]
    WalLevel { actual: String },
    #[error("table {table}: {reason}")]
    Schema { table: String, reason: String },
    #[error("{0}")]
    Privilege(String),
    #[error("replication slot {slot:?} is no longer usable ({reason}): changes since its last confirmed position may be gone. To go on, run with --recreate-slot: a new slot streams from now and every row with sent_to_kafka not TRUE is backfilled; see docs/operations.md")]
    SlotLost { slot: String, reason: String },
    #[error("column {column}: {reason}")]
    Value {
        column: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Type(#[from] crate::types::TypeError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("{context}: {}", pg_text(.source))]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("invalid PostgreSQL settings: {0}")]
    Config(String),
    /// Work that stopped for a reason worth one more try (a task that ended early).
    #[error("{0}")]
    Interrupted(String),
}

/// SQLSTATEs of a server that cannot serve now but will: connection trouble (08), shutting down or
/// starting up (57P), too many connections (53300).
fn server_unavailable(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P") || code == "53300"
}

impl SourceError {
    pub fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
        let context = context.into();
        move |source| SourceError::Sql { context, source }
    }

    /// Whether the connection itself is gone or the server is going away (as opposed to a
    /// statement that met a lock): a session that depends on it should end.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            SourceError::Connect { .. } => true,
            SourceError::Sql { source, .. } => match source.code() {
                Some(c) => {
                    let c = c.code();
                    c.starts_with("08") || c.starts_with("57P")
                }
                None => source.is_closed() || source.as_db_error().is_none(),
            },
            _ => false,
        }
    }

    /// Whether the same operation may succeed after a pause (connection lost, server restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Replication(e) => e.is_transient(),
            SourceError::Interrupted(_) => true,
            // Unreachable, starting up, shutting down, full: it passes. A refused login, a
            // missing database or a certificate that does not verify does not.
            SourceError::Connect { source, .. } => match source.code() {
                Some(c) => server_unavailable(c.code()),
                None => !crate::tls::is_tls_failure(source),
            },
            // A client error with no server error behind it is a connection-level failure.
            SourceError::Sql { source, .. } => match source.code() {
                Some(c) => {
                    let c = c.code();
                    // And what a busy table throws at a statement: deadlock, serialization
                    // failure, lock timeout, statement timeout or cancel.
                    server_unavailable(c) || ["40P01", "40001", "55P03", "57014"].contains(&c)
                }
                None => source.is_closed() || source.as_db_error().is_none(),
            },
            _ => false,
        }
    }
}

/// Which operations the publication publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOps(pub Vec<&'static str>);

impl PublishOps {
    pub fn as_publish_option(&self) -> String {
        self.0.join(", ")
    }
}

/// Output settings of the ordinary SQL sessions, appended to the user's `options`.
/// IntervalStyle as the replication session has it: a backfilled interval reads as a streamed one.
const SQL_SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres";

/// Everything the PostgreSQL side needs to know.
#[derive(Clone)]
pub struct SourceConfig {
    pub pg: tokio_postgres::Config,
    pub tls: tls::PgTls,
    /// The relayed tables, in the order given; a change's [`TableId`] indexes this.
    pub tables: Vec<TableSpec>,
    pub slot: String,
    pub publication: String,
    pub ops: PublishOps,
    /// PostgreSQL 16+: the replication origin the ledger writes under, which the stream then asks
    /// the server to filter out (`origin = none`); see [`catalog::ledger_origin`].
    pub ledger_origin: Option<String>,
}

/// Which of [`SourceConfig::tables`] a change belongs to.
pub type TableId = usize;

/// One relayed table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub schema: String,
    pub table: String,
    /// The ledger's column; [`catalog::preflight`] leaves it only when the table has it.
    pub ledger_column: Option<String>,
    /// The primary key's column when it is one integer column (ledger tables need one):
    /// set by [`catalog::preflight`].
    pub key_column: Option<String>,
    /// The table's OID at start, set by [`catalog::preflight`]: its identity (a table dropped and
    /// created again under the name is another table); 0 before.
    pub oid: u32,
    /// Whether its changes travel in the seed's message form (relation.rs): `IfShaped` for the
    /// seed's table (`--seed-table`), which the stream's preflight turns into `Required` or `Never`
    /// by the shape the table has then.
    pub seed: relation::SeedMode,
}

impl TableSpec {
    /// `schema.table` or `table` (then in `public`).
    pub fn parse(name: &str) -> Result<Self, SourceError> {
        let (schema, table) = match name.split_once('.') {
            Some((s, t)) => (s.to_string(), t.to_string()),
            None => ("public".to_string(), name.to_string()),
        };
        if schema.is_empty() || table.is_empty() {
            return Err(SourceError::Config(format!(
                "--table {name:?} must be `schema.table` or `table`"
            )));
        }
        Ok(TableSpec {
            schema,
            table,
            ledger_column: None,
            key_column: None,
            oid: 0,
            seed: relation::SeedMode::Never,
        })
    }

    /// `schema.table`, unquoted, as messages and logs name it.
    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// `"schema"."table"`, quoted for SQL.
    pub fn qualified(&self) -> String {
        format!(
            "{}.{}",
            client::quote_ident(&self.schema),
            client::quote_ident(&self.table)
        )
    }

    /// The ledger's column, quoted for SQL, when the table has one.
    pub fn ledger(&self) -> Option<String> {
        self.ledger_column.as_deref().map(client::quote_ident)
    }

    /// The integer key column, quoted for SQL (`id` until [`catalog::preflight`] read it).
    pub fn key(&self) -> String {
        client::quote_ident(self.key_column.as_deref().unwrap_or("id"))
    }
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("endpoint", &endpoint(&self.pg))
            .field("tables", &self.table_names())
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("ops", &self.ops)
            .finish()
    }
}

impl SourceConfig {
    /// Parses the URL and the `schema.table` name. The ordinary SQL sessions get the same output
    /// settings as the replication session, so both paths print timestamps alike.
    pub fn new(
        url: &str,
        tables: &[String],
        slot: &str,
        publication: &str,
        ops: PublishOps,
    ) -> Result<Self, SourceError> {
        let (url, mode, root) = tls::split_tls_params(url);
        let mut pg = tokio_postgres::Config::from_str(&url).map_err(|e| {
            SourceError::Config(format!(
                "--pg-url is not a valid PostgreSQL URL or key=value string: {e}"
            ))
        })?;
        let mode = match mode {
            Some(m) => tls::SslMode::parse(&m).map_err(SourceError::Config)?,
            None => tls::SslMode::Prefer,
        };
        let tls = tls::PgTls::new(mode, root.map(Into::into)).map_err(SourceError::Config)?;
        // The user's `options` (search_path, statement_timeout, …) stay; ours go last so that
        // DateStyle and TimeZone are what the relay parses whatever the user asked for.
        let options = client::append_options(pg.get_options(), SQL_SESSION_OPTIONS);
        pg.options(options);
        pg.application_name("cdc-relay");
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(std::time::Duration::from_secs(10));
        }
        // Several hosts are a primary and its standbys: the relay writes (ledger, heartbeats) and
        // its failover slot is usable only on the primary, so a read-only server is never the
        // one, even when the URL leaves `target_session_attrs` at libpq's `any`.
        if pg.get_hosts().len().max(pg.get_hostaddrs().len()) > 1 {
            pg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        // A peer that vanished without FIN or RST: unless the URL says otherwise, idle sockets
        // probe after 30 s (tokio-postgres' default is 2 hours) and unacknowledged data gives up
        // after 60 s (the kernel's default retries for about 15 minutes). Both connection kinds.
        if pg.get_keepalives_idle() == std::time::Duration::from_secs(2 * 60 * 60) {
            pg.keepalives_idle(std::time::Duration::from_secs(30));
        }
        if pg.get_keepalives_interval().is_none() {
            pg.keepalives_interval(std::time::Duration::from_secs(10));
        }
        if pg.get_keepalives_retries().is_none() {
            pg.keepalives_retries(3);
        }
        if pg.get_tcp_user_timeout().is_none() {
            pg.tcp_user_timeout(std::time::Duration::from_secs(60));
        }
        let tables = tables
            .iter()
            .map(|t| TableSpec::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        if tables.is_empty() {
            return Err(SourceError::Config("--table names no table".into()));
        }
        for (i, t) in tables.iter().enumerate() {
            if tables[..i].contains(t) {
                return Err(SourceError::Config(format!(
                    "--table {} is given twice",
                    t.name()
                )));
            }
        }
        for (what, name) in [("--slot", slot)] {
            // Slot names are restricted by PostgreSQL itself; checking here gives a clearer error.
            if name.is_empty()
                || name.len() > 63
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(SourceError::Config(format!(
                    "{what} {name:?}: slot names may contain only lower-case letters, digits and underscores (at most 63)"
                )));
            }
        }
        let mut cfg = SourceConfig {
            pg,
            tls: tls.clone(),
            tables,
            slot: slot.to_string(),
            publication: publication.to_string(),
            ops,
            ledger_origin: None,
        };
        cfg.set_tls(tls);
        Ok(cfg)
    }

    /// Uses these TLS settings for both kinds of connection.
    pub fn set_tls(&mut self, tls: tls::PgTls) {
        self.pg.ssl_mode(match tls.mode {
            tls::SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            tls::SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        self.tls = tls;
    }

    /// The first table (commands that report on one: `status`).
    pub fn first_table(&self) -> &TableSpec {
        &self.tables[0]
    }

    /// Every table's `schema.table`, comma-separated, for logs and messages.
    pub fn table_names(&self) -> String {
        self.tables
            .iter()
            .map(TableSpec::name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn endpoint(&self) -> String {
        endpoint(&self.pg)
    }

    /// The database's name (the user's name when the URL names none, as libpq does).
    pub fn database(&self) -> String {
        self.pg
            .get_dbname()
            .or(self.pg.get_user())
            .unwrap_or("postgres")
            .to_string()
    }

    /// Opens an ordinary SQL session; its connection task runs in the background.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, SourceError> {
        let err = |source| SourceError::Connect {
            endpoint: self.endpoint(),
            source,
        };
        let client = match self.tls.client_config() {
            None => {
                let (client, connection) =
                    self.pg.connect(tokio_postgres::NoTls).await.map_err(err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "PostgreSQL SQL connection ended");
                    }
                });
                client
            }
            Some(config) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*config).clone());
                let (client, connection) = self.pg.connect(tls).await.map_err(err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "PostgreSQL SQL connection ended");
                    }
                });
                client
            }
        };
        Ok(client)
    }

    pub fn replication_params(&self) -> Result<client::ConnectParams, SourceError> {
        Ok(client::ConnectParams::from_config(
            &self.pg,
            self.tls.clone(),
        )?)
    }
}

/// Every server of the URL as `host:port`, joined by commas (a multi-host URL names several).
fn endpoint(pg: &tokio_postgres::Config) -> String {
    let ports = pg.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    if hosts.is_empty() {
        return format!("localhost:{}", port(0));
    }
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| format!("{h}:{}", port(i)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A tokio-postgres error with the server's own words: its Display alone says only "db error".
pub fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut t = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(d) = db.detail() {
                t.push_str(&format!(" (detail: {d})"));
            }
            if let Some(h) = db.hint() {
                t.push_str(&format!(" (hint: {h})"));
            }
            t
        }
        None => crate::error_chain::with_causes(e),
    }
}

/// Parses an LSN returned as text by SQL.
pub fn parse_lsn(text: &str) -> Result<Lsn, SourceError> {
    text.parse::<Lsn>().map_err(|e| SourceError::Value {
        column: "lsn",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> SourceConfig {
        SourceConfig::new(url, &["t".into()], "s", "p", PublishOps(vec!["insert"])).unwrap()
    }

    #[test]
    fn the_users_options_are_kept_and_ours_come_last() {
        let c =
            cfg("postgres://u@h/db?options=-c%20search_path%3Dapp%20-c%20TimeZone%3DAsia/Tokyo");
        assert_eq!(
            c.pg.get_options(),
            Some("-c search_path=app -c TimeZone=Asia/Tokyo -c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres")
        );
        let c = cfg("host=h user=u options='-c statement_timeout=5s'");
        assert_eq!(
            c.pg.get_options(),
            Some(
                "-c statement_timeout=5s -c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres"
            )
        );
        assert_eq!(
            cfg("postgres://u@h/db").pg.get_options(),
            Some(SQL_SESSION_OPTIONS)
        );
        // The replication connection carries them too, with its own settings last.
        let params = c.replication_params().unwrap();
        let startup = client::append_options(
            params.options.as_deref(),
            client::REPLICATION_SESSION_OPTIONS,
        );
        assert!(startup.starts_with("-c statement_timeout=5s "), "{startup}");
        assert!(
            startup.ends_with(client::REPLICATION_SESSION_OPTIONS),
            "{startup}"
        );
    }

    #[test]
    fn several_hosts_always_mean_the_writable_one() {
        use tokio_postgres::config::TargetSessionAttrs;
        let multi = cfg("postgres://u@a:5432,b:5433/db");
        assert_eq!(
            multi.pg.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            multi.replication_params().unwrap().target,
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            cfg("postgres://u@a/db").pg.get_target_session_attrs(),
            TargetSessionAttrs::Any
        );
    }
}
