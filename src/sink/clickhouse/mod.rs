//! The ClickHouse sink: schema for the server's version, batching and inserts.

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Other(String),
}
