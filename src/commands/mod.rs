//! The subcommands. Each only wires components together: the source, the event format, Kafka and
//! the sink stay unaware of each other.

pub mod config;
pub mod error;
pub mod setup;
pub mod sink;
pub mod status;
pub mod stream;
pub mod verify;

pub use error::Error;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::{read_secret, ClickHouseArgs, KafkaArgs, KafkaSecurityArgs, Op, PostgresArgs};
use crate::kafka::KafkaConnection;
use crate::metrics::Registry;
use crate::sink::clickhouse::config::tls_for_url;
use crate::sink::clickhouse::ClickHouseConfig;
use crate::source::postgres::relation::SeedMode;
use crate::source::postgres::tls::{PgTls, SslMode};
use crate::source::postgres::{PublishOps, SourceConfig, TableSpec};

/// Runs a command's start-up until it succeeds: a service that is down or restarting as the relay
/// starts (a host booting, a supervisor restarting everything) is waited for, with the reason
/// logged on every attempt, instead of the relay exiting while it could carry on. Anything else
/// (a refused login, a missing table, bad settings) ends the command at once. `None`: shutdown was
/// asked for while waiting.
pub async fn start_when_ready<T, F, Fut>(
    what: &str,
    shutdown: &mut watch::Receiver<bool>,
    mut start: F,
) -> Result<Option<T>, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut backoff = Backoff::new();
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let attempt = tokio::select! {
            r = start() => r,
            _ = shutdown.changed() => return Ok(None),
        };
        match attempt {
            Ok(t) => return Ok(Some(t)),
            Err(e) if e.is_transient() => {
                let pause = backoff.next_pause();
                tracing::warn!(error = %e, retry_in = ?pause, "{what} could not start yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// `--ops` as the source understands it: the operations the publication publishes.
pub fn publish_ops(ops: &[Op]) -> PublishOps {
    PublishOps(ops.iter().map(|o| o.as_str()).collect())
}

/// The topic of each table (by [`crate::source::postgres::TableId`]): a `--route` names it, else
/// `--topic` for a single table, else `user_events` for `public.user_logins` (the seed's
/// contract) and `<schema>.<table>` for any other.
pub fn table_topics(cfg: &SourceConfig, kafka: &KafkaArgs) -> Result<Vec<String>, Error> {
    let mut routes = std::collections::HashMap::new();
    for route in &kafka.routes {
        let (table, topic) = route.split_once('=').ok_or_else(|| {
            Error::Config(format!("--route {route:?} must be `schema.table=topic`"))
        })?;
        let table = crate::source::postgres::TableSpec::parse(table.trim())?.name();
        if !cfg.tables.iter().any(|t| t.name() == table) {
            return Err(Error::Config(format!(
                "--route names {table}, which is not among --table {}",
                cfg.table_names()
            )));
        }
        routes.insert(table, topic.trim().to_string());
    }
    if kafka.topic.is_some() && cfg.tables.len() > 1 {
        return Err(Error::Config(
            "--topic names the topic of one table; with several, give each its topic with --route schema.table=topic (or let each go to <schema>.<table>)".into(),
        ));
    }
    Ok(cfg
        .tables
        .iter()
        .map(|t| {
            routes
                .get(&t.name())
                .cloned()
                .or_else(|| kafka.topic.clone())
                .unwrap_or_else(|| match t.name().as_str() {
                    "public.user_logins" => "user_events".to_string(),
                    name => name.to_string(),
                })
        })
        .collect())
}

/// The source settings from the command line, with the password from its file if one is named.
pub fn source_config(pg: &PostgresArgs, ops: PublishOps) -> Result<SourceConfig, Error> {
    let mut cfg = SourceConfig::new(&pg.pg_url, &pg.tables, &pg.slot, &pg.publication, ops)?;
    for t in &mut cfg.tables {
        t.ledger_column = Some(pg.ledger_column.clone());
    }
    let seed = match &pg.seed_table {
        Some(name) => {
            let spec = TableSpec::parse(name)?;
            match cfg.tables.iter().position(|t| t.name() == spec.name()) {
                Some(i) => Some(i),
                None => {
                    return Err(Error::Config(format!(
                        "--seed-table {name} is not one of the relayed tables (--table)"
                    )))
                }
            }
        }
        None => cfg
            .tables
            .iter()
            .position(|t| t.name() == "public.user_logins")
            .or((cfg.tables.len() == 1).then_some(0)),
    };
    if let Some(i) = seed {
        cfg.tables[i].seed = SeedMode::IfShaped;
    }
    if let Some(file) = &pg.pg_password_file {
        cfg.pg.password(read_secret(file).map_err(Error::Config)?);
    }
    if pg.pg_sslmode.is_some() || pg.pg_sslrootcert.is_some() {
        let mode = match &pg.pg_sslmode {
            Some(m) => SslMode::parse(m).map_err(Error::Config)?,
            None => cfg.tls.mode,
        };
        let root = pg
            .pg_sslrootcert
            .clone()
            .or_else(|| cfg.tls.root_cert.clone());
        cfg.set_tls(PgTls::new(mode, root).map_err(Error::Config)?);
    }
    Ok(cfg)
}

/// How to reach Kafka, with the SASL password from its file if one is named; checked up front.
pub async fn kafka_connection(
    brokers: &str,
    s: &KafkaSecurityArgs,
) -> Result<KafkaConnection, Error> {
    let sasl_password = match &s.kafka_sasl_password_file {
        Some(f) => Some(read_secret(f).map_err(Error::Config)?),
        None => s.kafka_sasl_password.clone(),
    };
    let connection = KafkaConnection {
        brokers: brokers.to_string(),
        security_protocol: s.kafka_security_protocol.clone(),
        sasl_mechanism: s.kafka_sasl_mechanism.clone(),
        sasl_username: s.kafka_sasl_username.clone(),
        sasl_password,
        ssl_ca_file: s.kafka_ssl_ca_file.clone(),
        ssl_certificate_file: s.kafka_ssl_certificate_file.clone(),
        ssl_key_file: s.kafka_ssl_key_file.clone(),
    };
    connection.validate().map_err(Error::Config)?;
    let probe = connection.clone();
    tokio::task::spawn_blocking(move || crate::kafka::inspect::check_settings(&probe))
        .await
        .map_err(|e| Error::Config(format!("checking the Kafka settings failed: {e}")))??;
    Ok(connection)
}

/// The sink's and setup's ClickHouse settings.
pub fn clickhouse_from_args(c: &ClickHouseArgs) -> Result<ClickHouseConfig, Error> {
    clickhouse_config(
        &c.clickhouse_url,
        &c.clickhouse_user,
        &c.clickhouse_password,
        c.clickhouse_password_file.as_deref(),
        c.clickhouse_ca_file.as_deref(),
        &c.clickhouse_database,
        &c.clickhouse_table,
    )
    .map(|cfg| ClickHouseConfig {
        cluster: crate::config::cluster_name(c.clickhouse_cluster.as_deref()).map(String::from),
        ..cfg
    })
}

/// Serves `registry` at `addr` if one is given.
pub async fn serve_metrics(
    registry: &Registry,
    addr: Option<std::net::SocketAddr>,
) -> Result<(), Error> {
    if let Some(addr) = addr {
        let bound = registry
            .clone()
            .serve(addr)
            .await
            .map_err(|e| Error::Config(format!("--metrics-addr {addr}: {e}")))?;
        tracing::info!(%bound, "serving metrics at /metrics");
    }
    Ok(())
}

/// The ClickHouse settings, with the password from its file if one is named.
pub fn clickhouse_config(
    url: &str,
    user: &str,
    password: &str,
    password_file: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
    database: &str,
    table: &str,
) -> Result<ClickHouseConfig, Error> {
    let password = match password_file {
        Some(f) => read_secret(f).map_err(Error::Config)?,
        None => password.to_string(),
    };
    Ok(ClickHouseConfig {
        url: url.to_string(),
        user: user.to_string(),
        password,
        database: database.to_string(),
        table: table.to_string(),
        tls: tls_for_url(url, ca_file).map_err(Error::Config)?,
        // Set by the callers that write (`clickhouse_from_args`).
        cluster: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(topic: Option<&str>, routes: &[&str]) -> KafkaArgs {
        KafkaArgs {
            kafka_brokers: "k:1".into(),
            topic: topic.map(str::to_string),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            security: Default::default(),
        }
    }

    fn cfg(tables: &[&str]) -> SourceConfig {
        let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
        SourceConfig::new(
            "postgres://u@h/db",
            &tables,
            "s",
            "p",
            PublishOps(vec!["insert"]),
        )
        .unwrap()
    }

    #[test]
    fn each_table_goes_to_its_topic() {
        // The seed's contract, and <schema>.<table> for any other table.
        let two = cfg(&["user_logins", "app.orders"]);
        assert_eq!(
            table_topics(&two, &kafka(None, &[])).unwrap(),
            vec!["user_events", "app.orders"]
        );
        assert_eq!(
            table_topics(&two, &kafka(None, &["app.orders=orders"])).unwrap(),
            vec!["user_events", "orders"]
        );
        assert_eq!(
            table_topics(&cfg(&["app.orders"]), &kafka(Some("t"), &[])).unwrap(),
            vec!["t"]
        );
        assert!(table_topics(&two, &kafka(Some("t"), &[])).is_err());
        assert!(table_topics(&two, &kafka(None, &["other.t=x"])).is_err());
        assert!(table_topics(&two, &kafka(None, &["no-equals"])).is_err());
    }
}
