//! Settings of the ClickHouse sink.

/// Where and what the sink writes. Never printed with the password.
#[derive(Clone)]
pub struct ClickHouseConfig {
    pub url: String,
    pub user: String,
    pub password: String,
    pub database: String,
    pub table: String,
}

impl std::fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("table", &self.table)
            .finish()
    }
}

impl ClickHouseConfig {
    /// A client for this server. Schema validation is off: it relies on
    /// RowBinaryWithNamesAndTypes, which ClickHouse 18.16 lacks; `schema::check_table` checks the
    /// columns instead.
    pub fn client(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_database(&self.database)
            .with_validation(false)
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
            quote_ident(&format!("{}_current", self.table))
        )
    }
}

/// Quotes a ClickHouse identifier with backquotes; backquotes and backslashes inside are escaped.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}
