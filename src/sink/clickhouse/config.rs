//! Settings of the ClickHouse sink.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;

/// Where and what the sink writes. Never printed with the password.
#[derive(Clone)]
pub struct ClickHouseConfig {
    pub url: String,
    pub user: String,
    pub password: String,
    pub database: String,
    pub table: String,
    /// For `https://` URLs: how the server's certificate is verified.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `--clickhouse-cluster`: the tables are replicated and sharded over this cluster (cluster.rs).
    pub cluster: Option<String>,
}

impl std::fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("table", &self.table)
            .field("https", &self.tls.is_some())
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl ClickHouseConfig {
    /// A client for this server. Schema validation is off: it relies on
    /// RowBinaryWithNamesAndTypes, which ClickHouse 18.16 lacks; `schema::check_table` checks the
    /// columns instead.
    pub fn client(&self) -> clickhouse::Client {
        let client = match &self.tls {
            None => clickhouse::Client::default(),
            Some(tls) => {
                let mut tcp = HttpConnector::new();
                tcp.set_keepalive(Some(Duration::from_secs(60)));
                tcp.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((**tls).clone())
                    .https_only()
                    .enable_http1()
                    .wrap_connector(tcp);
                // ClickHouse closes idle keep-alive connections after 3 s; drop ours before that.
                let http = HyperClient::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(2))
                    .build(https);
                clickhouse::Client::with_http_client(http)
            }
        };
        let client = client
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_database(&self.database)
            .with_validation(false);
        match self.cluster {
            // An insert into a Distributed table returns once every shard has its part (not once
            // it is spooled on the node we talk to): only then may the sink commit offsets.
            // Which replica: 18.16 writes the shard the node holds itself to its own replica
            // (whatever `prefer_localhost_replica` says; measured) and every other shard to its
            // first live replica in the configured order (`in_order`, not at random); reads go
            // the same way, so a sink reads back what it wrote (unchanged TOAST values) where it
            // wrote it. Sinks that all talk to first replicas (docs/operations.md) therefore
            // write and read each shard on one replica. Reads are not steered by replica delay:
            // inserts are not, and a sink would then read elsewhere than it just wrote.
            Some(_) => client
                .with_setting("insert_distributed_sync", "1")
                .with_setting("load_balancing", "in_order"),
            None => client,
        }
    }

    /// The table that holds the rows: the table itself, or on a cluster `<table>_local` under the
    /// Distributed table of that name.
    pub fn qualified_storage(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.database),
            quote_ident(&self.storage_name())
        )
    }

    pub fn storage_name(&self) -> String {
        super::cluster::storage_name(&self.table, self.cluster.as_deref())
    }

    /// `` `db`.`table` ``, quoted for SQL.
    pub fn qualified_table(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.database),
            quote_ident(&self.table)
        )
    }

    pub fn qualified_view(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.database),
            quote_ident(&self.view_name())
        )
    }

    /// `<table>_current`: one current row per id.
    pub fn view_name(&self) -> String {
        super::cluster::view_name(&self.table)
    }

    /// `<table>_truncates`: one row per applied truncate; its highest version is the watermark
    /// below which every row is gone.
    pub fn truncates_name(&self) -> String {
        format!("{}_truncates", self.table)
    }

    pub fn qualified_truncates(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.database),
            quote_ident(&self.truncates_name())
        )
    }
}

/// The TLS settings for `url`: none for `http://`, certificate verification against `ca_file` (or
/// the system's store) for `https://`.
pub fn tls_for_url(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let https = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    match (https, ca_file) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(format!(
            "--clickhouse-ca-file is set but --clickhouse-url {url} is not https://"
        )),
        (true, ca_file) => crate::tls::verifying_client_config(ca_file).map(Some),
    }
}

/// Quotes a ClickHouse identifier with backquotes; backquotes and backslashes inside are escaped.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// Quotes a ClickHouse string literal, escaping as the `clickhouse` crate escapes bound strings.
pub fn quote_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' | '\'' | '`' | '\t' | '\n' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}
