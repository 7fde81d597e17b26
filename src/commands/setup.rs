//! `cdc-relay setup` and `teardown`: create everything ahead of time (e.g. by an administrator with
//! more privileges than the relay), or remove the PostgreSQL side again.

use crate::commands::Error;
use crate::config::{SetupArgs, TeardownArgs};
use crate::kafka::topic::{ensure_topic, ensure_topic_with};
use crate::sink::clickhouse::schema;
use crate::source::postgres::catalog;
use crate::source::postgres::{PublishOps, SourceError};

pub async fn setup(args: SetupArgs) -> Result<(), Error> {
    let mut cfg = super::source_config(&args.postgres, super::publish_ops(&args.ops))?;
    let sql = cfg.connect_sql().await?;
    catalog::preflight(&mut cfg, &sql).await?;
    // The one place that changes an existing publication's operations (stream refuses to).
    catalog::setup_publication(&cfg, &sql).await?;
    match catalog::slot_info(&cfg, &sql).await? {
        Some(info) => {
            catalog::check_slot(&cfg, &info)?;
            catalog::ensure_failover(&cfg, &info).await;
            println!("slot {}: exists", cfg.slot);
        }
        None => {
            // No snapshot: the first `stream` finds the slot and backfills unsent rows after it
            // caught up, which covers everything committed before this moment.
            let (client, created) = catalog::create_slot(&cfg).await?;
            let failover = if client.supports_failover_slots() {
                " (failover slot)"
            } else {
                ""
            };
            println!(
                "slot {}: created at {}{failover}",
                cfg.slot, created.consistent_point
            );
        }
    }
    println!(
        "publication {}: publishes {}",
        cfg.publication,
        cfg.ops.as_publish_option()
    );

    let kafka = super::kafka_connection(&args.kafka.kafka_brokers, &args.kafka.security)
        .await?
        .client_config();
    for topic in super::table_topics(&cfg, &args.kafka)? {
        let n = ensure_topic(
            &kafka,
            &topic,
            args.topic_partitions,
            args.topic_replication,
        )
        .await?;
        println!("topic {topic}: {n} partitions");
        let schemas = crate::event::schemas_topic(&topic);
        ensure_topic_with(
            &kafka,
            &schemas,
            1,
            args.topic_replication,
            &[("cleanup.policy", "compact")],
        )
        .await?;
        println!("topic {schemas}: 1 partition (compacted)");
    }
    let n = ensure_topic(&kafka, &args.dlq_topic, 1, args.topic_replication).await?;
    println!("topic {}: {n} partitions", args.dlq_topic);

    let ch = super::clickhouse_from_args(&args.clickhouse)?;
    let client = ch.client();
    let version = schema::server_version(&client, &ch.url).await?;
    schema::ensure_schema(&client, &ch, version).await?;
    println!(
        "clickhouse {}: ready (server {}.{})",
        ch.qualified_table(),
        version.major,
        version.minor
    );
    Ok(())
}

pub async fn teardown(args: TeardownArgs) -> Result<(), Error> {
    if !args.yes_drop_slot {
        return Err(Error::Config(
            "teardown drops the replication slot, and with it the stream's position; pass --yes-drop-slot to confirm".into(),
        ));
    }
    let cfg = super::source_config(&args.postgres, PublishOps(vec![]))?;
    let sql = cfg.connect_sql().await?;
    if let Some(info) = catalog::slot_info(&cfg, &sql).await? {
        if info.active {
            return Err(Error::Config(format!(
                "slot {} is in use by a running `cdc-relay stream`: stop it first",
                cfg.slot
            )));
        }
        catalog::drop_slot(&cfg, &sql).await?;
        println!("slot {}: dropped", cfg.slot);
    }
    sql.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {}",
        crate::source::postgres::client::quote_ident(&cfg.publication)
    ))
    .await
    .map_err(SourceError::sql("dropping the publication"))?;
    println!("publication {}: dropped", cfg.publication);
    Ok(())
}
