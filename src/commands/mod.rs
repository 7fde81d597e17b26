//! The subcommands. Each only wires components together: the source, the event format, Kafka and
//! the sink stay unaware of each other.

pub mod config;
pub mod setup;
pub mod sink;
pub mod status;
pub mod stream;
