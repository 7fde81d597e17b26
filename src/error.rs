//! The error a command ends with, and the process exit code it maps to.

use crate::kafka::KafkaError;
use crate::source::postgres::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("postgres: {0}")]
    Source(#[from] SourceError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("clickhouse: {0}")]
    Sink(#[from] crate::sink::clickhouse::SinkError),
    #[error("{0}")]
    Config(String),
}

/// The error and its causes, each told once: a failed TLS handshake then says why ("invalid peer
/// certificate: UnknownIssuer") instead of only hyper's "client error (Connect)".
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

impl Error {
    /// 2: the environment is not set up for the relay (wal_level, privileges, missing table,
    /// invalid settings); 1: anything else.
    pub fn exit_code(&self) -> i32 {
        use SourceError as S;
        match self {
            Error::Source(
                S::WalLevel { .. }
                | S::Privilege(_)
                | S::Schema { .. }
                | S::Config(_)
                | S::SlotLost { .. },
            ) => 2,
            Error::Config(_) => 2,
            Error::Sink(crate::sink::clickhouse::SinkError::Schema { .. }) => 2,
            _ => 1,
        }
    }
}
