//! The error a command ends with, and the process exit code it maps to. It lives with the commands
//! because they are the one layer that knows every component.

use crate::kafka::KafkaError;
use crate::sink::clickhouse::SinkError;
use crate::source::postgres::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("postgres: {0}")]
    Source(#[from] SourceError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("clickhouse: {0}")]
    Sink(#[from] SinkError),
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// A service down or restarting, which waiting mends: a command starting meanwhile waits.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Source(e) => e.is_transient(),
            Error::Kafka(e) => e.is_transient(),
            Error::Sink(e) => e.is_transient(),
            Error::Config(_) => false,
        }
    }

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
            Error::Sink(SinkError::Schema { .. } | SinkError::Layout(_)) => 2,
            _ => 1,
        }
    }
}
