//! `cdc-relay sink`: Kafka → ClickHouse.

use tokio::sync::watch;

use crate::config::SinkArgs;
use crate::error::Error;

pub async fn run(_args: SinkArgs, _shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    Err(Error::Config("`sink` is not implemented yet".into()))
}
