//! `cdc-relay config check`: what the relay would run with, secrets masked, and whether each
//! command's settings are complete and valid. `cdc-relay config clickhouse-schema`: the statements
//! the sink sends to create and check its ClickHouse schema.

use clap::Parser;

use crate::config::{known_settings, mask, Cli, ClickHouseVersion, Command};
use crate::sink::clickhouse::schema::{schema_statements, ServerVersion};
use crate::sink::clickhouse::ClickHouseConfig;
use crate::source::postgres::PublishOps;

/// Prints the report; returns the exit code (0 valid, 2 invalid).
pub fn check(for_command: Option<&str>) -> i32 {
    println!("{:<34} effective value", "setting");
    for (env, flag) in known_settings() {
        if env == "CDC_RELAY_CONFIG" {
            continue;
        }
        let value = std::env::var(&env)
            .map(|v| mask(&env, &v))
            .unwrap_or_else(|_| "(default)".into());
        println!("{:<34} {value}    (--{flag})", env);
    }
    println!();
    let commands: Vec<&str> = match for_command {
        Some(c) => vec![c],
        None => vec!["stream", "sink", "status"],
    };
    let mut ok = true;
    for name in commands {
        match validate(name) {
            Ok(()) => println!("{name:<8} ok"),
            Err(e) => {
                ok = false;
                println!("{name:<8} INVALID: {e}");
            }
        }
    }
    if ok {
        0
    } else {
        2
    }
}

fn validate(name: &str) -> Result<(), String> {
    let cli = Cli::try_parse_from(["cdc-relay", name]).map_err(|e| {
        // clap's message without its usage footer, on one line.
        e.to_string()
            .lines()
            .take_while(|l| !l.starts_with("Usage:"))
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches("error: ")
            .to_string()
    })?;
    let pg = match &cli.command {
        Command::Stream(a) => Some((&a.postgres, super::publish_ops(&a.ops))),
        Command::Status(a) => Some((&a.postgres, PublishOps(vec![]))),
        Command::Verify(a) => Some((&a.postgres, PublishOps(vec![]))),
        _ => None,
    };
    if let Some((pg, ops)) = pg {
        super::source_config(pg, ops).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The statements [`crate::sink::clickhouse::schema::ensure_schema`] sends to a server of
/// `version`, in order, each after a comment saying when and ending with `;`.
pub fn clickhouse_schema(
    version: ClickHouseVersion,
    database: &str,
    table: &str,
    cluster: Option<&str>,
) -> String {
    let version = ServerVersion {
        major: version.major,
        minor: version.minor,
    };
    let cfg = ClickHouseConfig {
        url: String::new(),
        user: String::new(),
        password: String::new(),
        database: database.to_string(),
        table: table.to_string(),
        tls: None,
        cluster: cluster.map(str::to_string),
    };
    let mut out = format!(
        "-- The statements cdc-relay's sink and setup send to ClickHouse {version} to create and check the schema, in order.\n"
    );
    for s in schema_statements(&cfg, version) {
        out.push_str(&format!("\n-- {}\n{};\n", s.when, s.sql));
    }
    out
}
