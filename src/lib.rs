//! cdc-relay: change-data-capture from PostgreSQL through Kafka into ClickHouse.
//!
//! Data flows one way through the modules: [`source::postgres`] → [`event`] → [`kafka`] →
//! [`sink::clickhouse`]. The [`commands`] wire them together; nothing upstream knows what is
//! downstream of it.

pub mod backoff;
pub mod commands;
pub mod config;
pub mod error_chain;
pub mod event;
pub mod failpoints;
pub mod kafka;
pub mod metrics;
pub mod progress;
pub mod sink;
pub mod source;
pub mod tls;
pub mod types;
