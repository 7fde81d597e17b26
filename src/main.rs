//! The `cdc-relay` binary: parses the command line, sets up logging and signals, runs a command.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use cdc_relay::commands::{self, Error};
use cdc_relay::config::{Cli, Command, ConfigCommand, LogFormat};

fn main() -> ExitCode {
    // The config file feeds the environment, so it is read before the command line is parsed.
    if let Some(path) = config_file_from_args() {
        if let Err(e) = cdc_relay::config::apply_config_file(&path) {
            eprintln!("cdc-relay: error: {e}");
            return ExitCode::from(2);
        }
    }
    let cli = Cli::parse();
    match &cli.command {
        Command::Config(ConfigCommand::Check { for_command }) => {
            return ExitCode::from(commands::config::check(for_command.as_deref()) as u8);
        }
        Command::Config(ConfigCommand::ClickhouseSchema {
            clickhouse_version,
            clickhouse_database,
            clickhouse_table,
            clickhouse_cluster,
        }) => {
            print!(
                "{}",
                commands::config::clickhouse_schema(
                    *clickhouse_version,
                    clickhouse_database,
                    clickhouse_table,
                    cdc_relay::config::cluster_name(clickhouse_cluster.as_deref())
                )
            );
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let filter = EnvFilter::try_from_env("CDC_RELAY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cdc-relay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // verify's own codes are 0 and 1 (equal, drift): any error is 2.
    let is_verify = matches!(cli.command, Command::Verify(_));
    let result: anyhow::Result<i32> = runtime.block_on(async move {
        let shutdown = shutdown_signal();
        let outcome: Result<i32, Error> = match cli.command {
            Command::Stream(args) => commands::stream::run(args, shutdown).await.map(|()| 0),
            Command::Sink(args) => commands::sink::run(args, shutdown).await.map(|()| 0),
            Command::Status(args) => commands::status::run(args).await,
            Command::Setup(args) => commands::setup::setup(args).await.map(|()| 0),
            Command::Teardown(args) => commands::setup::teardown(args).await.map(|()| 0),
            Command::Verify(args) => commands::verify::run(args, shutdown).await,
            Command::Config(_) => Ok(0),
        };
        outcome.map_err(anyhow::Error::from)
    });
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let code = match is_verify {
                true => 2,
                false => e.downcast_ref::<Error>().map(Error::exit_code).unwrap_or(1),
            };
            tracing::error!("{e}");
            eprintln!("cdc-relay: error: {e}");
            ExitCode::from(code as u8)
        }
    }
}

/// `--config FILE`, `--config=FILE` or `CDC_RELAY_CONFIG`.
fn config_file_from_args() -> Option<std::path::PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        if a == "--config" {
            return args.get(i + 1).map(Into::into);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.into());
        }
    }
    std::env::var_os("CDC_RELAY_CONFIG").map(Into::into)
}

/// Flips to `true` on the first SIGINT or SIGTERM; a second one exits at once.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            wait_for_signal().await;
            count += 1;
            if count == 1 {
                tracing::info!(
                    "shutdown requested: finishing in-flight work (signal again to exit at once)"
                );
                let _ = tx.send(true);
            } else {
                eprintln!("cdc-relay: second signal, exiting without cleanup");
                std::process::exit(130);
            }
        }
    });
    rx
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
